//! `--autoscale MAX,MIN`: Celery's autoscaler for the prefork pool.
//!
//! Once a second it compares demand (tasks running, reserved here, and
//! messages waiting on the consumed queues) with the pool size: it adds
//! processes at once up to MAX when demand exceeds the pool, and retires
//! idle processes down to MIN only after demand has stayed below the pool
//! size for [`keepalive`], so a bursty queue does not make processes (and
//! their warm models) come and go. Unlike Celery's, which only sees
//! prefetched messages, it also counts the queue itself, so a worker with
//! prefetch 1 still scales up under a backlog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Ctx, Phase, Stop};

/// How long demand must stay below the pool size before it shrinks: 30 s,
/// or seconds from `AUTOSCALE_KEEPALIVE` (Celery's environment variable).
pub fn keepalive() -> Duration {
    std::env::var("AUTOSCALE_KEEPALIVE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
}
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Autoscaler {
    /// `(max, min)`.
    bounds: Mutex<(usize, usize)>,
    /// When demand last filled the pool.
    last_busy: Mutex<Instant>,
    /// A shrink is waiting for processes to become idle.
    shrinking: Arc<AtomicBool>,
    keepalive: Duration,
}

impl Autoscaler {
    pub fn new(max: usize, min: usize) -> Self {
        Self {
            bounds: Mutex::new((max, min.max(1))),
            last_busy: Mutex::new(Instant::now()),
            shrinking: Arc::new(AtomicBool::new(false)),
            keepalive: keepalive(),
        }
    }

    pub fn bounds(&self) -> (usize, usize) {
        *self.bounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `autoscale` control command: missing values keep their current
    /// setting; returns the new `(max, min)`.
    pub fn update(&self, max: Option<usize>, min: Option<usize>) -> Result<(usize, usize), String> {
        let mut b = self.bounds.lock().unwrap_or_else(|p| p.into_inner());
        let max = max.unwrap_or(b.0);
        let min = min.unwrap_or(b.1).max(1);
        if max < min {
            return Err(format!("ValueError('max ({max}) must be >= min ({min})')"));
        }
        *b = (max, min);
        Ok(*b)
    }

    /// What `inspect stats` reports under `autoscaler`.
    pub fn info(&self, ctx: &Ctx) -> Value {
        let (max, min) = self.bounds();
        json!({
            "max": max,
            "min": min,
            "current": ctx.pool.size(),
            "qty": ctx.inflight.in_phase(Phase::Reserved).len(),
        })
    }

    fn touch(&self) {
        *self.last_busy.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// One decision.
    async fn step(&self, ctx: &Ctx) {
        let (max, min) = self.bounds();
        let size = ctx.pool.size();
        let running = ctx.inflight.in_phase(Phase::Active).len();
        let reserved = ctx.inflight.in_phase(Phase::Reserved).len();
        let waiting: u64 = match ctx.broker.queue_lengths(&ctx.queues()).await {
            Ok(lengths) => lengths.iter().map(|(_, n)| n).sum(),
            Err(e) => {
                tracing::debug!(error = %e, "autoscaler: queue lengths unavailable");
                0
            }
        };
        let demand = running + reserved + usize::try_from(waiting).unwrap_or(usize::MAX);
        let want = demand.clamp(min, max);
        if demand >= size {
            self.touch();
        }
        if want > size {
            tracing::info!(from = size, to = want, demand, "autoscaler: scaling up");
            ctx.grow_pool(want - size);
            return;
        }
        let over_max = size > max;
        if want < size
            && (over_max || self.idle_for() >= self.keepalive)
            && !self.shrinking.swap(true, Ordering::AcqRel)
        {
            let n = size - want;
            tracing::info!(from = size, to = want, demand, "autoscaler: scaling down");
            let shrink = ctx.shrink_pool(n);
            let flag = self.shrinking.clone();
            tokio::spawn(async move {
                shrink.await;
                flag.store(false, Ordering::Release);
            });
        }
    }
}

/// The autoscaler loop (returns at once without `--autoscale`).
pub async fn run(ctx: Arc<Ctx>) {
    let Some(scaler) = ctx.autoscaler.as_ref() else {
        return;
    };
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => {}
        }
        if *ctx.stop.borrow() != Stop::Running {
            return;
        }
        scaler.step(&ctx).await;
    }
}
