//! The worker: consumes, runs, reports — one message's life in one place.
//!
//! Loops running side by side:
//! - the consumer fetches only while a prefetch permit is free, so at most
//!   `concurrency × prefetch_multiplier` messages are held (ETA messages
//!   waiting in memory give their permit back);
//! - the lease keeper refreshes `unacked_index` scores of held messages,
//!   so no sweep (ours or a Python worker's) restores a long task;
//! - the sweeper restores other workers' expired messages and releases
//!   parked ETA messages that came due.
//!
//! Shutdown: warm puts every unstarted message back at once and waits for
//! running tasks; cold (or a warm timeout) puts back running late-ack
//! messages too. Nothing acked early is ever re-run; nothing unacked is
//! ever dropped. All of it ends by `--shutdown-timeout` (`deadline.rs`):
//! what Redis did not take back by then stays in `unacked` for the
//! visibility restore.

pub(crate) mod autoscale;
mod chain;
mod chord;
pub mod deadline;
mod handler_panic;
mod inflight;
mod message;
mod outcome;
pub(crate) mod rate_limit;
pub(crate) mod revoked;
mod supervise;
mod unrunnable;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tasks::Registry;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::backend::ResultBackend;
use crate::broker::{Broker, BrokerConfig, Fetched};
use crate::config::{PoolKind, WorkerConfig};
use crate::events::{worker_fields, Events};
use crate::pool::prefork::{PreforkConfig, PreforkPool};
use crate::pool::threads::ThreadPool;
use crate::pool::Pool;
use crate::redis_link::{Backoff, RedisLink};
use deadline::Deadlines;
pub use deadline::{Left, StopOutcome};
pub use inflight::{Entry, InFlight, Phase};

/// How the worker was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Finish running tasks (up to the soft shutdown timeout).
    Warm,
    /// Put everything back now.
    Cold,
}

/// `(soft, hard)` seconds set by the `time_limit` control command.
pub type TimeLimitOverride = (Option<f64>, Option<f64>);

