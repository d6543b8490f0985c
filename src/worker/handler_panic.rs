//! When the worker's own handling of a message panics: a bug in this
//! crate, not in task code (task panics are caught in the pool process and
//! become `TaskPanicked`).
//!
//! Without this, tokio would contain the panic to the message's handler
//! task, and the message would be stranded: its in-flight entry never
//! removed, so its lease renewed for as long as the worker lives (no sweep
//! ever restores it), `inspect active` listing it forever, and the client
//! waiting on a result that never comes. Here the panic costs only that
//! message, and visibly: the task's FAILURE is stored (`WorkerInternalError`
//! naming the panic) unless a final state already was, and the message is
//! acked. It is failed rather than handed back because the same message
//! would most likely hit the same bug on every worker that takes it. A
//! final state stored before the panic stands, and its event is sent.
//!
//! Until something was sent that a failure would contradict, the FAILURE
//! is settled as any failure is: counted in its chord, the rest of its
//! chain failed, its errbacks called, so nothing downstream waits for
//! ever. If that is the code that panicked, the second panic is caught too
//! (see `message::accept`) and the stored FAILURE stands. Once the next
//! steps or a retry may be out (`Entry::settling`), the task may have
//! succeeded: only its own FAILURE is stored and counted. A message the
//! worker already put back (a requeue, an ETA parking) is left to its next
//! delivery. A final state stored before the panic is still counted in its
//! chord (the count takes a task once) but nothing else is redone for it.
//! A job still running in a pool process is stopped, as
//! `revoke(terminate=True)` stops one, since nothing would hear its
//! outcome.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tasks::chaos::HandlerPanic;
use tasks::{PyException, Task};

use super::inflight::Phase;
use super::message::{ack, record_final, store_then_ack_unless_acked};
use super::outcome::result_repr;
use super::outcome::{settle_failure, Finish};
use super::Ctx;
use crate::broker::Delivery;
use crate::pool::threads::panic_message;
use crate::protocol::result::{exception_from_value, exception_value};
use crate::protocol::{DecodeError, Envelope, State, StateDoc, TaskMessage};

/// Reads a task message, turning a panic of the decoder into a malformed
/// message (dead-lettered like any other): the decoder sees every byte a
/// producer can send, and a panic in it would otherwise stop the consumer
/// loop, and with it the worker, on every worker that fetched the message.
pub(crate) fn decode(ctx: &Ctx, envelope: &Envelope) -> Result<TaskMessage, DecodeError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let decoded = TaskMessage::decode(envelope);
        if let Ok(msg) = &decoded {
            chaos_point(ctx, msg, "decode");
        }
        decoded
    }))
    .unwrap_or_else(|payload| {
        let why = panic_message(payload.as_ref());
        tracing::error!(panic = %why, "the task message decoder panicked (a tori-worker bug); treating the message as malformed");
        Err(DecodeError::Internal(format!(
            "the worker's decoder panicked on this message (a tori-worker bug): {why}"
        )))
    })
}

/// Panics at `point` if this message is a `tori.chaos.handler_panic` for
/// that point and chaos tasks are enabled (tests only; see that task). A
/// `settle` message panics at `received` and again in [`recover`].
pub(crate) fn chaos_point(ctx: &Ctx, msg: &TaskMessage, point: &str) {
    if !ctx.cfg.enable_chaos_tasks || msg.task != HandlerPanic::NAME {
        return;
    }
    let asked = msg.args.first().and_then(Value::as_str);
    if asked == Some(point) || (asked == Some("settle") && point == "received") {
        panic!("chaos: handler panic requested at {point:?}");
    }
}

/// Sends the event of a final state stored before the panic. Events
/// follow the store, so it may never have been sent, and without it a
/// monitor shows the task running for ever; if it was sent, the repeat
/// only states the same outcome again. What only the lost handler knew is
/// left out or plain: `task-succeeded` has no runtime, and `task-revoked`
/// says neither terminated nor expired.
fn announce_stored(ctx: &Ctx, stored: &StateDoc) {
    let id = &stored.task_id;
    match stored.state {
        State::Success => ctx.events.task("task-succeeded", |ev| {
            ev.field("uuid", id)
                .field("result", &result_repr(&stored.result));
        }),
        State::Failure => {
            let exception = exception_from_value(&stored.result)
                .map(|e| e.repr())
                .unwrap_or_else(|| result_repr(&stored.result));
            let traceback = stored.traceback.clone().unwrap_or_default();
            ctx.events.task("task-failed", |ev| {
                ev.field("uuid", id)
                    .field("exception", &exception)
                    .field("traceback", &traceback);
            });
        }
        State::Revoked => ctx.events.task("task-revoked", |ev| {
            ev.field("uuid", id)
                .field("terminated", &false)
                .field("signum", &Value::Null)
                .field("expired", &false);
        }),
        _ => {}
    }
}

