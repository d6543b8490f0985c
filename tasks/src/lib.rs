//! The tasks tori-worker runs.
//!
//! This crate knows nothing of Redis, Celery's wire format or processes: a
//! task is a value implementing [`Task`], and the worker crate adapts it to
//! Celery's messages. That keeps every task testable as a plain function.

pub mod builtins;
pub mod chaos;
pub mod diagnostics;
pub mod ingest;
pub mod registry;
pub mod task;

pub use ingest::ingestion_status;
pub use registry::{DynTask, Registry, TaskInfo};
pub use task::{
    CancelFlag, NoProgress, ProgressSink, PyException, Task, TaskContext, TaskError, TaskOptions,
};

/// Every task this build ships, ready to run.
pub fn default_registry() -> Registry {
    let mut registry = Registry::new();
    diagnostics::register(&mut registry);
    // Only when scripts/setup-native placed the native files; otherwise
    // the worker answers NotRegistered and ingest::ingestion_status() says why.
    ingest::register(&mut registry);
    registry
}
