//! Prometheus metrics and a health check over plain HTTP
//! (`--metrics-addr`): `/metrics` in the text exposition format,
//! `/healthz` for orchestrators — unhealthy when consumption has stalled.
//!
//! A tiny hand-written HTTP/1.1 responder: two read-only GET endpoints do
//! not justify an HTTP framework in the worker.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::worker::{Ctx, Phase};

/// Runtime histogram buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Counters by task name, kept by the worker as tasks move through it.
#[derive(Debug, Default)]
pub struct Metrics {
    events: Mutex<BTreeMap<(String, &'static str), u64>>,
    runtimes: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    /// `kind`: received, succeeded, failed, retried, revoked, rejected.
    pub fn count(&self, task: &str, kind: &'static str) {
        *self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((task.to_owned(), kind))
            .or_default() += 1;
    }

    pub fn runtime(&self, task: &str, seconds: f64) {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let h = map.entry(task.to_owned()).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Seconds since the consumer last completed a poll of Redis.
pub fn seconds_since_poll(ctx: &Ctx) -> f64 {
    let last = ctx.last_poll_ok_ms.load(Ordering::Relaxed);
    (chrono::Utc::now().timestamp_millis() - last).max(0) as f64 / 1000.0
}

/// The consumer polls at least every second while it has capacity; when
/// every slot is busy it does not poll, so a busy worker is healthy too.
pub fn healthy(ctx: &Ctx) -> bool {
    let busy = ctx.prefetch.available_permits() == 0;
    busy || ctx.stopping() || seconds_since_poll(ctx) < 30.0
}

pub async fn render(ctx: &Ctx) -> String {
    let mut out = String::new();
    let node = label(&ctx.cfg.node_name);
    let _ = writeln!(
        out,
        "# HELP tori_tasks_total Tasks by name and outcome.\n# TYPE tori_tasks_total counter"
    );
    for ((task, kind), n) in ctx
        .metrics
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "tori_tasks_total{{worker=\"{node}\",task=\"{}\",state=\"{kind}\"}} {n}",
            label(task)
        );
    }
    let _ = writeln!(out, "# HELP tori_task_runtime_seconds Task run time.\n# TYPE tori_task_runtime_seconds histogram");
    for (task, h) in ctx
        .metrics
        .runtimes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let t = label(task);
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "tori_task_runtime_seconds_bucket{{worker=\"{node}\",task=\"{t}\",le=\"{bound}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(
            out,
            "tori_task_runtime_seconds_bucket{{worker=\"{node}\",task=\"{t}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "tori_task_runtime_seconds_sum{{worker=\"{node}\",task=\"{t}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "tori_task_runtime_seconds_count{{worker=\"{node}\",task=\"{t}\"}} {}",
            h.count
        );
    }
    let _ = writeln!(out, "# HELP tori_queue_length Messages waiting, all priorities.\n# TYPE tori_queue_length gauge");
    if let Ok(lengths) = ctx.broker.queue_lengths(&ctx.queues()).await {
        for (q, n) in lengths {
            let _ = writeln!(out, "tori_queue_length{{queue=\"{}\"}} {n}", label(&q));
        }
    }
    let size = ctx.pool.size();
    let busy = ctx.inflight.count(Phase::Active).min(size);
    let _ = writeln!(
        out,
        "# TYPE tori_pool_size gauge\ntori_pool_size{{worker=\"{node}\"}} {size}"
    );
    let _ = writeln!(
        out,
        "# TYPE tori_pool_busy gauge\ntori_pool_busy{{worker=\"{node}\"}} {busy}"
    );
    let _ = writeln!(
        out,
        "# TYPE tori_pool_idle gauge\ntori_pool_idle{{worker=\"{node}\"}} {}",
        size - busy
    );
    let _ = writeln!(out, "# HELP tori_pool_restarts_total Pool processes replaced, by cause.\n# TYPE tori_pool_restarts_total counter");
    for (cause, n) in ctx.pool.restarts() {
        let _ = writeln!(
            out,
            "tori_pool_restarts_total{{worker=\"{node}\",cause=\"{cause}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP tori_last_poll_timestamp_seconds Last successful broker poll.\n# TYPE tori_last_poll_timestamp_seconds gauge\ntori_last_poll_timestamp_seconds{{worker=\"{node}\"}} {}",
        ctx.last_poll_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "# TYPE tori_processed_total counter\ntori_processed_total{{worker=\"{node}\"}} {}",
        ctx.processed.load(Ordering::Relaxed)
    );
    let dead = ctx.broker.dead_letter_counts();
    let _ = writeln!(
        out,
        "# HELP tori_dead_letters_total Messages this worker moved to the dead-letter list.\n# TYPE tori_dead_letters_total counter\ntori_dead_letters_total{{worker=\"{node}\"}} {}",
        dead.written.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP tori_dead_letters_trimmed_total Oldest dead-letter records dropped by this worker's pushes (--dead-letter-max).\n# TYPE tori_dead_letters_trimmed_total counter\ntori_dead_letters_trimmed_total{{worker=\"{node}\"}} {}",
        dead.trimmed.load(Ordering::Relaxed)
    );
    out
}

/// Serves until the worker stops.
pub async fn serve(ctx: Arc<Ctx>, addr: String) {
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen for metrics");
            return;
        }
    };
    tracing::info!(%addr, "metrics on /metrics, health on /healthz");
    loop {
        let (mut sock, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = ctx.stopped() => return,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path.split('?').next().unwrap_or("/") {
                "/metrics" => ("200 OK", render(&ctx).await),
                "/healthz" if healthy(&ctx) => ("200 OK", "ok\n".to_owned()),
                "/healthz" => (
                    "503 Service Unavailable",
                    format!(
                        "stalled: no broker poll for {:.0}s\n",
                        seconds_since_poll(&ctx)
                    ),
                ),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}
