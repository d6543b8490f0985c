//! Calling a chord's body once its last header task is done (SPEC §3.7):
//! the counting is the backend's (`backend::chord`); this decides what the
//! body gets, the way Celery's `on_chord_part_return` does.
//!
//! A group body is called member by member, each with the joined results.
//! When the client saved the header's shape (a member that is a chain
//! ending in a group), the results are nested the same way.

use std::collections::HashMap;

use serde_json::{json, Value};
use tasks::task::py_repr;

use super::Ctx;
use crate::backend::chord::{ChordCount, ChordMember};
use crate::protocol::canvas::{self, Origin};
use crate::protocol::result::{exception_from_value, exception_value};
use crate::protocol::{pyjson, State, StateDoc, TaskMessage};

/// Counts this header task's final document in its chord and, if it was
/// the last one, calls the body (or fails it when a header failed).
/// Returns once every Redis write is done, so the caller may ack.
/// The body goes to the queue its options name, else `--default-queue`,
/// as a Python worker without `task_routes` would send it.
pub(crate) async fn part_return(ctx: &Ctx, msg: &TaskMessage, doc: &StateDoc, body: &Value) {
    let Some(group_id) = msg.group.as_deref() else {
        tracing::error!("chord header task without a group id; cannot count it, the chord body will not be called");
        return;
    };
    let member = pyjson::to_string(&json!([1, msg.id, doc.state.as_str(), doc.result]));
    let count = match ctx
        .backend
        .chord_part_return(
            group_id,
            &msg.id,
            msg.group_index,
            &member,
            carried_chord_size(body),
        )
        .await
    {
        Ok(count) => count,
        Err(e) => {
            tracing::error!(error = %e, group_id, "could not count the chord part; the chord body will not be called");
            return;
        }
    };
    let (token, members) = match count {
        ChordCount::Waiting { ready, size } => {
            tracing::debug!(group_id, ready, size, "chord part counted");
            return;
        }
        ChordCount::ClaimedElsewhere => {
            tracing::debug!(group_id, "chord complete; another worker calls its body");
            return;
        }
        ChordCount::AlreadyDone => {
            tracing::info!(
                group_id,
                "chord body was already called; redelivered header not counted again"
            );
            return;
        }
        ChordCount::Claimed { token, members } => (token, members),
    };
    match join_results(&members) {
        Ok(flat) => {
            let results = shape_results(ctx, group_id, &members, flat).await;
            call_body(ctx, msg, body, &results).await
        }
        Err(message) => fail_body(ctx, body, &message).await,
    }
    if let Err(e) = ctx.backend.chord_finished(group_id, &token).await {
        tracing::error!(error = %e, group_id, "could not mark the chord done");
    }
}

/// The chord size the body signature carries (`chord_size`, a top-level
/// field of the signature dict), which Celery 4.4 and 5.0 clients set in
/// `_chord.run` instead of writing the `.s` key; their workers read it as
/// `request.chord['chord_size']`. Newer clients leave it out. Anything but
/// a whole number a Lua script counts exactly is no size at all.
pub(crate) fn carried_chord_size(body: &Value) -> Option<u64> {
    body.get("chord_size")
        .and_then(Value::as_u64)
        .filter(|n| *n <= MAX_CARRIED_SIZE)
}

/// Redis scripts count in doubles: 2^53 is the last exact integer.
const MAX_CARRIED_SIZE: u64 = 1 << 53;

/// The header results in group order, or the ChordError message for the
/// first header that failed (Celery: `Dependency <id> raised <repr>`).
pub(crate) fn join_results(members: &[ChordMember]) -> Result<Vec<Value>, String> {
    members
        .iter()
        .map(|m| match m.state.as_str() {
            "FAILURE" | "REVOKED" => Err(format!(
                "Dependency {} raised {}",
                m.task_id,
                exception_from_value(&m.result)
                    .map(|e| e.repr())
                    .unwrap_or_else(|| py_repr(&m.result))
            )),
            _ => Ok(m.result.clone()),
        })
        .collect()
}