/// A message whose handling and its settling both panicked in `rounds`
/// earlier deliveries, more than --max-redeliveries allows: its FAILURE is
/// stored plainly (no chain, errbacks or chord count, whose code may be
/// what keeps panicking) and the message goes to the dead-letter list.
async fn give_up(ctx: &Ctx, delivery: &Delivery, tag: &str, task_id: &str, rounds: u64, why: &str) {
    let max = ctx.cfg.max_redeliveries;
    // A final state stored in one of those rounds (before its panic)
    // stands: the message is done, not poison.
    if let Ok(Some(stored)) = ctx.backend.final_doc(task_id).await {
        tracing::warn!(
            rounds,
            state = stored.state.as_str(),
            "its handling keeps panicking, but its final state is stored; keeping it"
        );
        ack(ctx, tag).await;
        announce_stored(ctx, &stored);
        return;
    }
    let message = format!(
        "tori-worker's own handling of this task's message panicked (a worker bug; please report \
         it): {why}. Settling that panicked too in {rounds} earlier deliveries, more than \
         --max-redeliveries={max} allows, so the message was moved to the dead-letter list."
    );
    tracing::error!(
        rounds,
        "poison message: its handling keeps panicking; dead-lettering it"
    );
    let exc = PyException::new("tori.exceptions", "WorkerInternalError", message.clone());
    let mut doc = StateDoc::new(
        task_id,
        State::Failure,
        exception_value(&exc.module, &exc.name, &exc.args),
    );
    doc.traceback = Some(format!("tori-worker internal error: {why}\n"));
    if let Err(e) = ctx.backend.store(&doc).await {
        tracing::error!(error = %e, "could not store the FAILURE; leaving the message unsettled");
        return;
    }
    match ctx
        .broker
        .dead_letter(Some(tag), &delivery.queue, &delivery.raw, &message)
        .await
    {
        Ok(true) => ctx.inflight.mark_acked(tag),
        // Restored meanwhile: its next delivery counts another round.
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "could not dead-letter; the restore sweep will retry it")
        }
    }
    ctx.events.task("task-failed", |ev| {
        ev.field("uuid", &task_id)
            .field("exception", &exc.repr())
            .field("traceback", &doc.traceback.clone().unwrap_or_default());
    });
}

