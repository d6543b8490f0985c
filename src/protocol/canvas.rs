//! Workflow steps a worker starts itself when a task finishes: the next
//! link of its chain, or a `link` callback, may be a group, a chord or a
//! chain instead of a task. A Python worker calls `apply_async((retval,),
//! …)` on that signature (`celery.app.trace`), which for a group publishes
//! every member under the group's id, and for a chord also records the
//! chord's size and gives every header member the body. Without this,
//! `a | group(b, c)`, `a | group(b, c) | d` (the client turns it into
//! `a | chord(group(b, c), d)`) and `a | chord(...)` would publish a task
//! named `celery.group` or `celery.chord` that no worker runs, and the
//! client would wait forever on member ids nothing publishes.
//!
//! The messages match what a Celery 5.7 worker publishes in these cases
//! (captured: ids, `group`, `group_index`, `parent_id`, `root_id`, the
//! body embedded as `chord` with the rest of the chain in its options, and
//! the `children` entry of the finished task). Pure data like the rest of
//! `protocol`: the caller records the chord size, then publishes.
//!
//! Not expanded (the caller fails the step with [`CanvasError`]): a chord
//! inside a group or a chord header reached this way, or a group or chord
//! inside a chain inside one.

use serde_json::{json, Map, Value};
use thiserror::Error;

use super::envelope::Envelope;
use super::outgoing::{Route, SignatureCall};
use super::result::child_ref;

/// The finished task a follow-up starts from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Its return value, the first argument of what follows (unless that
    /// signature is immutable).
    pub result: &'a Value,
    pub parent_id: &'a str,
    pub root_id: &'a str,
    /// This worker's node name, the messages' `origin` header.
    pub origin: &'a str,
    pub default_queue: &'a str,
}

/// What starting one workflow step takes.
#[derive(Debug, Default)]
pub struct Expansion {
    /// In publishing order.
    pub messages: Vec<(Envelope, Route)>,
    /// A chord's group id and size, to record before any header member is
    /// published (its last member to finish compares against it).
    pub chord_size: Option<(String, usize)>,
    /// The finished task's `children` entry for this step.
    pub child: Value,
}

