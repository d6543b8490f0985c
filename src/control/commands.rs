//! One small handler per remote-control command; replies shaped exactly
//! like a Python worker's (SPEC §5.4, `tests/vectors/pidbox/`).

use std::sync::atomic::Ordering;

use serde_json::{json, Map, Value};

use super::Request;
use crate::protocol::task_message::format_time;
use crate::protocol::{State, StateDoc};
use crate::worker::{rate_limit, Ctx, Phase, Stop};

/// Runs a command; `None` means "send no reply" (casts like `shutdown`).
pub(super) async fn dispatch(ctx: &Ctx, req: &Request) -> Option<Value> {
    let args = &req.arguments;
    let reply = match req.method.as_str() {
        "ping" => json!({"ok": "pong"}),
        "stats" => stats(ctx),
        "active" => active(ctx, args),
        "reserved" => list_phase(ctx, Phase::Reserved, false),
        "scheduled" => scheduled(ctx),
        "registered" => registered(ctx, args),
        "active_queues" => active_queues(ctx),
        "revoked" => json!(ctx.revoked.ids()),
        "conf" => conf(ctx),
        "report" => json!({"ok": report(ctx)}),
        "clock" => json!({"clock": ctx.events.clock.tick()}),
        "query_task" => query_task(ctx, args),
        "memsample" => json!(format!("{:.2}MiB", rss_kib() as f64 / 1024.0)),
        "hello" => hello(ctx, args),
        "revoke" => revoke(ctx, args, arg_bool(args, "terminate")).await,
        "terminate" => revoke(ctx, args, true).await,
        "rate_limit" => set_rate_limit(ctx, args),
        "time_limit" => set_time_limit(ctx, args),
        "add_consumer" => add_consumer(ctx, args).await,
        "cancel_consumer" => cancel_consumer(ctx, args),
        "enable_events" => {
            if ctx.events.set_task_events(true) {
                json!({"ok": "task events already enabled"})
            } else {
                tracing::info!("task events enabled by remote control");
                json!({"ok": "task events enabled"})
            }
        }
        "disable_events" => {
            if ctx.events.set_task_events(false) {
                tracing::info!("task events disabled by remote control");
                json!({"ok": "task events disabled"})
            } else {
                json!({"ok": "task events already disabled"})
            }
        }
        "heartbeat" => {
            let mut fields = Map::new();
            fields.insert("freq".into(), json!(5));
            fields.insert("sw_ident".into(), json!(crate::events::SW_IDENT));
            fields.insert("sw_ver".into(), json!(crate::events::SW_VER));
            fields.insert("sw_sys".into(), json!("Linux"));
            ctx.events.send("worker-heartbeat", fields).await;
            Value::Null
        }
        "shutdown" => {
            tracing::warn!("shutdown requested by remote control");
            ctx.stop_tx.send_replace(Stop::Warm);
            return None;
        }
        "pool_grow" => {
            let n = args.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
            ctx.grow_pool(n);
            tracing::info!(n, size = ctx.pool.size(), "pool grown by remote control");
            json!({"ok": "pool will grow"})
        }
        "pool_shrink" => {
            let n = args.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
            if ctx.pool.size() <= n {
                json!({"error": "Can't shrink the pool below one process"})
            } else {
                // Slots are taken back as tasks finish; reply at once, as
                // Celery does.
                tracing::info!(n, "pool shrink requested by remote control");
                tokio::spawn(ctx.shrink_pool(n));
                json!({"ok": "pool will shrink"})
            }
        }
        "autoscale" => match &ctx.autoscaler {
            None => json!({"error": "ValueError('Autoscale not enabled')"}),
            Some(a) => {
                let arg = |k: &str| {
                    args.get(k).and_then(|v| {
                        v.as_u64()
                            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    })
                };
                let max = arg("max").map(|n| n as usize);
                let min = arg("min").map(|n| n as usize);
                match a.update(max, min) {
                    Ok((max, min)) => {
                        tracing::info!(max, min, "autoscale bounds changed by remote control");
                        json!({"ok": format!("autoscale now max={max} min={min}")})
                    }
                    Err(e) => json!({"error": e}),
                }
            }
        },
        // Celery's answer without `worker_pool_restarts`. There are no
        // modules to reload: each process starts afresh with the tasks
        // built into the binary (and loads the model again when used).
        "pool_restart" if !ctx.cfg.pool_restarts => {
            json!({"error": "ValueError('Pool restarts not enabled')"})
        }
        "pool_restart" => match ctx.pool.restart() {
            Ok(()) => {
                tracing::info!(
                    "pool processes replaced by remote control, each after its current task"
                );
                json!({"ok": "reload started"})
            }
            Err(e) => json!({"error": e}),
        },
        // Fault injection for tests: a command whose handling panics.
        "tori_chaos_panic" if ctx.cfg.enable_chaos_tasks => {
            panic!("chaos: control command panic requested")
        }
        other => json!({"error": format!("KeyError('{other}')")}),
    };
    Some(reply)
}