/// Shared state of a running worker.
pub struct Ctx {
    pub cfg: WorkerConfig,
    pub broker: Broker,
    pub backend: ResultBackend,
    pub registry: Registry,
    pub pool: Arc<dyn Pool>,
    pub inflight: InFlight,
    pub prefetch: Arc<Semaphore>,
    pub held_eta: AtomicUsize,
    pub stop: watch::Receiver<Stop>,
    pub last_poll_ok_ms: AtomicI64,
    pub processed: AtomicU64,
    pub events: Events,
    pub metrics: crate::metrics::Metrics,
    pub revoked: revoked::Revoked,
    pub rate_limits: rate_limit::RateLimits,
    /// Time limits set at run time by `time_limit`.
    pub time_limits: Mutex<HashMap<String, TimeLimitOverride>>,
    /// Tasks finished per name (`inspect stats` → `total`).
    pub totals: Mutex<BTreeMap<String, u64>>,
    /// Consumed queues; `add_consumer`/`cancel_consumer` change it.
    pub queues: RwLock<Vec<String>>,
    pub started_at: Instant,
    /// Lets the `shutdown` control command stop the worker.
    pub stop_tx: watch::Sender<Stop>,
    /// Present with `--autoscale`.
    pub autoscaler: Option<autoscale::Autoscaler>,
    /// When the stop was first seen: the shutdown deadlines count from it.
    stop_seen_at: OnceLock<tokio::time::Instant>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("node", &self.cfg.node_name)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// After a message of [`crate::memory::LARGE_MESSAGE`] or more: the
    /// Redis connections that carried it (its fetch, its result, its
    /// dead-letter record) are renewed, since each keeps buffers the size
    /// of the largest thing it carried, and the allocator is asked to
    /// return what is free to the OS.
    ///
    /// `large` is kept a second longer, in the background: a renewed
    /// connection's task frees its buffers only once its last request is
    /// answered, and those frees should be returned at once too.
    pub(crate) async fn shed_large_message(&self, large: crate::memory::LargeMessage) {
        self.broker.link().renew().await;
        self.broker.blocking_link().renew().await;
        self.backend.link().renew().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Pages freed from another thread wait for their owner to
            // collect them: ask every runtime thread, as far as spawning
            // reaches them, while freed memory is still returned at once.
            let collects: Vec<_> = (0..8)
                .map(|_| tokio::spawn(async { crate::memory::release_to_os() }))
                .collect();
            for c in collects {
                let _ = c.await;
            }
            drop(large);
        });
        tracing::debug!("renewed Redis connections and released memory after a large message");
    }

    /// The handles that settling a message the worker will not run needs.
    pub(crate) fn unrunnable_handles(&self) -> unrunnable::Handles<'_> {
        unrunnable::Handles {
            backend: &self.backend,
            broker: &self.broker,
            events: &self.events,
            metrics: &self.metrics,
        }
    }

    /// Adds `n` pool processes and the prefetch room for them.
    pub fn grow_pool(&self, n: usize) {
        self.pool.grow(n);
        self.prefetch.add_permits(n * self.cfg.prefetch_multiplier);
    }

    /// Retires `n` pool processes as they become idle, and their prefetch
    /// room; the future completes when they are gone. The caller checks
    /// that at least one process stays.
    pub fn shrink_pool(&self, n: usize) -> impl std::future::Future<Output = ()> + Send + 'static {
        let pool = self.pool.clone();
        let prefetch = self.prefetch.clone();
        let fewer = n * self.cfg.prefetch_multiplier;
        async move {
            if let Err(e) = pool.shrink(n).await {
                tracing::warn!(error = %e, "pool shrink stopped");
            }
            if let Ok(permits) = prefetch.acquire_many(fewer as u32).await {
                permits.forget();
            }
            tracing::info!(size = pool.size(), "pool shrunk");
        }
    }

    /// Writes `--statedb` (revoked ids, clock) if configured; failures
    /// are logged (the ids stay in memory either way).
    pub fn save_state(&self) {
        if let Some(path) = &self.cfg.statedb {
            let state = self.revoked.to_state(self.events.clock.value());
            if let Err(e) = state.save(path) {
                tracing::error!(error = %e, "could not persist revoked ids");
            }
        }
    }

    pub fn count_finished(&self, task: &str) {
        *self
            .totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(task.to_owned())
            .or_default() += 1;
    }

    pub fn queues(&self) -> Vec<String> {
        self.queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn heartbeat_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        worker_fields(
            HEARTBEAT_FREQ,
            self.inflight.count(Phase::Active),
            self.processed.load(Ordering::Relaxed),
        )
    }

    /// A held message as named in the shutdown report.
    fn left(&self, tag: &str) -> Left {
        Left {
            delivery_tag: tag.to_owned(),
            task_id: self
                .inflight
                .view(tag, |e| e.task_id.clone())
                .unwrap_or_default(),
        }
    }

    pub fn stopping(&self) -> bool {
        *self.stop.borrow() != Stop::Running
    }

    /// Resolves when a stop is requested.
    pub async fn stopped(&self) {
        let mut rx = self.stop.clone();
        let _ = rx.wait_for(|s| *s != Stop::Running).await;
    }

    /// Resolves when a cold stop is requested (a second signal).
    async fn stopped_cold(&self) {
        let mut rx = self.stop.clone();
        let _ = rx.wait_for(|s| *s == Stop::Cold).await;
    }

    /// The shutdown deadlines, counted from the first time a stop was seen
    /// (the stop clock in [`Worker::run`] sees it the moment it is sent).
    fn deadlines(&self) -> Deadlines {
        let stop_at = *self.stop_seen_at.get_or_init(tokio::time::Instant::now);
        Deadlines::new(
            stop_at,
            self.cfg.soft_shutdown_timeout,
            self.cfg.shutdown_timeout,
        )
    }

    /// Resolves when the hard shutdown deadline has passed.
    async fn past_deadline(&self) {
        self.stopped().await;
        tokio::time::sleep_until(self.deadlines().hard).await;
    }
}

