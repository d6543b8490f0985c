//! The prefork child: `tori-worker pool-child`, started by the parent.
//!
//! It initialises its tasks once (building the registry loads models and
//! native libraries), then runs one job at a time as the parent sends them.
//! A panic is caught and reported; anything worse (abort, segfault, OOM
//! kill) ends only this process, and the parent notices the closed pipe.

use std::fs::File;
use std::io::{BufReader, Write};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tasks::{CancelFlag, ProgressSink, Registry, TaskContext, TaskError};

use super::ipc::{encode_frame, read_frame_sized, FrameError, FromChild, ToChild};
use super::threads::panic_message;

/// Frames to the parent; shared by the job loop and progress reports.
#[derive(Clone)]
struct Outbox(Arc<Mutex<File>>);

impl Outbox {
    /// Sends `msg` (or, when it cannot be framed, why); returns the bytes
    /// sent.
    fn send(&self, msg: &FromChild) -> usize {
        let frame = match encode_frame(msg) {
            Ok(frame) => frame,
            // Too large for a frame: the parent hears why, in a short one.
            Err(e) => {
                let instead = match msg {
                    FromChild::Done(_) => FromChild::Done(Err(crate::pool::encode_error(format!(
                        "the task's result could not be sent to the worker: {e}"
                    )))),
                    FromChild::Progress(_) => {
                        eprintln!("tori-worker pool process: progress report dropped: {e}");
                        return 0;
                    }
                    _ => FromChild::Panicked(format!("a pool process frame failed: {e}")),
                };
                match encode_frame(&instead) {
                    Ok(frame) => frame,
                    Err(_) => std::process::exit(70),
                }
            }
        };
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if out.write_all(&frame).and_then(|()| out.flush()).is_err() {
            // The parent is gone; nothing left to do for anyone.
            std::process::exit(0);
        }
        frame.len()
    }
}

struct FrameProgress(Outbox);

impl ProgressSink for FrameProgress {
    fn progress(&self, meta: serde_json::Value) {
        // The same limit as results: a report the parent could not read
        // would cost the job, so it is dropped and said on stderr.
        if let Err(too_deep) = crate::protocol::limits::check_depth_at(
            &meta,
            crate::protocol::limits::MAX_RESULT_DEPTH,
            || "a progress report".into(),
        ) {
            eprintln!("tori-worker pool process: progress report dropped: {too_deep}");
            return;
        }
        self.0.send(&FromChild::Progress(meta));
    }
}

/// Runs the child protocol until the parent closes our stdin.
pub fn run_child(registry: Registry) -> std::io::Result<()> {
    // Die with the parent even if it is SIGKILLed: a child must never run
    // on, holding a message nobody will ack.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // Frames travel on a private copy of stdout; fd 1 then points at stderr
    // so a task that prints cannot corrupt the protocol.
    let frames = rustix::io::dup(rustix::stdio::stdout())?;
    rustix::stdio::dup2_stdout(rustix::stdio::stderr())?;
    let outbox = Outbox(Arc::new(Mutex::new(File::from(frames))));
    outbox.send(&FromChild::Ready {
        pid: std::process::id(),
    });

    // The soft time limit arrives as SIGUSR1 (billiard signals a Python
    // pool process the same way) and raises the running job's flag; the
    // handler only stores an atomic. A frame on the pipe would need a
    // thread reading it while the job runs, and handing every job across
    // threads cost a wake-up per task. A signal left over from the previous
    // job is delivered before the read of the next one returns, so the
    // reset at the start of each job clears it.
    let cancel = Arc::new(CancelFlag::new());
    {
        let cancel = cancel.clone();
        // SAFETY: the handler does one atomic store, which is
        // async-signal-safe, and allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            signal_hook_registry::register(rustix::process::Signal::USR1.as_raw(), move || {
                cancel.cancel()
            })?;
        }
    }

    let progress = FrameProgress(outbox.clone());
    let mut stdin = BufReader::new(std::io::stdin().lock());
    // stdin closed: the parent wants us gone (recycling or shutdown).
    loop {
        let (job, frame_len) = match read_frame_sized::<ToChild>(&mut stdin) {
            Ok(Some((ToChild::Run(job), len))) => (job, len),
            Ok(None) => break,
            // Read whole but not understood: the stream is still in step,
            // and the parent fails that job and replaces this process.
            Err(e @ FrameError::Unreadable { .. }) => {
                outbox.send(&FromChild::Unreadable(e.to_string()));
                continue;
            }
            Err(e) => {
                outbox.send(&FromChild::Unreadable(e.to_string()));
                eprintln!("tori-worker pool process: cannot read from the worker: {e}");
                std::process::exit(65);
            }
        };
        cancel.reset();
        let reply = match registry.get(&job.name) {
            None => FromChild::Done(Err(TaskError::failed(tasks::PyException::new(
                "celery.exceptions",
                "NotRegistered",
                job.name.clone(),
            )))),
            Some(task) => {
                let ctx = TaskContext {
                    id: &job.id,
                    name: &job.name,
                    retries: job.retries,
                    cancel: &cancel,
                    progress: &progress,
                };
                match std::panic::catch_unwind(AssertUnwindSafe(|| {
                    task.call(&ctx, job.args, job.kwargs)
                })) {
                    Ok(result) => FromChild::Done(crate::pool::carriable(result)),
                    Err(payload) => FromChild::Panicked(panic_message(payload.as_ref())),
                }
            }
        };
        let reply_len = outbox.send(&reply);
        drop(reply);
        // A process stays warm for the next job; after a large one it
        // should not also stay large.
        if frame_len.max(reply_len) >= crate::memory::LARGE_MESSAGE {
            crate::memory::release_to_os();
        }
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

/// Puts this process under `SCHED_BATCH`: same CPU share as before, but
/// waking it never preempts the task running on that CPU. Each job reaches
/// a pool process by a pipe write that wakes it; under the normal policy
/// that wake-up took the CPU from the parent in the middle of its write
/// (measured: 18 % of the parent's samples in that `write`), so the parent
/// then had to be scheduled back before it could hand out the next job or
/// answer Redis. Now the parent finishes what it is doing and the child
/// runs when the parent waits or on the other CPU: on a no-op drain with
/// results, 12 % more tasks/s and 8 % less worker CPU per task. For long
/// CPU-bound tasks it changes nothing but who wins a wake-up: the parent,
/// which keeps heartbeats and remote control prompt.
///
/// Called first thing in a pool process, before tasks start threads, so
/// that every thread of the process inherits it.
pub fn use_batch_scheduling() {
    if let Err(e) = set_batch_policy() {
        eprintln!("tori-worker: pool process keeps the normal scheduling policy: {e}");
    }
}

fn set_batch_policy() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the param struct we pass and
    // changes only this process's policy; pid 0 is the calling process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
