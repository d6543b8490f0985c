//! The tasks tori-worker runs.
//!
//! This crate knows nothing of Redis, Celery's wire format or processes: a
//! task is a value implementing [`Task`], and the worker crate adapts it to
//! Celery's messages. That keeps every task testable as a plain function.

pub mod builtins;
pub mod chaos;
pub mod diagnostics;
#[cfg(feature = "ingest")]
pub mod ingest;
pub mod registry;
pub mod task;

#[cfg(feature = "ingest")]
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
    #[cfg(feature = "ingest")]
    ingest::register(&mut registry);
    registry
}

/// Why `pdf_ingestion` is missing from a build without the `ingest`
/// feature (the fuzz targets' build): the same answer the worker gives
/// when the native files are absent, so callers need no feature of their own.
#[cfg(not(feature = "ingest"))]
pub fn ingestion_status() -> Result<(), String> {
    Err("PDF ingestion (pdf_ingestion) is not in this build (the `ingest` feature is off)".into())
}
