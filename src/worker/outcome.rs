//! What happens after a task ran: result, workflow messages, ack.
//!
//! Order matters and follows Celery: workflow messages (retry republish,
//! chain links, callbacks) are published before the state is stored,
//! errbacks after it (an old-style errback looks the failure up by id),
//! and the message is acked last — a crash in between re-runs the task rather
//! than losing its continuation. A chord header's result is counted in its
//! chord right after it is stored (`chord.rs`). The task event goes out
//! last, as in Celery, whose pool process stores the result before the
//! parent announces it: whoever reacts to the event finds the result.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tasks::task::py_repr;
use tasks::{PyException, TaskError, TaskOptions};

use super::inflight::Phase;
use super::message::{ack, record_final, store_then_ack};
use super::{handler_panic, Ctx};
use crate::broker::Delivery;
use crate::pool::JobOutcome;
use crate::protocol::canvas::{self, CanvasError, Origin};
use crate::protocol::outgoing::retry_of;
use crate::protocol::result::{child_ref, exception_value, Extended};
use crate::protocol::{State, StateDoc, TaskMessage};

pub(crate) struct Finish<'a> {
    pub delivery: &'a Delivery,
    pub tag: &'a str,
    pub msg: &'a TaskMessage,
    pub options: &'a TaskOptions,
    pub acks_late: bool,
    pub runtime: Duration,
    pub soft_limit: Option<f64>,
}

impl Finish<'_> {
    pub(crate) fn doc(&self, ctx: &Ctx, state: State, result: Value) -> StateDoc {
        let mut doc = StateDoc::new(&self.msg.id, state, result);
        doc.group_id = self.msg.group.clone();
        doc.parent_id = self.msg.parent_id.clone();
        if ctx.cfg.result_extended {
            doc.extended = Some(Extended {
                name: self.msg.task.clone(),
                args: self.msg.args.clone(),
                kwargs: self.msg.kwargs.clone(),
                worker: ctx.cfg.node_name.clone(),
                retries: self.msg.retries,
                queue: self.delivery.queue.clone(),
            });
        }
        doc
    }

    fn ignore_result(&self) -> bool {
        self.msg.ignores_result(self.options.ignore_result)
    }
}

fn exc_value(e: &PyException) -> Value {
    exception_value(&e.module, &e.name, &e.args)
}

/// A Python-looking traceback, so tools that show `traceback` show where
/// the failure came from.
fn traceback_text(f: &Finish<'_>, e: &PyException, detail: Option<&str>) -> String {
    let mut tb = format!(
        "Traceback (most recent call last):\n  File \"tori-worker\", task {}[{}]\n",
        f.msg.task, f.msg.id
    );
    if let Some(detail) = detail {
        for line in detail.lines() {
            tb.push_str("    ");
            tb.push_str(line);
            tb.push('\n');
        }
    }
    let qualified = if e.module == "builtins" {
        e.name.clone()
    } else {
        format!("{}.{}", e.module, e.name)
    };
    tb.push_str(&format!("{qualified}: {}\n", e.message()));
    tb
}

