//! One message's life, from the moment it is reserved to its ack.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tasks::{CancelFlag, ProgressSink};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

use super::handler_panic;
use super::inflight::{Entry, InFlight, Phase};
use super::outcome::{self, Finish};
use super::unrunnable::{self, Unrunnable};
use super::Ctx;
use crate::broker::Delivery;
use crate::pool::Job;
use crate::protocol::result::exception_value;
use crate::protocol::task_message::attribute;
use crate::protocol::{DecodeError, State, StateDoc, TaskMessage};

/// Decodes a delivery and records it as held, synchronously, so that a
/// shutdown starting right after the fetch already knows about it. Returns
/// the rest of its life as a future (malformed and refused messages are
/// dead-lettered or failed inside it).
pub(crate) fn accept(
    ctx: Arc<Ctx>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let tag = delivery.envelope.delivery_tag().to_owned();
    let large = (delivery.raw.len() >= crate::memory::LARGE_MESSAGE)
        .then(crate::memory::LargeMessage::begin);
    let decoded = handler_panic::decode(&ctx, &delivery.envelope);
    let (task_id, task_name) = match &decoded {
        Ok(m) => (m.id.clone(), m.task.clone()),
        Err(DecodeError::Refused {
            task_id, task_name, ..
        }) => (task_id.clone(), task_name.clone().unwrap_or_default()),
        Err(_) => attribute(&delivery.envelope)
            .map(|(id, name)| (id, name.unwrap_or_default()))
            .unwrap_or_default(),
    };
    let msg = decoded.as_ref().ok();
    let env = &delivery.envelope;
    let serial = InFlight::next_serial();
    ctx.inflight.insert(
        &tag,
        Entry {
            serial,
            task_id: task_id.clone(),
            task_name: task_name.clone(),
            queue: delivery.queue.clone(),
            phase: Phase::Reserved,
            acked: false,
            settling: false,
            eta: msg.and_then(|m| m.eta),
            args: msg.map(|m| json!(m.args)).unwrap_or(json!([])),
            kwargs: msg.map(|m| json!(m.kwargs)).unwrap_or(json!({})),
            argsrepr: msg.map(argsrepr).unwrap_or_default(),
            kwargsrepr: msg.map(kwargsrepr).unwrap_or_default(),
            time_start: None,
            worker_pid: Arc::default(),
            exchange: env.exchange().to_owned(),
            routing_key: env.routing_key().to_owned(),
            priority: env.priority(),
            redelivered: env.redelivered(),
            terminate: Arc::default(),
            terminate_signal: Arc::new(std::sync::atomic::AtomicI32::new(15)),
        },
    );
    let span = tracing::info_span!("task", task_id = %task_id, task_name = %task_name);
    // Boxed here: the state of a message's whole life is large, and moving
    // it by value through `spawn` into the task cell was ~5 % of the
    // parent's time on a no-op drain (memmove); a box moves one pointer.
    Box::pin(
        async move {
            let handled = AssertUnwindSafe(handle(&ctx, &delivery, &tag, decoded, permit))
                .catch_unwind()
                .await;
            if let Err(payload) = handled {
                // Settling may run the code that panicked again (a chord
                // header's count); a second panic must not strand the
                // message either. Its entry still goes below, so its lease
                // is no longer renewed: a message not yet acked comes back
                // after the visibility timeout (and is acked without
                // running if a final state was stored by then).
                let settled =
                    AssertUnwindSafe(handler_panic::recover(&ctx, &delivery, &tag, serial, payload))
                        .catch_unwind()
                        .await;
                if settled.is_err() {
                    tracing::error!("settling a message whose handling panicked panicked too; if it was not acked yet, it comes back after the visibility timeout");
                    // Counted, so that a bug hit in every round ends in the
                    // dead-letter list rather than looping for ever.
                    let unacked = ctx.inflight.view(&tag, |e| {
                        e.serial == serial && !e.acked && e.phase != Phase::Restored
                    }) == Some(true);
                    if unacked {
                        if let Err(e) = ctx.broker.count_unsettled_round(&tag).await {
                            tracing::warn!(error = %e, "could not count the unsettled round");
                        }
                    }
                }
            }
            // A message abandoned because the worker is stopping stays in
            // the table: shutdown puts it back on its queue.
            let abandoned = ctx.stopping()
                && ctx.inflight.view(&tag, |e| {
                    e.serial == serial
                        && !e.acked
                        && matches!(e.phase, Phase::Reserved | Phase::Scheduled)
                }) == Some(true);
            if !abandoned {
                ctx.inflight.remove_delivery(&tag, serial);
            }
            if let Some(large) = large {
                drop(delivery);
                ctx.shed_large_message(large).await;
            }
        }
        .instrument(span),
    )
}

