//! Command line and environment → worker configuration.
//!
//! Flag names follow `celery worker` where Celery has one, and so do the
//! environment variables (`CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND`,
//! with `REDIS_URL` as the fallback for both).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::redis_url::{RedisSettings, TransportOptions, UrlError};

#[derive(Debug, Parser)]
#[command(
    name = "tori-worker",
    version,
    about = "A Celery-compatible worker for Redis, written in Rust",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `tori-worker [worker] ...`: the worker is the default command.
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker (the default).
    Worker(Box<WorkerArgs>),
    /// List the registered tasks.
    Tasks {
        /// Print JSON (for the Python bridge's drift check).
        #[arg(long)]
        json: bool,
        /// Include the `tori.chaos.*` tasks.
        #[arg(long)]
        enable_chaos_tasks: bool,
    },
    /// Ingest one PDF locally, without Redis, and print the result JSON.
    Ingest {
        /// The PDF to ingest.
        file: std::path::PathBuf,
        /// Options as JSON, e.g. '{"chunk_tokens": 128}'.
        #[arg(long)]
        options: Option<String>,
    },
    /// Inspect and act on the dead-letter list: list, show, requeue, purge.
    DeadLetter(Box<DeadLetterArgs>),
    /// A prefork pool process (started by the worker, not by hand).
    #[command(hide = true)]
    PoolChild {
        #[arg(long, default_value = "info")]
        loglevel: String,
        #[arg(long)]
        enable_chaos_tasks: bool,
    },
}

/// `tori-worker dead-letter [BROKER FLAGS] ACTION [--json]`.
#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: DeadLetterAction,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// The records, newest first.
    List,
    /// One record in full, raw message included.
    Show {
        /// The record's id (see `list`).
        id: String,
    },
    /// Put records' messages back on their queues and remove the records.
    Requeue {
        /// The record's id (see `list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every record.
        #[arg(long)]
        all: bool,
        /// Push to this queue instead of the record's own.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Delete every record, or only the one with ID.
    Purge {
        /// The record's id (see `list`); all records when omitted.
        id: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolKind {
    /// Child processes with warm task state, isolated from each other.
    Prefork,
    /// One blocking thread per slot, inside the worker process.
    Threads,
    /// One task at a time, inside the worker process.
    Solo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the broker's keys are: shared by the worker and the
/// `dead-letter` command, so both read the same flags and variables.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Broker URL: redis://[user:password@]host[:port][/db], rediss://
    /// (TLS, with ?ssl_cert_reqs=&ssl_ca_certs=&ssl_certfile=&ssl_keyfile=),
    /// unix:///path.sock?db=N, redis+socket:///path.sock?virtual_host=N,
    /// sentinel://host:26379[/db][;sentinel://host2:26379...] (with
    /// master_name in --broker-transport-options).
    #[arg(short = 'b', long, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,

    /// Celery's `broker_use_ssl` as JSON: {"ssl_cert_reqs": "required",
    /// "ssl_ca_certs": "/ca.pem", "ssl_certfile": ..., "ssl_keyfile": ...,
    /// "ssl_check_hostname": true}. Turns TLS on; the URL's own ssl_*
    /// parameters win over it.
    #[arg(long, env = "CELERY_BROKER_USE_SSL")]
    pub broker_use_ssl: Option<String>,

    /// Celery's `broker_transport_options` as JSON: master_name,
    /// sentinel_kwargs ({"password": ...}), visibility_timeout,
    /// global_keyprefix, socket_timeout, socket_connect_timeout.
    #[arg(long, env = "CELERY_BROKER_TRANSPORT_OPTIONS")]
    pub broker_transport_options: Option<String>,

    /// Prefix for every broker key (kombu's `global_keyprefix`; the
    /// transport option of that name is used when this is not given).
    #[arg(long, default_value = "")]
    pub key_prefix: String,

    /// Redis list that receives messages no worker can ever run.
    #[arg(long, default_value = "tori.dead_letter")]
    pub dead_letter_key: String,
}

impl BrokerArgs {
    /// `--broker`, else `CELERY_BROKER_URL` (through clap), else `REDIS_URL`.
    pub fn broker_url(&self) -> Result<String, ConfigError> {
        self.broker
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(redis_url_env)
            .ok_or(ConfigError::NoBroker)
    }
}

impl BrokerArgs {
    /// The broker's transport options (`{}` when not given).
    pub fn transport_options(&self) -> Result<TransportOptions, ConfigError> {
        transport_options(
            self.broker_transport_options.as_deref(),
            "--broker-transport-options",
        )
    }

    /// Where and how to reach the broker.
    pub fn settings(&self) -> Result<RedisSettings, ConfigError> {
        let url = self.broker_url()?;
        let ssl = use_ssl(self.broker_use_ssl.as_deref(), "--broker-use-ssl")?;
        Ok(crate::redis_url::parse(
            &url,
            ssl.as_ref(),
            &self.transport_options()?,
        )?)
    }

    /// `--key-prefix`, else the transport options' `global_keyprefix`.
    pub fn key_prefix(&self) -> Result<String, ConfigError> {
        if !self.key_prefix.is_empty() {
            return Ok(self.key_prefix.clone());
        }
        Ok(self
            .transport_options()?
            .global_keyprefix
            .unwrap_or_default())
    }
}

fn transport_options(json: Option<&str>, option: &str) -> Result<TransportOptions, ConfigError> {
    match json.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(TransportOptions::default()),
        Some(json) => Ok(TransportOptions::parse(json, option)?),
    }
}

fn use_ssl(
    json: Option<&str>,
    option: &str,
) -> Result<Option<std::collections::BTreeMap<String, String>>, ConfigError> {
    match json.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(json) => Ok(Some(crate::redis_url::parse_use_ssl(json, option)?)),
    }
}

