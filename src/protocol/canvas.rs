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
//! Nested shapes are started as Celery starts them: a chord that is a
//! member of a group or of a chord header (its body takes the member's
//! place), and a chain member whose last link is a group or a chord (the
//! last link is frozen into the outer group, the first task carries it).
//! Three levels deep: a chain of tasks inside a group that ends such a
//! chain (`a | group(b | group(c | d, e), f)`) is frozen into the outer
//! group by its last link; a chord there (inside a group only) by its
//! body; a chain of tasks or a group inside the header of a chord that
//! ends such a chain is frozen with that header. A chord may also come
//! before the last link of a member chain (`b | group(c, d) | e | f`,
//! which the client builds as a chord whose body is `e | f`, unrolled as
//! Celery's `chain.run` unrolls it).
//! A chord with a group body may end such a chain (`b | group(c, d) |
//! group(e, f)`): the group's members take the place.
//! Not expanded (the caller fails the step with [`CanvasError`]): a chord
//! inside a group that ends such a chain inside a chord header (a Celery
//! 5.7 worker starts it so that the outer chord never completes), a
//! nested chord whose body is a chord, a chord with a group body before
//! the last link of such a chain, and links deeper than tasks inside the
//! three-level shapes above.

use serde_json::{json, Map, Value};
use thiserror::Error;

use super::envelope::Envelope;
use super::outgoing::{signature_task_id, Route, SignatureCall};
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
    /// Each chord's group id and size (a nested chord has its own), to
    /// record before any header member is published (its last member to
    /// finish compares against it).
    pub chord_sizes: Vec<(String, usize)>,
    /// Chord headers to save as `GroupResult.as_tuple()` before publishing
    /// (Celery's `apply_chord`): only those where a member's result is
    /// itself a group, so that the body gets nested lists.
    pub saved_groups: Vec<(String, Value)>,
    /// The finished task's `children` entry for this step.
    pub child: Value,
}

impl Expansion {
    /// One task message, listed as a plain child.
    fn single((env, route): (Envelope, Route)) -> Self {
        let child = child_ref(message_id(&env));
        Self {
            messages: vec![(env, route)],
            chord_sizes: Vec::new(),
            saved_groups: Vec::new(),
            child,
        }
    }

