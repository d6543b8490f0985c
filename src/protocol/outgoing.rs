//! Task messages this worker publishes: retries, callbacks and chain links,
//! shaped the way a Python worker publishes them (SPEC §2.1).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::envelope::Envelope;
use super::pyjson;
use super::task_message::{format_time, TaskMessage, CONTENT_TYPE_JSON};
use tasks::task::py_repr;

/// The `reply_to` of messages whose signature names none: a Celery worker
/// puts its app's `thread_oid` there (`send_task`'s default), one id per
/// process. Only the RPC result backend reads it; it is set so the
/// messages look the same.
static WORKER_OID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| uuid::Uuid::new_v4().to_string());

pub(crate) fn worker_oid() -> &'static str {
    &WORKER_OID
}

/// Where a published task message should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
    pub priority: u8,
}

/// The retry of `original`: same id and body, `retries + 1`, a new `eta`,
/// `parent_id` = its own id, a fresh delivery tag (a new delivery, not a
/// restore).
pub fn retry_of(original: &Envelope, msg: &TaskMessage, eta: DateTime<Utc>) -> Envelope {
    let mut env = original.clone();
    // A producer's `retries` can be anything up to u32::MAX (larger ones
    // are read as that): stay there rather than wrap to 0.
    env.set_header("retries", json!(msg.retries.saturating_add(1)));
    env.set_header("eta", json!(format_time(eta)));
    env.set_header("parent_id", json!(msg.id));
    // A retry is a new delivery: drop restore markers from the original.
    let mut obj = env.as_object().clone();
    if let Some(Value::Object(h)) = obj.get_mut("headers") {
        h.remove("redelivered");
    }
    if let Some(Value::Object(p)) = obj.get_mut("properties") {
        if let Some(Value::Object(d)) = p.get_mut("delivery_info") {
            d.remove("redelivered");
        }
    }
    let mut env = Envelope::parse(pyjson::to_string(&obj).as_bytes())
        .expect("a re-serialized valid envelope stays valid");
    env.renew_delivery_tag();
    env
}

/// A signature (`{"task", "args", "kwargs", "options", "immutable"}`)
/// turned into a message, with `parent_result` prepended to its args
/// unless it is immutable.
/// The task id a signature's options freeze it under: `None` when it is
/// absent, null, empty or not a string. Celery publishes a signature under
/// `task_id or uuid()`, so an empty id asks for a new one; it never names
/// a message (issue #25). Every reader of a signature's id goes through
/// here, so what the canvas records and what is published agree.
pub fn signature_task_id(options: &Map<String, Value>) -> Option<&str> {
    options
        .get("task_id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
}

#[derive(Debug, Clone)]
pub struct SignatureCall<'a> {
    pub signature: &'a Value,
    pub parent_result: Option<&'a Value>,
    pub parent_id: &'a str,
    pub root_id: &'a str,
    /// Remaining chain for the new message (SPEC §2.1: next link last).
    /// `None` where Celery passes no chain (callbacks, chord members,
    /// errbacks): then a `chain` list in the signature's own options (a
    /// chord body's) is used, else the message says `null`.
    pub chain: Option<Vec<Value>>,
    pub origin: &'a str,
    pub default_queue: &'a str,
}

