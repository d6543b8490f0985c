//! A failed task fails the rest of its chain, as Celery's result backend
//! does in `mark_as_failure`.
//!
//! The links after a failed task are never sent, so without this their
//! results stay PENDING for good: an `AsyncResult` of the chain's last
//! task made from its id alone (a status page, `GET /jobs/{id}`, another
//! process) waits forever, and a chord whose header holds the chain never
//! counts that member, so its body never runs and never fails.

use std::collections::VecDeque;

use serde_json::Value;

use super::Ctx;
use crate::protocol::canvas;
use crate::protocol::outgoing::SignatureCall;
use crate::protocol::{StateDoc, TaskMessage};

/// For every link still to come in `msg`'s chain: stores `failed` under
/// its id (when `store`: Celery skips this for `ignore_result` tasks),
/// counts it as a failed member of the chord it belongs to, and, for a
/// link that is itself a chord, goes on into that chord's body (the
/// result the rest of the workflow waits on). A group link's members get
/// the failure too. Signatures without a task id of their own are passed
/// over, as Celery does.
/// Returns once every write is done, so the caller may ack.
pub(crate) async fn fail_remaining_links(
    ctx: &Ctx,
    msg: &TaskMessage,
    failed: &StateDoc,
    store: bool,
) {
    let root = msg.root_id.clone().unwrap_or_else(|| msg.id.clone());
    // `chain` holds the next link last; fail them in the order they would
    // have run.
    let mut links: VecDeque<&Value> = msg.chain.iter().rev().collect();
    while let Some(link) = links.pop_front() {
        let options = link.get("options").and_then(Value::as_object);
        let option = |key: &str| options.and_then(|o| o.get(key)).filter(|v| !v.is_null());
        let id = option("task_id").and_then(Value::as_str);
        let mut doc = failed.clone();
        doc.task_id = id.unwrap_or_default().to_owned();
        doc.group_id = option("group_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        doc.parent_id = None;
        doc.extended = None;
        doc.children = Some(Vec::new());
        if let (Some(id), true) = (id, store) {
            if let Err(e) = ctx.backend.store(&doc).await {
                tracing::error!(error = %e, link = id, "could not store FAILURE for a later chain link; it stays PENDING");
            } else {
                tracing::info!(link = id, "later chain link marked FAILURE");
            }
        }
        if store && link.get("task").and_then(Value::as_str) == Some("celery.group") {
            // Celery stores the failure under the group's id only; the
            // client of `a | group(...)` waits on the members' ids.
            for member in canvas::task_ids(link)
                .into_iter()
                .filter(|m| Some(m.as_str()) != id)
            {
                let mut member_doc = doc.clone();
                member_doc.task_id = member;
                if let Err(e) = ctx.backend.store(&member_doc).await {
                    tracing::error!(error = %e, member = %member_doc.task_id, "could not store FAILURE for a member of a later group link; it stays PENDING");
                }
            }
        }
        if option("chord").is_some() {
            count_in_chord(ctx, msg, &root, link, &mut doc).await;
        }
        if link.get("subtask_type").and_then(Value::as_str) == Some("chord") {
            if let Some(body) = link
                .get("kwargs")
                .and_then(|k| k.get("body"))
                .filter(|b| !b.is_null())
            {
                links.push_back(body);
            }
        }
    }
}

/// Counts a chain link that is a chord header member as failed. Its chord
/// fields are read from the message the link would have become, so they
/// mean exactly what they would mean in a header task's own message.
async fn count_in_chord(
    ctx: &Ctx,
    msg: &TaskMessage,
    root: &str,
    link: &Value,
    doc: &mut StateDoc,
) {
    let call = SignatureCall {
        signature: link,
        parent_result: None,
        parent_id: &msg.id,
        root_id: root,
        chain: None,
        origin: &ctx.cfg.node_name,
        default_queue: &ctx.cfg.default_queue,
    };
    let member = call
        .build()
        .and_then(|(env, _)| TaskMessage::decode(&env).ok());
    let Some(member) = member else {
        tracing::error!(%link, "a later chain link belongs to a chord but cannot be read; that chord's body will not be called");
        return;
    };
    let Some(body) = member.chord.clone().filter(|b| !b.is_null()) else {
        return;
    };
    doc.task_id = member.id.clone();
    super::chord::part_return(ctx, &member, doc, &body).await;
}
