//! Where task code runs.
//!
//! The worker asks a [`Pool`] for a slot, then hands it a [`Job`]. The slot
//! step exists so a message waiting for a free slot is still "reserved"
//! (and can be put back on the queue at shutdown) until the moment it
//! really starts. Knows nothing of Redis.

pub mod child;
pub mod ipc;
#[cfg(test)]
mod ipc_props;
pub mod prefork;
pub mod threads;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tasks::{CancelFlag, DynTask, ProgressSink, TaskError};
use tokio::sync::oneshot;

/// One task invocation.
pub struct Job {
    pub task: Arc<dyn DynTask>,
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
    /// Ask the task to stop (soft limit): it sees `checkpoint()` fail.
    pub soft_limit: Option<Duration>,
    /// Stop waiting for it (hard limit).
    pub hard_limit: Option<Duration>,
    pub cancel: Arc<CancelFlag>,
    pub progress: Arc<dyn ProgressSink>,
    /// `revoke(terminate=True)`: stop it now (prefork kills its process).
    pub terminate: Arc<tokio::sync::Notify>,
    /// The signal to stop it with (Celery's `signal=` argument).
    pub terminate_signal: Arc<std::sync::atomic::AtomicI32>,
    /// The pool writes the pid of the process running it here.
    pub pid: Arc<std::sync::atomic::AtomicU32>,
    /// Told that pid once the job is in its process, so that STARTED names
    /// the process that runs the job: the pid `run` writes at once may be
    /// unknown or stale (a prefork process still starting, or replaced
    /// just before the job reached it).
    pub handed_to: Option<oneshot::Sender<u32>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// How a job ended, from the pool's point of view.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The task returned (a value or a task-level error).
    Finished {
        result: Result<Value, TaskError>,
        /// Process that ran it (for STARTED/`worker_pid`).
        pid: u32,
    },
    /// The task panicked; the message is the panic payload.
    Panicked(String),
    /// The hard time limit passed before it finished.
    HardTimeLimit(Duration),
    /// The process running it went over `--max-memory-per-child` and was
    /// killed (prefork).
    MemoryLimit { rss_kib: u64, cap_kib: u64 },
    /// Revoked with terminate while running.
    Terminated,
    /// The process running it died (prefork) or the pool went away.
    WorkerLost(String),
}

/// A task's result as a pool hands it on, within the limits of what the
/// worker can carry (`protocol::limits::MAX_RESULT_DEPTH`): a value nested
/// deeper becomes a
/// FAILURE with kombu's `EncodeError`, Celery's outcome for a result its
/// serializer cannot encode, instead of a frame or document that the next
/// hop could not read.
pub fn carriable(result: Result<Value, TaskError>) -> Result<Value, TaskError> {
    use crate::protocol::limits::{check_depth_at, MAX_RESULT_DEPTH};
    let check_depth = |v: &Value, what: &str| check_depth_at(v, MAX_RESULT_DEPTH, || what.into());
    match result {
        Ok(value) => match check_depth(&value, "the task's return value") {
            Ok(()) => Ok(value),
            Err(too_deep) => Err(encode_error(too_deep.to_string())),
        },
        Err(TaskError::Failed {
            exception,
            traceback,
        }) => match exception
            .args
            .iter()
            .try_for_each(|a| check_depth(a, "an argument of the task's exception"))
        {
            Ok(()) => Err(TaskError::Failed {
                exception,
                traceback,
            }),
            Err(too_deep) => Err(TaskError::Failed {
                exception: tasks::PyException::new(
                    &exception.module,
                    &exception.name,
                    format!("({too_deep}; its arguments were dropped)"),
                ),
                traceback,
            }),
        },
        other => other,
    }
}

/// `kombu.exceptions.EncodeError(message)`: a result the worker cannot
/// carry back.
pub fn encode_error(message: impl Into<String>) -> TaskError {
    TaskError::failed(tasks::PyException::new(
        "kombu.exceptions",
        "EncodeError",
        message,
    ))
}

/// A claim on one execution slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Waits for a permit of a pool's slot semaphore (never closed).
pub(crate) fn acquire_slot(
    slots: &Arc<tokio::sync::Semaphore>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Slot> + Send + 'static>> {
    let slots = slots.clone();
    Box::pin(async move {
        let permit = slots
            .acquire_owned()
            .await
            .expect("pool semaphore is never closed");
        Slot { _permit: permit }
    })
}

/// Takes one slot away for good, once it is free (shrinking a pool).
pub(crate) async fn retire_slot(slots: &tokio::sync::Semaphore) -> Result<(), String> {
    slots.acquire().await.map_err(|e| e.to_string())?.forget();
    Ok(())
}

/// An execution pool. Implementations: [`threads::ThreadPool`] (also used
/// for `--pool solo` with one thread); the prefork pool slots in here.
pub trait Pool: Send + Sync + std::fmt::Debug {
    /// `threads`, `solo`, `prefork`: what `inspect stats` reports.
    fn kind(&self) -> &'static str;
    fn size(&self) -> usize;
    /// Waits for a free slot.
    fn acquire(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Slot> + Send + '_>>;
    /// Runs `job` in the slot; the receiver yields its outcome.
    fn run(&self, slot: Slot, job: Job) -> oneshot::Receiver<JobOutcome>;
    /// Pids of the processes running tasks.
    fn pids(&self) -> Vec<u32>;
    /// Adds `n` execution slots (prefork: `n` more processes).
    fn grow(&self, n: usize);
    /// Removes `n` slots once they are free (prefork: their processes
    /// exit); never below one.
    fn shrink(
        &self,
        n: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
    /// Stops every running task now (cold shutdown). Prefork kills its
    /// processes; threads cannot be killed, so the default does nothing.
    fn abort(&self) {}
    /// Replaces every process with a fresh one, each once its current task
    /// is done (`pool_restart`); only prefork has processes to replace.
    fn restart(&self) -> Result<(), String> {
        Err(format!(
            "the {} pool has no processes to restart",
            self.kind()
        ))
    }
    /// Processes replaced, by cause (prefork only).
    fn restarts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        Default::default()
    }
}
