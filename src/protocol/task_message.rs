//! Celery task messages, protocol 2 and protocol 1 (SPEC §2).
//!
//! Decoding separates two kinds of bad input because they end differently:
//! a message we can attribute to a task id but refuse to deserialize
//! (pickle, unknown content type) gets a FAILURE result telling the
//! producer how to fix it; a message we cannot attribute at all goes to
//! the dead-letter list.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::{Map, Value};
use thiserror::Error;

use super::envelope::{Envelope, EnvelopeError, Present};
use super::limits;

/// The only serializers this worker will deserialize. Pickle is never
/// loaded: it executes code chosen by whoever can write to the queue.
pub const CONTENT_TYPE_JSON: &str = "application/json";
pub const CONTENT_TYPE_MSGPACK: &str = "application/x-msgpack";

#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecodeError {
    /// Not a task message at all; goes to the dead-letter list.
    #[error("malformed envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    /// A task message we cannot read; goes to the dead-letter list.
    #[error("malformed task message: {0}")]
    Malformed(String),
    /// A task message in a serialization we refuse; the task id is known,
    /// so the producer gets a FAILURE result explaining the fix.
    #[error("refusing to deserialize content type {content_type:?}")]
    Refused {
        content_type: String,
        task_id: String,
        task_name: Option<String>,
    },
    /// The decoder itself failed on this message (a tori-worker bug, not
    /// the producer's): `tori.exceptions.WorkerInternalError`, as for any
    /// other panic in the worker's own handling.
    #[error("{0}")]
    Internal(String),
    /// A readable message with a field whose value cannot be used (an eta
    /// that is no time, a time limit that is no number of seconds, args
    /// that are no list): the Python exception a Celery user would get
    /// for it.
    #[error("{message}")]
    Invalid { exception: PyError, message: String },
}

/// The builtin Python exceptions a bad field is reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyError {
    ValueError,
    TypeError,
}

impl DecodeError {
    /// The Python exception (module, name) the task's FAILURE carries when
    /// the message can be attributed to a task id.
    pub fn exception(&self) -> (&'static str, &'static str) {
        match self {
            Self::Envelope(_) | Self::Malformed(_) => ("kombu.exceptions", "DecodeError"),
            Self::Refused { .. } => ("kombu.exceptions", "ContentDisallowed"),
            Self::Internal(_) => ("tori.exceptions", "WorkerInternalError"),
            Self::Invalid {
                exception: PyError::ValueError,
                ..
            } => ("builtins", "ValueError"),
            Self::Invalid {
                exception: PyError::TypeError,
                ..
            } => ("builtins", "TypeError"),
        }
    }

    fn value(message: String) -> Self {
        Self::Invalid {
            exception: PyError::ValueError,
            message,
        }
    }

    fn type_error(message: String) -> Self {
        Self::Invalid {
            exception: PyError::TypeError,
            message,
        }
    }
}

/// The task a message is for, as far as it can be read without decoding
/// its body: the `id` and `task` headers (protocol 2), else kombu's
/// `correlation_id` property, which carries the task id in both protocols.
/// Lets a message whose body cannot be decoded still end in a stored state.
pub fn attribute(envelope: &Envelope) -> Option<(String, Option<String>)> {
    let headers = envelope.headers();
    let id = str_of(headers.get("id"))
        .or_else(|| str_field(envelope.properties(), "correlation_id"))
        .filter(|id| !id.is_empty())?;
    Some((id, str_of(headers.get("task"))))
}

/// `timelimit` header: Celery writes **[hard, soft]** (SPEC §8).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeLimit {
    pub hard: Option<f64>,
    pub soft: Option<f64>,
}

/// A decoded task request.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub protocol: u8,
    pub id: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u32,
    pub time_limit: TimeLimit,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub group_index: Option<i64>,
    pub shadow: Option<String>,
    pub origin: Option<String>,
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    /// The message's `ignore_result` header; when present it overrides
    /// the task's own setting (Celery's `get_actual_ignore_result`).
    pub ignore_result: Option<bool>,
    /// Signatures to call with the result on success (`link=`).
    pub callbacks: Vec<Value>,
    /// Signatures to call on failure (`link_error=`).
    pub errbacks: Vec<Value>,
    /// Remaining chain links, next one last (SPEC §2.1).
    pub chain: Vec<Value>,
    /// Chord body signature when this task is a chord header member.
    pub chord: Option<Value>,
}