fn arg_bool(args: &Map<String, Value>, key: &str) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn arg_str<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn active(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    list_phase(ctx, Phase::Active, arg_bool(args, "safe"))
}

fn list_phase(ctx: &Ctx, phase: Phase, safe: bool) -> Value {
    let node = &ctx.cfg.node_name;
    Value::Array(
        ctx.inflight
            .in_phase(phase)
            .iter()
            .map(|e| e.request_info(node, safe))
            .collect(),
    )
}

fn scheduled(ctx: &Ctx) -> Value {
    let node = &ctx.cfg.node_name;
    Value::Array(
        ctx.inflight
            .in_phase(Phase::Scheduled)
            .iter()
            .map(|e| {
                json!({
                    "eta": e.eta.map(format_time),
                    "priority": e.priority,
                    "request": e.request_info(node, false),
                })
            })
            .collect(),
    )
}

/// `["name", ...]`, or `"name [attr=value ...]"` for requested attributes.
fn registered(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let wanted: Vec<String> = args
        .get("taskinfoitems")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let names: Vec<Value> = ctx
        .registry
        .describe()
        .into_iter()
        .map(|info| {
            let rate = ctx
                .rate_limits
                .get(&info.name)
                .map(|r| r.map(|per_s| format!("{per_s}/s")))
                .unwrap_or(info.rate_limit.clone());
            let mut attrs = Vec::new();
            for item in &wanted {
                let value = match item.as_str() {
                    "rate_limit" => rate.clone(),
                    "time_limit" => info.time_limit.map(|t| t.to_string()),
                    "soft_time_limit" => info.soft_time_limit.map(|t| t.to_string()),
                    "acks_late" => {
                        info.acks_late
                            .map(|a| if a { "True".into() } else { "False".into() })
                    }
                    "ignore_result" => info.ignore_result.then(|| "True".into()),
                    _ => None,
                };
                if let Some(v) = value {
                    attrs.push(format!("{item}={v}"));
                }
            }
            if attrs.is_empty() {
                json!(info.name)
            } else {
                json!(format!("{} [{}]", info.name, attrs.join(" ")))
            }
        })
        .collect();
    Value::Array(names)
}