/// The body's argument: the flat list, unless the client saved the
/// header's shape (a member whose result is a group), in which case each
/// group becomes a nested list, as Celery's `GroupResult.join` gives it.
async fn shape_results(
    ctx: &Ctx,
    group_id: &str,
    members: &[ChordMember],
    flat: Vec<Value>,
) -> Vec<Value> {
    let saved = match ctx.backend.saved_group(group_id).await {
        Ok(Some(saved)) => saved,
        Ok(None) => return flat,
        Err(e) => {
            tracing::warn!(error = %e, group_id, "could not read the chord's saved header; the body gets the flat list");
            return flat;
        }
    };
    let by_id: HashMap<&str, &Value> = members
        .iter()
        .map(|m| (m.task_id.as_str(), &m.result))
        .collect();
    match shape(&saved, &by_id) {
        Some(Value::Array(shaped)) => shaped,
        _ => {
            tracing::warn!(group_id, saved = %saved, "the chord's saved header names results it did not count; the body gets the flat list");
            flat
        }
    }
}

/// A result tuple (`[[id, parent], children]`) filled in: a group (its
/// children a list) becomes the list of its members' results, a single
/// result its value.
pub(crate) fn shape(tuple: &Value, by_id: &HashMap<&str, &Value>) -> Option<Value> {
    let id = tuple.get(0)?.get(0)?.as_str()?;
    match tuple.get(1) {
        Some(Value::Array(children)) => children
            .iter()
            .map(|c| shape(c, by_id))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
        _ => by_id.get(id).map(|v| (*v).clone()),
    }
}

/// Calls the body as Celery's `callback.delay(results)` does: a task gets
/// the joined results first; a group body starts every member with them,
/// a chord body starts its header with them (`canvas`), under the ids the
/// client froze. A body that cannot be started or published fails with
/// ChordError under every id not yet published.
async fn call_body(ctx: &Ctx, msg: &TaskMessage, body: &Value, results: &[Value]) {
    let results = Value::Array(results.to_vec());
    let root = msg.root_id.clone().unwrap_or_else(|| msg.id.clone());
    let from = Origin {
        result: &results,
        parent_id: &msg.id,
        root_id: &root,
        origin: &ctx.cfg.node_name,
        default_queue: &ctx.cfg.default_queue,
    };
    let expansion = match canvas::expand(body, None, &from) {
        Ok(expansion) => expansion,
        Err(e) => {
            let message = format!("tori-worker cannot call this chord body: {e}");
            return fail_body(ctx, body, &message).await;
        }
    };
    if let Err((what, e)) = super::outcome::record_step(ctx, &expansion).await {
        let message = format!("could not record {what} of the chord body: {e}");
        return fail_body(ctx, body, &message).await;
    }
    for (published, (env, route)) in expansion.messages.iter().enumerate() {
        let id = canvas::message_id(env);
        match ctx
            .broker
            .publish(env, &route.exchange, &route.routing_key)
            .await
        {
            Ok(_) => tracing::info!(chord_body = %id, "chord complete; body called"),
            Err(e) => {
                let message = format!("could not publish the chord body: {e}");
                tracing::error!(error = %e, "could not publish the chord body; storing FAILURE ChordError for it");
                // Messages already published will run; fail the rest.
                let mut unsent: Vec<String> = canvas::task_ids(body).into_iter().take(1).collect();
                unsent.extend(
                    expansion.messages[published..]
                        .iter()
                        .map(|(env, _)| canvas::message_id(env))
                        .filter(|id| !id.is_empty())
                        .map(str::to_owned),
                );
                return fail_ids(ctx, &unsent, &message).await;
            }
        }
    }
}

