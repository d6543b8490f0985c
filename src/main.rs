//! `tori-worker`: flags and environment → configuration → run.

/// mimalloc instead of glibc malloc: the parent allocates and frees small
/// buffers for every message (envelopes, JSON, Redis replies), and malloc
/// and free were ~10 % of its samples on the no-op drain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod dead_letter_cli;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tori_worker::config::{Cli, Command, ConfigError, LogFormat, WorkerArgs};
use tori_worker::redis_link::LinkError;
use tori_worker::redis_url::UrlError;
use tori_worker::worker::{Stop, Worker};
use tracing_subscriber::EnvFilter;

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},redis=warn,rustls=warn,pdf_oxide=error"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Tasks {
            json,
            enable_chaos_tasks,
        }) => print_tasks(json, enable_chaos_tasks),
        Some(Command::Ingest { file, options }) => ingest_one(&file, options.as_deref()),
        Some(Command::PoolChild {
            loglevel,
            enable_chaos_tasks,
        }) => {
            tori_worker::pool::child::use_batch_scheduling();
            init_logging(&loglevel, LogFormat::Text);
            let registry = tori_worker::task_registry(enable_chaos_tasks);
            tori_worker::pool::child::run_child(registry).context("pool process")
        }
        Some(Command::DeadLetter(args)) => {
            init_logging("warn", LogFormat::Text);
            // The reason alone, one line: an operator's mistake (an unknown
            // id) is not a crash, so no backtrace even with RUST_BACKTRACE.
            if let Err(e) = dead_letter_cli::run(*args) {
                eprintln!("tori-worker dead-letter: {e}");
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Worker(args)) => config_exit(run_worker(*args)),
        None => config_exit(run_worker(cli.worker)),
    }
}

/// sysexits' EX_CONFIG: the worker cannot start as configured (a bad URL
/// or option, a TLS certificate or file problem). Retrying will not help,
/// so a supervisor should not restart it in a tight loop unnoticed.
const EX_CONFIG: i32 = 78;

fn config_exit(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = &result {
        let config = e.downcast_ref::<LinkError>().is_some()
            || e.downcast_ref::<ConfigError>().is_some()
            || e.downcast_ref::<UrlError>().is_some();
        if config {
            tracing::error!(error = %e, "cannot start: configuration");
            eprintln!("tori-worker: {e}");
            std::process::exit(EX_CONFIG);
        }
    }
    result
}

fn print_tasks(json: bool, chaos: bool) -> anyhow::Result<()> {
    let registry = tori_worker::task_registry(chaos);
    if json {
        println!("{}", serde_json::to_string_pretty(&registry.describe())?);
    } else {
        for info in registry.describe() {
            println!("{}({})", info.name, info.params.join(", "));
        }
    }
    Ok(())
}

/// Prints PROGRESS reports of the one-shot ingest to stderr.
#[cfg(feature = "ingest")]
struct StderrProgress;

#[cfg(feature = "ingest")]
impl tasks::ProgressSink for StderrProgress {
    fn progress(&self, meta: serde_json::Value) {
        eprintln!("progress {meta}");
    }
}

/// Without the `ingest` feature there is no ingestion task to run.
#[cfg(not(feature = "ingest"))]
fn ingest_one(_file: &std::path::Path, _options: Option<&str>) -> anyhow::Result<()> {
    tasks::ingestion_status().map_err(anyhow::Error::msg)
}

/// `tori-worker ingest FILE.pdf`: the ingestion task run in this process,
/// reading under the file's own directory unless TORI_STORAGE_ROOT is set.
#[cfg(feature = "ingest")]
fn ingest_one(file: &std::path::Path, options: Option<&str>) -> anyhow::Result<()> {
    init_logging("warn", LogFormat::Text);
    tasks::ingestion_status().map_err(anyhow::Error::msg)?;
    let file = file
        .canonicalize()
        .with_context(|| format!("cannot open {}", file.display()))?;
    let root = match std::env::var_os("TORI_STORAGE_ROOT").filter(|v| !v.is_empty()) {
        Some(root) => std::path::PathBuf::from(root),
        None => file
            .parent()
            .context("the file has no parent directory")?
            .to_path_buf(),
    };
    let task = tasks::ingest::PdfIngestion::new(&root, tasks::ingest::NativeFiles::from_env())
        .map_err(anyhow::Error::msg)?;
    let mut kwargs = serde_json::Map::new();
    if let Some(options) = options {
        let value: serde_json::Value =
            serde_json::from_str(options).context("--options is not JSON")?;
        kwargs.insert("options".into(), value);
    }
    let cancel = tasks::CancelFlag::new();
    let ctx = tasks::TaskContext {
        id: "local",
        name: "pdf_ingestion",
        retries: 0,
        cancel: &cancel,
        progress: &StderrProgress,
    };
    let args = vec![serde_json::json!(file.display().to_string())];
    match tasks::DynTask::call(&task, &ctx, args, kwargs) {
        Ok(result) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Err(tasks::TaskError::Failed { exception, .. }) => {
            anyhow::bail!(
                "{}.{}: {}",
                exception.module,
                exception.name,
                exception.message()
            )
        }
        Err(other) => anyhow::bail!("ingestion did not finish: {other:?}"),
    }
}

fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    init_logging(&args.loglevel, args.log_format);
    let cfg = args.resolve()?;
    // rediss:// needs a TLS crypto provider; install ours once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the parent only moves bytes between Redis and its pool
    // (task code runs in pool processes or blocking threads), and with a
    // single thread no wake-up crosses threads. Measured on the no-op
    // drain: -25 % CPU per task and +11-25 % throughput against a 2-thread
    // runtime (benches/RESULTS.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("tori-io")
        .build()
        .context("starting the async runtime")?;
    let stopped = runtime.block_on(async move {
        // Listen before anything else: a stop must work in every phase,
        // start-up without Redis included. A signal arriving before the
        // watcher runs is kept by its stream.
        let signals = Signals::listen().context("listening for signals")?;
        let registry = tori_worker::task_registry(cfg.enable_chaos_tasks);
        let worker = Worker::new(cfg, registry)?;
        tokio::spawn(signals.watch(worker.stopper()));
        worker.run().await
    })?;
    // Threads abandoned at a hard time limit must not keep the process
    // up, nor past --shutdown-timeout. Dropping the runtime's tasks also
    // kills any pool process still there (kill on drop).
    runtime.shutdown_timeout(stopped.time_left.min(std::time::Duration::from_secs(1)));
    let code = stopped.outcome.exit_code();
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// The stop signals, registered from the first moment.
struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// SIGTERM or SIGINT: warm shutdown. A second one, or SIGQUIT: cold.
    async fn watch(mut self, stopper: tokio::sync::watch::Sender<Stop>) {
        loop {
            let cold = tokio::select! {
                _ = self.term.recv() => false,
                _ = self.int.recv() => false,
                _ = self.quit.recv() => true,
            };
            let next = if cold || *stopper.borrow() != Stop::Running {
                Stop::Cold
            } else {
                Stop::Warm
            };
            tracing::warn!(mode = ?next, "shutdown requested");
            stopper.send_replace(next);
        }
    }
}