    /// Takes in what a nested step needs published and recorded.
    fn absorb(&mut self, inner: Expansion) {
        self.messages.extend(inner.messages);
        self.chord_sizes.extend(inner.chord_sizes);
        self.saved_groups.extend(inner.saved_groups);
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
    check_signatures(sig)?;
    rest.iter().flatten().try_for_each(check_signatures)?;
    match kind(sig) {
        Kind::Task => call(sig, Some(from.result), rest, from).map(Expansion::single),
        Kind::Group => expand_group(sig, rest, from),
        Kind::Chord => expand_chord(sig, rest, from),
        Kind::Chain => expand_chain(sig, rest, from),
    }
}

/// Every signature in `sig` (group members, chain links, chord header
/// and body, at any depth) is an object: a malformed message can put
/// anything there, and the expansion below edits signatures in place.
fn check_signatures(sig: &Value) -> Result<(), CanvasError> {
    if !sig.is_object() {
        return Err(CanvasError::NoTaskName(sig.to_string()));
    }
    if kind(sig) == Kind::Task {
        return Ok(());
    }
    let kwargs = sig.get("kwargs");
    for key in ["tasks", "header", "body"] {
        match kwargs.and_then(|k| k.get(key)) {
            Some(Value::Array(list)) => list.iter().try_for_each(check_signatures)?,
            Some(v @ Value::Object(_)) => check_signatures(v)?,
            _ => {}
        }
    }
    Ok(())
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
    let group_id = sig_task_id(sig).map_or_else(new_id, str::to_owned);
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
    let mut out = Expansion::default();
    let mut children = Vec::new();
    let prefix = std::slice::from_ref(from.result);
    for (index, member) in members(sig, "group")? {
        let place = Place {
            index,
            group_id: &group_id,
            outer_body: None,
        };
        if let Some(nested) = start_nested(member, &place, rest.as_deref(), prefix, from)? {
            children.push(nested.child.clone());
            out.absorb(nested);
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
        out.messages.push((env, route));
    }
    out.child = json!([[group_id, null], children]);
    Ok(out)
}

/// A chord's body, which every chord needs.
fn chord_body(sig: &Value) -> Result<Value, CanvasError> {
    sig.get("kwargs")
        .and_then(|k| k.get("body"))
        .filter(|b| b.is_object())
        .cloned()
        .ok_or_else(|| CanvasError::Unsupported(format!("a chord without a body: {sig}")))
}

/// The group id a chord's header runs under: the header's frozen id, else
/// the chord's, else a new one.
fn chord_group_id(header: &Value, chord: &Value) -> String {
    sig_task_id(header)
        .or_else(|| sig_task_id(chord))
        .map_or_else(new_id, str::to_owned)
}

fn chord_header(sig: &Value) -> Value {
    sig.get("kwargs")
        .and_then(|k| k.get("header"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The chord's own args after `prefix` (the parent's result), unless the
/// chord is immutable: what goes before each header member's args.
fn chord_partial(sig: &Value, prefix: &[Value]) -> Vec<Value> {
    let mut partial: Vec<Value> = if immutable(sig) {
        Vec::new()
    } else {
        prefix.to_vec()
    };
    partial.extend(
        sig.get("args")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    );
    partial
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
    let header = chord_header(sig);
    let mut body = chord_body(sig)?;
    let group_id = chord_group_id(&header, sig);
    let partial = chord_partial(sig, std::slice::from_ref(from.result));

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
        frozen_id(opts);
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

    let header_members = header_members(&header)?;
    if header_members.is_empty() {
        return call(&body, Some(&json!([])), None, from).map(Expansion::single);
    }
    let (mut out, children) = start_header(&header_members, &body, &group_id, &partial, from)?;
    out.child = json!([[group_id, null], children]);
    Ok(out)
}

/// A chord header's members (a group's, or a plain list's), nested groups
/// unrolled.
fn header_members(header: &Value) -> Result<Vec<(usize, &Value)>, CanvasError> {
    match header {
        Value::Array(list) => flatten(list),
        other => members(other, "chord header"),
    }
}

/// Publishes a chord's header members with `body` under `group_id`, after
/// `partial`, as Celery's `_chord.run` applies the header: records the
/// chord's size (what its members add up to, Celery's `_chord._descend`:
/// a chain counts by its last link, a nested chord by its body, a group by
/// its members) and, when a member's result is itself a group, the
/// header's shape. Returns the members' `children` entries beside.
fn start_header(
    header_members: &[(usize, &Value)],
    body: &Value,
    group_id: &str,
    partial: &[Value],
    from: &Origin<'_>,
) -> Result<(Expansion, Vec<Value>), CanvasError> {
    let mut out = Expansion::default();
    let mut children = Vec::new();
    let mut saved_children = Vec::new();
    let mut size = 0;
    for (index, member) in header_members {
        size += completions(member);
        let place = Place {
            index: *index,
            group_id,
            outer_body: Some(body),
        };
        if let Some(nested) = start_nested(member, &place, None, partial, from)? {
            let mut saved = nested.child.clone();
            // Celery saves the header as `_chord.run` froze it again,
            // which wraps a nested chord's header in a group of its own: an
            // id nothing else names. That holds for a chord member, a chord
            // with a group body that ends a chain member, and a chord
            // inside a group that ends one.
            match kind(member) {
                Kind::Chord => refreeze_chord_header(&mut saved),
                // A chain ending in a chord with a group body: that
                // chord's header; a chain ending in a group: the chords
                // among its members.
                Kind::Chain if saved.get(1).is_some_and(Value::is_array) => {
                    if saved.pointer("/0/1/1").is_some_and(Value::is_array) {
                        refreeze_chord_header(&mut saved);
                    } else if let Some(results) = saved.get_mut(1).and_then(Value::as_array_mut) {
                        results.iter_mut().for_each(refreeze_chord_header);
                    }
                }
                _ => {}
            }
            saved_children.push(saved);
            children.push(nested.child.clone());
            out.absorb(nested);
            continue;
        }
        let mut member = (*member).clone();
        prepend_args(&mut member, partial);
        let opts = options_mut(&mut member);
        opts.entry("group_id").or_insert_with(|| json!(group_id));
        opts.insert("group_index".into(), json!(index));
        opts.insert("chord".into(), body.clone());
        let (env, route) = call(&member, None, None, from)?;
        children.push(child_ref(message_id(&env)));
        saved_children.push(child_ref(message_id(&env)));
        out.messages.push((env, route));
    }
    // Celery's `apply_chord` saves the header only when it is "complex".
    if children.iter().any(is_group_result) {
        out.saved_groups.push((
            group_id.to_owned(),
            json!([[group_id, null], saved_children]),
        ));
    }
    out.chord_sizes.push((group_id.to_owned(), size));
    Ok((out, children))
}

/// A chord's result (its body's, whose parent is the header's group
/// result: `[[body, [[header, parent], members]], …]`) with a new id for
/// its header; anything else as it is.
fn refreeze_chord_header(result: &mut Value) {
    if result.pointer("/0/1/1").is_some_and(Value::is_array) {
        if let Some(id) = result.pointer_mut("/0/1/0/0") {
            *id = json!(new_id());
        }
    }
}

/// Where a nested member stands: its place in the outer group and the
/// outer chord's body, if the group is a chord header.
struct Place<'a> {
    index: usize,
    group_id: &'a str,
    outer_body: Option<&'a Value>,
}

/// Starts a member that is a chain or a chord ([`chain_member`],
/// [`chord_member`]); `None` for a task, which the caller publishes.
fn start_nested(
    member: &Value,
    place: &Place<'_>,
    chain: Option<&[Value]>,
    prefix: &[Value],
    from: &Origin<'_>,
) -> Result<Option<Expansion>, CanvasError> {
    let Place {
        index,
        group_id,
        outer_body,
    } = *place;
    Ok(match kind(member) {
        Kind::Chain => Some(chain_member(
            member, index, group_id, outer_body, prefix, from,
        )?),
        Kind::Chord => Some(chord_member(
            member, index, group_id, outer_body, chain, prefix, from,
        )?),
        _ => None,
    })
}

/// `GroupResult.as_tuple()` has a list of results where an `AsyncResult`'s
/// has `null`.
fn is_group_result(tuple: &Value) -> bool {
    tuple.get(1).is_some_and(Value::is_array)
}

/// How many header completions a member stands for (Celery's
/// `_chord._descend`).
fn completions(sig: &Value) -> usize {
    let tasks = || {
        sig.get("kwargs")
            .and_then(|k| k.get("tasks"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    match kind(sig) {
        Kind::Task => 1,
        Kind::Group => tasks().iter().map(completions).sum(),
        Kind::Chain => tasks()
            .iter()
            .rev()
            .map(completions)
            .find(|n| *n > 0)
            .unwrap_or(0),
        Kind::Chord => sig
            .get("kwargs")
            .and_then(|k| k.get("body"))
            .filter(|b| b.is_object())
            .map_or(0, completions),
    }
}

/// A chord as a member of a group or of a chord header, started as
/// Celery's group starts it (`chord.apply_async(partial,
/// add_to_parent=False, chord=<the outer chord's body>, **group options)`):
/// its body takes the member's place in the outer group (the outer group
/// id and index, and the outer body to call in turn), and its header runs
/// under the chord's own group id with that body (a group body's members
/// take the place instead, see [`freeze_group_body`]). `chain` is the
/// rest of the workflow where the group passes one on (a chain step, not
/// a callback or a chord header).
fn chord_member(
    chord: &Value,
    index: usize,
    group_id: &str,
    outer_body: Option<&Value>,
    chain: Option<&[Value]>,
    prefix: &[Value],
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    let header = chord_header(chord);
    let mut body = chord_body(chord)?;
    let inner_id = chord_group_id(&header, chord);
    let body_kind = kind(&body);
    let members = match body_kind {
        Kind::Task => {
            freeze_in_place(&mut body, index, group_id, outer_body, &json!(from.root_id));
            None
        }
        Kind::Group => Some(freeze_group_body(
            &mut body,
            index,
            group_id,
            &inner_id,
            outer_body,
            &json!(from.root_id),
        )?),
        other => {
            return Err(CanvasError::Unsupported(format!(
                "a chord whose body is a {} inside a group or chord header",
                kind_name(other)
            )))
        }
    };
    {
        // The group's apply options reach the body through the chord.
        let opts = options_mut(&mut body);
        opts.insert("add_to_parent".into(), json!(false));
        opts.insert("chord".into(), outer_body.cloned().unwrap_or(Value::Null));
        if let Some(chain) = chain {
            opts.insert("chain".into(), Value::Array(chain.to_vec()));
        }
        opts.entry("priority").or_insert(Value::Null);
        if body_kind == Kind::Task {
            opts.insert("group_id".into(), json!(group_id));
        }
    }
    let body_id = sig_task_id(&body).unwrap_or_default().to_owned();
    let body_result = |parent: Value| match &members {
        None => json!([[body_id, parent], null]),
        Some(members) => json!([[body_id, parent], members]),
    };
    let partial = chord_partial(chord, prefix);
    let header_members = header_members(&header)?;
    if header_members.is_empty() {
        if body_kind != Kind::Task {
            return Err(CanvasError::Unsupported(
                "an empty chord whose body is a group inside a group or chord header".into(),
            ));
        }
        // `body.delay([])`.
        let mut out = Expansion::single(call(&body, Some(&json!([])), None, from)?);
        out.child = body_result(json!([[inner_id, null], []]));
        return Ok(out);
    }
    let (mut out, children) = start_header(&header_members, &body, &inner_id, &partial, from)?;
    out.child = body_result(json!([[inner_id, null], children]));
    Ok(out)
}

/// A nested chord's group body, frozen as Celery freezes it twice (into
/// the outer group in the chord's place, then by the chord with its own
/// header's id): the group itself names the chord's header, and its
/// members (nested groups unrolled, numbered anew) take the outer group
/// id and the outer chord's body, so that each counts for the outer
/// chord. Returns the members' results.
fn freeze_group_body(
    body: &mut Value,
    index: usize,
    group_id: &str,
    header_id: &str,
    outer_body: Option<&Value>,
    root: &Value,
) -> Result<Vec<Value>, CanvasError> {
    {
        let opts = options_mut(body);
        frozen_id(opts);
        opts.insert("group_index".into(), json!(index));
        opts.insert("root_id".into(), root.clone());
        opts.entry("parent_id").or_insert(Value::Null);
        opts.insert("group_id".into(), json!(header_id));
        if let Some(outer) = outer_body {
            opts.insert("chord".into(), outer.clone());
        }
    }
    let tasks: Vec<Value> = members(body, "chord body")?
        .into_iter()
        .map(|(_, m)| m.clone())
        .collect();
    let mut frozen = Vec::with_capacity(tasks.len());
    for (n, mut task) in tasks.into_iter().enumerate() {
        if kind(&task) != Kind::Task {
            return Err(CanvasError::Unsupported(format!(
                "a {} inside the group body of a chord inside a group or chord header",
                kind_name(kind(&task))
            )));
        }
        let opts = options_mut(&mut task);
        give_ids(opts);
        opts.insert("group_index".into(), json!(n));
        opts.entry("group_id").or_insert_with(|| json!(group_id));
        if let Some(outer) = outer_body {
            opts.insert("chord".into(), outer.clone());
        }
        if truthy(root) {
            opts.insert("root_id".into(), root.clone());
        }
        frozen.push(task);
    }
    let results = frozen
        .iter()
        .map(|t| child_ref(sig_task_id(t).unwrap_or_default()))
        .collect();
    if let Some(kwargs) = body.get_mut("kwargs").and_then(Value::as_object_mut) {
        kwargs.insert("tasks".into(), Value::Array(frozen));
    }
    Ok(results)
}

/// A nested chord's body frozen into the outer group in the chord's place
/// (Celery's `chord.freeze(group_id=, chord=, root_id=, group_index=)`
/// freezes the body so): the outer group id unless it has one, the
/// place, and the outer chord's body to call in turn.
fn freeze_in_place(
    body: &mut Value,
    index: usize,
    group_id: &str,
    outer_body: Option<&Value>,
    root: &Value,
) {
    let opts = options_mut(body);
    frozen_id(opts);
    if truthy(root) {
        opts.insert("root_id".into(), root.clone());
    }
    opts.entry("reply_to")
        .or_insert_with(|| json!(super::outgoing::worker_oid()));
    opts.entry("group_id").or_insert_with(|| json!(group_id));
    if let Some(outer) = outer_body {
        opts.insert("chord".into(), outer.clone());
    }
    opts.insert("group_index".into(), json!(index));
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
/// (frozen) as its chain; the *last* link stands for the member, so it
/// alone carries the group id, the place in the group and the chord body,
/// and its result is the one that counts. The last link may be a group
/// (its members join the outer group) or a chord (its body does); a chord
/// may also come before it (frozen with the root id only). Returns
/// the message with the member's `children` entry (the last link, its
/// parents back to the first task).
fn chain_member(
    chain: &Value,
    index: usize,
    group_id: &str,
    chord: Option<&Value>,
    prefix: &[Value],
    from: &Origin<'_>,
) -> Result<Expansion, CanvasError> {
    let mut tasks = unroll_chord_bodies(
        chain
            .get("kwargs")
            .and_then(|k| k.get("tasks"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    )?;
    let Some(last) = tasks.len().checked_sub(1) else {
        return Err(CanvasError::Unsupported(
            "an empty chain inside a group or chord header".into(),
        ));
    };
    if last == 0 && kind(&tasks[0]) != Kind::Task {
        return Err(CanvasError::Unsupported(format!(
            "a chain of one {} inside a group or chord header",
            kind_name(kind(&tasks[0]))
        )));
    }
    // A chord may come before the last link (the client turns `group |
    // task` into one); a group there would be a chord with a group body.
    let middle = tasks.get(1..last).unwrap_or_default();
    let first_kind = Some(kind(&tasks[0])).filter(|k| *k != Kind::Task);
    let middle_kind = middle
        .iter()
        .map(kind)
        .find(|k| !matches!(k, Kind::Task | Kind::Chord));
    if let Some(other) = first_kind.or(middle_kind) {
        return Err(CanvasError::Unsupported(format!(
            "a {} followed by more links in a chain inside a group or chord header",
            kind_name(other)
        )));
    }
    let root = json!(from.root_id);
    let mut middle_chords = Vec::new();
    for task in tasks.iter_mut().take(last).skip(1) {
        if kind(task) == Kind::Chord {
            middle_chords.push(Some(freeze_chord_link(task, None, &root)?));
            continue;
        }
        middle_chords.push(None);
        let opts = options_mut(task);
        give_ids(opts);
        opts.insert("root_id".into(), root.clone());
    }
    let last_kind = kind(&tasks[last]);
    let tail = match last_kind {
        Kind::Group => freeze_group_link(&mut tasks[last], index, group_id, chord, from)?,
        Kind::Chord => {
            let place = Place {
                index,
                group_id,
                outer_body: chord,
            };
            Tail::Chord(freeze_chord_link(&mut tasks[last], Some(&place), &root)?)
        }
        _ => {
            let task = &mut tasks[last];
            let opts = options_mut(task);
            if last > 0 {
                give_ids(opts);
            }
            opts.insert("group_index".into(), json!(index));
            opts.insert("root_id".into(), json!(from.root_id));
            opts.entry("group_id").or_insert_with(|| json!(group_id));
            if let Some(body) = chord {
                opts.insert("chord".into(), body.clone());
            }
            Tail::Task
        }
    };
    let mut first = tasks[0].clone();
    prepend_args(&mut first, prefix);
    let rest: Vec<Value> = tasks[1..].iter().rev().cloned().collect();
    let message = call(&first, None, Some(rest), from)?;
    // The links' results, each the parent of the next.
    let mut parent = child_ref(message_id(&message.0));
    let middle = tasks.get(1..last).unwrap_or_default();
    for (task, chord) in middle.iter().zip(middle_chords) {
        parent = match chord {
            Some(chord) => chord.result(parent),
            None => json!([[sig_task_id(task).unwrap_or_default(), parent], null]),
        };
    }
    let child = match tail {
        Tail::Task if last == 0 => parent,
        Tail::Task => json!([[sig_task_id(&tasks[last]), parent], null]),
        Tail::Group { id, members } => json!([[id, parent], members]),
        Tail::Chord(chord) => chord.result(parent),
    };
    let mut out = Expansion::single(message);
    out.child = child;
    Ok(out)
}

/// Celery's `chord._unroll_body` as `chain.run` applies it to a chain's
/// links: a chord whose body is a chain led by a task keeps that task as
/// its body (with the chain's own options, except those `chain.run` takes
/// itself), and the rest of the body's chain follows it as links of the
/// outer chain. The client builds `b | group(c, d) | e | f` as such a
/// chord.
fn unroll_chord_bodies(links: Vec<Value>) -> Result<Vec<Value>, CanvasError> {
    const RUN_OPTIONS: [&str; 8] = [
        "chord",
        "group_id",
        "group_index",
        "link",
        "link_error",
        "parent_id",
        "root_id",
        "task_id",
    ];
    let mut out = Vec::with_capacity(links.len());
    for mut link in links {
        let body = link
            .get("kwargs")
            .and_then(|k| k.get("body"))
            .filter(|b| kind(&link) == Kind::Chord && kind(b) == Kind::Chain);
        let body_links = body
            .and_then(|b| b.get("kwargs")?.get("tasks")?.as_array())
            .filter(|l| l.first().is_some_and(|first| kind(first) != Kind::Group))
            .cloned();
        let (Some(body), Some(mut body_links)) = (body, body_links) else {
            out.push(link);
            continue;
        };
        let opts = options(body);
        if opts.contains_key("link") || opts.contains_key("link_error") {
            return Err(CanvasError::Unsupported(
                "a chord whose body is a chain with callbacks inside a group or chord header"
                    .into(),
            ));
        }
        let rest = body_links.split_off(1);
        let mut first = body_links.remove(0);
        let first_opts = options_mut(&mut first);
        for (k, v) in opts {
            if !RUN_OPTIONS.contains(&k.as_str()) {
                first_opts.insert(k, v);
            }
        }
        link["kwargs"]["body"] = first;
        out.push(link);
        out.extend(rest);
    }
    Ok(out)
}

/// What the last link of a chain member stands for in its `children`
/// entry.
enum Tail {
    Task,
    Group { id: String, members: Vec<Value> },
    Chord(FrozenChord),
}

/// A chord frozen in a member's place: its body's ids (a chain body's
/// links, first to last), the id its header's result is listed under, and
/// the header members' results.
struct FrozenChord {
    body_ids: Vec<String>,
    /// A group body's members' results.
    body_members: Option<Vec<Value>>,
    header_id: String,
    members: Vec<Value>,
}

impl FrozenChord {
    /// The chord's result (its body's last link, whose first link's parent
    /// is the header's), with `parent` as the header's parent.
    fn result(self, parent: Value) -> Value {
        let header = json!([[self.header_id, parent], self.members]);
        let body = self
            .body_ids
            .into_iter()
            .fold(header, |parent, id| json!([[id, parent], null]));
        match self.body_members {
            Some(members) => json!([body[0], members]),
            None => body,
        }
    }
}

/// A group as the last link of a chain member, frozen as Celery's
/// `group.freeze(group_id=, chord=, group_index=, root_id=)` freezes it:
/// its members (nested groups unrolled, numbered anew) join the *outer*
/// group and carry the outer chord's body.
fn freeze_group_link(
    group: &mut Value,
    index: usize,
    group_id: &str,
    chord: Option<&Value>,
    from: &Origin<'_>,
) -> Result<Tail, CanvasError> {
    let (own_id, root, parent) = {
        let opts = options_mut(group);
        let own_id = frozen_id(opts);
        opts.insert("group_id".into(), json!(group_id));
        if let Some(body) = chord {
            opts.insert("chord".into(), body.clone());
        }
        opts.insert("group_index".into(), json!(index));
        let root = opts
            .entry("root_id")
            .or_insert_with(|| json!(from.root_id))
            .clone();
        let parent = opts.entry("parent_id").or_insert(Value::Null).clone();
        (own_id, root, parent)
    };
    let mut frozen = Vec::new();
    let mut members = Vec::new();
    let mut stack: std::collections::VecDeque<Value> = group
        .get("kwargs")
        .and_then(|k| k.get("tasks"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into();
    while let Some(mut task) = stack.pop_front() {
        match kind(&task) {
            Kind::Group => {
                let inner = task
                    .get("kwargs")
                    .and_then(|k| k.get("tasks"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for t in inner.into_iter().rev() {
                    stack.push_front(t);
                }
            }
            Kind::Task => {
                let opts = options_mut(&mut task);
                frozen_id(opts);
                if truthy(&root) {
                    opts.insert("root_id".into(), root.clone());
                }
                if truthy(&parent) {
                    opts.insert("parent_id".into(), parent.clone());
                }
                opts.entry("reply_to")
                    .or_insert_with(|| json!(super::outgoing::worker_oid()));
                opts.entry("group_id").or_insert_with(|| json!(group_id));
                if let Some(body) = chord {
                    opts.insert("chord".into(), body.clone());
                }
                opts.insert("group_index".into(), json!(frozen.len()));
                members.push(child_ref(sig_task_id(&task).unwrap_or_default()));
                frozen.push(task);
            }
            Kind::Chain if chain_is_empty(&task) => {}
            Kind::Chain => {
                let place = Place {
                    index: frozen.len(),
                    group_id,
                    outer_body: chord,
                };
                members.push(freeze_task_chain(&mut task, Some(&place), &root)?);
                frozen.push(task);
            }
            Kind::Chord if chord.is_some() => {
                // Byte for byte what a Python worker publishes would hang:
                // the nested body keeps the group id of its own header, so
                // the outer chord of a Celery 5.7 worker never completes.
                return Err(CanvasError::Unsupported(
                    "a chord inside a group that ends a chain inside a chord header \
                     (a Celery 5.7 worker starts it so that the outer chord never completes)"
                        .into(),
                ));
            }
            Kind::Chord => {
                let place = Place {
                    index: frozen.len(),
                    group_id,
                    outer_body: chord,
                };
                let frozen_chord = freeze_chord_link(&mut task, Some(&place), &root)?;
                members.push(frozen_chord.result(Value::Null));
                frozen.push(task);
            }
        }
    }
    if let Some(kwargs) = group.get_mut("kwargs").and_then(Value::as_object_mut) {
        kwargs.insert("tasks".into(), Value::Array(frozen));
    }
    Ok(Tail::Group {
        id: own_id,
        members,
    })
}

/// A chain of tasks that is a member of a group frozen into an outer
/// group, frozen as Celery's `chain.freeze(group_id=, chord=, root_id=,
/// group_index=)` freezes it (`prepare_steps` without cloning): every link
/// gets an id, a reply-to and the root id, and the *last* link alone
/// stands for the member, with the outer group id (unless it has one), the
/// place and the outer chord's body. Returns the last link's result, its
/// parents back to the first link. A chain with a group or chord inside is
/// refused.
fn freeze_task_chain(
    chain: &mut Value,
    place: Option<&Place<'_>>,
    root: &Value,
) -> Result<Value, CanvasError> {
    let prefix: Vec<Value> = chain
        .get("args")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(tasks) = chain
        .get_mut("kwargs")
        .and_then(|k| k.get_mut("tasks"))
        .and_then(Value::as_array_mut)
    else {
        return Err(CanvasError::Unsupported(
            "a chain without tasks inside a group that ends a chain inside a group or chord header"
                .into(),
        ));
    };
    if let Some(other) = tasks.iter().map(kind).find(|k| *k != Kind::Task) {
        return Err(CanvasError::Unsupported(format!(
            "a {} inside a chain inside a group that ends a chain inside a group or chord header",
            kind_name(other)
        )));
    }
    let Some(last) = tasks.len().checked_sub(1) else {
        return Err(CanvasError::Unsupported(
            "an empty chain as a chord body inside a chain inside a group or chord header".into(),
        ));
    };
    // `prepare_steps` walks the chain from its last link back to its first.
    for (n, task) in tasks.iter_mut().enumerate().rev() {
        if n == 0 && !prefix.is_empty() {
            // Unlike a call, freezing prepends even to an immutable link.
            let own = task.get("args").and_then(Value::as_array).cloned();
            task["args"] = Value::Array(
                prefix
                    .iter()
                    .cloned()
                    .chain(own.into_iter().flatten())
                    .collect(),
            );
        }
        let opts = options_mut(task);
        frozen_id(opts);
        if truthy(root) {
            opts.insert("root_id".into(), root.clone());
        }
        opts.entry("reply_to")
            .or_insert_with(|| json!(super::outgoing::worker_oid()));
        if let Some(place) = place.filter(|_| n == last) {
            opts.entry("group_id")
                .or_insert_with(|| json!(place.group_id));
            if let Some(body) = place.outer_body {
                opts.insert("chord".into(), body.clone());
            }
            opts.insert("group_index".into(), json!(place.index));
        }
    }
    let mut result = Value::Null;
    for task in tasks.iter() {
        let id = sig_task_id(task).unwrap_or_default();
        result = json!([[id, result], null]);
    }
    Ok(result)
}

/// A chord as the last link of a chain member, frozen as a Celery 5.7
/// worker sends it on (`chord.freeze(group_id=, chord=, root_id=,
/// group_index=)` on a clone): its header and the header's members with
/// the root id, its body in the outer group's place. It starts when the
/// link before it finishes, and gives its header the body then.
fn freeze_chord_link(
    chord: &mut Value,
    place: Option<&Place<'_>>,
    root: &Value,
) -> Result<FrozenChord, CanvasError> {
    let mut body = chord_body(chord)?;
    let mut header = chord_header(chord);
    if !header.is_object() || kind(&header) != Kind::Group {
        return Err(CanvasError::Unsupported(
            "a chord whose header is not a group at the end of a chain inside a group or chord header"
                .into(),
        ));
    }
    let header_id = {
        let opts = options_mut(&mut header);
        let header_id = frozen_id(opts);
        opts.insert("root_id".into(), root.clone());
        opts.entry("parent_id").or_insert(Value::Null);
        header_id
    };
    let mut body_members = None;
    match (kind(&body), place) {
        (Kind::Task, Some(p)) => {
            freeze_in_place(&mut body, p.index, p.group_id, p.outer_body, root)
        }
        // Its members take the place (`a | group(b | group(c, d) |
        // group(e, f), g)` is built so). Frozen once, into the outer
        // group, and without a root id: a Celery 5.7 worker sends it so.
        (Kind::Group, Some(p)) => {
            body_members = Some(freeze_group_body(
                &mut body,
                p.index,
                p.group_id,
                p.group_id,
                p.outer_body,
                &Value::Null,
            )?);
        }
        // A link before the last: `body.freeze(root_id=)` only.
        (Kind::Task, None) => {
            let opts = options_mut(&mut body);
            frozen_id(opts);
            if truthy(root) {
                opts.insert("root_id".into(), root.clone());
            }
            opts.entry("reply_to")
                .or_insert_with(|| json!(super::outgoing::worker_oid()));
        }
        // The client makes `b | group(c, d) | e | f` a chord whose body
        // is `e | f`; its last link takes the place.
        (Kind::Chain, place) => {
            freeze_task_chain(&mut body, place, root)?;
        }
        // Its members would have to take the outer group id, which is
        // not ported here: refused rather than started uncountable.
        (other, _) => {
            return Err(CanvasError::Unsupported(format!(
                "a chord whose body is a {} inside a chain inside a group or chord header",
                kind_name(other)
            )))
        }
    }
    let body_ids: Vec<String> = match kind(&body) {
        Kind::Chain => body
            .get("kwargs")
            .and_then(|k| k.get("tasks"))
            .and_then(Value::as_array)
            .map(|links| {
                links
                    .iter()
                    .map(|l| sig_task_id(l).unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![sig_task_id(&body).unwrap_or_default().to_owned()],
    };
    let mut members = Vec::new();
    if let Some(tasks) = header
        .get_mut("kwargs")
        .and_then(|k| k.get_mut("tasks"))
        .and_then(Value::as_array_mut)
    {
        for (n, task) in tasks.iter_mut().enumerate() {
            freeze_header_member(task, n, root, &mut members)?;
        }
    }
    options_mut(chord).insert("task_id".into(), json!(header_id));
    // Celery freezes the header wrapped in a new group (the serialized
    // header is a dict, not a `group`), so the result it lists for the
    // header has an id of its own that nothing else names.
    let header_id = new_id();
    if let Some(kwargs) = chord.get_mut("kwargs").and_then(Value::as_object_mut) {
        kwargs.insert("header".into(), header);
        kwargs.insert("body".into(), body);
    }
    Ok(FrozenChord {
        body_ids,
        body_members,
        header_id,
        members,
    })
}

/// A member of the header of a chord that ends a chain member, frozen as
/// Celery 5.7 leaves it in the message (the chord freezes a copy of its
/// header): every task gets an id, a reply-to and the root id, and keeps
/// the place the client gave it; a chain of tasks counts by its last link
/// (its results, each the parent of the next), a nested group by each of
/// its tasks. Pushes the member's results onto `results`.
fn freeze_header_member(
    member: &mut Value,
    n: usize,
    root: &Value,
    results: &mut Vec<Value>,
) -> Result<(), CanvasError> {
    let refuse = |what: Kind| {
        CanvasError::Unsupported(format!(
            "a {} inside the header of a chord that ends a chain inside a group or chord header",
            kind_name(what)
        ))
    };
    let freeze = |task: &mut Value, index: Option<usize>| {
        let opts = options_mut(task);
        give_ids(opts);
        if let Some(index) = index {
            opts.entry("group_index").or_insert_with(|| json!(index));
        }
        if truthy(root) {
            opts.insert("root_id".into(), root.clone());
        }
    };
    match kind(member) {
        Kind::Task => {
            freeze(member, Some(n));
            results.push(child_ref(sig_task_id(member).unwrap_or_default()));
        }
        what @ (Kind::Chain | Kind::Group) => {
            let Some(tasks) = member
                .get_mut("kwargs")
                .and_then(|k| k.get_mut("tasks"))
                .and_then(Value::as_array_mut)
            else {
                return Err(refuse(what));
            };
            if let Some(other) = tasks.iter().map(kind).find(|k| *k != Kind::Task) {
                return Err(refuse(other));
            }
            let last = tasks.len().saturating_sub(1);
            let mut chained = Value::Null;
            for (k, task) in tasks.iter_mut().enumerate() {
                let index = match what {
                    Kind::Group => Some(k),
                    _ => (k == last).then_some(n),
                };
                freeze(task, index);
                let id = sig_task_id(task).unwrap_or_default();
                if what == Kind::Group {
                    results.push(child_ref(id));
                } else {
                    chained = json!([[id, chained], null]);
                }
            }
            if what == Kind::Chain && !tasks.is_empty() {
                results.push(chained);
            }
        }
        other => return Err(refuse(other)),
    }
    Ok(())
}

/// The signature's task id, given a new one where it has none (its id
/// once frozen). An empty or null `task_id` is none, as in Celery's
/// `task_id or uuid()` ([`signature_task_id`]).
fn frozen_id(opts: &mut Map<String, Value>) -> String {
    if let Some(id) = signature_task_id(opts) {
        return id.to_owned();
    }
    let id = new_id();
    opts.insert("task_id".into(), json!(id));
    id
}

/// `sig`'s own task id, if it has a usable one ([`signature_task_id`]).
fn sig_task_id(sig: &Value) -> Option<&str> {
    signature_task_id(sig.get("options")?.as_object()?)
}

/// A task id and a reply-to where the signature has none yet, as
/// Celery's `freeze` gives them.
fn give_ids(opts: &mut Map<String, Value>) {
    frozen_id(opts);
    opts.entry("reply_to")
        .or_insert_with(|| json!(super::outgoing::worker_oid()));
}

/// Python's truth of an option value (`if root_id:`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Bool(b) => *b,
        _ => true,
    }
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
        return Ok(Expansion::default());
    };
    // Frozen as Celery's `chain.run` freezes them: each later task gets
    // its id now, so the first one carries the whole workflow.
    let mut chain = rest.unwrap_or_default();
    chain.extend(others.iter().rev().map(|task| {
        let mut task = task.clone();
        let opts = options_mut(&mut task);
        frozen_id(opts);
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
/// its own list (Celery's `group._prepared`); an empty chain is dropped,
/// as Celery 5.7 drops it.
fn flatten(tasks: &[Value]) -> Result<Vec<(usize, &Value)>, CanvasError> {
    let mut out = Vec::new();
    for (index, task) in tasks.iter().enumerate() {
        match kind(task) {
            Kind::Group => out.extend(members(task, "group")?),
            Kind::Chain if chain_is_empty(task) => {}
            _ => out.push((index, task)),
        }
    }
    Ok(out)
}

fn chain_is_empty(chain: &Value) -> bool {
    chain
        .get("kwargs")
        .and_then(|k| k.get("tasks"))
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
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
    if let Some(id) = sig_task_id(sig) {
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
        assert!(exp.chord_sizes.is_empty());
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

    /// Celery publishes a signature under `task_id or uuid()`: an empty or
    /// null `task_id` in a group, chord or chain gets a new id, the one the
    /// message carries and the recorded results name (issue #25).
    #[test]
    fn an_empty_or_null_task_id_gets_a_new_one() {
        let result = json!(1);
        let mut null_member = task(json!([2]), "x");
        null_member["options"]["task_id"] = Value::Null;
        let sig = group(vec![task(json!([1]), ""), null_member], "");
        let exp = expand(&sig, Some(Vec::new()), &from(&result)).unwrap();
        let msgs = decoded(&exp);
        let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
        assert!(ids.iter().all(|id| !id.is_empty()) && ids[0] != ids[1]);
        let group_id = msgs[0].group.clone().unwrap();
        assert!(!group_id.is_empty());
        assert_eq!(
            exp.child,
            json!([
                [group_id, null],
                [[[ids[0], null], null], [[ids[1], null], null]]
            ])
        );

        let sig = json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {},
            "header": group(vec![task(json!([10]), "")], ""),
            "body": task(json!([]), "")}, "options": {"task_id": ""}, "subtask_type": "chord", "immutable": false});
        let exp = expand(&sig, Some(Vec::new()), &from(&result)).unwrap();
        let (group_id, _) = &exp.chord_sizes[0];
        assert!(!group_id.is_empty());
        let member = &decoded(&exp)[0];
        assert!(!member.id.is_empty());
        assert_eq!(member.group.as_ref(), Some(group_id));
        let body = member.chord.as_ref().unwrap();
        assert!(!body["options"]["task_id"].as_str().unwrap().is_empty());

        let sig = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [
            task(json!([1]), ""), task(json!([2]), "")]}, "options": {}, "subtask_type": "chain", "immutable": false});
        let exp = expand(&sig, Some(Vec::new()), &from(&result)).unwrap();
        let first = &decoded(&exp)[0];
        assert!(!first.id.is_empty());
        let next = first.chain[0]["options"]["task_id"].as_str().unwrap();
        assert!(!next.is_empty() && next != first.id);
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
        assert_eq!(exp.chord_sizes, [("g".to_owned(), 2)]);
        assert!(
            exp.saved_groups.is_empty(),
            "a header of tasks is not saved"
        );
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
    fn a_chain_in_a_group_that_ends_a_member_chain_counts_by_its_last_link() {
        // a | group(b | group(c | d, e), f): the step after a.
        let inner = group(
            vec![
                chain(vec![task(json!([11]), "c"), task(json!([12]), "d")]),
                task(json!([13]), "e"),
            ],
            "ig",
        );
        let member = chain(vec![task(json!([10]), "b"), inner]);
        let sig = group(vec![member, task(json!([20]), "f")], "g");
        let result = json!(0);
        let exp = expand(&sig, None, &from(&result)).unwrap();
        let msgs = decoded(&exp);
        assert_eq!(msgs.len(), 2, "b now, f now; c, d and e once b is done");
        assert_eq!(msgs[0].id, "b");
        let frozen = &msgs[0].chain[0];
        let links = &frozen["kwargs"]["tasks"][0]["kwargs"]["tasks"];
        // The chain's last link stands for it in the *outer* group.
        assert_eq!(links[1]["options"]["task_id"], json!("d"));
        assert_eq!(links[1]["options"]["group_id"], json!("g"));
        assert_eq!(links[1]["options"]["group_index"], json!(0));
        assert!(links[0]["options"].get("group_id").is_none());
        assert!(links[0]["options"].get("group_index").is_none());
        let e = &frozen["kwargs"]["tasks"][1]["options"];
        assert_eq!(
            (&e["group_id"], &e["group_index"]),
            (&json!("g"), &json!(1))
        );
        for link in [&links[0], &links[1], &frozen["kwargs"]["tasks"][1]] {
            assert_eq!(link["options"]["root_id"], json!("root"));
        }
        assert_eq!(
            exp.child,
            json!([
                ["g", null],
                [
                    [
                        ["ig", [["b", null], null]],
                        [[["d", [["c", null], null]], null], [["e", null], null]]
                    ],
                    [["f", null], null]
                ]
            ])
        );
        // As the header of a | chord([b | group(c | d, e), f], g) it
        // stands for d, e and f.
        assert_eq!(completions(&sig), 3);
    }

    #[test]
    fn a_chain_in_the_header_of_a_chord_that_ends_a_member_chain_is_frozen_with_it() {
        // a | group(b | chord([c | d, e], f), g): the step after a.
        let header = group(
            vec![
                chain(vec![task(json!([11]), "c"), task(json!([12]), "d")]),
                task(json!([13]), "e"),
            ],
            "hg",
        );
        let member = chain(vec![
            task(json!([10]), "b"),
            chord(header, task(json!([]), "f")),
        ]);
        let sig = group(vec![member, task(json!([20]), "g")], "og");
        let result = json!(0);
        let exp = expand(&sig, None, &from(&result)).unwrap();
        let msgs = decoded(&exp);
        let frozen = &msgs[0].chain[0];
        let links = &frozen["kwargs"]["header"]["kwargs"]["tasks"][0]["kwargs"]["tasks"];
        for link in links.as_array().unwrap() {
            assert_eq!(link["options"]["root_id"], json!("root"));
        }
        // The body stands for the member in the outer group.
        let body = &frozen["kwargs"]["body"]["options"];
        assert_eq!(
            (&body["group_id"], &body["group_index"]),
            (&json!("og"), &json!(0))
        );
        // The header's results: the chain's last link (its parent the
        // first), then e.
        assert_eq!(
            exp.child[1][0][0][1][1],
            json!([[["d", [["c", null], null]], null], [["e", null], null]])
        );
    }

    #[test]
    fn a_chord_whose_body_is_a_chain_led_by_a_task_is_unrolled_as_celery_runs_it() {
        let header = || group(vec![task(json!([1]), "c")], "hg");
        let body = chain(vec![task(json!([2]), "e"), task(json!([3]), "f")]);
        let links =
            unroll_chord_bodies(vec![task(json!([0]), "b"), chord(header(), body)]).unwrap();
        let ids: Vec<&str> = links
            .iter()
            .map(|l| sig_task_id(l).unwrap_or_default())
            .collect();
        assert_eq!(ids, ["b", "hg", "f"]);
        assert_eq!(links[1]["kwargs"]["body"]["options"]["task_id"], json!("e"));
        // A body chain led by a group stays whole: its links run once per
        // member.
        let led_by_group = chain(vec![
            group(vec![task(json!([4]), "g1")], "bg"),
            task(json!([5]), "h"),
        ]);
        let links = unroll_chord_bodies(vec![chord(header(), led_by_group.clone())]).unwrap();
        assert_eq!(links.len(), 1);
        assert_eq!(links[0]["kwargs"]["body"], led_by_group);
    }

    #[test]
    fn a_member_that_is_not_a_signature_is_an_error_not_a_panic() {
        let result = json!(0);
        for sig in [
            json!({"task": "celery.group", "kwargs": {"tasks": ["oops"]}, "options": {}}),
            json!({"task": "celery.group", "kwargs": {"tasks": [
                {"task": "celery.chain", "kwargs": {"tasks": [{"task": "t"}, 5]}}]}, "options": {}}),
            json!({"task": "celery.chord", "kwargs": {
                "header": {"task": "celery.group", "kwargs": {"tasks": [7]}},
                "body": {"task": "t"}}, "options": {}}),
        ] {
            let err = expand(&sig, None, &from(&result)).unwrap_err();
            assert!(matches!(err, CanvasError::NoTaskName(_)), "{sig}: {err}");
        }
        let err = expand(
            &task(json!([]), "t"),
            Some(vec![json!(null)]),
            &from(&result),
        );
        assert!(matches!(err, Err(CanvasError::NoTaskName(_))));
        // A chord ending a member chain whose body is an empty chain.
        let empty = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": []},
                           "options": {}, "subtask_type": "chain"});
        let member = chain(vec![
            task(json!([1]), "b"),
            chord(group(vec![task(json!([2]), "c")], "hg"), empty),
        ]);
        let sig = group(vec![member], "g");
        let err = expand(&sig, None, &from(&result)).unwrap_err();
        assert!(
            matches!(err, CanvasError::Unsupported(ref why) if why.contains("an empty chain")),
            "{err}"
        );
    }

    fn chord(header: Value, body: Value) -> Value {
        let id = header["options"]["task_id"].clone();
        json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": header, "body": body},
               "options": {"task_id": id}, "subtask_type": "chord", "immutable": false})
    }

    fn chain(tasks: Vec<Value>) -> Value {
        json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": tasks},
               "options": {}, "subtask_type": "chain", "immutable": false})
    }

    #[test]
    fn a_chord_inside_a_group_runs_its_header_and_its_body_takes_the_members_place() {
        let inner = chord(
            group(vec![task(json!([1]), "h1"), task(json!([2]), "h2")], "hg"),
            task(json!([]), "b"),
        );
        let sig = group(vec![inner, task(json!([3]), "d")], "g");
        let result = json!(0);
        let exp = expand(&sig, Some(Vec::new()), &from(&result)).unwrap();
        let msgs = decoded(&exp);
        let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["h1", "h2", "d"]);
        assert_eq!(exp.chord_sizes, [("hg".to_owned(), 2)]);
        for m in &msgs[..2] {
            assert_eq!(m.group.as_deref(), Some("hg"));
            assert_eq!(m.args[0], json!(0), "the parent's result goes first");
            let body = &m.chord.as_ref().expect("the header carries the body")["options"];
            // The body counts for the outer group, in the chord's place.
            assert_eq!(body["group_id"], json!("g"));
            assert_eq!(body["group_index"], json!(0));
            assert_eq!(body["chord"], Value::Null);
        }
        assert_eq!(
            (msgs[2].group.as_deref(), msgs[2].group_index),
            (Some("g"), Some(1))
        );
        assert_eq!(
            exp.child,
            json!([
                ["g", null],
                [
                    [
                        [
                            "b",
                            [["hg", null], [[["h1", null], null], [["h2", null], null]]]
                        ],
                        null
                    ],
                    [["d", null], null]
                ]
            ])
        );
    }

    #[test]
    fn a_chord_counts_a_nested_chord_by_its_body_and_a_chain_by_its_last_group() {
        let nested = chord(
            group(vec![task(json!([1]), "n1")], "ng"),
            task(json!([]), "nb"),
        );
        let ends_in_group = chain(vec![
            task(json!([2]), "c1"),
            group(vec![task(json!([3]), "c2"), task(json!([4]), "c3")], "cg"),
        ]);
        let sig = chord(
            group(vec![nested, ends_in_group, task(json!([5]), "t")], "outer"),
            task(json!([]), "body"),
        );
        let result = json!(0);
        let exp = expand(&sig, None, &from(&result)).unwrap();
        let mut sizes = exp.chord_sizes.clone();
        sizes.sort();
        assert_eq!(sizes, [("ng".to_owned(), 1), ("outer".to_owned(), 4)]);
        // A member's result is a group, so the header's shape is saved.
        let [(gid, shape)] = exp.saved_groups.as_slice() else {
            panic!("one saved header expected: {:?}", exp.saved_groups)
        };
        assert_eq!(gid, "outer");
        assert_eq!(
            shape[1][1],
            json!([
                ["cg", [["c1", null], null]],
                [[["c2", null], null], [["c3", null], null]]
            ])
        );
        // The chain's first task carries its group, frozen into the outer chord.
        let msgs = decoded(&exp);
        let c1 = msgs.iter().find(|m| m.id == "c1").unwrap();
        let tail = &c1.chain[0];
        for member in tail["kwargs"]["tasks"].as_array().unwrap() {
            assert_eq!(member["options"]["group_id"], json!("outer"));
            assert_eq!(
                member["options"]["chord"]["options"]["task_id"],
                json!("body")
            );
        }
    }

    #[test]
    fn a_step_nested_deeper_is_refused_and_every_id_is_named() {
        let deep = chain(vec![
            task(json!([1]), "c1"),
            group(
                vec![chord(
                    group(vec![task(json!([2]), "x1")], "xg"),
                    task(json!([3]), "x2"),
                )],
                "cg",
            ),
        ]);
        let sig = chord(
            group(vec![deep, task(json!([3]), "d")], "g"),
            task(json!([]), "b"),
        );
        let result = json!(0);
        let err = expand(&sig, None, &from(&result)).unwrap_err();
        assert!(
            matches!(err, CanvasError::Unsupported(ref why) if why.contains("a chord inside a group that ends a chain inside a chord header")),
            "{err}"
        );
        assert_eq!(
            task_ids(&sig),
            ["g", "c1", "cg", "xg", "x1", "x2", "d", "b"]
        );
        // A nested chord whose body is a chord would have to hand the
        // outer group id on two levels down: refused rather than started
        // uncountable.
        let chord_body = chord(
            group(vec![task(json!([1]), "h1")], "hg"),
            chord(
                group(vec![task(json!([2]), "m1")], "bg"),
                task(json!([]), "b2"),
            ),
        );
        let sig = group(vec![chord_body, task(json!([3]), "d")], "g");
        let err = expand(&sig, None, &from(&result)).unwrap_err();
        assert!(
            matches!(err, CanvasError::Unsupported(ref why) if why.contains("a chord whose body is a chord")),
            "{err}"
        );
        // A task's own kwargs are never taken for workflow parts.
        let plain = json!({"task": "t", "kwargs": {"body": {"options": {"task_id": "x"}}}, "options": {"task_id": "t1"}});
        assert_eq!(task_ids(&plain), ["t1"]);
    }
}