impl TaskMessage {
    /// Whether the result is left unstored: the message's header if it
    /// has one, else the task's declared `ignore_result`, as Celery 5.7
    /// decides it (`get_actual_ignore_result`, `Request.store_errors`).
    pub fn ignores_result(&self, task_default: bool) -> bool {
        self.ignore_result.unwrap_or(task_default)
    }

    /// Decodes the task carried by `envelope`.
    ///
    /// The headers are read typed from their text when the envelope has
    /// it (see [`V2Headers`]); otherwise, or when that reading fails, from
    /// the headers object, with the same result.
    pub fn decode(envelope: &Envelope) -> Result<Self, DecodeError> {
        let typed = envelope
            .headers_text()
            .and_then(|text| serde_json::from_str::<V2Headers>(text).ok());
        match &typed {
            Some(h) => Self::decode_with(envelope, |key| h.get(key)),
            None => {
                let headers = envelope.headers();
                Self::decode_with(envelope, |key| headers.get(key))
            }
        }
    }

    fn decode_with<'h>(
        envelope: &Envelope,
        header: impl Fn(&str) -> Option<&'h Value>,
    ) -> Result<Self, DecodeError> {
        let content_type = envelope.content_type();
        let body_bytes = envelope.body()?;

        let payload = match content_type {
            CONTENT_TYPE_JSON | "json" => serde_json::from_slice::<Value>(&body_bytes)
                .map_err(|e| DecodeError::Malformed(format!("body is not JSON: {e}"))),
            CONTENT_TYPE_MSGPACK | "application/msgpack" => {
                // The same depth as serde_json allows, so both serializers
                // refuse at one depth (`limits`), and well before a deep
                // value could exhaust the stack.
                let mut de = rmp_serde::Deserializer::from_read_ref(&body_bytes);
                de.set_max_depth(limits::MAX_DOCUMENT_DEPTH);
                serde::Deserialize::deserialize(&mut de)
                    .map_err(|e| DecodeError::Malformed(format!("body is not msgpack: {e}")))
            }
            other => {
                // Attribute the message if we can, so the producer hears
                // about it; protocol 1 keeps the id only in the (refused)
                // body, but kombu copies it to `correlation_id`.
                let id = str_of(header("id"))
                    .or_else(|| str_field(envelope.properties(), "correlation_id"));
                return match id {
                    Some(task_id) => Err(DecodeError::Refused {
                        content_type: other.to_owned(),
                        task_id,
                        task_name: str_of(header("task")),
                    }),
                    None => Err(DecodeError::Malformed(format!(
                        "content type {other:?} refused and no task id to report it under"
                    ))),
                };
            }
        }?;

        if header("task").is_some() {
            Self::from_v2(header, payload)
        } else if payload.get("task").is_some() {
            Self::from_v1(payload)
        } else {
            Err(DecodeError::Malformed(
                "no `task` header and no `task` field in the body".into(),
            ))
        }
    }

    fn from_v2<'h>(
        header: impl Fn(&str) -> Option<&'h Value>,
        payload: Value,
    ) -> Result<Self, DecodeError> {
        let id = str_of(header("id"))
            .ok_or_else(|| DecodeError::Malformed("header `id` missing or not a string".into()))?;
        let task = str_of(header("task"))
            .ok_or_else(|| DecodeError::Malformed("header `task` is not a string".into()))?;

        // Body: [args, kwargs, embed]; a "hybrid" object body is accepted
        // like Python does.
        let (args, kwargs, embed) = match payload {
            Value::Array(mut parts) => {
                parts.resize(3, Value::Null);
                let embed = parts.pop().unwrap_or(Value::Null);
                let kwargs = parts.pop().unwrap_or(Value::Null);
                let args = parts.pop().unwrap_or(Value::Null);
                (args, kwargs, embed)
            }
            Value::Object(mut obj) => {
                let args = obj.remove("args").unwrap_or(Value::Null);
                let kwargs = obj.remove("kwargs").unwrap_or(Value::Null);
                (args, kwargs, Value::Object(obj))
            }
            _ => {
                return Err(DecodeError::Malformed(
                    "protocol 2 body must be [args, kwargs, embed]".into(),
                ))
            }
        };
        let args = as_args(args)?;
        let kwargs = as_kwargs(kwargs)?;
        check_values(&args, &kwargs)?;
        let embed = embed.as_object().cloned().unwrap_or_default();

        Ok(Self {
            protocol: 2,
            // An empty root is none: Celery's `root_id or id` when it
            // sends the next step (the same mistake as an empty signature
            // `task_id`, issue #25).
            root_id: str_of(header("root_id"))
                .filter(|root| !root.is_empty())
                .or_else(|| Some(id.clone())),
            parent_id: str_of(header("parent_id")),
            eta: time_of("eta", header("eta"))?,
            expires: time_of("expires", header("expires"))?,
            retries: retries_of(header("retries"))?,
            time_limit: time_limit(header("timelimit"))?,
            group: str_of(header("group")),
            group_index: header("group_index").and_then(Value::as_i64),
            shadow: str_of(header("shadow")),
            origin: str_of(header("origin")),
            argsrepr: str_of(header("argsrepr")),
            kwargsrepr: str_of(header("kwargsrepr")),
            ignore_result: header("ignore_result").and_then(Value::as_bool),
            callbacks: list_field(&embed, "callbacks"),
            errbacks: list_field(&embed, "errbacks"),
            chain: list_field(&embed, "chain"),
            chord: embed.get("chord").filter(|c| c.is_object()).cloned(),
            id,
            task,
            args,
            kwargs,
        })
    }

    fn from_v1(payload: Value) -> Result<Self, DecodeError> {
        let Value::Object(body) = payload else {
            return Err(DecodeError::Malformed(
                "protocol 1 body must be an object".into(),
            ));
        };
        let id = str_field(&body, "id")
            .ok_or_else(|| DecodeError::Malformed("protocol 1 body has no `id`".into()))?;
        let task = str_field(&body, "task")
            .ok_or_else(|| DecodeError::Malformed("protocol 1 `task` is not a string".into()))?;
        let args = as_args(body.get("args").cloned().unwrap_or(Value::Null))?;
        let kwargs = as_kwargs(body.get("kwargs").cloned().unwrap_or(Value::Null))?;
        check_values(&args, &kwargs)?;
        Ok(Self {
            protocol: 1,
            args,
            kwargs,
            eta: time_field(&body, "eta")?,
            expires: time_field(&body, "expires")?,
            retries: retries_of(body.get("retries"))?,
            time_limit: time_limit(body.get("timelimit"))?,
            root_id: Some(id.clone()),
            parent_id: None,
            group: str_field(&body, "group").or_else(|| str_field(&body, "taskset")),
            group_index: body.get("group_index").and_then(Value::as_i64),
            shadow: None,
            origin: None,
            argsrepr: None,
            kwargsrepr: None,
            ignore_result: None,
            callbacks: list_field(&body, "callbacks"),
            errbacks: list_field(&body, "errbacks"),
            chain: Vec::new(),
            chord: body.get("chord").filter(|c| c.is_object()).cloned(),
            id,
            task,
        })
    }
}