/// A configured worker, ready to run.
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Ctx>,
    stop_tx: watch::Sender<Stop>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Worker {
    pub fn new(cfg: WorkerConfig, registry: Registry) -> anyhow::Result<Self> {
        // BRPOP waits 1 s; give its replies ample time before calling the
        // connection dead. Other commands are quick.
        let broker_link = RedisLink::connect_to(&cfg.broker, "broker", Duration::from_secs(10))?;
        let blocking = RedisLink::connect_to(&cfg.broker, "consumer", Duration::from_secs(10))?;
        // The same Redis for both (the usual setup): one connection, so a
        // task's result and another's ack leave in one pipeline (see
        // `redis_batch`) instead of one round trip each on two sockets.
        let backend_link = if cfg.backend == cfg.broker {
            broker_link.clone()
        } else {
            RedisLink::connect_to(&cfg.backend, "backend", Duration::from_secs(10))?
        };
        let broker = Broker::new(
            broker_link,
            blocking,
            BrokerConfig {
                queues: cfg.queues.clone(),
                keys: crate::broker::keys::Keys::new(&cfg.key_prefix, &cfg.dead_letter_key),
                visibility_timeout: cfg.visibility_timeout,
                worker_name: cfg.node_name.clone(),
                max_message_size: cfg.max_message_size,
                dead_letter_max: cfg.dead_letter_max,
            },
        );
        let backend = ResultBackend::new(backend_link, &cfg.backend_key_prefix, cfg.result_expires);
        let events_link = RedisLink::connect_to(&cfg.broker, "events", Duration::from_secs(10))?;
        let events = Events::new(
            events_link,
            &cfg.node_name,
            &cfg.key_prefix,
            cfg.task_events,
        );
        let pool: Arc<dyn Pool> = match cfg.pool {
            PoolKind::Prefork => {
                let mut child_args = vec![
                    "pool-child".to_owned(),
                    "--loglevel".to_owned(),
                    cfg.loglevel.clone(),
                ];
                if cfg.enable_chaos_tasks {
                    child_args.push("--enable-chaos-tasks".to_owned());
                }
                Arc::new(PreforkPool::start(PreforkConfig {
                    size: cfg.concurrency,
                    exe: std::env::current_exe()?,
                    child_args,
                    max_tasks_per_child: cfg.max_tasks_per_child,
                    max_memory_kib: cfg.max_memory_per_child_kib,
                    job_watchdog: cfg.job_watchdog,
                }))
            }
            PoolKind::Threads => Arc::new(ThreadPool::new("threads", cfg.concurrency)),
            PoolKind::Solo => Arc::new(ThreadPool::new("solo", 1)),
        };
        let rate_limits = rate_limit::RateLimits::default();
        for info in registry.describe() {
            if let Some(rate) = info.rate_limit.as_deref() {
                rate_limits.set(
                    &info.name,
                    rate_limit::parse_rate(rate).map_err(anyhow::Error::msg)?,
                );
            }
        }
        let revoked = revoked::Revoked::default();
        if let Some(path) = &cfg.statedb {
            let state = revoked::StateFile::load(path).map_err(anyhow::Error::msg)?;
            let live = revoked.load_state(&state);
            events.clock.adjust(state.clock);
            tracing::info!(path = %path.display(), revoked = live, "state loaded (--statedb)");
        }
        let (stop_tx, stop_rx) = watch::channel(Stop::Running);
        let prefetch = Arc::new(Semaphore::new(cfg.concurrency * cfg.prefetch_multiplier));
        Ok(Self {
            ctx: Arc::new(Ctx {
                broker,
                backend,
                registry,
                pool,
                inflight: InFlight::default(),
                prefetch,
                held_eta: AtomicUsize::new(0),
                stop: stop_rx,
                last_poll_ok_ms: AtomicI64::new(now_ms()),
                processed: AtomicU64::new(0),
                events,
                metrics: crate::metrics::Metrics::default(),
                revoked,
                rate_limits,
                time_limits: Mutex::default(),
                totals: Mutex::default(),
                queues: RwLock::new(cfg.queues.clone()),
                started_at: Instant::now(),
                stop_tx: stop_tx.clone(),
                autoscaler: cfg
                    .autoscale
                    .map(|(max, min)| autoscale::Autoscaler::new(max, min)),
                stop_seen_at: OnceLock::new(),
                cfg,
            }),
            stop_tx,
        })
    }

    /// A handle that asks the worker to stop.
    pub fn stopper(&self) -> watch::Sender<Stop> {
        self.stop_tx.clone()
    }

    /// Runs until stopped; returns after everything held was put back or
    /// finished, or when `--shutdown-timeout` has passed since the stop
    /// (then the outcome names what stays in `unacked`).
    pub async fn run(self) -> anyhow::Result<Stopped> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        // Starts the shutdown clock the moment a stop is sent, whatever
        // step the worker is in then.
        let clock = ctx.clone();
        tokio::spawn(async move {
            clock.stopped().await;
            clock.deadlines();
        });
        tracing::info!(
            node = %cfg.node_name,
            broker = %ctx.broker.link().url_for_logs(),
            queues = ?cfg.queues,
            concurrency = cfg.concurrency,
            pool = ctx.pool.kind(),
            tasks = ?ctx.registry.names().collect::<Vec<_>>(),
            "tori-worker starting"
        );
        if let Err(why) = tasks::ingestion_status() {
            tracing::warn!(%why, "pdf_ingestion is not available in this worker (run scripts/setup-native); its messages will fail with NotRegistered");
        }
        // Every start-up step may wait on Redis for ever (retried with
        // backoff), so a stop must cut it short. Nothing has been fetched
        // yet, so nothing needs putting back; each Redis write here is one
        // atomic command or script, done or not. (A restore sweep cut
        // short leaves its `unacked_mutex` to expire, up to 5 minutes.)
        let started = tokio::select! {
            biased;
            _ = ctx.stopped() => false,
            r = start_up(&ctx) => { r?; true }
        };
        if !started {
            tracing::warn!(
                "stop requested during start-up: nothing was fetched, nothing to put back; exiting"
            );
            ctx.pool.abort();
            ctx.save_state();
            return Ok(Stopped::new(&ctx, StopOutcome::Clean));
        }

        let background = TaskTracker::new();
        spawn_supervised(&background, &ctx, "heartbeat", heartbeat);
        spawn_supervised(&background, &ctx, "event flusher", |ctx| async move {
            let stop = ctx.clone();
            ctx.events
                .flusher(async move { stop.stopped().await })
                .await;
        });
        spawn_supervised(&background, &ctx, "remote control", crate::control::mailbox);
        spawn_supervised(&background, &ctx, "lease keeper", lease_keeper);
        if let Some(addr) = ctx.cfg.metrics_addr.clone() {
            spawn_supervised(&background, &ctx, "metrics", move |ctx| {
                crate::metrics::serve(ctx, addr.clone())
            });
        }
        spawn_supervised(&background, &ctx, "restore sweeper", sweeper);
        spawn_supervised(&background, &ctx, "eta releaser", eta_releaser);
        spawn_supervised(&background, &ctx, "autoscaler", autoscale::run);
        background.close();

        let handlers = TaskTracker::new();
        tracing::info!(node = %cfg.node_name, "worker ready");
        // The consumer notices a stop within a second (its BRPOP's wait),
        // unless Redis stopped answering mid-fetch: then the deadline ends
        // it (a message popped but not yet recorded is then kombu's one
        // window, see README "Delivery guarantees").
        tokio::select! {
            _ = consume(&ctx, &handlers) => {}
            _ = ctx.past_deadline() => {
                tracing::error!("shutdown deadline passed while the consumer waited on Redis");
            }
        }
        handlers.close();

        let mode = *ctx.stop.borrow();
        let deadlines = ctx.deadlines();
        let left = shutdown(&ctx, &handlers, mode, deadlines).await;
        ctx.save_state();
        if tokio::time::timeout_at(
            deadlines.hard,
            ctx.events.send("worker-offline", ctx.heartbeat_fields()),
        )
        .await
        .is_err()
        {
            tracing::warn!("worker-offline event not sent before the shutdown deadline");
        }
        // Background loops watch the same stop signal.
        let background_end = deadlines
            .hard
            .min(tokio::time::Instant::now() + Duration::from_secs(5));
        let _ = tokio::time::timeout_at(background_end, background.wait()).await;
        drop(self.stop_tx);
        let outcome = StopOutcome::from_left(left);
        match &outcome {
            StopOutcome::Clean => tracing::info!(
                processed = ctx.processed.load(Ordering::Relaxed),
                "worker stopped"
            ),
            StopOutcome::LeftForVisibilityRestore(left) => {
                for l in left {
                    tracing::error!(delivery_tag = %l.delivery_tag, task_id = %l.task_id, "message left in 'unacked': the visibility restore puts it back");
                }
                tracing::error!(
                    left = left.len(),
                    processed = ctx.processed.load(Ordering::Relaxed),
                    shutdown_timeout = ctx.cfg.shutdown_timeout.as_secs_f64(),
                    visibility_timeout = ctx.cfg.visibility_timeout.as_secs_f64(),
                    "worker stopped at the shutdown deadline with messages not put back; they stay in 'unacked' until the visibility restore (exit code 3)"
                );
            }
        }
        Ok(Stopped::new(&ctx, outcome))
    }
}