impl Expansion {
    /// One task message, listed as a plain child.
    fn single((env, route): (Envelope, Route)) -> Self {
        let child = child_ref(message_id(&env));
        Self {
            messages: vec![(env, route)],
            chord_size: None,
            child,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CanvasError {
    #[error("a workflow signature has no task name: {0}")]
    NoTaskName(String),
    #[error("tori-worker cannot start this workflow step: {0}")]
    Unsupported(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Task,
    Group,
    Chord,
    Chain,
}

fn kind(sig: &Value) -> Kind {
    let task = sig.get("task").and_then(Value::as_str);
    let subtype = sig.get("subtask_type").and_then(Value::as_str);
    match (task, subtype) {
        (Some("celery.group"), _) | (_, Some("group")) => Kind::Group,
        (Some("celery.chord"), _) | (_, Some("chord")) => Kind::Chord,
        (Some("celery.chain"), _) | (_, Some("chain")) => Kind::Chain,
        _ => Kind::Task,
    }
}

fn options(sig: &Value) -> Map<String, Value> {
    sig.get("options")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn option_str<'a>(sig: &'a Value, key: &str) -> Option<&'a str> {
    sig.get("options")?.get(key)?.as_str()
}

fn immutable(sig: &Value) -> bool {
    sig.get("immutable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Builds the messages for `sig`, the step that follows `from`. `rest` is
/// what remains of the chain after it (next link last), `None` for a
/// callback.
pub fn expand(
    sig: &Value,
    rest: Option<Vec<Value>>,
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    // A signature that was a chord's body carries the rest of its chain.
    let rest = rest.or_else(|| sig.get("options")?.get("chain")?.as_array().cloned());
    match kind(sig) {
        Kind::Task => call(sig, Some(from.result), rest, from).map(Expansion::single),
        Kind::Group => expand_group(sig, rest, from),
        Kind::Chord => expand_chord(sig, rest, from),
        Kind::Chain => expand_chain(sig, rest, from),
    }
}

/// `group.apply_async((retval,), chain=rest, …)`: every member under the
/// group's id (its frozen `task_id`, else a new one), numbered in order.
/// Options set on the group itself win over a member's own, except the
/// member's `group_id` (Celery's `_IMMUTABLE_OPTIONS`).
fn expand_group(
    sig: &Value,
    rest: Option<Vec<Value>>,
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    let group_id = option_str(sig, "task_id").map_or_else(new_id, str::to_owned);
    let inherited: Map<String, Value> = options(sig)
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "task_id"
                    | "group_id"
                    | "root_id"
                    | "parent_id"
                    | "group_index"
                    | "reply_to"
                    | "chain"
            )
        })
        .collect();
    let mut messages = Vec::new();
    let mut children = Vec::new();
    for (index, member) in members(sig, "group")? {
        if kind(member) == Kind::Chain {
            let (message, child) = chain_member(
                member,
                index,
                &group_id,
                None,
                std::slice::from_ref(from.result),
                from,
            )?;
            messages.push(message);
            children.push(child);
            continue;
        }
        let mut member = member.clone();
        let opts = options_mut(&mut member);
        for (k, v) in &inherited {
            if k == "group_id" && opts.contains_key(k) {
                continue;
            }
            opts.insert(k.clone(), v.clone());
        }
        opts.entry("group_id").or_insert_with(|| json!(group_id));
        opts.insert("group_index".into(), json!(index));
        let (env, route) = call(&member, Some(from.result), rest.clone(), from)?;
        children.push(child_ref(message_id(&env)));
        messages.push((env, route));
    }
    Ok(Expansion {
        messages,
        chord_size: None,
        child: json!([[group_id, null], children]),
    })
}

/// `chord.apply_async((retval,), chain=rest, …)`: the body is frozen with
/// the rest of the chain (so it goes on after the body), and every header
/// member carries it, under the header's group id; the size is recorded
/// first. An empty header calls the body at once with `[]`, as Celery does.
fn expand_chord(
    sig: &Value,
    rest: Option<Vec<Value>>,
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    let kwargs = sig.get("kwargs").cloned().unwrap_or(Value::Null);
    let header = kwargs.get("header").cloned().unwrap_or(Value::Null);
    let mut body = kwargs
        .get("body")
        .filter(|b| b.is_object())
        .cloned()
        .ok_or_else(|| CanvasError::Unsupported(format!("a chord without a body: {sig}")))?;
    let group_id = option_str(&header, "task_id")
        .or_else(|| option_str(sig, "task_id"))
        .map_or_else(new_id, str::to_owned);
    // The chord's own args follow the parent's result; both go before
    // each header member's args.
    let mut partial: Vec<Value> = Vec::new();
    if !immutable(sig) {
        partial.push(from.result.clone());
    }
    partial.extend(
        sig.get("args")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    );

    let body_kind = kind(&body);
    {
        let opts = options_mut(&mut body);
        if let Some(rest) = rest {
            opts.insert("chain".into(), Value::Array(rest));
        }
        opts.insert("root_id".into(), json!(from.root_id));
        opts.entry("priority").or_insert(Value::Null);
        // A chord body passes the group id on to its own body instead.
        if body_kind != Kind::Chord {
            opts.entry("group_id").or_insert_with(|| json!(group_id));
        }
        opts.entry("task_id").or_insert_with(|| json!(new_id()));
    }
    if body_kind == Kind::Chord {
        freeze_chord_body(&mut body, &group_id, from.root_id);
    }
    // A group body's members are frozen with the chord's group id (Celery's
    // `group.freeze(group_id=...)` in `_chord.run`).
    if kind(&body) == Kind::Group {
        if let Some(tasks) = body
            .get_mut("kwargs")
            .and_then(|k| k.get_mut("tasks"))
            .and_then(Value::as_array_mut)
        {
            for (index, member) in tasks.iter_mut().enumerate() {
                let opts = options_mut(member);
                opts.insert("group_index".into(), json!(index));
                opts.insert("root_id".into(), json!(from.root_id));
                opts.entry("group_id").or_insert_with(|| json!(group_id));
            }
        }
    }

    let header_members: Vec<(usize, &Value)> = if header.is_array() {
        flatten(header.as_array().map(Vec::as_slice).unwrap_or_default())?
    } else {
        members(&header, "chord header")?
    };
    if header_members.is_empty() {
        return call(&body, Some(&json!([])), None, from).map(Expansion::single);
    }
    let mut messages = Vec::new();
    let mut children = Vec::new();
    for (index, member) in &header_members {
        if kind(member) == Kind::Chain {
            let (message, child) =
                chain_member(member, *index, &group_id, Some(&body), &partial, from)?;
            messages.push(message);
            children.push(child);
            continue;
        }
        let mut member = (*member).clone();
        prepend_args(&mut member, &partial);
        let opts = options_mut(&mut member);
        opts.entry("group_id").or_insert_with(|| json!(group_id));
        opts.insert("group_index".into(), json!(index));
        opts.insert("chord".into(), body.clone());
        let (env, route) = call(&member, None, None, from)?;
        children.push(child_ref(message_id(&env)));
        messages.push((env, route));
    }
    Ok(Expansion {
        messages,
        chord_size: Some((group_id.clone(), header_members.len())),
        child: json!([[group_id, null], children]),
    })
}

/// A chord that is another chord's body, frozen as Celery's
/// `_chord.freeze` freezes it: its header and the header's members get the
/// root id, its own body the root id and the outer chord's group id.
fn freeze_chord_body(chord: &mut Value, group_id: &str, root_id: &str) {
    let Some(kwargs) = chord.get_mut("kwargs").filter(|k| k.is_object()) else {
        return;
    };
    if let Some(header) = kwargs.get_mut("header") {
        if header.is_object() {
            options_mut(header).insert("root_id".into(), json!(root_id));
        }
        let members = match header {
            Value::Array(list) => Some(list),
            other => other
                .get_mut("kwargs")
                .and_then(|k| k.get_mut("tasks"))
                .and_then(Value::as_array_mut),
        };
        for member in members.into_iter().flatten() {
            options_mut(member).insert("root_id".into(), json!(root_id));
        }
    }
    if let Some(body) = kwargs.get_mut("body").filter(|b| b.is_object()) {
        let opts = options_mut(body);
        opts.insert("root_id".into(), json!(root_id));
        opts.entry("group_id").or_insert_with(|| json!(group_id));
    }
}

/// A chain as a member of a group or chord header (`group(b | c, d)`),
/// as Celery's `chain.run` starts it with a group id: the first task gets
/// `prefix` before its own args and is published now, carrying the others
/// (frozen) as its chain; the *last* task stands for the member, so it
/// alone carries the group id, the place in the group and the chord body,
/// and its result is the one that counts. Returns the message and the
/// member's `children` entry (the last task, its parents back to the
/// first).
fn chain_member(
    chain: &Value,
    index: usize,
    group_id: &str,
    chord: Option<&Value>,
    prefix: &[Value],
    from: &Origin<'_>,
) -> Result<((Envelope, Route), Value), CanvasError> {
    let mut tasks = chain
        .get("kwargs")
        .and_then(|k| k.get("tasks"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if tasks.is_empty() {
        return Err(CanvasError::Unsupported(
            "an empty chain inside a group or chord header".into(),
        ));
    }
    if let Some(other) = tasks.iter().map(kind).find(|k| *k != Kind::Task) {
        return Err(CanvasError::Unsupported(format!(
            "a {} inside a chain inside a group or chord header",
            kind_name(other)
        )));
    }
    let last = tasks.len() - 1;
    for (i, task) in tasks.iter_mut().enumerate() {
        if i > 0 {
            let opts = options_mut(task);
            opts.entry("task_id").or_insert_with(|| json!(new_id()));
            opts.entry("reply_to")
                .or_insert_with(|| json!(super::outgoing::worker_oid()));
        }
        if i == last {
            let opts = options_mut(task);
            opts.insert("group_index".into(), json!(index));
            opts.insert("root_id".into(), json!(from.root_id));
            opts.entry("group_id").or_insert_with(|| json!(group_id));
            if let Some(body) = chord {
                opts.insert("chord".into(), body.clone());
            }
        } else if i > 0 {
            options_mut(task).insert("root_id".into(), json!(from.root_id));
        }
    }
    let mut first = tasks[0].clone();
    prepend_args(&mut first, prefix);
    let rest: Vec<Value> = tasks[1..].iter().rev().cloned().collect();
    let message = call(&first, None, Some(rest), from)?;
    let mut child = child_ref(message_id(&message.0));
    for task in &tasks[1..] {
        let id = option_str(task, "task_id").unwrap_or_default();
        child = json!([[id, child], null]);
    }
    Ok((message, child))
}

/// A chain as a callback: its first task gets the result and carries the
/// others as its own chain (next link last), followed by `rest`.
fn expand_chain(
    sig: &Value,
    rest: Option<Vec<Value>>,
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    let tasks = sig
        .get("kwargs")
        .and_then(|k| k.get("tasks"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some((first, others)) = tasks.split_first() else {
        return Ok(Expansion {
            messages: Vec::new(),
            chord_size: None,
            child: Value::Null,
        });
    };
    // Frozen as Celery's `chain.run` freezes them: each later task gets
    // its id now, so the first one carries the whole workflow.
    let mut chain = rest.unwrap_or_default();
    chain.extend(others.iter().rev().map(|task| {
        let mut task = task.clone();
        let opts = options_mut(&mut task);
        opts.entry("task_id").or_insert_with(|| json!(new_id()));
        opts.insert("root_id".into(), json!(from.root_id));
        opts.entry("reply_to")
            .or_insert_with(|| json!(super::outgoing::worker_oid()));
        task
    }));
    expand(first, Some(chain), from).map_err(|e| match e {
        CanvasError::Unsupported(why) => {
            CanvasError::Unsupported(format!("{why} (the first step of a chain)"))
        }
        other => other,
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Task => "task",
        Kind::Group => "group",
        Kind::Chord => "chord",
        Kind::Chain => "chain",
    }
}

/// The members of a group signature with their `group_index`.
fn members<'a>(group: &'a Value, what: &str) -> Result<Vec<(usize, &'a Value)>, CanvasError> {
    match kind(group) {
        Kind::Group => {}
        other => {
            return Err(CanvasError::Unsupported(format!(
                "a {what} that is a {} instead of a group",
                kind_name(other)
            )))
        }
    }
    let tasks = group
        .get("kwargs")
        .and_then(|k| k.get("tasks"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    flatten(tasks)
}

/// Nested groups unrolled in place, each member numbered by its place in
/// its own list (Celery's `group._prepared`); tasks and chains are
/// members, a chord inside is refused.
fn flatten(tasks: &[Value]) -> Result<Vec<(usize, &Value)>, CanvasError> {
    let mut out = Vec::new();
    for (index, task) in tasks.iter().enumerate() {
        match kind(task) {
            Kind::Task | Kind::Chain => out.push((index, task)),
            Kind::Group => out.extend(members(task, "group")?),
            other => {
                return Err(CanvasError::Unsupported(format!(
                    "a {} inside a group or chord header ({})",
                    kind_name(other),
                    task.get("task").and_then(Value::as_str).unwrap_or("?")
                )))
            }
        }
    }
    Ok(out)
}

/// `prefix` before the signature's own args, unless it is immutable (a
/// partial call: Celery's `Signature._merge`).
fn prepend_args(sig: &mut Value, prefix: &[Value]) {
    if immutable(sig) {
        return;
    }
    let own = sig
        .get("args")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    sig["args"] = Value::Array(prefix.iter().cloned().chain(own).collect());
}

fn options_mut(sig: &mut Value) -> &mut Map<String, Value> {
    if !sig.get("options").is_some_and(Value::is_object) {
        sig["options"] = json!({});
    }
    sig["options"].as_object_mut().expect("just made an object")
}

fn call(
    sig: &Value,
    parent_result: Option<&Value>,
    chain: Option<Vec<Value>>,
    from: &Origin<'_>,
) -> Result<(Envelope, Route), CanvasError> {
    SignatureCall {
        signature: sig,
        parent_result,
        parent_id: from.parent_id,
        root_id: from.root_id,
        chain,
        origin: from.origin,
        default_queue: from.default_queue,
    }
    .build()
    .ok_or_else(|| CanvasError::NoTaskName(sig.to_string()))
}

/// The task id a built task message carries (`""` if none).
pub fn message_id(env: &Envelope) -> &str {
    env.headers()
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Several signatures as one unfrozen group, the way Celery's tracer
/// starts several `link` callbacks or `link_error` errbacks
/// (`group(sigs).apply_async(...)`): the members share a new group id.
pub fn group_of(sigs: impl IntoIterator<Item = Value>) -> Value {
    json!({
        "task": "celery.group",
        "args": [],
        "kwargs": {"tasks": sigs.into_iter().collect::<Vec<_>>()},
        "options": {},
        "subtask_type": "group",
        "immutable": false,
    })
}

/// Every task id a signature names (its own, its members', a chord's
/// body's), so a step that cannot be started can be failed under each id
/// a client may be waiting on.
pub fn task_ids(sig: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_ids(sig, &mut out);
    out
}

fn collect_ids(sig: &Value, out: &mut Vec<String>) {
    if let Some(id) = option_str(sig, "task_id") {
        if !out.iter().any(|x| x == id) {
            out.push(id.to_owned());
        }
    }
    if kind(sig) == Kind::Task {
        return;
    }
    let kwargs = sig.get("kwargs");
    for key in ["tasks", "header", "body"] {
        match kwargs.and_then(|k| k.get(key)) {
            Some(Value::Array(list)) => list.iter().for_each(|s| collect_ids(s, out)),
            Some(v @ Value::Object(_)) => collect_ids(v, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskMessage;

    fn task(args: Value, id: &str) -> Value {
        json!({"task": "tori.echo", "args": args, "kwargs": {}, "options": {"task_id": id, "reply_to": "r"},
               "subtask_type": null, "immutable": false})
    }

    fn group(tasks: Vec<Value>, id: &str) -> Value {
        json!({"task": "celery.group", "args": [], "kwargs": {"tasks": tasks},
               "options": {"task_id": id}, "subtask_type": "group", "immutable": false})
    }

    fn from(result: &Value) -> Origin<'_> {
        Origin {
            result,
            parent_id: "a",
            root_id: "root",
            origin: "w@h",
            default_queue: "celery",
        }
    }

    fn decoded(exp: &Expansion) -> Vec<TaskMessage> {
        exp.messages
            .iter()
            .map(|(env, _)| TaskMessage::decode(env).unwrap())
            .collect()
    }

    #[test]
    fn a_group_link_publishes_its_members_under_its_id() {
        // Shaped like the chain embed the Celery 5.7 client sends for
        // `a | group(b, group(c, d))` (nested groups are kept here, to
        // check the unrolling too).
        let sig = group(
            vec![
                task(json!([10]), "b"),
                group(
                    vec![task(json!([20]), "c"), task(json!([30]), "d")],
                    "inner",
                ),
            ],
            "g",
        );
        let result = json!(7);
        let exp = expand(&sig, Some(Vec::new()), &from(&result)).unwrap();
        let msgs = decoded(&exp);
        let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "d"]);
        // Celery's `_prepared` numbers a nested group's members in their
        // own list.
        let places: Vec<Option<i64>> = msgs.iter().map(|m| m.group_index).collect();
        assert_eq!(places, [Some(0), Some(0), Some(1)]);
        for m in &msgs {
            assert_eq!(m.group.as_deref(), Some("g"));
            assert_eq!(m.parent_id.as_deref(), Some("a"));
            assert_eq!(m.root_id.as_deref(), Some("root"));
            assert_eq!(m.args[0], json!(7));
        }
        assert_eq!(exp.chord_size, None);
        assert_eq!(
            exp.child,
            json!([
                ["g", null],
                [
                    [["b", null], null],
                    [["c", null], null],
                    [["d", null], null]
                ]
            ])
        );
    }

    #[test]
    fn a_chord_link_records_its_size_and_hands_the_body_the_rest_of_the_chain() {
        let body = task(json!([]), "body");
        let after = task(json!([5]), "after");
        let sig = json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {},
            "header": group(vec![task(json!([10]), "b"), task(json!([20]), "c")], "g"),
            "body": body}, "options": {"task_id": "g"}, "subtask_type": "chord", "immutable": false});
        let result = json!("r1");
        let exp = expand(&sig, Some(vec![after.clone()]), &from(&result)).unwrap();
        assert_eq!(exp.chord_size, Some(("g".to_owned(), 2)));
        let msgs = decoded(&exp);
        assert_eq!(msgs.len(), 2);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.group.as_deref(), Some("g"));
            assert_eq!(m.group_index, Some(i as i64));
            assert_eq!(m.args[0], json!("r1"));
            assert!(m.chain.is_empty());
            let chord = m
                .chord
                .as_ref()
                .expect("every header member carries the body");
            assert_eq!(chord["options"]["task_id"], json!("body"));
            assert_eq!(chord["options"]["group_id"], json!("g"));
            assert_eq!(chord["options"]["root_id"], json!("root"));
            assert_eq!(chord["options"]["chain"], json!([after]));
        }
    }

    #[test]
    fn group_options_win_over_a_members_except_its_group_id() {
        let mut sig = group(vec![task(json!([1]), "b"), task(json!([2]), "c")], "g");
        sig["options"]["queue"] = json!("fast");
        sig["kwargs"]["tasks"][1]["options"]["group_id"] = json!("own");
        let result = json!(null);
        let exp = expand(&sig, None, &from(&result)).unwrap();
        let routes: Vec<&str> = exp
            .messages
            .iter()
            .map(|(_, r)| r.routing_key.as_str())
            .collect();
        assert_eq!(routes, ["fast", "fast"]);
        let groups: Vec<Option<String>> = decoded(&exp).into_iter().map(|m| m.group).collect();
        assert_eq!(groups, [Some("g".to_owned()), Some("own".to_owned())]);
    }

    #[test]
    fn a_chain_in_a_group_counts_by_its_last_task() {
        let inner = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [
            task(json!([1]), "c1"), task(json!([2]), "c2"), task(json!([3]), "c3")]},
            "options": {}, "subtask_type": "chain"});
        let sig = group(vec![inner, task(json!([4]), "d")], "g");
        let result = json!(0);
        let exp = expand(&sig, None, &from(&result)).unwrap();
        let msgs = decoded(&exp);
        assert_eq!(
            (msgs[0].id.as_str(), msgs[0].group.as_deref()),
            ("c1", None)
        );
        assert_eq!(msgs[0].args, vec![json!(0), json!(1)]);
        // Next link last; only the last task carries the group.
        let chain_ids: Vec<&str> = msgs[0]
            .chain
            .iter()
            .map(|t| t["options"]["task_id"].as_str().unwrap())
            .collect();
        assert_eq!(chain_ids, ["c3", "c2"]);
        assert_eq!(msgs[0].chain[0]["options"]["group_id"], json!("g"));
        assert_eq!(msgs[0].chain[0]["options"]["group_index"], json!(0));
        assert!(msgs[0].chain[1]["options"].get("group_id").is_none());
        assert_eq!(msgs[1].group_index, Some(1));
        assert_eq!(
            exp.child[1][0],
            json!([["c3", [["c2", [["c1", null], null]], null]], null])
        );
    }

    #[test]
    fn a_chord_inside_a_group_is_refused_and_every_id_is_named() {
        let inner = json!({"task": "celery.chord", "args": [], "kwargs": {
            "header": group(vec![task(json!([1]), "h1")], "hg"), "body": task(json!([]), "b")},
            "options": {"task_id": "hg"}, "subtask_type": "chord"});
        let sig = group(vec![inner, task(json!([3]), "d")], "g");
        let result = json!(0);
        let err = expand(&sig, None, &from(&result)).unwrap_err();
        assert!(
            matches!(err, CanvasError::Unsupported(ref why) if why.contains("a chord inside a group")),
            "{err}"
        );
        assert_eq!(task_ids(&sig), ["g", "hg", "h1", "b", "d"]);
        // A task's own kwargs are never taken for workflow parts.
        let plain = json!({"task": "t", "kwargs": {"body": {"options": {"task_id": "x"}}}, "options": {"task_id": "t1"}});
        assert_eq!(task_ids(&plain), ["t1"]);
    }
}