/// A decoded message's life; malformed and refused ones are dead-lettered
/// or failed here.
async fn handle(
    ctx: &Arc<Ctx>,
    delivery: &Delivery,
    tag: &str,
    decoded: Result<TaskMessage, DecodeError>,
    permit: OwnedSemaphorePermit,
) {
    match decoded {
        Ok(msg) => life(ctx, delivery, tag, msg, permit).await,
        Err(DecodeError::Refused {
            content_type,
            task_id,
            ..
        }) => {
            refuse(ctx, delivery, tag, &task_id, &content_type).await;
        }
        Err(e) => {
            let settled = unrunnable::settle(
                ctx.unrunnable_handles(),
                Unrunnable {
                    queue: &delivery.queue,
                    tag,
                    raw: &delivery.raw,
                    task: attribute(&delivery.envelope),
                    exception: e.exception(),
                    reason: e.to_string(),
                },
            )
            .await;
            if settled {
                ctx.inflight.mark_acked(tag);
            }
        }
    }
}

/// The args repr Celery shows in events and `inspect`: the producer's
/// `argsrepr` header when present.
fn argsrepr(m: &TaskMessage) -> String {
    m.argsrepr.clone().unwrap_or_else(|| {
        let parts: Vec<String> = m.args.iter().map(tasks::task::py_repr).collect();
        if parts.len() == 1 {
            format!("({},)", parts[0])
        } else {
            format!("({})", parts.join(", "))
        }
    })
}

fn kwargsrepr(m: &TaskMessage) -> String {
    m.kwargsrepr
        .clone()
        .unwrap_or_else(|| tasks::task::py_repr(&Value::Object(m.kwargs.clone())))
}

fn epoch() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6
}

/// Stores REVOKED and sends `task-revoked`.
pub(crate) async fn store_revoked(
    ctx: &Ctx,
    msg: &TaskMessage,
    tag: &str,
    reason: &str,
    signum: Option<i32>,
    expired: bool,
) {
    let task_id = &msg.id;
    let terminated = signum.is_some();
    let doc = StateDoc::new(
        task_id,
        State::Revoked,
        exception_value("celery.exceptions", "TaskRevokedError", &[json!(reason)]),
    );
    let declared = ctx
        .registry
        .get(&msg.task)
        .is_some_and(|t| t.options().ignore_result);
    let store = !msg.ignores_result(declared);
    record_final(ctx, msg, &doc, tag, store, true).await;
    let name = ctx
        .inflight
        .view(tag, |e| e.task_name.clone())
        .unwrap_or_default();
    ctx.metrics.count(&name, "revoked");
    ctx.events.task("task-revoked", |ev| {
        ev.field("uuid", &task_id)
            .field("terminated", &terminated)
            .field("signum", &signum)
            .field("expired", &expired);
    });
}

/// A pickle (or other refused) payload: tell the producer how to fix it.
async fn refuse(ctx: &Ctx, delivery: &Delivery, tag: &str, task_id: &str, content_type: &str) {
    let hint = if content_type == "application/x-python-serialize" {
        " (pickle)"
    } else {
        ""
    };
    let message = format!(
        "Refusing to deserialize a message of content type {content_type:?}{hint}: tori-worker only \
         accepts JSON and msgpack. Configure the producer with task_serializer='json' \
         (and accept_content=['json'])."
    );
    tracing::error!(queue = %delivery.queue, %content_type, "refused message content type; storing FAILURE");
    let doc = StateDoc::new(
        task_id,
        State::Failure,
        exception_value("kombu.exceptions", "ContentDisallowed", &[json!(message)]),
    );
    store_then_ack(ctx, &doc, tag).await;
}