/// How [`Worker::run`] ended.
#[derive(Debug)]
pub struct Stopped {
    pub outcome: StopOutcome,
    /// What is left of `--shutdown-timeout`: the most the process may
    /// still spend on leaving (threads abandoned at a hard time limit).
    pub time_left: Duration,
}

impl Stopped {
    fn new(ctx: &Ctx, outcome: StopOutcome) -> Self {
        let time_left = ctx
            .deadlines()
            .hard
            .saturating_duration_since(tokio::time::Instant::now());
        Self { outcome, time_left }
    }
}

/// Declares the queues, runs the start-up restore sweep and says the
/// worker is online: everything before the first fetch that talks to Redis.
async fn start_up(ctx: &Ctx) -> anyhow::Result<()> {
    for link in [ctx.broker.link(), ctx.backend.link()] {
        // Waits while Redis is away; a TLS failure ends start-up here,
        // with what to change, instead of retrying for ever.
        link.ready().await?;
        for ignored in &link.settings().ignored {
            tracing::warn!(role = link.role(), option = %ignored, "Redis option not used by tori-worker");
        }
    }
    ctx.broker.declare_queues(&ctx.cfg.queues).await?;
    match ctx.broker.restore_visible().await {
        Ok(n) if n > 0 => {
            tracing::warn!(restored = n, "restored messages abandoned by dead workers")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "startup restore sweep failed; will retry"),
    }
    ctx.events
        .send("worker-online", ctx.heartbeat_fields())
        .await;
    Ok(())
}