/// The protocol 2 headers a worker reads. Parsing only these from the
/// headers' text skips building an ordered map of every header (the
/// largest cost of decoding on a no-op drain); unknown headers are
/// skipped. A header present twice fails this reading, and the decoder
/// falls back to the headers object, which keeps the last one as Python's
/// `json.loads` does.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct V2Headers {
    id: Present,
    task: Present,
    root_id: Present,
    parent_id: Present,
    eta: Present,
    expires: Present,
    retries: Present,
    timelimit: Present,
    group: Present,
    group_index: Present,
    shadow: Present,
    origin: Present,
    argsrepr: Present,
    kwargsrepr: Present,
    ignore_result: Present,
}

impl V2Headers {
    fn get(&self, key: &str) -> Option<&Value> {
        match key {
            "id" => self.id.get(),
            "task" => self.task.get(),
            "root_id" => self.root_id.get(),
            "parent_id" => self.parent_id.get(),
            "eta" => self.eta.get(),
            "expires" => self.expires.get(),
            "retries" => self.retries.get(),
            "timelimit" => self.timelimit.get(),
            "group" => self.group.get(),
            "group_index" => self.group_index.get(),
            "shadow" => self.shadow.get(),
            "origin" => self.origin.get(),
            "argsrepr" => self.argsrepr.get(),
            "kwargsrepr" => self.kwargsrepr.get(),
            "ignore_result" => self.ignore_result.get(),
            _ => None,
        }
    }
}