/// A task's final state: stored (unless `store` is false: the task
/// ignores its result), counted in its chord if it is a chord header
/// (Celery counts a header whether or not its result is stored, and a
/// revoked one too, so the body is failed rather than left waiting), then
/// acked if `ack_now`. A failed store leaves the message unacked, so it
/// runs again rather than lose its result or strand its chord; returns
/// false then.
pub(crate) async fn record_final(
    ctx: &Ctx,
    msg: &TaskMessage,
    doc: &StateDoc,
    tag: &str,
    store: bool,
    ack_now: bool,
) -> bool {
    if store {
        if let Err(e) = ctx.backend.store(doc).await {
            tracing::error!(error = %e, acks_late = ack_now, "could not store the result (a message not yet acked stays unacked and runs again)");
            return false;
        }
        handler_panic::chaos_point(ctx, msg, "stored");
    }
    if let Some(body) = &msg.chord {
        super::chord::part_return(ctx, msg, doc, body).await;
    }
    if ack_now {
        ack(ctx, tag).await;
    }
    true
}

/// Stores a document and acknowledges; if Redis refuses for good, the
/// message stays unacked and is restored later rather than lost.
pub(crate) async fn store_then_ack(ctx: &Ctx, doc: &StateDoc, tag: &str) {
    store_then_ack_unless_acked(ctx, doc, tag, false).await;
}

/// [`store_then_ack`] for a message that may already be acked (then only
/// the store); whether the state was stored.
pub(crate) async fn store_then_ack_unless_acked(
    ctx: &Ctx,
    doc: &StateDoc,
    tag: &str,
    acked: bool,
) -> bool {
    if let Err(e) = ctx.backend.store(doc).await {
        if acked {
            tracing::error!(error = %e, "could not store the result");
        } else {
            tracing::error!(error = %e, "could not store the result; leaving the message unacked for redelivery");
        }
        return false;
    }
    if !acked {
        ack(ctx, tag).await;
    }
    true
}

pub(crate) async fn ack(ctx: &Ctx, tag: &str) {
    match ctx.broker.ack(tag).await {
        Ok(()) => ctx.inflight.mark_acked(tag),
        Err(e) => tracing::error!(error = %e, "ack failed; the message may be redelivered"),
    }
}

async fn life(
    ctx: &Arc<Ctx>,
    delivery: &Delivery,
    tag: &str,
    msg: TaskMessage,
    permit: OwnedSemaphorePermit,
) {
    tracing::info!(queue = %delivery.queue, retries = msg.retries, protocol = msg.protocol, "task received");
    ctx.metrics.count(&msg.task, "received");

    // Celery's order: an unknown task fails in the consumer, a revoked or
    // already expired one is announced as revoked, and neither is
    // "received" (no task-received event; only the log line above).
    let Some(task) = ctx.registry.get(&msg.task) else {
        tracing::error!("received unregistered task; storing FAILURE NotRegistered");
        ctx.metrics.count(&msg.task, "failed");
        let doc = StateDoc::new(
            &msg.id,
            State::Failure,
            exception_value("celery.exceptions", "NotRegistered", &[json!(msg.task)]),
        );
        store_then_ack(ctx, &doc, tag).await;
        ctx.events.task("task-failed", |ev| {
            ev.field("uuid", &msg.id)
                .field("exception", &format!("NotRegistered('{}')", msg.task));
        });
        return;
    };
    handler_panic::chaos_point(ctx, &msg, "received");
    if ctx.revoked.contains(&msg.id) {
        tracing::warn!("task was revoked; discarding it");
        store_revoked(ctx, &msg, tag, "revoked", None, false).await;
        return;
    }
    if revoke_if_expired(ctx, &msg, tag).await {
        return;
    }

    ctx.events.task("task-received", |ev| {
        ev.field("uuid", &msg.id)
            .field("name", &msg.task)
            .field("args", &argsrepr(&msg))
            .field("kwargs", &kwargsrepr(&msg))
            .field("root_id", &msg.root_id)
            .field("parent_id", &msg.parent_id)
            .field("retries", &msg.retries)
            .field(
                "eta",
                &msg.eta.map(crate::protocol::task_message::format_time),
            )
            .field(
                "expires",
                &msg.expires.map(crate::protocol::task_message::format_time),
            );
    });

    // A redelivery of a task that already finished (the worker died between
    // storing the result and acking) must not run again.
    if delivery.envelope.redelivered() {
        match ctx.backend.state_of(&msg.id).await {
            Ok(Some(state)) if crate::backend::is_final(&state) => {
                tracing::warn!(%state, "redelivered task already finished; acknowledging without running it again");
                ack(ctx, tag).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not check the stored state of a redelivered task")
            }
        }
    }

    if let Some(eta) = msg.eta {
        let wait = (eta - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            if wait > ctx.cfg.eta_horizon
                || ctx.held_eta.load(std::sync::atomic::Ordering::Relaxed) >= ctx.cfg.max_held_eta
            {
                let due = eta.timestamp_millis() as f64 / 1000.0;
                // No longer this worker's to settle, even if a panic came
                // now; if parking fails, the lease is no longer renewed and
                // the visibility timeout puts the message back.
                ctx.inflight.advance(tag, Phase::Restored);
                match ctx.broker.park_eta(delivery, due).await {
                    Ok(_) => tracing::info!(%eta, "ETA is far off; parked in Redis until due"),
                    Err(e) => {
                        tracing::error!(error = %e, "could not park ETA message; it stays unacked and will be restored")
                    }
                }
                return;
            }
            ctx.inflight.advance(tag, Phase::Scheduled);
            // Waiting ETA tasks do not count against prefetch (as in Celery).
            drop(permit);
            ctx.held_eta
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%eta, "task scheduled");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.stopped() => {}
            }
            ctx.held_eta
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !ctx.inflight.advance(tag, Phase::Reserved) || ctx.stopping() {
                return; // shutdown puts it back
            }
            if revoke_if_expired(ctx, &msg, tag).await {
                return;
            }
            if ctx.revoked.contains(&msg.id) {
                store_revoked(ctx, &msg, tag, "revoked", None, false).await;
                return;
            }
            return run(ctx, delivery, tag, msg, task, None).await;
        }
    }
    run(ctx, delivery, tag, msg, task, Some(permit)).await
}

