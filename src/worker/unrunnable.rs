//! Messages the worker will never run: too large, undecodable, or with a
//! field whose value cannot be used. Each ends the same way, here: when
//! its task id can be read, the task gets a FAILURE whose exception says
//! what was wrong (so `AsyncResult.get()` returns instead of waiting for
//! ever; Celery itself stores nothing for such messages), then the raw
//! message goes to the dead-letter list, where an operator can read it and
//! requeue it. Nothing is dropped.
//!
//! Takes the narrow handles it needs, not the whole worker context.

use serde_json::json;

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::protocol::result::exception_value;
use crate::protocol::{State, StateDoc};

/// What the worker needs to settle a message it will not run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handles<'a> {
    pub backend: &'a ResultBackend,
    pub broker: &'a Broker,
    pub events: &'a Events,
    pub metrics: &'a Metrics,
}

/// One message the worker will not run.
#[derive(Debug)]
pub(crate) struct Unrunnable<'a> {
    pub queue: &'a str,
    /// Its entry in `unacked`.
    pub tag: &'a str,
    /// The exact bytes it arrived as (kept in the dead-letter record).
    pub raw: &'a str,
    /// Task id and name, when they could be read.
    pub task: Option<(String, Option<String>)>,
    /// The Python exception (module, name) its FAILURE carries.
    pub exception: (&'static str, &'static str),
    /// What was wrong, for the log, the FAILURE and the dead-letter record.
    pub reason: String,
}

/// Stores FAILURE for the message's task (when it has a readable id), then
/// moves the message to the dead-letter list. A failed store leaves the
/// message unacked, so it is delivered again rather than dead-lettered
/// with no state stored. Returns whether it was dead-lettered.
pub(crate) async fn settle(h: Handles<'_>, m: Unrunnable<'_>) -> bool {
    let (task_id, task_name) = match &m.task {
        Some((id, name)) => (Some(id.as_str()), name.as_deref().unwrap_or("")),
        None => (None, ""),
    };
    let (module, name) = m.exception;
    tracing::error!(
        task_id = task_id.unwrap_or(""),
        task_name,
        queue = m.queue,
        size = m.raw.len(),
        preview = %super::preview(m.raw),
        exception = name,
        reason = %m.reason,
        "message will not be run; storing FAILURE (when its task id is known) and moving it to the dead-letter list"
    );
    if let Some(id) = task_id {
        let doc = StateDoc::new(
            id,
            State::Failure,
            exception_value(module, name, &[json!(m.reason)]),
        );
        if let Err(e) = h.backend.store(&doc).await {
            tracing::error!(task_id = id, error = %e, "could not store FAILURE for a message that will not be run; leaving it unacked for redelivery");
            return false;
        }
        h.metrics.count(task_name, "failed");
        h.events.task("task-failed", |ev| {
            ev.field("uuid", &id)
                .field("exception", &format!("{name}({:?})", m.reason));
        });
    }
    match h
        .broker
        .dead_letter(Some(m.tag), m.queue, m.raw, &m.reason)
        .await
    {
        Ok(moved) => moved,
        Err(e) => {
            tracing::error!(error = %e, "could not dead-letter; the restore sweep will deliver the message again");
            false
        }
    }
}

/// [`settle`] for a message that was never parsed (unreadable, or too
/// large to parse): its task is read from the raw text's headers.
pub(crate) async fn settle_unparsed(
    h: Handles<'_>,
    queue: &str,
    tag: &str,
    raw: &str,
    exception: (&'static str, &'static str),
    reason: String,
) -> bool {
    let task = crate::protocol::envelope::peek_task(raw.as_bytes());
    settle(
        h,
        Unrunnable {
            queue,
            tag,
            raw,
            task,
            exception,
            reason,
        },
    )
    .await
}