/// Settles a message whose handler panicked (see the module doc). `serial`
/// tells this delivery's in-flight entry from a later one of the same tag.
pub(crate) async fn recover(
    ctx: &Arc<Ctx>,
    delivery: &Delivery,
    tag: &str,
    serial: u64,
    payload: Box<dyn Any + Send>,
) {
    let why = panic_message(payload.as_ref());
    let held = ctx.inflight.view(tag, |e| {
        (e.serial == serial && e.phase != Phase::Restored).then(|| {
            (
                e.task_id.clone(),
                e.acked,
                e.settling,
                (e.phase == Phase::Active).then(|| e.terminate.clone()),
            )
        })
    });
    let Some(Some((task_id, acked, settling, running))) = held else {
        // It was put back on its queue (by shutdown, a requeue or ETA
        // parking), or a later delivery of the same tag replaced it: it is
        // not ours to settle.
        tracing::error!(panic = %why, "handling this message panicked (a tori-worker bug); it was already put back");
        return;
    };
    if task_id.is_empty() {
        // It panicked while dead-lettering an unreadable message.
        tracing::error!(panic = %why, "handling a malformed message panicked (a tori-worker bug); dead-lettering it");
        let reason = format!("malformed message, and its handling panicked: {why}");
        if let Err(e) = ctx
            .broker
            .dead_letter(Some(tag), &delivery.queue, &delivery.raw, &reason)
            .await
        {
            tracing::error!(error = %e, "could not dead-letter; the restore sweep will retry it");
        }
        return;
    }
    tracing::error!(panic = %why, acked, "handling this task's message panicked (a tori-worker bug); failing the task, the worker carries on");
    if let Some(terminate) = running {
        // Its pool process may still be running it, with nobody left to
        // hear the outcome: stop it, as `revoke(terminate=True)` does.
        terminate.notify_one();
    }
    if !acked {
        // A message whose settling panicked too came back after the
        // visibility timeout (`message::accept` counted that round), to
        // panic again if the bug is in every round: like a task that keeps
        // killing its pool process, it is put back at most
        // --max-redeliveries times, and given up on the next delivery.
        match ctx.broker.unsettled_rounds(tag).await {
            Ok(rounds) if rounds > u64::from(ctx.cfg.max_redeliveries) => {
                give_up(ctx, delivery, tag, &task_id, rounds, &why).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read its unsettled rounds; settling it")
            }
        }
    }
    // The decoder did not panic on this message once (it was decoded to
    // get here), but guard it anyway: this is the path of last resort.
    let msg = std::panic::catch_unwind(AssertUnwindSafe(|| {
        TaskMessage::decode(&delivery.envelope).ok()
    }))
    .ok()
    .flatten();
    if let Some(msg) = &msg {
        chaos_point(ctx, msg, "settle");
    }
    match ctx.backend.final_doc(&task_id).await {
        Ok(Some(stored)) => {
            // It panicked after the outcome was stored: keep that outcome,
            // and count it in its chord in case the panic came before
            // that (the count takes a task once, so a second is harmless).
            tracing::warn!(
                state = stored.state.as_str(),
                "its final state was already stored; keeping it"
            );
            if let Some((msg, body)) = msg.as_ref().and_then(|m| Some((m, m.chord.as_ref()?))) {
                super::chord::part_return(ctx, msg, &stored, body).await;
            }
            if !acked {
                ack(ctx, tag).await;
            }
            announce_stored(ctx, &stored);
            return;
        }
        Ok(None) => {}
        Err(e) => {
            // Storing would most likely fail too; a message not yet acked
            // is restored after the visibility timeout and handled again.
            tracing::error!(error = %e, "cannot read its stored state; leaving it unsettled");
            return;
        }
    }
    let exc = PyException::new(
        "tori.exceptions",
        "WorkerInternalError",
        format!(
            "tori-worker's own handling of this task's message panicked (a worker bug; please \
             report it): {why}. The task was failed rather than run again, since the same \
             message would most likely hit the same bug; the worker carried on."
        ),
    );
    let failure = exception_value(&exc.module, &exc.name, &exc.args);
    let traceback = format!("tori-worker internal error: {why}\n");
    let settled = match &msg {
        Some(msg) => {
            let options = ctx
                .registry
                .get(&msg.task)
                .map(|t| t.options())
                .unwrap_or_default();
            let f = Finish {
                delivery,
                tag,
                msg,
                options: &options,
                acks_late: !acked,
                runtime: Duration::ZERO,
                soft_limit: None,
            };
            let mut doc = f.doc(ctx, State::Failure, failure);
            doc.traceback = Some(traceback.clone());
            if settling {
                // The next steps of its workflow or a retry may be out
                // already (see `Entry::settling`), and the task may have
                // succeeded. Only its own FAILURE is stored and counted in
                // its chord; failing the rest of its chain or calling
                // errbacks could contradict what was sent.
                let store = !msg.ignores_result(options.ignore_result);
                record_final(ctx, msg, &doc, tag, store, !acked).await
            } else {
                // Nothing was sent that a failure would contradict: settled
                // as any failure is, in Celery's order: stored and counted
                // in its chord, the rest of its chain failed, the errbacks
                // called, then acked. Should that panic as well, the FAILURE
                // is stored by then, so the message that comes back after
                // the visibility timeout is acked without running.
                settle_failure(ctx, &f, &doc, !acked).await
            }
        }
        None => {
            let mut doc = StateDoc::new(&task_id, State::Failure, failure);
            doc.traceback = Some(traceback.clone());
            store_then_ack_unless_acked(ctx, &doc, tag, acked).await
        }
    };
    if settled {
        if let Some(msg) = &msg {
            ctx.metrics.count(&msg.task, "failed");
        }
        ctx.events.task("task-failed", |ev| {
            ev.field("uuid", &task_id)
                .field("exception", &exc.repr())
                .field("traceback", &traceback);
        });
    }
}