pub(crate) async fn finish(ctx: &Ctx, f: Finish<'_>, outcome: JobOutcome) {
    let secs = f.runtime.as_secs_f64();
    if ctx.inflight.view(f.tag, |e| e.phase) == Some(super::Phase::Restored) {
        // A cold shutdown took the message back and stopped the process:
        // the task will run again elsewhere, so record nothing.
        tracing::warn!(
            runtime = secs,
            "task interrupted by shutdown; its message was restored"
        );
        return;
    }
    ctx.count_finished(&f.msg.task);
    ctx.metrics.runtime(&f.msg.task, secs);
    let failure = match outcome {
        JobOutcome::Terminated => {
            tracing::warn!(runtime = secs, "task terminated by revoke");
            let signum = ctx
                .inflight
                .view(f.tag, |e| {
                    e.terminate_signal
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .unwrap_or(15);
            return super::message::store_revoked(
                ctx,
                f.msg,
                f.tag,
                "terminated",
                Some(signum),
                false,
            )
            .await;
        }
        JobOutcome::Finished {
            result: Ok(value), ..
        } => {
            return succeed(ctx, &f, value, secs).await;
        }
        JobOutcome::Finished {
            result:
                Err(TaskError::Retry {
                    countdown,
                    reason,
                    max_retries,
                }),
            ..
        } => {
            return retry(ctx, &f, countdown, reason, max_retries).await;
        }
        JobOutcome::Finished {
            result: Err(TaskError::Reject { requeue, reason }),
            ..
        } => {
            return reject(ctx, &f, requeue, reason).await;
        }
        JobOutcome::Finished {
            result:
                Err(TaskError::Failed {
                    exception,
                    traceback,
                }),
            ..
        } => (exception, traceback),
        JobOutcome::Finished {
            result: Err(TaskError::SoftTimeLimitExceeded),
            ..
        } => (
            PyException::new(
                "celery.exceptions",
                "SoftTimeLimitExceeded",
                format!(
                    "soft time limit ({}s) exceeded",
                    f.soft_limit.unwrap_or_default()
                ),
            ),
            None,
        ),
        JobOutcome::Panicked(message) => (
            PyException::new(
                "tori.exceptions",
                "TaskPanicked",
                format!("task panicked: {message}"),
            ),
            None,
        ),
        JobOutcome::HardTimeLimit(limit) => (
            PyException::new(
                "celery.exceptions",
                "TimeLimitExceeded",
                format!("hard time limit ({}s) exceeded", limit.as_secs_f64()),
            ),
            None,
        ),
        JobOutcome::MemoryLimit { rss_kib, cap_kib } => (
            PyException::builtin(
                "MemoryError",
                format!(
                    "task exceeded the memory cap of {cap_kib} KiB (--max-memory-per-child): its \
                     process reached {rss_kib} KiB and was replaced"
                ),
            ),
            None,
        ),
        JobOutcome::WorkerLost(why) if f.acks_late && ctx.cfg.reject_on_worker_lost => {
            return requeue_lost(ctx, &f, why, secs).await;
        }
        JobOutcome::WorkerLost(why) => (
            PyException::new("billiard.exceptions", "WorkerLostError", why),
            None,
        ),
    };
    fail(ctx, &f, failure.0, failure.1, secs).await;
}

async fn succeed(ctx: &Ctx, f: &Finish<'_>, value: Value, secs: f64) {
    let root = f.msg.root_id.clone().unwrap_or_else(|| f.msg.id.clone());
    let from = Origin {
        result: &value,
        parent_id: &f.msg.id,
        root_id: &root,
        origin: &ctx.cfg.node_name,
        default_queue: &ctx.cfg.default_queue,
    };
    let mut children = Vec::new();
    let steps = follow_ups(f.msg);
    if !steps.is_empty() {
        // From here the next steps may be out: a panic must not fail them.
        ctx.inflight.mark_settling(f.tag);
    }
    for (sig, rest) in steps {
        let expansion = match canvas::expand(&sig, rest, &from) {
            Ok(expansion) => expansion,
            Err(e) => {
                tracing::error!(error = %e, signature = %sig, "cannot start the next workflow step; the task fails with the error");
                let exc = canvas_error(&e);
                fail_step(ctx, &sig, &exc, &[]).await;
                return fail(ctx, f, exc, None, secs).await;
            }
        };
        if let Err((what, e)) = record_step(ctx, &expansion).await {
            tracing::error!(error = %e, what, "could not record a chord of the next workflow step; the task fails with the error");
            let exc = publish_error(&e, &what);
            // Nothing of the step was published: its ids would stay
            // PENDING for ever.
            fail_step(ctx, &sig, &exc, &[]).await;
            return fail(ctx, f, exc, None, secs).await;
        }
        let mut published: Vec<String> = Vec::new();
        for (env, route) in &expansion.messages {
            if let Err(e) = ctx
                .broker
                .publish(env, &route.exchange, &route.routing_key)
                .await
            {
                let id = canvas::message_id(env);
                tracing::error!(error = %e, next = %id, "could not publish the next workflow task; the task fails with the error");
                let exc = publish_error(&e, &format!("the next task of the workflow ({id})"));
                // The step is incomplete (a group missing members, a chord
                // that can never count to its size): its ids get the
                // failure, except the members already published, which
                // run and store their own results.
                fail_step(ctx, &sig, &exc, &published).await;
                return fail(ctx, f, exc, None, secs).await;
            }
            published.push(canvas::message_id(env).to_owned());
        }
        if !expansion.child.is_null() {
            children.push(expansion.child);
        }
    }
    handler_panic::chaos_point(ctx, f.msg, "published");
    let shown = result_repr(&value);
    tracing::info!(runtime = secs, result = %shown, "task succeeded");
    ctx.metrics.count(&f.msg.task, "succeeded");
    if f.ignore_result() && f.msg.chord.is_none() {
        if f.acks_late {
            ack(ctx, f.tag).await;
        }
    } else {
        let mut doc = f.doc(ctx, State::Success, value);
        doc.children = Some(children);
        finish_with(ctx, f, &doc).await;
    }
    // After the result is stored, as Celery's pool process stores it
    // before the parent announces it: whoever reacts to the event finds
    // the result there.
    ctx.events.task("task-succeeded", |ev| {
        ev.field("uuid", &f.msg.id)
            .field("result", &shown)
            .field("runtime", &secs);
    });
}

/// Records what a workflow step needs before any of its messages is
/// published: the header shape of each chord that must keep one, and each
/// chord's size. Says what could not be recorded.
pub(super) async fn record_step(
    ctx: &Ctx,
    expansion: &canvas::Expansion,
) -> Result<(), (String, redis::RedisError)> {
    for (group_id, shape) in &expansion.saved_groups {
        ctx.backend
            .save_group(group_id, shape)
            .await
            .map_err(|e| (format!("the header of chord {group_id}"), e))?;
    }
    for (group_id, size) in &expansion.chord_sizes {
        ctx.backend
            .set_chord_size(group_id, *size)
            .await
            .map_err(|e| (format!("the size of chord {group_id}"), e))?;
    }
    Ok(())
}

/// What follows a success, in Celery's order (`trace`'s
/// `_dispatch_callbacks_and_chain`): the `link` callbacks, then the next
/// link of the chain with the rest of it. Several callbacks are started
/// as one group (each group callback as its own), as Celery does.
fn follow_ups(msg: &TaskMessage) -> Vec<(Value, Option<Vec<Value>>)> {
    let mut out = Vec::new();
    match msg.callbacks.as_slice() {
        [] => {}
        [one] => out.push((one.clone(), None)),
        many => {
            let (groups, plain): (Vec<&Value>, Vec<&Value>) = many
                .iter()
                .partition(|sig| sig.get("task").and_then(Value::as_str) == Some("celery.group"));
            out.extend(groups.into_iter().map(|g| (g.clone(), None)));
            if !plain.is_empty() {
                out.push((canvas::group_of(plain.into_iter().cloned()), None));
            }
        }
    }
    let mut chain = msg.chain.clone();
    if let Some(next) = chain.pop() {
        out.push((next, Some(chain)));
    }
    out
}

/// A step that cannot be started fails the task that led to it (in Celery
/// the error would be raised inside the task's trace); the exception says
/// which step and why.
fn canvas_error(e: &CanvasError) -> PyException {
    match e {
        CanvasError::NoTaskName(_) => PyException::new("builtins", "ValueError", e.to_string()),
        CanvasError::Unsupported(_) => {
            PyException::new("builtins", "NotImplementedError", e.to_string())
        }
    }
}

/// Stores the failure under every id the unstartable step names (its
/// members, a chord's body), so a client waiting on any of them gets the
/// error instead of waiting for tasks nothing will publish.
/// Stores FAILURE for every id the step names except those already
/// `published`: those run and store their own result, and a FAILURE
/// written after it (the member can finish before this runs) would
/// overwrite their success.
async fn fail_step(ctx: &Ctx, sig: &Value, exc: &PyException, published: &[String]) {
    for id in canvas::task_ids(sig) {
        if published.contains(&id) {
            continue;
        }
        let doc = StateDoc::new(&id, State::Failure, exc_value(exc));
        if let Err(e) = ctx.backend.store(&doc).await {
            tracing::error!(error = %e, task_id = %id, "could not store FAILURE for a workflow step that did not start; it stays PENDING");
        }
    }
}

/// The failure of a task whose follow-up message Redis refused for good
/// (a transient error is retried inside `publish`, so this is WRONGTYPE,
/// OOM, a script error...). In Celery the callbacks, the next chain link
/// and `retry()` are published from inside the task's trace, so such an
/// error becomes the task's FAILURE (`report_internal_error`, then
/// `on_error`): whoever waits on the result or on the workflow hears of
/// it, and the message is settled instead of hanging on a result that
/// never comes. redis-py raises `ResponseError` for a refused command.
fn publish_error(e: &redis::RedisError, what: &str) -> PyException {
    PyException::new(
        "redis.exceptions",
        "ResponseError",
        format!("could not publish {what}: {e}"),
    )
}

async fn fail(ctx: &Ctx, f: &Finish<'_>, exc: PyException, traceback: Option<String>, secs: f64) {
    tracing::error!(runtime = secs, exception = %exc.repr(), "task failed");
    ctx.metrics.count(&f.msg.task, "failed");
    let traceback = traceback.unwrap_or_else(|| traceback_text(f, &exc, None));
    let mut doc = f.doc(ctx, State::Failure, exc_value(&exc));
    doc.traceback = Some(traceback.clone());
    settle_failure(ctx, f, &doc, f.acks_late).await;
    // Sent whether or not the result is stored, as Celery does: monitors
    // would otherwise show an ignored task as running forever. After the
    // store, as with success.
    send_failed(ctx, f, &exc.repr(), &traceback);
}

/// `task-failed`, sent after the failure is settled (see the module doc).
fn send_failed(ctx: &Ctx, f: &Finish<'_>, exception: &str, traceback: &str) {
    ctx.events.task("task-failed", |ev| {
        ev.field("uuid", &f.msg.id)
            .field("exception", &exception)
            .field("traceback", &traceback);
    });
}

/// Errbacks get the failed task's id (Celery's old-style errback call;
/// new-style `(request, exc, traceback)` errbacks need Python objects),
/// started as one group, as Celery's `_call_task_errbacks` starts them.
/// An errback that cannot go into a group (a chain, say) is started on
/// its own.
pub(crate) async fn call_errbacks(ctx: &Ctx, errbacks: &[Value], failed_id: &str, root_id: &str) {
    if errbacks.is_empty() {
        return;
    }
    let id_value = json!(failed_id);
    let from = Origin {
        result: &id_value,
        parent_id: failed_id,
        root_id,
        origin: &ctx.cfg.node_name,
        default_queue: &ctx.cfg.default_queue,
    };
    let expansions = match canvas::expand(&canvas::group_of(errbacks.iter().cloned()), None, &from)
    {
        Ok(group) => vec![Ok(group)],
        Err(_) => errbacks
            .iter()
            .map(|eb| canvas::expand(eb, None, &from))
            .collect(),
    };
    for expansion in expansions {
        let expansion = match expansion {
            Ok(expansion) => expansion,
            Err(e) => {
                tracing::error!(error = %e, "cannot call an errback");
                continue;
            }
        };
        for (env, route) in &expansion.messages {
            if let Err(e) = ctx
                .broker
                .publish(env, &route.exchange, &route.routing_key)
                .await
            {
                tracing::error!(error = %e, "could not publish errback");
            }
        }
    }
}

/// Celery's `mark_as_failure`, in its order: this task's FAILURE stored
/// (unless ignored) and counted in its chord, then the rest of its chain,
/// then the errbacks (an old-style errback gets the task id to look the
/// failure up, so it must already be there); acked last when acking late.
/// Returns false, leaving the message unacked, if the store failed.
pub(crate) async fn settle_failure(
    ctx: &Ctx,
    f: &Finish<'_>,
    doc: &StateDoc,
    ack_now: bool,
) -> bool {
    if !record_final(ctx, f.msg, doc, f.tag, !f.ignore_result(), false).await {
        return false;
    }
    super::chain::fail_remaining_links(ctx, f.msg, doc, !f.ignore_result()).await;
    let root = f.msg.root_id.as_deref().unwrap_or(&f.msg.id);
    call_errbacks(ctx, &f.msg.errbacks, &f.msg.id, root).await;
    if ack_now {
        ack(ctx, f.tag).await;
    }
    true
}

/// Puts the message back on its queue (Celery's reject with requeue). Its
/// entry is marked restored first: the message is no longer this worker's
/// to settle, even if a panic came now, and once it is back on the queue
/// this worker may fetch it again under the same tag, whose new entry a
/// later mark must not touch. If the requeue fails, the lease is no longer
/// renewed either, and the visibility timeout puts it back.
async fn put_back(ctx: &Ctx, tag: &str) {
    ctx.inflight.advance(tag, Phase::Restored);
    if let Err(e) = ctx.broker.restore(tag, true).await {
        tracing::error!(error = %e, "could not requeue; the visibility timeout will restore it");
    }
}

/// Records the final document (`record_final`): acked here only when
/// acking late; an early ack went out when the job started.
async fn finish_with(ctx: &Ctx, f: &Finish<'_>, doc: &StateDoc) {
    record_final(ctx, f.msg, doc, f.tag, !f.ignore_result(), f.acks_late).await;
}

/// Delay before the next attempt: explicit countdown, else backoff, else
/// the task's default delay (Celery's rules).
fn retry_delay(options: &TaskOptions, retries: u32, countdown: Option<f64>) -> f64 {
    if let Some(c) = countdown {
        return c.max(0.0);
    }
    match options.retry_backoff {
        Some(base) => {
            let delay = (base * 2f64.powi(retries.min(30) as i32)).min(options.retry_backoff_max);
            if options.retry_jitter {
                fastrand::f64() * delay
            } else {
                delay
            }
        }
        None => options.default_retry_delay,
    }
}

async fn retry(
    ctx: &Ctx,
    f: &Finish<'_>,
    countdown: Option<f64>,
    reason: Option<PyException>,
    max_retries: Option<Option<u32>>,
) {
    let limit = max_retries.unwrap_or(f.options.max_retries);
    if let Some(limit) = limit {
        if f.msg.retries >= limit {
            let exc = reason.unwrap_or_else(|| {
                PyException::new(
                    "celery.exceptions",
                    "MaxRetriesExceededError",
                    format!(
                        "Can't retry {}[{}] args:{} kwargs:{}",
                        f.msg.task,
                        f.msg.id,
                        py_repr(&Value::Array(f.msg.args.clone())),
                        py_repr(&Value::Object(f.msg.kwargs.clone()))
                    ),
                )
            });
            tracing::warn!(
                retries = f.msg.retries,
                max_retries = limit,
                "retry limit reached"
            );
            return fail(ctx, f, exc, None, f.runtime.as_secs_f64()).await;
        }
    }
    let delay = retry_delay(f.options, f.msg.retries, countdown);
    // A countdown can come from the producer (`tori.flaky(countdown=…)`):
    // one that is no usable number of seconds fails the task, not the
    // worker's handling.
    let Some(eta) = crate::protocol::limits::seconds(delay)
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| Utc::now().checked_add_signed(d))
    else {
        let exc = PyException::builtin(
            "ValueError",
            format!(
                "retry countdown must be a number of seconds from 0 to {:e}, got {delay}",
                crate::protocol::limits::MAX_SECONDS
            ),
        );
        return fail(ctx, f, exc, None, f.runtime.as_secs_f64()).await;
    };
    let republished = retry_of(&f.delivery.envelope, f.msg, eta);
    // From here the retry may be out: a panic must not fail the task.
    ctx.inflight.mark_settling(f.tag);
    if let Err(e) = ctx
        .broker
        .publish(
            &republished,
            f.delivery.envelope.exchange(),
            f.delivery.envelope.routing_key(),
        )
        .await
    {
        tracing::error!(error = %e, "could not republish the retry; the task fails with the error");
        let exc = publish_error(&e, "the retry");
        return fail(ctx, f, exc, None, f.runtime.as_secs_f64()).await;
    }
    let shown = reason.clone().unwrap_or_else(|| {
        PyException::new("celery.exceptions", "Retry", format!("Retry in {delay}s"))
    });
    tracing::warn!(countdown = delay, retries = f.msg.retries.saturating_add(1), reason = %shown.repr(), "task will be retried");
    ctx.metrics.count(&f.msg.task, "retried");
    let mut doc = f.doc(ctx, State::Retry, exc_value(&shown));
    doc.traceback = Some(traceback_text(
        f,
        &PyException::new(
            "celery.exceptions",
            "Retry",
            format!("Retry in {delay}s: {}", shown.repr()),
        ),
        None,
    ));
    doc.children = Some(vec![child_ref(&f.msg.id)]);
    if f.ignore_result() {
        ack(ctx, f.tag).await;
    } else {
        store_then_ack(ctx, &doc, f.tag).await;
    }
    ctx.events.task("task-retried", |ev| {
        ev.field("uuid", &f.msg.id)
            .field("exception", &shown.repr())
            .field("traceback", &doc.traceback);
    });
}

/// Late-ack task whose process died: put it back, unless it has already
/// killed its process more than `--max-redeliveries` times — then it is a
/// poison message: FAILURE, dead-letter list, ack.
async fn requeue_lost(ctx: &Ctx, f: &Finish<'_>, why: String, secs: f64) {
    let deaths = match ctx.broker.count_lost_delivery(&f.msg.id).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "could not count the lost delivery; leaving the message for the restore sweep");
            return;
        }
    };
    let max = u64::from(ctx.cfg.max_redeliveries);
    if deaths <= max {
        tracing::warn!(deaths, max_redeliveries = max, reason = %why, "pool process died; task put back on its queue");
        // Celery rejects with requeue here: task-rejected, no task-failed;
        // sent before the requeue so it cannot follow the redelivery's
        // task-received.
        ctx.events.task("task-rejected", |ev| {
            ev.field("uuid", &f.msg.id).field("requeue", &true);
        });
        put_back(ctx, f.tag).await;
        return;
    }
    let message = format!(
        "{why}; the task killed its worker process {deaths} times, more than --max-redeliveries={max}, \
         so it was moved to the dead-letter list"
    );
    let exc = PyException::new("billiard.exceptions", "WorkerLostError", message.clone());
    tracing::error!(
        runtime = secs,
        deaths,
        "poison message: giving up and dead-lettering it"
    );
    // A failure like any other (errbacks, the rest of the chain, the chord
    // count, task-failed), except that the message goes to the dead-letter
    // list instead of being acked.
    let traceback = traceback_text(f, &exc, None);
    let mut doc = f.doc(ctx, State::Failure, exc_value(&exc));
    doc.traceback = Some(traceback.clone());
    if !settle_failure(ctx, f, &doc, false).await {
        return;
    }
    let raw = f.delivery.raw.clone();
    match ctx
        .broker
        .dead_letter(Some(f.tag), &f.delivery.queue, &raw, &message)
        .await
    {
        Ok(true) => ctx.inflight.mark_acked(f.tag),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "could not dead-letter the poison message"),
    }
    send_failed(ctx, f, &exc.repr(), &traceback);
}