fn redis_url_env() -> Option<String> {
    std::env::var("REDIS_URL").ok().filter(|s| !s.is_empty())
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Result backend URL (a Redis URL in any of the broker's forms);
    /// defaults to the broker URL.
    #[arg(long, env = "CELERY_RESULT_BACKEND")]
    pub result_backend: Option<String>,

    /// Celery's `redis_backend_use_ssl` as JSON (see --broker-use-ssl).
    #[arg(long, env = "CELERY_REDIS_BACKEND_USE_SSL")]
    pub redis_backend_use_ssl: Option<String>,

    /// Celery's `result_backend_transport_options` as JSON: master_name,
    /// sentinel_kwargs, global_keyprefix, socket_timeout, ...
    #[arg(long, env = "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS")]
    pub result_backend_transport_options: Option<String>,

    /// Queues to consume, comma-separated.
    #[arg(short = 'Q', long, value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,

    /// Number of tasks run at once (default: number of CPUs).
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,

    #[arg(short = 'P', long, value_enum, default_value_t = PoolKind::Prefork)]
    pub pool: PoolKind,

    /// File keeping revoked task ids (and the logical clock) across
    /// restarts (Celery's `--statedb`); JSON, written on each revoke and at
    /// shutdown.
    #[arg(short = 'S', long, env = "TORI_STATEDB")]
    pub statedb: Option<std::path::PathBuf>,

    /// `MAX,MIN` pool processes (Celery's `--autoscale`): start with MIN,
    /// add processes while messages wait, retire idle ones after 30 s.
    /// Replaces --concurrency. Changeable at run time by `autoscale`.
    #[arg(long, value_name = "MAX,MIN")]
    pub autoscale: Option<String>,

    /// Node name; %h = host name, %n = its first label, %d = its domain.
    #[arg(short = 'n', long, default_value = "tori@%h")]
    pub hostname: String,

    #[arg(short = 'l', long, default_value = "info", env = "TORI_LOGLEVEL")]
    pub loglevel: String,

    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "TORI_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Messages reserved per slot, Celery's `worker_prefetch_multiplier`
    /// with its default of 4: fetching ahead keeps every slot busy and
    /// takes several messages per Redis round trip (2× the no-op throughput
    /// of 1). For long tasks such as PDF ingestion Celery's advice holds:
    /// 1 fetches only when a slot is free, so a peer added to drain a
    /// backlog is not left idle while this worker holds messages.
    #[arg(long, default_value_t = 4)]
    pub prefetch_multiplier: usize,

    /// Default hard time limit in seconds for tasks that set none.
    #[arg(long)]
    pub time_limit: Option<f64>,

    /// Default soft time limit in seconds for tasks that set none.
    #[arg(long)]
    pub soft_time_limit: Option<f64>,

    /// Acknowledge after the task finished, for tasks that do not choose
    /// (Celery's `task_acks_late`).
    #[arg(long, env = "TORI_ACKS_LATE")]
    pub acks_late: bool,

    /// Write the STARTED state (Celery's `task_track_started`).
    #[arg(long)]
    pub track_started: bool,

    /// Seconds results are kept (Celery's `result_expires`); 0 = forever.
    #[arg(long, default_value_t = 86_400)]
    pub result_expires: u64,

    /// Store name, args, kwargs, worker, retries and queue with results
    /// (Celery's `result_extended`).
    #[arg(long)]
    pub result_extended: bool,

    /// Seconds a message may stay unacknowledged before any worker on the
    /// database restores it (kombu's `visibility_timeout`). Use the same
    /// value as your Python workers.
    /// The transport options' `visibility_timeout` is used when this is
    /// not given; the default is kombu's, 3600.
    #[arg(long, env = "TORI_VISIBILITY_TIMEOUT")]
    pub visibility_timeout: Option<f64>,

    /// Seconds between restore sweeps of expired unacked messages.
    #[arg(long, default_value_t = 10.0)]
    pub restore_interval: f64,

    /// ETA tasks due within this many seconds wait in memory; later ones
    /// are parked in Redis (`tori.eta`) until they are due.
    #[arg(long, default_value_t = 300.0)]
    pub eta_horizon: f64,

    /// At most this many ETA tasks wait in memory; more are parked.
    #[arg(long, default_value_t = 10_000)]
    pub max_held_eta: usize,

    /// Most records kept in the dead-letter list: each push trims it to
    /// the newest N in the same step (counted in /metrics as
    /// `tori_dead_letters_trimmed_total`), so poison messages cannot fill
    /// Redis. 0 = no limit.
    #[arg(long, default_value_t = 10_000, env = "TORI_DEAD_LETTER_MAX")]
    pub dead_letter_max: u64,

    /// Queue for the messages this worker publishes whose signature names
    /// no queue: chain links, callbacks, errbacks, chord bodies (Celery's
    /// `task_default_queue`). A Python worker routes those with the app's
    /// `task_routes`, which a Rust worker cannot see, so set `queue=` on
    /// such signatures when they must go elsewhere.
    #[arg(long, env = "TORI_DEFAULT_QUEUE", default_value = "celery")]
    pub default_queue: String,

    /// Seconds a warm shutdown waits for running tasks before restoring
    /// them (late ack) and exiting; at most --shutdown-timeout.
    #[arg(long, default_value_t = 20.0)]
    pub soft_shutdown_timeout: f64,

    /// Hard bound, in seconds, on the whole shutdown from the first stop
    /// signal to exit, Redis reachable or not. Messages that cannot be put
    /// back in time stay in `unacked` for the visibility restore (exit
    /// code 3). Keep it below Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 25.0, env = "TORI_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: f64,

    /// Send task events (Celery's `-E`); monitors can also switch them on
    /// at run time with `enable_events`. Worker heartbeats are always sent.
    #[arg(short = 'E', long)]
    pub task_events: bool,

    /// Replace a pool process after this many tasks (prefork pool).
    #[arg(long)]
    pub max_tasks_per_child: Option<u64>,

    /// Kill a pool process whose RSS goes over this many KiB while it runs
    /// a task; the task fails with MemoryError naming the cap (prefork).
    #[arg(long)]
    pub max_memory_per_child: Option<u64>,

    /// Largest message, in bytes, the worker decodes; a larger one is not
    /// decoded: its task gets FAILURE `MessageSizeExceeded` (when its id
    /// can be read) and the message goes to the dead-letter list. 0 for no
    /// limit.
    #[arg(long, env = "TORI_MAX_MESSAGE_SIZE", default_value_t = 32 << 20)]
    pub max_message_size: u64,

    /// Seconds a task without a hard time limit may hold a pool process
    /// before the worker kills that process and reports the task lost
    /// (prefork). A task with a hard limit gets it plus 10 s. 0 for never.
    #[arg(long, env = "TORI_JOB_WATCHDOG", default_value_t = 86_400.0)]
    pub job_watchdog: f64,

    /// With late ack, put a task whose pool process died back on the queue
    /// (Celery's `task_reject_on_worker_lost`) instead of failing it.
    #[arg(long)]
    pub reject_on_worker_lost: bool,

    /// Let the `pool_restart` remote control command replace every pool
    /// process (Celery's `worker_pool_restarts`; off by default, as there).
    #[arg(long)]
    pub pool_restarts: bool,

    /// How many times a task may be put back after killing its process
    /// (or after the worker's own handling of it panicked twice, in the
    /// handling and in settling that) before it fails for good and goes to
    /// the dead-letter list.
    #[arg(long, default_value_t = 3)]
    pub max_redeliveries: u32,

    /// Serve Prometheus metrics (`/metrics`) and a health check
    /// (`/healthz`) on this address, e.g. `127.0.0.1:9808`.
    #[arg(long, env = "TORI_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Register the `tori.chaos.*` tasks (panic, abort, segfault, alloc,
    /// spin, exit) for fault-injection tests. Never in production.
    #[arg(long)]
    pub enable_chaos_tasks: bool,
}

/// Everything the worker needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub broker: RedisSettings,
    pub backend: RedisSettings,
    /// The result backend's key prefix (`global_keyprefix` of
    /// `--result-backend-transport-options`).
    pub backend_key_prefix: String,
    pub queues: Vec<String>,
    pub concurrency: usize,
    /// `(max, min)` from `--autoscale`; `concurrency` is then `min`.
    pub autoscale: Option<(usize, usize)>,
    pub statedb: Option<std::path::PathBuf>,
    pub pool: PoolKind,
    pub node_name: String,
    pub prefetch_multiplier: usize,
    pub default_time_limit: Option<f64>,
    pub default_soft_time_limit: Option<f64>,
    pub acks_late: bool,
    pub track_started: bool,
    pub result_expires: Option<Duration>,
    pub result_extended: bool,
    pub visibility_timeout: Duration,
    pub restore_interval: Duration,
    pub eta_horizon: Duration,
    pub max_held_eta: usize,
    pub dead_letter_key: String,
    /// 0 = no limit.
    pub dead_letter_max: u64,
    pub default_queue: String,
    pub key_prefix: String,
    /// Never more than `shutdown_timeout`.
    pub soft_shutdown_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_tasks_per_child: Option<u64>,
    pub max_memory_per_child_kib: Option<u64>,
    /// `None`: no limit.
    pub max_message_size: Option<usize>,
    /// `None`: never.
    pub job_watchdog: Option<Duration>,
    pub reject_on_worker_lost: bool,
    pub pool_restarts: bool,
    pub max_redeliveries: u32,
    pub enable_chaos_tasks: bool,
    pub loglevel: String,
    pub task_events: bool,
    pub metrics_addr: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no broker URL: pass --broker or set CELERY_BROKER_URL (or REDIS_URL)")]
    NoBroker,
    #[error("{0} must be a positive number of seconds (at most 1e9)")]
    BadSeconds(&'static str),
    #[error("--queues must name at least one queue")]
    NoQueues,
    #[error("--autoscale takes MAX,MIN (or MAX) with MAX >= MIN >= 1, got {0:?}")]
    BadAutoscale(String),
    #[error(transparent)]
    Redis(#[from] UrlError),
}

fn positive(value: f64, name: &'static str) -> Result<Duration, ConfigError> {
    crate::protocol::limits::seconds(value)
        .filter(|d| !d.is_zero())
        .ok_or(ConfigError::BadSeconds(name))
}

/// A time limit from the command line: `None` when unset or 0 (no limit).
fn time_limit(value: Option<f64>, name: &'static str) -> Result<Option<f64>, ConfigError> {
    match value {
        None => Ok(None),
        Some(0.0) => Ok(None),
        Some(t) => positive(t, name).map(|_| Some(t)),
    }
}

/// `"MAX,MIN"` or `"MAX"` (MIN 1 then, as in Celery: `--autoscale=10`
/// means up to 10 from 0; this pool keeps at least one process).
pub fn parse_autoscale(spec: &str) -> Option<(usize, usize)> {
    let mut parts = spec.split(',').map(str::trim);
    let max: usize = parts.next()?.parse().ok()?;
    let min: usize = match parts.next() {
        Some(m) => m.parse().ok()?,
        None => 1,
    };
    let min = min.max(1);
    (parts.next().is_none() && max >= min).then_some((max, min))
}

/// Expands `%h`, `%n` and `%d` in a node name as Celery does.
pub fn expand_node_name(template: &str, host: &str) -> String {
    let (first, domain) = host.split_once('.').unwrap_or((host, ""));
    template
        .replace("%h", host)
        .replace("%n", first)
        .replace("%d", domain)
}

impl WorkerArgs {
    pub fn resolve(&self) -> Result<WorkerConfig, ConfigError> {
        let broker_url = self.broker.broker_url()?;
        let broker = self.broker.settings()?;
        let backend_url = self
            .result_backend
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(redis_url_env)
            .unwrap_or_else(|| broker_url.clone());
        let broker_options = self.broker.transport_options()?;
        let backend_options = transport_options(
            self.result_backend_transport_options.as_deref(),
            "--result-backend-transport-options",
        )?;
        // As in Celery, the backend falls back to the broker's TLS settings
        // only when it is the same URL.
        let backend_ssl = match use_ssl(
            self.redis_backend_use_ssl.as_deref(),
            "--redis-backend-use-ssl",
        )? {
            Some(ssl) => Some(ssl),
            None if backend_url == broker_url => {
                use_ssl(self.broker.broker_use_ssl.as_deref(), "--broker-use-ssl")?
            }
            None => None,
        };
        let backend_opts_for_url =
            if self.result_backend_transport_options.is_none() && backend_url == broker_url {
                broker_options.clone()
            } else {
                backend_options.clone()
            };
        let backend =
            crate::redis_url::parse(&backend_url, backend_ssl.as_ref(), &backend_opts_for_url)?;
        let visibility_timeout = self
            .visibility_timeout
            .or(broker_options.visibility_timeout)
            .unwrap_or(3600.0);
        let queues: Vec<String> = self
            .queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect();
        if queues.is_empty() {
            return Err(ConfigError::NoQueues);
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let concurrency = self
            .concurrency
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1);
        let autoscale = match (&self.autoscale, self.pool) {
            (None, _) => None,
            (Some(_), PoolKind::Solo) => None,
            (Some(spec), _) => {
                Some(parse_autoscale(spec).ok_or_else(|| ConfigError::BadAutoscale(spec.clone()))?)
            }
        };
        let shutdown_timeout = positive(self.shutdown_timeout, "--shutdown-timeout")?;
        let soft = positive(self.soft_shutdown_timeout, "--soft-shutdown-timeout")?;
        let soft_shutdown_timeout = soft.min(shutdown_timeout);
        if soft > shutdown_timeout {
            // The hard bound wins: a warm wait that outlasts it would be
            // cut short anyway, with the tasks killed rather than put back.
            tracing::warn!(
                soft_shutdown_timeout = soft.as_secs_f64(),
                shutdown_timeout = shutdown_timeout.as_secs_f64(),
                "--soft-shutdown-timeout is longer than --shutdown-timeout; using --shutdown-timeout"
            );
        }
        Ok(WorkerConfig {
            broker,
            backend,
            backend_key_prefix: backend_options.global_keyprefix.unwrap_or_default(),
            queues,
            concurrency: match (self.pool, autoscale) {
                (PoolKind::Solo, _) => 1,
                (_, Some((_, min))) => min,
                _ => concurrency,
            },
            autoscale,
            statedb: self.statedb.clone(),
            pool: self.pool,
            node_name: expand_node_name(&self.hostname, &host),
            prefetch_multiplier: self.prefetch_multiplier.max(1),
            default_time_limit: time_limit(self.time_limit, "--time-limit")?,
            default_soft_time_limit: time_limit(self.soft_time_limit, "--soft-time-limit")?,
            acks_late: self.acks_late,
            track_started: self.track_started,
            result_expires: (self.result_expires > 0)
                .then(|| Duration::from_secs(self.result_expires)),
            result_extended: self.result_extended,
            visibility_timeout: positive(visibility_timeout, "--visibility-timeout")?,
            restore_interval: positive(self.restore_interval, "--restore-interval")?,
            eta_horizon: positive(self.eta_horizon, "--eta-horizon")?,
            max_held_eta: self.max_held_eta,
            dead_letter_key: self.broker.dead_letter_key.clone(),
            dead_letter_max: self.dead_letter_max,
            default_queue: self.default_queue.clone(),
            key_prefix: self.broker.key_prefix()?,
            soft_shutdown_timeout,
            shutdown_timeout,
            max_tasks_per_child: self.max_tasks_per_child.filter(|n| *n > 0),
            max_memory_per_child_kib: self.max_memory_per_child.filter(|n| *n > 0),
            max_message_size: (self.max_message_size > 0)
                .then(|| usize::try_from(self.max_message_size).unwrap_or(usize::MAX)),
            job_watchdog: if self.job_watchdog == 0.0 {
                None
            } else {
                Some(positive(self.job_watchdog, "--job-watchdog")?)
            },
            reject_on_worker_lost: self.reject_on_worker_lost,
            pool_restarts: self.pool_restarts,
            max_redeliveries: self.max_redeliveries,
            enable_chaos_tasks: self.enable_chaos_tasks,
            loglevel: self.loglevel.clone(),
            task_events: self.task_events,
            metrics_addr: self.metrics_addr.clone().filter(|a| !a.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_expansion() {
        assert_eq!(
            expand_node_name("tori@%h", "vm.example.org"),
            "tori@vm.example.org"
        );
        assert_eq!(expand_node_name("w1@%n", "vm.example.org"), "w1@vm");
        assert_eq!(
            expand_node_name("%n.%d", "vm.example.org"),
            "vm.example.org"
        );
    }

    #[test]
    fn flags_parse_like_celery() {
        let cli = Cli::try_parse_from([
            "tori-worker",
            "--broker",
            "redis://h/1",
            "-Q",
            "a,b",
            "--concurrency",
            "3",
            "--acks-late",
        ])
        .unwrap();
        let cfg = cli.worker.resolve().unwrap();
        assert_eq!(cfg.queues, vec!["a", "b"]);
        assert_eq!(cfg.concurrency, 3);
        assert_eq!(cfg.backend.redacted(), "redis://h/1");
        assert!(cfg.acks_late);
        let cli = Cli::try_parse_from(["tori-worker", "worker", "--broker", "redis://h"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Worker(_))));
        let cli = Cli::try_parse_from([
            "tori-worker",
            "dead-letter",
            "--broker",
            "redis://h",
            "--dead-letter-key",
            "dl",
            "requeue",
            "--all",
            "--json",
        ])
        .unwrap();
        let Some(Command::DeadLetter(dl)) = cli.command else {
            panic!("not dead-letter: {:?}", cli.command);
        };
        assert_eq!(dl.broker.broker_url().unwrap(), "redis://h");
        assert_eq!(dl.broker.dead_letter_key, "dl");
        assert!(dl.json);
        assert!(matches!(
            dl.action,
            DeadLetterAction::Requeue {
                id: None,
                all: true,
                ..
            }
        ));
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(cfg.soft_shutdown_timeout, Duration::from_secs(20));
        let cli = Cli::try_parse_from(["tori-worker", "tasks", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Tasks { json: true, .. })
        ));
    }

    #[test]
    fn the_soft_shutdown_fits_inside_the_hard_bound() {
        let cli = Cli::try_parse_from([
            "tori-worker",
            "--broker",
            "redis://h",
            "--shutdown-timeout",
            "3",
            "--soft-shutdown-timeout",
            "60",
        ])
        .unwrap();
        let cfg = cli.worker.resolve().unwrap();
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(3));
        assert_eq!(cfg.soft_shutdown_timeout, Duration::from_secs(3));
        let cli = Cli::try_parse_from([
            "tori-worker",
            "--broker",
            "redis://h",
            "--shutdown-timeout",
            "0",
        ])
        .unwrap();
        assert!(matches!(
            cli.worker.resolve(),
            Err(ConfigError::BadSeconds("--shutdown-timeout"))
        ));
    }
}