fn str_of(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).map(str::to_owned)
}

fn str_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    str_of(map.get(key))
}

/// `retries`: absent or null is 0; otherwise a whole number from 0 up.
fn retries_of(value: Option<&Value>) -> Result<u32, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(r) => u32::try_from(r)
                .map_err(|_| DecodeError::value(format!("`retries` is too large: {n}"))),
            None => Err(DecodeError::value(format!(
                "`retries` must be a whole number >= 0, got {n}"
            ))),
        },
        Some(other) => Err(DecodeError::type_error(format!(
            "`retries` must be an int, got {}",
            py_type(other)
        ))),
    }
}

/// Every argument and keyword value within the depth the worker can carry
/// to a pool process and back (`limits`).
fn check_values(args: &[Value], kwargs: &Map<String, Value>) -> Result<(), DecodeError> {
    for (i, a) in args.iter().enumerate() {
        limits::check_depth(a, || format!("args[{i}]"))
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    }
    for (k, v) in kwargs {
        limits::check_depth(v, || format!("kwargs[{k:?}]"))
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    }
    Ok(())
}

/// Python's name for a JSON value's type, for error messages.
fn py_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn list_field(map: &Map<String, Value>, key: &str) -> Vec<Value> {
    match map.get(key) {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

fn as_args(value: Value) -> Result<Vec<Value>, DecodeError> {
    match value {
        Value::Array(a) => Ok(a),
        Value::Null => Ok(Vec::new()),
        other => Err(DecodeError::type_error(format!(
            "args must be a list or tuple, got {}",
            py_type(&other)
        ))),
    }
}

fn as_kwargs(value: Value) -> Result<Map<String, Value>, DecodeError> {
    match value {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        other => Err(DecodeError::type_error(format!(
            "kwargs must be a dict, got {}",
            py_type(&other)
        ))),
    }
}

/// `timelimit`: `[hard, soft]`, each null or seconds (0 meaning none, as in
/// Celery). Anything else is reported, not guessed at: a limit the worker
/// silently dropped would let a task run unbounded.
fn time_limit(value: Option<&Value>) -> Result<TimeLimit, DecodeError> {
    let part = |which: &str, v: Option<&Value>| match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let secs = n.as_f64().unwrap_or(f64::NAN);
            match limits::seconds(secs) {
                // 0 is Celery's "no limit"; a tiny positive one is a limit.
                Some(_) if secs == 0.0 => Ok(None),
                Some(_) => Ok(Some(secs)),
                None => Err(DecodeError::value(format!(
                    "timelimit {which} must be a number of seconds from 0 to {:e}, got {n}",
                    limits::MAX_SECONDS
                ))),
            }
        }
        Some(other) => Err(DecodeError::type_error(format!(
            "timelimit {which} must be a number, got {}",
            py_type(other)
        ))),
    };
    match value {
        None | Some(Value::Null) => Ok(TimeLimit::default()),
        Some(Value::Array(pair)) if pair.len() <= 2 => Ok(TimeLimit {
            hard: part("hard", pair.first())?,
            soft: part("soft", pair.get(1))?,
        }),
        Some(other) => Err(DecodeError::type_error(format!(
            "timelimit must be a [hard, soft] pair, got {}",
            py_type(other)
        ))),
    }
}

fn time_field(map: &Map<String, Value>, key: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    time_of(key, map.get(key))
}