fn queue_object(name: &str) -> Value {
    json!({
        "name": name,
        "exchange": {"name": name, "type": "direct", "arguments": null, "durable": true,
                     "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": name,
        "queue_arguments": null,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": null,
    })
}

fn active_queues(ctx: &Ctx) -> Value {
    Value::Array(ctx.queues().iter().map(|q| queue_object(q)).collect())
}

fn conf(ctx: &Ctx) -> Value {
    let c = &ctx.cfg;
    json!({
        "broker_url": c.broker.redacted(),
        "result_backend": c.backend.redacted(),
        "worker_concurrency": c.concurrency,
        "worker_pool": format!("{:?}", c.pool).to_lowercase(),
        "worker_prefetch_multiplier": c.prefetch_multiplier,
        "worker_send_task_events": ctx.events.task_events_enabled(),
        "task_acks_late": c.acks_late,
        "task_track_started": c.track_started,
        "task_time_limit": c.default_time_limit,
        "task_soft_time_limit": c.default_soft_time_limit,
        "task_reject_on_worker_lost": c.reject_on_worker_lost,
        "result_expires": c.result_expires.map(|d| d.as_secs()),
        "result_extended": c.result_extended,
        "worker_max_tasks_per_child": c.max_tasks_per_child,
        "worker_max_memory_per_child": c.max_memory_per_child_kib,
        "broker_transport_options": broker_transport_options(c),
        "broker_use_ssl": c.broker.tls.is_some(),
        "redis_backend_use_ssl": c.backend.tls.is_some(),
        "task_queues": ctx.queues(),
    })
}

/// The transport options in effect, without secrets (the sentinels'
/// password is never shown).
fn broker_transport_options(c: &crate::config::WorkerConfig) -> Value {
    let mut options = json!({
        "visibility_timeout": c.visibility_timeout.as_secs_f64(),
        "global_keyprefix": c.key_prefix,
    });
    if let crate::redis_url::Endpoint::Sentinel { master_name, .. } = &c.broker.endpoint {
        options["master_name"] = json!(master_name);
    }
    options
}

fn report(ctx: &Ctx) -> String {
    format!(
        "software -> {} {} (Rust)\nnode -> {}\npool -> {} x{}\nbroker -> {}\nqueues -> {}\n",
        crate::events::SW_IDENT,
        crate::events::SW_VER,
        ctx.cfg.node_name,
        ctx.pool.kind(),
        ctx.pool.size(),
        ctx.cfg.broker.redacted(),
        ctx.queues().join(", "),
    )
}

/// Task ids given as one string or a list, as Celery's tools send them.
fn id_list(args: &Map<String, Value>, key: &str) -> Vec<String> {
    match args.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn query_task(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let ids = id_list(args, "ids");
    let node = &ctx.cfg.node_name;
    let mut out = Map::new();
    for id in ids {
        if let Some(e) = ctx.inflight.by_task_id(&id) {
            let state = match e.phase {
                Phase::Active => "active",
                Phase::Scheduled => "scheduled",
                Phase::Reserved | Phase::Restored => "reserved",
            };
            out.insert(id, json!([state, e.request_info(node, false)]));
        }
    }
    Value::Object(out)
}

fn hello(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    if let Some(Value::Array(ids)) = args.get("revoked") {
        for id in ids.iter().filter_map(Value::as_str) {
            ctx.revoked.add(id);
        }
    }
    if arg_str(args, "from_node") == Some(ctx.cfg.node_name.as_str()) {
        return Value::Null;
    }
    json!({"revoked": ctx.revoked.ids(), "clock": ctx.events.clock.tick()})
}

/// Revokes ids: remembered so their messages are discarded when reached;
/// REVOKED is written now for tasks not yet started (as Celery 5.7 does);
/// with `terminate`, running ones are killed.
async fn revoke(ctx: &Ctx, args: &Map<String, Value>, terminate: bool) -> Value {
    let ids = id_list(args, "task_id");
    let mut terminated = Vec::new();
    for id in &ids {
        ctx.revoked.add(id);
        let running = ctx
            .inflight
            .by_task_id(id)
            .filter(|e| e.phase == Phase::Active);
        match running {
            Some(entry) if terminate => {
                entry
                    .terminate_signal
                    .store(signal_number(args.get("signal")), Ordering::Relaxed);
                entry.terminate.notify_one();
                terminated.push(id.clone());
            }
            Some(_) => {}
            None => {
                let state = ctx.backend.state_of(id).await.ok().flatten();
                if matches!(
                    state.as_deref(),
                    None | Some("PENDING") | Some("RETRY") | Some("RECEIVED")
                ) {
                    let doc = StateDoc::new(
                        id,
                        State::Revoked,
                        crate::protocol::result::exception_value(
                            "celery.exceptions",
                            "TaskRevokedError",
                            &[json!("revoked")],
                        ),
                    );
                    if let Err(e) = ctx.backend.store(&doc).await {
                        tracing::warn!(task_id = %id, error = %e, "could not store REVOKED");
                    }
                }
            }
        }
    }
    tracing::warn!(ids = ?ids, terminate, "tasks revoked by remote control");
    ctx.save_state();
    if terminate {
        if terminated.is_empty() {
            json!({"ok": "terminate: tasks unknown"})
        } else {
            json!({"ok": format!("terminate: {}", terminated.join(", "))})
        }
    } else {
        let set: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
        json!({"ok": format!("tasks {{{}}} flagged as revoked", set.join(", "))})
    }
}

/// Celery accepts `"SIGTERM"`, `"TERM"`, `"KILL"` or a number.
fn signal_number(value: Option<&Value>) -> i32 {
    match value {
        Some(Value::Number(n)) => n.as_i64().map(|n| n as i32).unwrap_or(15),
        Some(Value::String(s)) => match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
            "KILL" => 9,
            "INT" => 2,
            "QUIT" => 3,
            "HUP" => 1,
            "USR1" => 10,
            "USR2" => 12,
            _ => 15,
        },
        _ => 15,
    }
}

fn set_rate_limit(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let Some(task) = arg_str(args, "task_name") else {
        return json!({"error": "task_name is required"});
    };
    if ctx.registry.get(task).is_none() {
        return json!({"error": "unknown task"});
    }
    let rate = match args.get("rate_limit") {
        Some(Value::String(s)) => rate_limit::parse_rate(s),
        Some(Value::Number(n)) => Ok(n.as_f64().filter(|r| *r > 0.0)),
        _ => Ok(None),
    };
    match rate {
        Err(e) => json!({"error": format!("Invalid rate limit string: {e}")}),
        Ok(None) => {
            ctx.rate_limits.set(task, None);
            tracing::info!(task, "rate limit disabled by remote control");
            json!({"ok": "rate limit disabled successfully"})
        }
        Ok(Some(per_second)) => {
            ctx.rate_limits.set(task, Some(per_second));
            tracing::info!(task, per_second, "rate limit set by remote control");
            json!({"ok": "new rate limit set successfully"})
        }
    }
}

fn set_time_limit(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let Some(task) = arg_str(args, "task_name") else {
        return json!({"error": "task_name is required"});
    };
    if ctx.registry.get(task).is_none() {
        return json!({"error": "unknown task"});
    }
    let soft = args
        .get("soft")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0);
    let hard = args
        .get("hard")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0);
    ctx.time_limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(task.to_owned(), (soft, hard));
    json!({"ok": "time limits set successfully"})
}