/// Spawns a background loop under `supervise`, restarted a second after a
/// panic.
fn spawn_supervised<Fut>(
    tracker: &TaskTracker,
    ctx: &Arc<Ctx>,
    name: &'static str,
    start: impl Fn(Arc<Ctx>) -> Fut + Send + 'static,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ctx = ctx.clone();
    tracker.spawn(supervise::supervise(
        name,
        Duration::from_secs(1),
        move || start(ctx.clone()),
    ));
}

/// Largest batch taken in one atomic fetch.
const MAX_BATCH: usize = 64;

async fn consume(ctx: &Arc<Ctx>, handlers: &TaskTracker) {
    let mut order = ctx.queues();
    let mut backoff = Backoff::default();
    let mut stalled_logged = false;
    loop {
        let first = tokio::select! {
            permit = ctx.prefetch.clone().acquire_owned() => permit.expect("prefetch semaphore is never closed"),
            _ = ctx.stopped() => break,
        };
        if ctx.stopping() {
            break;
        }
        // Follow add_consumer/cancel_consumer, keeping the rotation.
        let wanted = ctx.queues();
        order.retain(|q| wanted.contains(q));
        for q in &wanted {
            if !order.contains(q) {
                order.push(q.clone());
            }
        }
        if order.is_empty() {
            drop(first);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = ctx.stopped() => break,
            }
        }
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match ctx.prefetch.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // Never cancel a fetch: a BRPOP whose reply is dropped loses the
        // message. It returns within a second, so stopping stays prompt.
        match ctx
            .broker
            .fetch(&mut order, permits.len(), Duration::from_secs(1))
            .await
        {
            Ok(items) => {
                ctx.last_poll_ok_ms.store(now_ms(), Ordering::Relaxed);
                if backoff.attempts > 0 || stalled_logged {
                    tracing::info!("broker connection recovered; consuming again");
                    stalled_logged = false;
                }
                backoff.reset();
                // Fewer than asked for: the queues are (nearly) empty, so
                // the next reserve will most likely come back empty too.
                // Let the messages just taken reach their pool processes
                // before it is sent, rather than after its request (the
                // spawned handlers otherwise wait for this loop's next
                // await). A full batch keeps the reserve going out first.
                let drained = items.len() < permits.len();
                for item in items {
                    let permit = permits.pop().expect("never fetch more than permits");
                    match item {
                        Fetched::Message(delivery) if !ctx.queues().contains(&delivery.queue) => {
                            // Fetched in the instant a cancel_consumer took
                            // the queue away: hand it back, as kombu does.
                            let ctx = ctx.clone();
                            handlers.spawn(async move {
                                let tag = delivery.envelope.delivery_tag().to_owned();
                                if let Err(e) = ctx.broker.restore(&tag, true).await {
                                    tracing::warn!(error = %e, "could not requeue a message of a cancelled queue");
                                }
                                drop(permit);
                            });
                        }
                        Fetched::Message(delivery) => {
                            handlers.spawn(message::accept(ctx.clone(), delivery, permit));
                        }
                        Fetched::DeadLettered { queue, raw } => {
                            tracing::error!(
                                queue,
                                size = raw.len(),
                                preview = %preview(&raw),
                                dead_letter = %ctx.broker.keys().dead_letter,
                                "malformed envelope moved to the dead-letter list"
                            );
                        }
                        Fetched::Unreadable {
                            queue,
                            raw,
                            tag,
                            error,
                        } => {
                            let ctx = ctx.clone();
                            handlers.spawn(async move {
                                unrunnable::settle_unparsed(
                                    ctx.unrunnable_handles(),
                                    &queue,
                                    &tag,
                                    &raw,
                                    ("kombu.exceptions", "DecodeError"),
                                    format!("unreadable message: {error}"),
                                )
                                .await;
                                drop(permit);
                            });
                        }
                        Fetched::TooLarge {
                            queue,
                            raw,
                            tag,
                            size,
                            limit,
                        } => {
                            let large = crate::memory::LargeMessage::begin();
                            let ctx = ctx.clone();
                            handlers.spawn(async move {
                                unrunnable::settle_unparsed(
                                    ctx.unrunnable_handles(),
                                    &queue,
                                    &tag,
                                    &raw,
                                    ("kombu.exceptions", "MessageSizeExceeded"),
                                    format!(
                                        "message of {size} bytes exceeds the worker's --max-message-size of {limit} bytes; not decoded"
                                    ),
                                )
                                .await;
                                drop(raw);
                                ctx.shed_large_message(large).await;
                                drop(permit);
                            });
                        }
                    }
                }
                if drained {
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let since =
                    (now_ms() - ctx.last_poll_ok_ms.load(Ordering::Relaxed)) as f64 / 1000.0;
                tracing::warn!(error = %e, seconds_since_last_poll = since, retry_in_ms = delay.as_millis() as u64, "broker poll failed");
                stalled_logged = true;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.stopped() => break,
                }
            }
        }
    }
}