/// The body gets FAILURE with a ChordError, as Celery's
/// `chord_error_from_stack` stores it, so `AsyncResult(body).get()` raises
/// instead of waiting forever. Its `link_error` errbacks are called first,
/// with the body's id, as Celery calls them (the documented way to handle
/// a failed chord: `chord(header, body.on_error(handler.s()))`).
async fn fail_body(ctx: &Ctx, body: &Value, message: &str) {
    if let Some(body_id) = body
        .get("options")
        .and_then(|o| o.get("task_id"))
        .and_then(Value::as_str)
    {
        let errbacks: Vec<Value> = match body.get("options").and_then(|o| o.get("link_error")) {
            Some(Value::Array(list)) => list.clone(),
            Some(one @ Value::Object(_)) => vec![one.clone()],
            _ => Vec::new(),
        };
        super::outcome::call_errbacks(ctx, &errbacks, body_id, body_id).await;
    }
    // A group body fails under its own id (what Celery stores) and under
    // each member's (a chord body: its header's), so a client waiting on
    // any of them sees it too.
    fail_ids(ctx, &canvas::task_ids(body), message).await;
}

/// Stores FAILURE ChordError under each id.
async fn fail_ids(ctx: &Ctx, ids: &[String], message: &str) {
    if ids.is_empty() {
        tracing::error!(
            message,
            "chord failed and its body has no task id to store the failure under"
        );
        return;
    }
    for body_id in ids {
        tracing::error!(
            chord_body = %body_id,
            message,
            "chord failed; storing FAILURE ChordError for its body"
        );
        let doc = StateDoc::new(
            body_id,
            State::Failure,
            exception_value("celery.exceptions", "ChordError", &[json!(message)]),
        );
        if let Err(e) = ctx.backend.store(&doc).await {
            tracing::error!(error = %e, "could not store the chord body FAILURE");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, state: &str, result: Value) -> ChordMember {
        ChordMember {
            task_id: id.into(),
            state: state.into(),
            result,
        }
    }

    #[test]
    fn a_saved_header_nests_the_results_of_its_groups() {
        // GroupResult.as_tuple() of chord([chain(a, group(b, c)), d], ...):
        // the chain's result is the inner group (with its parent, a).
        let saved = json!([
            ["g", null],
            [
                [
                    ["inner", [["a", null], null]],
                    [[["b", null], null], [["c", null], null]]
                ],
                [["d", null], null]
            ]
        ]);
        let (b, c, d) = (json!(12), json!(22), json!(6));
        let by_id = HashMap::from([("b", &b), ("c", &c), ("d", &d)]);
        assert_eq!(shape(&saved, &by_id), Some(json!([[12, 22], 6])));
        let missing = HashMap::from([("b", &b), ("d", &d)]);
        assert_eq!(shape(&saved, &missing), None);
    }

    #[test]
    fn the_carried_chord_size_is_a_whole_number_or_nothing() {
        // As a Celery 5.0 client sends it: a top-level field of the body.
        let body = json!({"task": "tori.echo", "options": {}, "chord_size": 3});
        assert_eq!(carried_chord_size(&body), Some(3));
        // Celery >= 5.1 clients leave it out (or None).
        assert_eq!(carried_chord_size(&json!({"task": "t"})), None);
        assert_eq!(carried_chord_size(&json!({"chord_size": null})), None);
        for bad in [
            json!(-1),
            json!(2.5),
            json!("3"),
            json!(1e300),
            json!(u64::MAX),
        ] {
            assert_eq!(carried_chord_size(&json!({ "chord_size": bad })), None);
        }
    }

    #[test]
    fn results_join_in_order() {
        let got = join_results(&[
            member("a", "SUCCESS", json!(2)),
            member("b", "SUCCESS", json!({"k": [1]})),
        ]);
        assert_eq!(got, Ok(vec![json!(2), json!({"k": [1]})]));
    }

    #[test]
    fn a_failed_header_fails_the_chord_like_celery() {
        let exc =
            json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
        let got = join_results(&[
            member("a", "SUCCESS", json!(2)),
            member("b", "FAILURE", exc),
        ]);
        assert_eq!(got, Err("Dependency b raised ValueError('boom')".into()));
    }
}
