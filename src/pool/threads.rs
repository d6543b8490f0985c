//! Tasks on blocking threads inside the worker process.
//!
//! Cheap and good for I/O-bound or trusted tasks. What it cannot do, by
//! the nature of threads: survive an abort or segfault in native code, or
//! stop a task that never checks its cancel flag — at the hard limit the
//! worker reports `TimeLimitExceeded` and stops waiting, but the thread
//! runs on. The prefork pool exists for exactly those cases.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tasks::TaskContext;
use tokio::sync::{oneshot, Semaphore};

use super::{Job, JobOutcome, Pool, Slot};

#[derive(Debug)]
pub struct ThreadPool {
    kind: &'static str,
    size: std::sync::atomic::AtomicUsize,
    slots: Arc<Semaphore>,
}

impl ThreadPool {
    /// `kind` is `threads` or `solo` (one thread).
    pub fn new(kind: &'static str, size: usize) -> Self {
        let size = size.max(1);
        Self {
            kind,
            size: size.into(),
            slots: Arc::new(Semaphore::new(size)),
        }
    }
}

/// Extracts the message of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Runs a job on the current thread, turning a panic into an outcome.
pub fn run_job_here(job: &Job) -> JobOutcome {
    let ctx = TaskContext {
        id: &job.id,
        name: &job.name,
        retries: job.retries,
        cancel: &job.cancel,
        progress: job.progress.as_ref(),
    };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        job.task.call(&ctx, job.args.clone(), job.kwargs.clone())
    }));
    match outcome {
        Ok(result) => JobOutcome::Finished {
            result: super::carriable(result),
            pid: std::process::id(),
        },
        Err(payload) => JobOutcome::Panicked(panic_message(payload.as_ref())),
    }
}

impl Pool for ThreadPool {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn size(&self) -> usize {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn grow(&self, n: usize) {
        self.slots.add_permits(n);
        self.size.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn shrink(
        &self,
        n: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            for _ in 0..n {
                if self.size() <= 1 {
                    return Err("cannot shrink the pool below one slot".into());
                }
                self.size.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                super::retire_slot(&self.slots).await?;
            }
            Ok(())
        })
    }

    fn acquire(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Slot> + Send + '_>> {
        super::acquire_slot(&self.slots)
    }

    fn run(&self, slot: Slot, mut job: Job) -> oneshot::Receiver<JobOutcome> {
        let (tx, rx) = oneshot::channel();
        let soft = job.soft_limit;
        let hard = job.hard_limit;
        let cancel = job.cancel.clone();
        let terminate = job.terminate.clone();
        job.pid
            .store(std::process::id(), std::sync::atomic::Ordering::Relaxed);
        if let Some(handed_to) = job.handed_to.take() {
            let _ = handed_to.send(std::process::id());
        }
        let task = tokio::task::spawn_blocking(move || {
            let outcome = run_job_here(&job);
            // The slot is held until the thread is really free, even if the
            // worker stopped waiting at the hard limit.
            drop(slot);
            outcome
        });
        tokio::spawn(async move {
            let soft_timer = async {
                match soft {
                    Some(d) => {
                        tokio::time::sleep(d).await;
                        cancel.cancel();
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hard_timer = async {
                match hard {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::pin!(task, soft_timer, hard_timer);
            let mut soft_done = false;
            let outcome = loop {
                tokio::select! {
                    joined = &mut task => {
                        break joined.unwrap_or_else(|e| JobOutcome::WorkerLost(format!("task thread failed: {e}")));
                    }
                    _ = &mut soft_timer, if !soft_done => { soft_done = true; }
                    _ = terminate.notified() => {
                        // A thread cannot be killed: ask it to stop and
                        // stop waiting for it.
                        cancel.cancel();
                        break JobOutcome::Terminated;
                    }
                    _ = &mut hard_timer => {
                        cancel.cancel();
                        break JobOutcome::HardTimeLimit(hard.unwrap_or_default());
                    }
                }
            };
            let _ = tx.send(outcome);
        });
        rx
    }

    fn pids(&self) -> Vec<u32> {
        vec![std::process::id()]
    }
}