/// The first 200 characters of a message, for logs.
pub(crate) fn preview(raw: &str) -> String {
    let mut s: String = raw.chars().take(200).collect();
    if raw.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// Puts unstarted messages back, waits for running tasks (warm), then
/// kills the pool and puts running late-ack messages back; every step ends
/// by its deadline. Returns the messages that stay in `unacked`.
async fn shutdown(
    ctx: &Arc<Ctx>,
    handlers: &TaskTracker,
    mode: Stop,
    deadlines: Deadlines,
) -> Vec<Left> {
    let mut left = Vec::new();
    let unstarted = ctx.inflight.take_unstarted();
    let mut restored = 0;
    for tag in &unstarted {
        // Named now: its handler stands down and may drop the entry.
        let held = ctx.left(tag);
        match put_back(ctx, tag, deadlines.hard).await {
            PutBack::Done => restored += 1,
            PutBack::Left => left.push(held),
        }
    }
    tracing::info!(
        restored,
        left = left.len(),
        ?mode,
        "shutdown: unstarted messages put back on their queues"
    );

    let finished = mode != Stop::Cold
        && tokio::select! {
            _ = handlers.wait() => true,
            _ = tokio::time::sleep_until(deadlines.warm_end) => false,
            // A second signal during the warm wait: cold from here.
            _ = ctx.stopped_cold() => false,
        };
    if finished {
        return left;
    }
    // Cold, or the warm wait ran out: take the running late-ack messages
    // back, stop their processes first (so a task is never running here
    // while another worker already runs it again), then restore them.
    let interrupted = ctx.inflight.take_running_unacked();
    ctx.pool.abort();
    let reaped = deadlines
        .hard
        .min(tokio::time::Instant::now() + Duration::from_secs(5));
    let _ = tokio::time::timeout_at(reaped, handlers.wait()).await;
    for (tag, entry) in interrupted {
        match put_back(ctx, &tag, deadlines.hard).await {
            PutBack::Done => {
                tracing::warn!(task_id = %entry.task_id, task_name = %entry.task_name, "running task interrupted by shutdown; message restored, it will run again")
            }
            PutBack::Left => left.push(Left {
                delivery_tag: tag,
                task_id: entry.task_id,
            }),
        }
    }
    for entry in ctx.inflight.running_acked() {
        tracing::error!(task_id = %entry.task_id, task_name = %entry.task_name, "running task was acknowledged early and is interrupted by shutdown (use acks_late to have it re-run)");
    }
    left
}

enum PutBack {
    /// Back on its queue, or no longer in `unacked` (settled meanwhile).
    Done,
    /// Still in `unacked`: Redis refused or did not answer by `end`.
    Left,
}

/// Puts one held message back on its queue, giving up at `end` (Redis
/// away): the restore is one script, so the message is then either back
/// or still in `unacked`, never lost.
async fn put_back(ctx: &Ctx, tag: &str, end: tokio::time::Instant) -> PutBack {
    match tokio::time::timeout_at(end, ctx.broker.restore(tag, false)).await {
        Ok(Ok(_)) => PutBack::Done,
        Ok(Err(e)) => {
            tracing::error!(delivery_tag = %tag, error = %e, "could not restore at shutdown; the visibility restore will");
            PutBack::Left
        }
        Err(_) => PutBack::Left,
    }
}

/// Seconds between worker heartbeats (Celery's default); Flower marks a
/// worker offline after two missed beats.
pub const HEARTBEAT_FREQ: f64 = 2.0;

async fn heartbeat(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(HEARTBEAT_FREQ)) => {}
            _ = ctx.stopped() => return,
        }
        ctx.events
            .send("worker-heartbeat", ctx.heartbeat_fields())
            .await;
    }
}