/// Expired tasks are never run: REVOKED `["expired"]`, as Celery does.
async fn revoke_if_expired(ctx: &Ctx, msg: &TaskMessage, tag: &str) -> bool {
    match msg.expires {
        Some(expires) if expires <= Utc::now() => {
            tracing::warn!(%expires, "task expired before it could run; storing REVOKED");
            store_revoked(ctx, msg, tag, "expired", None, true).await;
            true
        }
        _ => false,
    }
}

/// Forwards PROGRESS reports from the running task to the backend, in
/// order, and stops before the final state is written.
struct ChannelProgress(mpsc::UnboundedSender<Value>);

impl ProgressSink for ChannelProgress {
    fn progress(&self, meta: Value) {
        let _ = self.0.send(meta);
    }
}

fn log_failed_ack(acked: Result<(), redis::RedisError>) {
    if let Err(e) = acked {
        tracing::error!(error = %e, "early ack failed; the message will be redelivered after the visibility timeout");
    }
}

async fn run(
    ctx: &Arc<Ctx>,
    delivery: &Delivery,
    tag: &str,
    msg: TaskMessage,
    task: Arc<dyn tasks::DynTask>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let wait = ctx.rate_limits.reserve(&msg.task);
    if !wait.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.stopped() => return,
        }
    }
    let slot = tokio::select! {
        slot = ctx.pool.acquire() => slot,
        _ = ctx.stopped() => return, // still Reserved: shutdown puts it back
    };
    if ctx.revoked.contains(&msg.id) {
        store_revoked(ctx, &msg, tag, "revoked", None, false).await;
        return;
    }
    // It may have waited for the rate limit or a free process long enough
    // to expire; Celery checks again when it hands a task to the pool.
    if revoke_if_expired(ctx, &msg, tag).await {
        return;
    }
    if !ctx.inflight.advance(tag, Phase::Active) {
        return;
    }
    let Some((terminate, terminate_signal, worker_pid)) = ctx.inflight.view(tag, |e| {
        (
            e.terminate.clone(),
            e.terminate_signal.clone(),
            e.worker_pid.clone(),
        )
    }) else {
        return;
    };
    let options = task.options();
    let acks_late = options.acks_late.unwrap_or(ctx.cfg.acks_late);
    let hard = msg
        .time_limit
        .hard
        .or(options.time_limit)
        .or(ctx.cfg.default_time_limit);
    let soft = msg
        .time_limit
        .soft
        .or(options.soft_time_limit)
        .or(ctx.cfg.default_soft_time_limit);
    // PROGRESS reports are written from this handler while the pool runs
    // the job, in order, and all of them before the final state.
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Value>();
    let write_progress = |meta: Value| {
        let doc = StateDoc::new(&msg.id, State::Progress, meta);
        async move {
            if let Err(e) = ctx.backend.store(&doc).await {
                tracing::warn!(error = %e, "could not store PROGRESS");
            }
        }
    };
    let mut job = Job {
        task,
        id: msg.id.clone(),
        name: msg.task.clone(),
        args: msg.args.clone(),
        kwargs: msg.kwargs.clone(),
        retries: msg.retries,
        // Validated where they came from (message, task, command line);
        // a number that still is no duration means no limit, not a panic.
        soft_limit: soft.and_then(crate::protocol::limits::seconds),
        hard_limit: hard.and_then(crate::protocol::limits::seconds),
        cancel: Arc::new(CancelFlag::new()),
        progress: Arc::new(ChannelProgress(progress_tx)),
        terminate,
        terminate_signal,
        pid: worker_pid.clone(),
        handed_to: None,
    };
    let write_started = ctx.cfg.track_started && !msg.ignores_result(options.ignore_result);
    // `task-started` waits for the job to be in a process too, as Celery
    // sends it when the pool accepted the job; a process being replaced may
    // take seconds to start.
    let send_started = ctx.events.task_events_enabled();
    let handed_to = (write_started || send_started).then(|| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        job.handed_to = Some(tx);
        rx
    });
    ctx.inflight.set_started(tag, epoch());
    tracing::info!("task started");
    let started = Instant::now();
    let running = ctx.pool.run(slot, job);
    // An early ack goes out once the job is handed to the pool, as Celery
    // acks once the pool accepted it; it is deferred a moment (at most
    // `redis_batch::LINGER`) so that it shares a round trip with the next
    // write, often this task's STARTED or result. The message counts as
    // acked from here: a cold shutdown does not put it back, and it stops
    // counting against prefetch, as with kombu's QoS (which counts unacked
    // deliveries). If the ack fails, the lease is no longer renewed and
    // the visibility timeout restores the message: never lost either way.
    // One that shutdown already put back is not acked.
    let mut permit = permit;
    let early_ack = (!acks_late && ctx.inflight.mark_acked_unless_restored(tag)).then(|| {
        drop(permit.take());
        ctx.broker.ack_deferred(tag)
    });
    // STARTED names the process that has the job (Celery's pool process
    // writes its own pid): the pool says which once the job is in it, which
    // may be a process still starting. Still before the final state, which
    // this handler writes later; the event follows the stored state, as
    // every task event here does. A job that never reaches a process (the
    // pool closing) gets neither.
    if let Some(handed_to) = handed_to {
        if let Ok(pid) = handed_to.await {
            if write_started {
                let doc = StateDoc::new(
                    &msg.id,
                    State::Started,
                    json!({"pid": pid, "hostname": ctx.cfg.node_name}),
                );
                if let Err(e) = ctx.backend.store(&doc).await {
                    tracing::warn!(error = %e, "could not store STARTED");
                }
            }
            if send_started {
                ctx.events.task("task-started", |ev| {
                    ev.field("uuid", &msg.id);
                });
            }
        }
    }
    tokio::pin!(running);
    let result = loop {
        tokio::select! {
            biased;
            done = &mut running => break done,
            Some(meta) = progress_rx.recv() => {
                write_progress(meta).await;
                handler_panic::chaos_point(ctx, &msg, "running");
            }
        }
    };
    let runtime = started.elapsed();
    let result = result
        .unwrap_or_else(|_| crate::pool::JobOutcome::WorkerLost("the pool dropped the job".into()));
    while let Ok(meta) = progress_rx.try_recv() {
        write_progress(meta).await;
    }

    outcome::finish(
        ctx,
        Finish {
            delivery,
            tag,
            msg: &msg,
            options: &options,
            acks_late,
            runtime,
            soft_limit: soft,
        },
        result,
    )
    .await;
    // Usually it left with the result just written. If nothing was written
    // (an ignored result) it may still linger, to leave with other tasks'
    // acks: nothing waits on it, as its prefetch slot is already free.
    if let Some(pending) = early_ack {
        log_failed_ack(pending.await);
    }
    ctx.processed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A late-ack message's permit is held until it is settled (result
    // stored, acked or put back): a message put back must not be fetched
    // again by this worker while its first handler is still finishing.
    drop(permit);
}