async fn add_consumer(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let Some(queue) = arg_str(args, "queue").filter(|q| !q.is_empty()) else {
        return json!({"error": "queue is required"});
    };
    {
        let mut queues = ctx.queues.write().unwrap_or_else(|p| p.into_inner());
        if queues.iter().any(|q| q == queue) {
            return json!({"ok": format!("already consuming from '{queue}'")});
        }
        queues.push(queue.to_owned());
    }
    if let Err(e) = ctx.broker.declare_queues(&[queue.to_owned()]).await {
        tracing::warn!(queue, error = %e, "could not declare the new queue's binding");
    }
    tracing::info!(queue, "consuming from a new queue (remote control)");
    json!({"ok": format!("add consumer {queue}")})
}

fn cancel_consumer(ctx: &Ctx, args: &Map<String, Value>) -> Value {
    let Some(queue) = arg_str(args, "queue") else {
        return json!({"error": "queue is required"});
    };
    ctx.queues
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|q| q != queue);
    tracing::info!(queue, "no longer consuming from queue (remote control)");
    json!({"ok": format!("no longer consuming from {queue}")})
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// getrusage-like numbers from /proc (Flower shows them on the worker page).
fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let maxrss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    // /proc/self/stat: minflt=8, majflt=10, utime=12, stime=13 (0-based
    // after the name).
    json!({
        "utime": ticks(11), "stime": ticks(12), "maxrss": maxrss,
        "ixrss": 0, "idrss": 0, "isrss": 0,
        "minflt": num(7), "majflt": num(9), "nswap": 0,
        "inblock": 0, "oublock": 0, "msgsnd": 0, "msgrcv": 0, "nsignals": 0,
        "nvcsw": 0, "nivcsw": 0,
    })
}

fn stats(ctx: &Ctx) -> Value {
    let c = &ctx.cfg;
    let totals = ctx.totals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let settings = ctx.broker.link().settings();
    let (hostname, port) = match &settings.endpoint {
        crate::redis_url::Endpoint::Tcp { host, port } => (json!(host), json!(port)),
        crate::redis_url::Endpoint::Unix { path } => {
            (json!(path.display().to_string()), Value::Null)
        }
        crate::redis_url::Endpoint::Sentinel { nodes, .. } => nodes
            .first()
            .map(|(h, p)| (json!(h), json!(p)))
            .unwrap_or((Value::Null, Value::Null)),
    };
    let ssl = settings.tls.is_some();
    json!({
        "total": totals,
        "pid": std::process::id(),
        "clock": ctx.events.clock.value().to_string(),
        "uptime": ctx.started_at.elapsed().as_secs(),
        "pool": {
            "implementation": format!("tori_worker.pool:{}", ctx.pool.kind()),
            "max-concurrency": ctx.pool.size(),
            "processes": ctx.pool.pids(),
            "max-tasks-per-child": c.max_tasks_per_child.map(|n| json!(n)).unwrap_or(json!("N/A")),
            "put-guarded-by-semaphore": false,
            "timeouts": [c.default_soft_time_limit.unwrap_or(0.0), c.default_time_limit.unwrap_or(0.0)],
            "writes": {"total": ctx.processed.load(Ordering::Relaxed)},
        },
        "autoscaler": ctx.autoscaler.as_ref().map(|a| a.info(ctx)).unwrap_or_else(|| json!({})),
        "broker": {
            "hostname": hostname,
            "userid": settings.username,
            "virtual_host": settings.db.to_string(),
            "port": port,
            "insist": false,
            "ssl": ssl,
            "transport": "redis",
            "connect_timeout": 5,
            "transport_options": {"visibility_timeout": c.visibility_timeout.as_secs_f64()},
            "login_method": null,
            "uri_prefix": null,
            "heartbeat": null,
            "failover_strategy": "round-robin",
            "alternates": [],
            "credential_provider": null,
        },
        "prefetch_count": ctx.pool.size() * c.prefetch_multiplier,
        "rusage": rusage(),
        "sw_ident": crate::events::SW_IDENT,
        "sw_ver": crate::events::SW_VER,
    })
}