async fn reject(ctx: &Ctx, f: &Finish<'_>, requeue: bool, reason: String) {
    tracing::warn!(requeue, %reason, "task rejected its message");
    ctx.metrics.count(&f.msg.task, "rejected");
    if requeue {
        if !f.acks_late {
            // Acked when it started, as in Celery, where reject() then
            // does nothing: there is no message left to put back.
            tracing::warn!(
                "Reject(requeue=True) after an early ack: the message is gone; nothing requeued"
            );
            return;
        }
        ctx.events.task("task-rejected", |ev| {
            ev.field("uuid", &f.msg.id).field("requeue", &true);
        });
        put_back(ctx, f.tag).await;
        return;
    }
    // Never to run again, so Celery (request.py `on_failure`) fails it
    // like any error (chain, chord, errbacks; no traceback stored), sends
    // task-failed, and then task-rejected only if the message was still
    // unacked — with an early ack it already was.
    let exc = PyException {
        module: "celery.exceptions".into(),
        name: "Reject".into(),
        args: vec![json!(reason), json!(false)],
    };
    let doc = f.doc(ctx, State::Failure, exc_value(&exc));
    settle_failure(ctx, f, &doc, f.acks_late).await;
    send_failed(
        ctx,
        f,
        &format!("reject requeue=False: {reason}"),
        &traceback_text(f, &exc, None),
    );
    if f.acks_late {
        ctx.events.task("task-rejected", |ev| {
            ev.field("uuid", &f.msg.id).field("requeue", &false);
        });
    }
}

/// Characters of a result's repr in the task-succeeded event and the log
/// line (Celery's `resultrepr_maxsize` default).
const RESULT_REPR_MAX: usize = 1024;

/// A result as `task-succeeded` and the log show it.
pub(crate) fn result_repr(value: &Value) -> String {
    truncate(&py_repr(value), RESULT_REPR_MAX)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_follows_celery_rules() {
        let mut o = TaskOptions::default();
        assert_eq!(retry_delay(&o, 0, Some(2.0)), 2.0);
        assert_eq!(retry_delay(&o, 0, None), 180.0);
        o.retry_backoff = Some(1.0);
        o.retry_backoff_max = 10.0;
        assert_eq!(retry_delay(&o, 0, None), 1.0);
        assert_eq!(retry_delay(&o, 3, None), 8.0);
        assert_eq!(retry_delay(&o, 10, None), 10.0);
        o.retry_jitter = true;
        assert!(retry_delay(&o, 3, None) <= 8.0);
    }
}