fn time_of(key: &str, value: Option<&Value>) -> Result<Option<DateTime<Utc>>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s).map(Some).ok_or_else(|| {
            DecodeError::value(format!(
                "`{key}` is not an ISO-8601 time: {:?}",
                s.chars().take(100).collect::<String>()
            ))
        }),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|secs| secs.is_finite())
            .and_then(|secs| Utc.timestamp_millis_opt((secs * 1000.0) as i64).single())
            .map(Some)
            .ok_or_else(|| DecodeError::value(format!("`{key}` is not a valid epoch: {n}"))),
        Some(other) => Err(DecodeError::type_error(format!(
            "`{key}` must be an ISO-8601 string, got {}",
            py_type(other)
        ))),
    }
}

/// Parses Python `datetime.isoformat()` output; naive times are UTC
/// (Celery's `enable_utc` default).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.with_timezone(&Utc));
        }
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(naive.and_utc());
        }
    }
    None
}

/// Formats like Python's `datetime.isoformat()` for an aware UTC time.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vector(name: &str) -> Envelope {
        let path = format!(
            "{}/tests/vectors/broker/{name}.raw",
            env!("CARGO_MANIFEST_DIR")
        );
        Envelope::parse(&std::fs::read(&path).unwrap()).unwrap()
    }

    fn expected(name: &str) -> Value {
        let path = format!(
            "{}/tests/vectors/broker/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// The typed header reading decodes every captured message, and a few
    /// unusual ones, exactly as the headers object does.
    #[test]
    fn typed_headers_decode_like_the_headers_object() {
        let mut typed = 0;
        for (path, env) in crate::protocol::broker_vector_envelopes() {
            typed += usize::from(
                env.headers_text()
                    .is_some_and(|t| serde_json::from_str::<V2Headers>(t).is_ok()),
            );
            let object = env.clone().into_object();
            assert_eq!(object.headers_text(), None);
            assert_eq!(
                TaskMessage::decode(&env),
                TaskMessage::decode(&object),
                "{}",
                path.display()
            );
        }
        assert!(typed >= 20, "typed headers read only {typed} vectors");
        let mut base = vector("task_delay_add_2_3").as_object().clone();
        for headers in [
            json!({"task": null, "id": "i"}),
            json!({"task": "t", "id": "i", "retries": -1, "timelimit": [null, 5], "eta": 12.5}),
            json!({"task": "t", "id": 3}),
            json!({"task": "t", "id": "i", "eta": "not a time"}),
        ] {
            base.insert("headers".into(), headers.clone());
            let text = serde_json::to_string(&base).unwrap();
            let env = Envelope::parse(text.as_bytes()).unwrap();
            assert!(env.is_read());
            let object = env.clone().into_object();
            assert_eq!(
                TaskMessage::decode(&env),
                TaskMessage::decode(&object),
                "{headers}"
            );
        }
        // A duplicate header fails the typed reading; the object keeps the
        // last one, as Python's json.loads does.
        let text = String::from_utf8(
            std::fs::read(format!(
                "{}/tests/vectors/broker/task_delay_add_2_3.raw",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap(),
        )
        .unwrap();
        let doubled = text.replacen("\"retries\": 0", "\"retries\": 0, \"retries\": 4", 1);
        assert_ne!(doubled, text);
        let env = Envelope::parse(doubled.as_bytes()).unwrap();
        assert!(serde_json::from_str::<V2Headers>(env.headers_text().unwrap()).is_err());
        assert_eq!(TaskMessage::decode(&env).unwrap().retries, 4);
    }

    /// Every captured broker message decodes to what its `.json` says.
    #[test]
    fn every_golden_broker_vector_decodes() {
        let dir = format!("{}/tests/vectors/broker", env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("raw") {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let raw = std::fs::read(&path).unwrap();
            let want = expected(&name);
            if name == "unacked_hash_entry" {
                // `[envelope, exchange, routing_key]`, not an envelope.
                let entry: Value = serde_json::from_slice(&raw).unwrap();
                assert_eq!(entry, want["value"], "{name}");
                checked += 1;
                continue;
            }
            let env = Envelope::parse(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                &Value::Object(env.as_object().clone()),
                &want["envelope"],
                "{name}"
            );
            assert_eq!(
                String::from_utf8(env.body().unwrap()).unwrap(),
                want["body_bytes_utf8"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                env.to_json().as_bytes(),
                &raw[..],
                "{name}: re-serialization"
            );
            let msg = TaskMessage::decode(&env).unwrap_or_else(|e| panic!("{name}: {e}"));
            let body = &want["body_decoded"];
            let headers = &want["envelope"]["headers"];
            if msg.protocol == 2 {
                assert_eq!(msg.id, headers["id"].as_str().unwrap(), "{name}");
                assert_eq!(msg.task, headers["task"].as_str().unwrap(), "{name}");
                assert_eq!(Value::Array(msg.args.clone()), body[0], "{name}");
                assert_eq!(Value::Object(msg.kwargs.clone()), body[1], "{name}");
                assert_eq!(
                    msg.retries as u64,
                    headers["retries"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    msg.eta
                        .map(format_time)
                        .map(Value::from)
                        .unwrap_or(Value::Null),
                    headers["eta"],
                    "{name}"
                );
            } else {
                assert_eq!(msg.id, body["id"].as_str().unwrap(), "{name}");
                assert_eq!(Value::Array(msg.args.clone()), body["args"], "{name}");
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} vectors checked");
    }

    /// Celery's `get_actual_ignore_result`: a message's header, when it
    /// has one, wins over the task's own setting either way.
    #[test]
    fn ignore_result_header_overrides_the_task_setting() {
        let v2 = TaskMessage::decode(&vector("task_delay_add_2_3")).unwrap();
        assert_eq!(v2.ignore_result, Some(false));
        assert!(!v2.ignores_result(true));
        let mut ignoring = v2.clone();
        ignoring.ignore_result = Some(true);
        assert!(ignoring.ignores_result(false));
        let v1 = TaskMessage::decode(&vector("task_protocol1")).unwrap();
        assert_eq!(v1.ignore_result, None);
        assert!(v1.ignores_result(true) && !v1.ignores_result(false));
    }

    #[test]
    fn delay_add_2_3() {
        let msg = TaskMessage::decode(&vector("task_delay_add_2_3")).unwrap();
        assert_eq!(msg.protocol, 2);
        assert_eq!(msg.task, "capapp.add");
        assert_eq!(msg.args, vec![json!(2), json!(3)]);
        assert!(msg.kwargs.is_empty());
        assert_eq!(msg.root_id.as_deref(), Some(msg.id.as_str()));
        assert_eq!(msg.time_limit, TimeLimit::default());
        assert!(msg.callbacks.is_empty() && msg.chain.is_empty() && msg.chord.is_none());
    }

    /// An empty `root_id` header is no root: the task is its own, as
    /// Celery's `root_id or id` makes it for the steps it sends on.
    #[test]
    fn an_empty_root_id_is_the_task_itself() {
        let mut env = vector("task_delay_add_2_3");
        env.set_header("root_id", json!(""));
        let msg = TaskMessage::decode(&env).unwrap();
        assert_eq!(msg.root_id.as_deref(), Some(msg.id.as_str()));
        env.set_header("root_id", json!("r"));
        assert_eq!(
            TaskMessage::decode(&env).unwrap().root_id.as_deref(),
            Some("r")
        );
    }

    #[test]
    fn timelimit_is_hard_then_soft() {
        let msg = TaskMessage::decode(&vector("task_queue_other_timelimit")).unwrap();
        assert_eq!(
            msg.time_limit,
            TimeLimit {
                hard: Some(30.0),
                soft: Some(20.0)
            }
        );
    }

    #[test]
    fn eta_expires_and_protocol1() {
        let eta = TaskMessage::decode(&vector("task_eta")).unwrap();
        assert_eq!(
            format_time(eta.eta.unwrap()),
            "2030-01-02T03:04:05.678901+00:00"
        );
        let exp = TaskMessage::decode(&vector("task_expires_60")).unwrap();
        assert!(exp.expires.is_some());
        let p1 = TaskMessage::decode(&vector("task_protocol1")).unwrap();
        assert_eq!(p1.protocol, 1);
        assert_eq!(p1.task, "capapp.add");
        assert_eq!(p1.args, vec![json!(2), json!(3)]);
    }

    #[test]
    fn workflow_fields() {
        let chain = TaskMessage::decode(&vector("task_chain_first")).unwrap();
        assert_eq!(chain.chain.len(), 2);
        let link = TaskMessage::decode(&vector("task_link_and_link_error")).unwrap();
        assert_eq!(link.callbacks.len(), 1);
        assert_eq!(link.errbacks.len(), 1);
        let chord = TaskMessage::decode(&vector("task_chord_header_0")).unwrap();
        assert_eq!(chord.group_index, Some(0));
        assert!(chord.chord.is_some());
    }

    #[test]
    fn pickle_is_refused_with_the_task_id() {
        let mut obj = vector("task_delay_add_2_3").as_object().clone();
        obj.insert(
            "content-type".into(),
            json!("application/x-python-serialize"),
        );
        obj.insert("content-encoding".into(), json!("binary"));
        let env = Envelope::parse(serde_json::to_string(&obj).unwrap().as_bytes()).unwrap();
        match TaskMessage::decode(&env) {
            Err(DecodeError::Refused {
                content_type,
                task_id,
                task_name,
            }) => {
                assert_eq!(content_type, "application/x-python-serialize");
                assert_eq!(task_id, "154dc395-95cd-4e2e-86e4-d404a40cb9bc");
                assert_eq!(task_name.as_deref(), Some("capapp.add"));
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn msgpack_body_decodes() {
        let body = rmp_serde::to_vec(&json!([[1, "a"], {"k": true}, {}])).unwrap();
        let mut headers = Map::new();
        headers.insert("task".into(), json!("tori.echo"));
        headers.insert("id".into(), json!("abc"));
        let env = Envelope::new(
            &body,
            CONTENT_TYPE_MSGPACK,
            headers,
            Map::new(),
            "",
            "celery",
            0,
        );
        let env = Envelope::parse(env.to_json().as_bytes()).unwrap();
        let msg = TaskMessage::decode(&env).unwrap();
        assert_eq!(msg.args, vec![json!(1), json!("a")]);
        assert_eq!(msg.kwargs.get("k"), Some(&json!(true)));
    }

    #[test]
    fn missing_id_or_bad_body_is_malformed() {
        let mut headers = Map::new();
        headers.insert("task".into(), json!("tori.echo"));
        let env = Envelope::new(
            b"[[], {}, {}]",
            CONTENT_TYPE_JSON,
            headers.clone(),
            Map::new(),
            "",
            "q",
            0,
        );
        assert!(matches!(
            TaskMessage::decode(&env),
            Err(DecodeError::Malformed(_))
        ));
        headers.insert("id".into(), json!("x"));
        let env = Envelope::new(
            b"not json",
            CONTENT_TYPE_JSON,
            headers,
            Map::new(),
            "",
            "q",
            0,
        );
        assert!(matches!(
            TaskMessage::decode(&env),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// A float a Python producer writes (`repr`, the shortest text that
    /// reads back exactly) reaches the task exactly: found one ULP off by
    /// the property tests (issue #25) before serde_json's
    /// `float_roundtrip`.
    #[test]
    fn python_floats_decode_exactly() {
        let mut headers = Map::new();
        headers.insert("task".into(), json!("tori.echo"));
        headers.insert("id".into(), json!("f"));
        let body = br#"[[2.656926209546977e-52, 1.8976910564100087e-72, -3.9742705791554596e+31], {}, {}]"#;
        let env = Envelope::new(body, CONTENT_TYPE_JSON, headers, Map::new(), "", "q", 0);
        let msg = TaskMessage::decode(&env).unwrap();
        let floats: Vec<f64> = msg.args.iter().filter_map(Value::as_f64).collect();
        assert_eq!(
            floats,
            [
                2.656926209546977e-52,
                1.8976910564100087e-72,
                -3.9742705791554596e31
            ]
        );
    }

    #[test]
    fn naive_and_offset_times() {
        assert_eq!(
            parse_time("2024-01-02T03:04:05")
                .map(format_time)
                .as_deref(),
            Some("2024-01-02T03:04:05.000000+00:00")
        );
        assert_eq!(
            parse_time("2024-01-02T04:04:05+01:00")
                .map(format_time)
                .as_deref(),
            Some("2024-01-02T03:04:05.000000+00:00")
        );
    }
}