impl SignatureCall<'_> {
    /// Builds the envelope and its route; `None` when the signature has no
    /// task name (e.g. a nested group we do not expand).
    pub fn build(&self) -> Option<(Envelope, Route)> {
        let sig = self.signature.as_object()?;
        let task = sig.get("task")?.as_str()?;
        let options = sig
            .get("options")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let immutable = sig
            .get("immutable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut args = sig
            .get("args")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let (false, Some(result)) = (immutable, self.parent_result) {
            args.insert(0, result.clone());
        }
        let kwargs = sig
            .get("kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let id = signature_task_id(&options)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let queue = options
            .get("queue")
            .and_then(|q| q.as_str().or_else(|| q.get("name").and_then(Value::as_str)))
            .unwrap_or(self.default_queue);
        let route = Route {
            exchange: options
                .get("exchange")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            routing_key: options
                .get("routing_key")
                .and_then(Value::as_str)
                .unwrap_or(queue)
                .to_owned(),
            priority: options
                .get("priority")
                .and_then(Value::as_u64)
                .map(|p| p.min(255) as u8)
                .unwrap_or(0),
        };
        let time_limit = [
            options.get("time_limit").cloned().unwrap_or(Value::Null),
            options
                .get("soft_time_limit")
                .cloned()
                .unwrap_or(Value::Null),
        ];
        let mut headers = Map::new();
        headers.insert("lang".into(), json!("py"));
        headers.insert("task".into(), json!(task));
        headers.insert("id".into(), json!(id));
        headers.insert(
            "shadow".into(),
            options.get("shadow").cloned().unwrap_or(Value::Null),
        );
        headers.insert("eta".into(), Value::Null);
        headers.insert("expires".into(), Value::Null);
        headers.insert(
            "group".into(),
            options.get("group_id").cloned().unwrap_or(Value::Null),
        );
        headers.insert(
            "group_index".into(),
            options.get("group_index").cloned().unwrap_or(Value::Null),
        );
        headers.insert("retries".into(), json!(0));
        headers.insert("timelimit".into(), json!(time_limit));
        headers.insert("root_id".into(), json!(self.root_id));
        headers.insert("parent_id".into(), json!(self.parent_id));
        headers.insert("argsrepr".into(), json!(tuple_repr(&args)));
        headers.insert(
            "kwargsrepr".into(),
            json!(py_repr(&Value::Object(kwargs.clone()))),
        );
        headers.insert("origin".into(), json!(self.origin));
        headers.insert(
            "ignore_result".into(),
            json!(options
                .get("ignore_result")
                .and_then(Value::as_bool)
                .unwrap_or(false)),
        );
        headers.insert("replaced_task_nesting".into(), json!(0));
        headers.insert("stamped_headers".into(), Value::Null);
        headers.insert("stamps".into(), json!({}));

        // A chord body carries the rest of its chain in its options (the
        // worker that calls it has no other record of it).
        let chain = match (&self.chain, options.get("chain")) {
            (Some(rest), _) => json!(rest),
            (None, Some(rest @ Value::Array(_))) => rest.clone(),
            (None, _) => Value::Null,
        };
        let embed = json!({
            "callbacks": sig_list(&options, "link"),
            "errbacks": sig_list(&options, "link_error"),
            "chain": chain,
            "chord": options.get("chord").cloned().unwrap_or(Value::Null),
        });
        let body = pyjson::to_string(&json!([args, kwargs, embed]));
        let mut properties = Map::new();
        properties.insert("correlation_id".into(), json!(id));
        let reply_to = options
            .get("reply_to")
            .cloned()
            .unwrap_or_else(|| json!(worker_oid()));
        properties.insert("reply_to".into(), reply_to);
        let env = Envelope::new(
            body.as_bytes(),
            CONTENT_TYPE_JSON,
            headers,
            properties,
            &route.exchange,
            &route.routing_key,
            route.priority,
        );
        Some((env, route))
    }
}

fn sig_list(options: &Map<String, Value>, key: &str) -> Value {
    match options.get(key) {
        Some(Value::Array(a)) if !a.is_empty() => Value::Array(a.clone()),
        Some(v @ Value::Object(_)) => json!([v]),
        _ => Value::Null,
    }
}

/// Python's repr of a tuple of args: `(5, 4)`, `(3,)`, `()`.
fn tuple_repr(args: &[Value]) -> String {
    let parts: Vec<String> = args.iter().map(py_repr).collect();
    match parts.len() {
        1 => format!("({},)", parts[0]),
        _ => format!("({})", parts.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> Envelope {
        let path = format!(
            "{}/tests/vectors/broker/{name}.raw",
            env!("CARGO_MANIFEST_DIR")
        );
        Envelope::parse(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn chain_link_matches_what_python_published() {
        let first = vector("task_chain_first");
        let first_msg = TaskMessage::decode(&first).unwrap();
        let mut chain = first_msg.chain.clone();
        let next = chain.pop().unwrap();
        let call = SignatureCall {
            signature: &next,
            parent_result: Some(&json!(5)),
            parent_id: &first_msg.id,
            root_id: first_msg.root_id.as_deref().unwrap(),
            chain: Some(chain.clone()),
            origin: "gen1@vm",
            default_queue: "celery",
        };
        let (env, route) = call.build().unwrap();
        assert_eq!(route.routing_key, "celery");
        let msg = TaskMessage::decode(&env).unwrap();
        assert_eq!(msg.args, vec![json!(5), json!(4)]);
        assert_eq!(msg.parent_id.as_deref(), Some(first_msg.id.as_str()));
        assert_eq!(msg.chain, chain);
        assert_eq!(env.headers()["argsrepr"], json!("(5, 4)"));
        // The captured second link has the same header keys in the same order.
        let python = vector("task_chain_second_published_by_worker");
        let ours: Vec<&String> = env.headers().keys().collect();
        let theirs: Vec<&String> = python.headers().keys().collect();
        assert_eq!(ours, theirs);
    }

    /// The captured chain's second link, and the message a worker would
    /// publish for a signature, as built and as decoded.
    fn second_link() -> Value {
        let first = TaskMessage::decode(&vector("task_chain_first")).unwrap();
        first.chain.last().unwrap().clone()
    }

    fn publish(sig: &Value) -> (Envelope, TaskMessage) {
        let call = SignatureCall {
            signature: sig,
            parent_result: None,
            parent_id: "p",
            root_id: "r",
            chain: None,
            origin: "gen1@vm",
            default_queue: "celery",
        };
        let (env, _) = call.build().unwrap();
        let msg = TaskMessage::decode(&env).unwrap();
        (env, msg)
    }

    #[test]
    fn signature_ignore_result_reaches_the_message_header() {
        let mut next = second_link();
        let build = |sig: &Value| publish(sig).1;
        assert_eq!(build(&next).ignore_result, Some(false));
        next["options"]["ignore_result"] = json!(true);
        assert_eq!(build(&next).ignore_result, Some(true));
    }

    /// Celery publishes `task_id or uuid()`: an empty, null or non-string
    /// `task_id` gets a new id, never an empty one (issue #25).
    #[test]
    fn an_empty_or_null_signature_task_id_gets_a_new_one() {
        let mut next = second_link();
        let id_of = |sig: &Value| {
            let (env, msg) = publish(sig);
            assert_eq!(env.properties()["correlation_id"], json!(msg.id));
            msg.id
        };
        next["options"]["task_id"] = json!("frozen");
        assert_eq!(id_of(&next), "frozen");
        let mut seen = Vec::new();
        for empty in [json!(""), Value::Null, json!(5)] {
            next["options"]["task_id"] = empty.clone();
            assert_eq!(
                signature_task_id(next["options"].as_object().unwrap()),
                None
            );
            let id = id_of(&next);
            assert!(!id.is_empty() && !seen.contains(&id), "{empty}: {id:?}");
            seen.push(id);
        }
    }

    use crate::protocol::limits;
    use crate::protocol::strategies::{finite_f64, json_within, text};
    use crate::protocol::TimeLimit;
    use proptest::prelude::*;

    /// A signature option: absent, a value of the type Celery writes, or
    /// any JSON value (a hostile or buggy producer).
    fn opt(typed: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
        prop_oneof![
            2 => Just(None),
            3 => typed.prop_map(Some),
            1 => json_within(3).prop_map(Some),
        ]
        .boxed()
    }

    fn signature_list() -> impl Strategy<Value = Value> {
        let sig = (text(), json_within(4))
            .prop_map(|(task, arg)| {
                json!({"task": task, "args": [arg], "kwargs": {}, "options": {}, "immutable": false})
            })
            .boxed();
        prop_oneof![
            proptest::collection::vec(sig.clone(), 0..3).prop_map(Value::Array),
            sig,
        ]
    }

    fn options() -> impl Strategy<Value = Map<String, Value>> {
        let keys = [
            ("task_id", opt(text().prop_map(Value::from))),
            ("group_id", opt(text().prop_map(Value::from))),
            ("group_index", opt(any::<i64>().prop_map(Value::from))),
            ("shadow", opt(text().prop_map(Value::from))),
            ("queue", opt(text().prop_map(Value::from))),
            ("priority", opt(any::<u64>().prop_map(Value::from))),
            ("time_limit", opt(finite_f64().prop_map(Value::from))),
            ("soft_time_limit", opt(finite_f64().prop_map(Value::from))),
            ("ignore_result", opt(any::<bool>().prop_map(Value::from))),
            ("link", opt(signature_list())),
            ("link_error", opt(signature_list())),
            ("chain", opt(signature_list())),
            ("chord", opt(signature_list())),
        ];
        keys.map(|(key, value)| value.prop_map(move |v| v.map(|v| (key.to_owned(), v))))
            .prop_map(|entries| entries.into_iter().flatten().collect())
    }

    fn expected_list(value: Option<&Value>) -> Vec<Value> {
        match value {
            Some(Value::Array(items)) => items.clone(),
            Some(v @ Value::Object(_)) => vec![v.clone()],
            _ => Vec::new(),
        }
    }

    proptest! {
        #![proptest_config(crate::protocol::strategies::config())]
        /// Every message the worker publishes for a signature (a chain
        /// link, a callback, a chord member) decodes back to what the
        /// signature says, with the parent's result in front of its args
        /// unless it is immutable; its retry decodes too.
        #[test]
        fn built_messages_decode_to_the_signature(
            task in text(),
            args in proptest::collection::vec(json_within(16), 0..4),
            kwargs in proptest::collection::vec((text(), json_within(16)), 0..4),
            options in options(),
            immutable in any::<bool>(),
            parent_result in proptest::option::of(json_within(16)),
            chain in proptest::option::of(proptest::collection::vec(signature_list(), 0..3)),
            retries in prop_oneof![Just(0u32), any::<u32>(), Just(u32::MAX)],
        ) {
            let kwargs: Map<String, Value> = kwargs.into_iter().collect();
            let sig = json!({
                "task": task, "args": args, "kwargs": kwargs,
                "options": options, "immutable": immutable,
            });
            let call = SignatureCall {
                signature: &sig,
                parent_result: parent_result.as_ref(),
                parent_id: "parent-id",
                root_id: "root-id",
                chain: chain.clone(),
                origin: "gen1@vm",
                default_queue: "celery",
            };
            let (env, _route) = call.build().expect("a signature with a task name builds");
            let env = Envelope::parse(env.to_json().as_bytes()).expect("published envelope parses");
            let decoded = TaskMessage::decode(&env);
            // A time limit no worker can use (a hostile or buggy producer's
            // option, copied as Celery copies it) is refused on decode.
            let usable = |k: &str| match options.get(k) {
                None | Some(Value::Null) => true,
                Some(Value::Number(n)) => n.as_f64().and_then(limits::seconds).is_some(),
                Some(_) => false,
            };
            if !(usable("time_limit") && usable("soft_time_limit")) {
                prop_assert!(
                    matches!(&decoded, Err(crate::protocol::DecodeError::Invalid { message, .. }) if message.contains("timelimit")),
                    "{:?}", decoded
                );
                return Ok(());
            }
            let msg = decoded.expect("published message decodes");

            let mut want_args = args.clone();
            if let (false, Some(result)) = (immutable, &parent_result) {
                want_args.insert(0, result.clone());
            }
            let limit = |k: &str| options.get(k).and_then(Value::as_f64).filter(|s| *s > 0.0);
            let string = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_owned);
            prop_assert_eq!(msg.protocol, 2);
            prop_assert_eq!(&msg.task, &task);
            // An empty id is none: Celery's `task_id or uuid()`.
            match string("task_id").filter(|id| !id.is_empty()) {
                Some(id) => prop_assert_eq!(&msg.id, &id),
                None => prop_assert!(!msg.id.is_empty()),
            }
            prop_assert_eq!(&msg.args, &want_args);
            prop_assert_eq!(&msg.kwargs, &kwargs);
            prop_assert_eq!(msg.parent_id.as_deref(), Some("parent-id"));
            prop_assert_eq!(msg.root_id.as_deref(), Some("root-id"));
            prop_assert_eq!(msg.origin.as_deref(), Some("gen1@vm"));
            prop_assert_eq!(&msg.group, &string("group_id"));
            prop_assert_eq!(msg.group_index, options.get("group_index").and_then(Value::as_i64));
            prop_assert_eq!(&msg.shadow, &string("shadow"));
            prop_assert_eq!(
                msg.time_limit,
                TimeLimit { hard: limit("time_limit"), soft: limit("soft_time_limit") }
            );
            prop_assert_eq!(
                msg.ignore_result,
                Some(options.get("ignore_result").and_then(Value::as_bool).unwrap_or(false))
            );
            prop_assert_eq!(msg.retries, 0);
            prop_assert_eq!(msg.eta, None);
            prop_assert_eq!(msg.expires, None);
            prop_assert_eq!(&msg.callbacks, &expected_list(options.get("link")));
            prop_assert_eq!(&msg.errbacks, &expected_list(options.get("link_error")));
            let want_chain = match &chain {
                Some(rest) => rest.clone(),
                None => match options.get("chain") {
                    Some(Value::Array(rest)) => rest.clone(),
                    _ => Vec::new(),
                },
            };
            prop_assert_eq!(&msg.chain, &want_chain);
            prop_assert_eq!(&msg.chord, &options.get("chord").filter(|c| c.is_object()).cloned());

            // Its retry: same task, one more retry, parent = itself.
            let mut msg = msg;
            msg.retries = retries;
            let eta = chrono::Utc::now();
            let retried = TaskMessage::decode(&retry_of(&env, &msg, eta)).expect("retry decodes");
            prop_assert_eq!(&retried.id, &msg.id);
            prop_assert_eq!(&retried.args, &msg.args);
            prop_assert_eq!(retried.retries, retries.saturating_add(1));
            prop_assert_eq!(retried.parent_id.as_deref(), Some(msg.id.as_str()));
            prop_assert_eq!(retried.eta.map(format_time), Some(format_time(eta)));
        }
    }

    /// Found by `built_messages_decode_to_the_signature`: a message whose
    /// `retries` header is at the ceiling was republished with 0 retries
    /// (and panicked with overflow checks on).
    #[test]
    fn retry_of_a_message_at_the_retry_ceiling_stays_there() {
        let original = vector("task_retry_republish_0");
        let mut msg = TaskMessage::decode(&original).unwrap();
        msg.retries = u32::MAX;
        let retried = retry_of(&original, &msg, chrono::Utc::now());
        assert_eq!(TaskMessage::decode(&retried).unwrap().retries, u32::MAX);
    }

    #[test]
    fn retry_republish_matches_capture() {
        let original = vector("task_retry_republish_0");
        let msg = TaskMessage::decode(&original).unwrap();
        let python = vector("task_retry_republish_1");
        let eta = TaskMessage::decode(&python).unwrap().eta.unwrap();
        let ours = retry_of(&original, &msg, eta);
        assert_ne!(ours.delivery_tag(), original.delivery_tag());
        for key in ["retries", "eta", "parent_id", "root_id", "id", "task"] {
            assert_eq!(ours.headers()[key], python.headers()[key], "{key}");
        }
        assert_eq!(ours.body().unwrap(), python.body().unwrap());
    }
}
