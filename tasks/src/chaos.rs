//! Tasks that misbehave on purpose (`tori.chaos.*`), registered only with
//! `--enable-chaos-tasks`. They prove the worker survives what real task
//! code does on a bad day: panic, abort, segfault, allocate without end,
//! spin without ever checking for cancellation, reject their own message —
//! and one, `tori.chaos.handler_panic`, that makes the worker's own
//! handling of its message panic, for the bugs no review catches.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::diagnostics::NoArgs;
use crate::registry::Registry;
use crate::task::{Task, TaskContext, TaskError};

pub fn register(registry: &mut Registry) {
    registry
        .register(Panic)
        .register(Abort)
        .register(Segfault)
        .register(Alloc)
        .register(Spin)
        .register(Exit)
        .register(RejectMessage)
        .register(HandlerPanic);
}

#[derive(Debug, Clone, Copy)]
pub struct Panic;

impl Task for Panic {
    const NAME: &'static str = "tori.chaos.panic";
    const PARAMS: &'static [&'static str] = &[];
    type Args = NoArgs;
    type Output = ();

    fn run(&self, _ctx: &TaskContext<'_>, _args: NoArgs) -> Result<(), TaskError> {
        panic!("chaos: panic requested")
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Abort;

impl Task for Abort {
    const NAME: &'static str = "tori.chaos.abort";
    const PARAMS: &'static [&'static str] = &[];
    type Args = NoArgs;
    type Output = ();

    fn run(&self, _ctx: &TaskContext<'_>, _args: NoArgs) -> Result<(), TaskError> {
        std::process::abort()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Segfault;

impl Task for Segfault {
    const NAME: &'static str = "tori.chaos.segfault";
    const PARAMS: &'static [&'static str] = &[];
    type Args = NoArgs;
    type Output = ();

    #[allow(unsafe_code)]
    fn run(&self, _ctx: &TaskContext<'_>, _args: NoArgs) -> Result<(), TaskError> {
        // SAFETY: none — this is the point. It stands for a crash inside
        // native code (pdfium, ONNX Runtime) that no Rust guard can catch.
        unsafe {
            std::ptr::null_mut::<u64>().write_volatile(black_box(1));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Alloc;

#[derive(Debug, Deserialize)]
pub struct AllocArgs {
    mib: u64,
}

impl Task for Alloc {
    const NAME: &'static str = "tori.chaos.alloc";
    const PARAMS: &'static [&'static str] = &["mib"];
    type Args = AllocArgs;
    type Output = u64;

    /// Allocates and touches `mib` MiB, 16 MiB at a time, like a decoder
    /// blowing up on a hostile file; it never checks for cancellation.
    fn run(&self, _ctx: &TaskContext<'_>, args: AllocArgs) -> Result<u64, TaskError> {
        let mut held: Vec<Vec<u8>> = Vec::new();
        let chunk = 16 << 20;
        let mut total = 0u64;
        while total < args.mib << 20 {
            held.push(vec![1u8; chunk]);
            total += chunk as u64;
            // Give an RSS watcher a chance to see the growth.
            std::thread::sleep(Duration::from_millis(2));
        }
        black_box(&held);
        Ok(args.mib)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Spin;

#[derive(Debug, Deserialize)]
pub struct SpinArgs {
    seconds: f64,
}

impl Task for Spin {
    const NAME: &'static str = "tori.chaos.spin";
    const PARAMS: &'static [&'static str] = &["seconds"];
    type Args = SpinArgs;
    type Output = u64;

    /// Burns CPU in a loop that never looks at its cancel flag, like a
    /// parser stuck on a malformed file.
    fn run(&self, _ctx: &TaskContext<'_>, args: SpinArgs) -> Result<u64, TaskError> {
        let until = Duration::try_from_secs_f64(args.seconds.max(0.0))
            .ok()
            .and_then(|d| Instant::now().checked_add(d))
            .ok_or_else(|| TaskError::value(format!("seconds is too large: {}", args.seconds)))?;
        let mut n = 0u64;
        while Instant::now() < until {
            n = black_box(n.wrapping_add(1));
        }
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Exit;

#[derive(Debug, Deserialize)]
pub struct ExitArgs {
    #[serde(default)]
    code: i32,
}

impl Task for Exit {
    const NAME: &'static str = "tori.chaos.exit";
    const PARAMS: &'static [&'static str] = &["code"];
    type Args = ExitArgs;
    type Output = ();

    fn run(&self, _ctx: &TaskContext<'_>, args: ExitArgs) -> Result<(), TaskError> {
        std::process::exit(args.code)
    }
}

/// `tori.chaos.reject(reason, requeue=False, once_marker=None)`: raises
/// Celery's `Reject(reason, requeue)`, the way a task gives up on a message
/// it must never run again (`requeue=False`) or hands it back for another
/// worker (`requeue=True`). With `once_marker`, a file path, it rejects only
/// while that file does not exist, creating it as it rejects: a requeued
/// message then succeeds on its next delivery, so a test can see that it
/// came back (and only once).
#[derive(Debug, Clone, Copy)]
pub struct RejectMessage;

#[derive(Debug, Deserialize)]
pub struct RejectArgs {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    requeue: bool,
    #[serde(default)]
    once_marker: Option<std::path::PathBuf>,
}

impl Task for RejectMessage {
    const NAME: &'static str = "tori.chaos.reject";
    const PARAMS: &'static [&'static str] = &["reason", "requeue", "once_marker"];
    type Args = RejectArgs;
    type Output = String;

    fn run(&self, _ctx: &TaskContext<'_>, args: RejectArgs) -> Result<String, TaskError> {
        if let Some(marker) = &args.once_marker {
            // create_new: of two deliveries racing, exactly one rejects.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(marker);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Ok(format!("not rejected: {} exists", marker.display()));
                }
                Err(e) => {
                    return Err(TaskError::runtime(format!(
                        "cannot create {}: {e}",
                        marker.display()
                    )))
                }
            }
        }
        Err(TaskError::Reject {
            requeue: args.requeue,
            reason: args.reason,
        })
    }
}

/// `tori.chaos.handler_panic(point)`: returns `point` when it runs; the
/// misbehaviour is elsewhere. The worker's handling of this task's message
/// (in the parent process, which never runs task code) panics at `point`
/// (`HandlerPanic::POINTS`) when chaos tasks are enabled. No real input is
/// known to panic the handler — each one found became a bug fix — so this is
/// how the tests prove that the next one still costs only its own message.
#[derive(Debug, Clone, Copy)]
pub struct HandlerPanic;

impl HandlerPanic {
    /// Where the handler panics: while reading the message (`decode`),
    /// once it is accepted and before it runs (`received`), while its job
    /// runs (`running`: the job reports progress, the handler panics once
    /// it has stored it, and the job then sleeps a minute without checking
    /// for cancellation, so only stopping its process ends it sooner), once
    /// the next steps of its workflow are published and before its result
    /// is stored (`published`), after its final state is stored and before
    /// a late ack (`stored`), or at `received` and then again while the
    /// panic is being settled (`settle`).
    pub const POINTS: &'static [&'static str] = &[
        "decode",
        "received",
        "running",
        "published",
        "stored",
        "settle",
    ];

    /// How long a `running` job sleeps: far longer than any test waits for
    /// the outcome, so a test that sees the process free again knows the
    /// job was stopped, not finished.
    pub const RUNNING_SLEEP: Duration = Duration::from_secs(60);
}

#[derive(Debug, Deserialize)]
pub struct HandlerPanicArgs {
    point: String,
}

impl Task for HandlerPanic {
    const NAME: &'static str = "tori.chaos.handler_panic";
    const PARAMS: &'static [&'static str] = &["point"];
    type Args = HandlerPanicArgs;
    type Output = String;

    fn run(&self, ctx: &TaskContext<'_>, args: HandlerPanicArgs) -> Result<String, TaskError> {
        if args.point == "running" {
            ctx.report_progress(serde_json::json!({ "point": "running" }));
            std::thread::sleep(Self::RUNNING_SLEEP);
        }
        Ok(args.point)
    }
}