/// How often leases are refreshed: well inside the visibility timeout.
fn lease_interval(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
}

async fn lease_keeper(ctx: Arc<Ctx>) {
    let every = lease_interval(ctx.cfg.visibility_timeout);
    let mut last = Instant::now();
    loop {
        // Wake often enough to leave promptly once a stop has drained
        // everything we hold.
        tokio::time::sleep(every.min(Duration::from_millis(100))).await;
        let tags = ctx.inflight.lease_tags();
        if ctx.stopping() && tags.is_empty() {
            return;
        }
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        if let Err(e) = ctx.broker.refresh_leases(&tags).await {
            tracing::warn!(error = %e, held = tags.len(), "could not refresh leases");
        }
    }
}

async fn sweeper(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.cfg.restore_interval) => {}
            _ = ctx.stopped() => return,
        }
        match ctx.broker.restore_visible().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                restored = n,
                "restored messages whose worker stopped renewing them"
            ),
            Err(e) => tracing::warn!(error = %e, "restore sweep failed"),
        }
    }
}

async fn eta_releaser(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = ctx.stopped() => return,
        }
        match ctx.broker.release_due_eta(Duration::from_secs(2)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                released = n,
                "parked ETA messages are due; back on their queues"
            ),
            Err(e) => tracing::warn!(error = %e, "could not release parked ETA messages"),
        }
    }
}
