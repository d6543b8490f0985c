//! What each fuzz target checks, as plain functions: the targets in
//! `fuzz_targets/` call them on libFuzzer's inputs, and the worker's own
//! `cargo test` (`tests/fuzz_seeds.rs`) calls them on the committed seed
//! corpus and on every captured vector, so CI exercises the same checks
//! without a fuzzing toolchain.
//!
//! Every function must return normally on any input. A panic is a finding:
//! either a panic in the worker's decoders (what the fuzzer is for) or a
//! broken property named in the `assert!` message.

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tori_worker::pool::ipc::{self, FromChild, ToChild};
use tori_worker::protocol::canvas::{self, Origin};
use tori_worker::protocol::outgoing::retry_of;
use tori_worker::protocol::{DecodeError, Envelope, EnvelopeError, TaskMessage};

/// serde_json's nesting limit. Inputs nested deeper are refused by the
/// decoders (the nesting policy itself is issue #25 item 1, not checked
/// here), so properties that re-parse a value skip them.
const SERDE_JSON_DEPTH: usize = 128;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn is_depth_error(message: &str) -> bool {
    message.contains("recursion limit exceeded") || message.contains("depth limit exceeded")
}

// ---------------------------------------------------------------- envelope

/// What a worker reads from an envelope, answered independently from the
/// envelope's full JSON object: the typed fast path of `Envelope::parse`
/// must give the same answers (SPEC §1.3 defaults included).
fn expected_answers(object: &Map<String, Value>) -> Value {
    let props = object.get("properties").and_then(Value::as_object);
    let prop = |k: &str| props.and_then(|p| p.get(k));
    let info = prop("delivery_info").and_then(Value::as_object);
    let info_str = |k: &str| info.and_then(|i| i.get(k)).and_then(Value::as_str);
    let headers = object.get("headers").and_then(Value::as_object);
    let flag = |v: Option<&Value>| v.and_then(Value::as_bool).unwrap_or(false);
    json!({
        "content_type": object.get("content-type").and_then(Value::as_str).unwrap_or("application/json"),
        "content_encoding": object.get("content-encoding").and_then(Value::as_str).unwrap_or("utf-8"),
        "delivery_tag": prop("delivery_tag").and_then(Value::as_str).unwrap_or(""),
        "exchange": info_str("exchange").unwrap_or(""),
        "routing_key": info_str("routing_key").unwrap_or(""),
        "priority": prop("priority").and_then(Value::as_u64).map_or(0, |p| p.min(255)),
        "redelivered": flag(headers.and_then(|h| h.get("redelivered"))) || flag(info.and_then(|i| i.get("redelivered"))),
        "headers": headers.cloned().unwrap_or_default(),
    })
}

fn answers(env: &Envelope) -> Value {
    json!({
        "content_type": env.content_type(),
        "content_encoding": env.content_encoding(),
        "delivery_tag": env.delivery_tag(),
        "exchange": env.exchange(),
        "routing_key": env.routing_key(),
        "priority": env.priority(),
        "redelivered": env.redelivered(),
        "headers": env.headers(),
    })
}

/// The body as the object says it should decode.
fn expected_body(object: &Map<String, Value>) -> Result<Vec<u8>, ()> {
    let body = object.get("body").and_then(Value::as_str).unwrap_or("");
    let base64 = object
        .get("properties")
        .and_then(|p| p.get("body_encoding"))
        .and_then(Value::as_str)
        == Some("base64");
    if base64 {
        BASE64.decode(body.trim()).map_err(|_| ())
    } else {
        Ok(body.as_bytes().to_vec())
    }
}

/// Raw bytes popped from a queue: `Envelope::parse` and every accessor a
/// worker calls on what it accepts.
pub fn envelope(data: &[u8]) {
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    check_envelope(&env);
}

fn check_envelope(env: &Envelope) {
    let object = env.as_object();
    assert!(
        matches!(object.get("body"), Some(Value::String(_))),
        "accepted without a string body"
    );
    assert!(!env.delivery_tag().is_empty(), "accepted without a tag");
    assert_eq!(
        answers(env),
        expected_answers(object),
        "typed reading differs from the object"
    );
    assert_eq!(
        env.body().map_err(|_| ()),
        expected_body(object),
        "body() differs from the object's body"
    );
    let _ = env.properties().len();
    if let Some(text) = env.headers_text() {
        // The headers' text is the headers object (`{}` when none).
        let parsed: Value = serde_json::from_str(text).expect("headers_text is JSON");
        match (&parsed, object.get("headers")) {
            // Absent or `null`: no headers, read as `{}`.
            (Value::Object(m), None | Some(Value::Null)) => {
                assert!(m.is_empty(), "headers_text without headers")
            }
            (Value::Object(_), Some(h)) => assert_eq!(&parsed, h, "headers_text"),
            (other, h) => panic!("headers_text {other} for headers {h:?}"),
        }
    }

    // What goes back to Redis (restore, dead-letter) reads back the same.
    let text = env.to_json();
    let again = Envelope::parse(text.as_bytes()).expect("to_json of an envelope parses");
    assert_eq!(&again, env, "to_json round trip");

    // The changes a worker makes keep it an envelope.
    let mut restored = env.clone();
    restored.mark_redelivered();
    assert!(restored.redelivered(), "mark_redelivered");
    assert_eq!(restored.delivery_tag(), env.delivery_tag());
    let mut renewed = restored.clone();
    renewed.renew_delivery_tag();
    renewed.set_delivery_mode(2);
    let again = Envelope::parse(renewed.to_json().as_bytes()).expect("changed envelope parses");
    assert!(again.redelivered() && again.delivery_tag() == renewed.delivery_tag());
}

// ------------------------------------------------------------ task message

/// A task message decoded twice: from the envelope as read, and from the
/// envelope after a change that forces every reader onto the full object.
/// Both must agree, and a decoded message must survive what the worker
/// does with it next (a retry republish).
fn check_decode(env: &Envelope) -> Result<TaskMessage, DecodeError> {
    let decoded = TaskMessage::decode(env);
    let mut object = env.clone();
    object.set_header("x-tori-fuzz", Value::Null);
    assert!(object.headers_text().is_none());
    assert_eq!(
        decoded,
        TaskMessage::decode(&object),
        "typed and object decoding differ"
    );
    if let Ok(msg) = &decoded {
        assert!(matches!(msg.protocol, 1 | 2));
        let retry = retry_of(env, msg, chrono::Utc::now());
        let again = TaskMessage::decode(&retry).expect("a retry of a decoded message decodes");
        assert_eq!(again.id, msg.id, "retry keeps the id");
        if msg.protocol == 2 {
            assert_eq!(again.args, msg.args, "retry keeps the args");
        }
    }
    decoded
}

/// Raw bytes popped from a queue, through to the decoded task.
pub fn task_message_raw(data: &[u8]) {
    if let Ok(env) = Envelope::parse(data) {
        let _ = check_decode(&env);
    }
}

/// A JSON value with a say over its shape.
#[derive(Debug, Clone, Arbitrary)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Time(Time),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

/// Object keys: mostly ones the decoders look for.
#[derive(Debug, Clone, Arbitrary)]
pub enum Key {
    Known(u8),
    Other(String),
}

const KNOWN_KEYS: &[&str] = &[
    "id",
    "task",
    "args",
    "kwargs",
    "eta",
    "expires",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "group",
    "group_index",
    "shadow",
    "origin",
    "argsrepr",
    "kwargsrepr",
    "ignore_result",
    "callbacks",
    "errbacks",
    "chain",
    "chord",
    "taskset",
    "redelivered",
    "lang",
    "options",
    "subtask_type",
    "immutable",
    "tasks",
    "header",
    "body",
];

impl Key {
    fn name(&self) -> String {
        match self {
            Key::Known(i) => KNOWN_KEYS[*i as usize % KNOWN_KEYS.len()].to_owned(),
            Key::Other(s) => s.clone(),
        }
    }
}

/// A time as a producer might write it: ISO-8601 in the layouts Python
/// writes, with out-of-range fields too.
#[derive(Debug, Clone, Arbitrary)]
pub struct Time {
    year: i32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    micros: u32,
    offset: Option<i16>,
    space: bool,
}

impl Time {
    fn text(&self) -> String {
        let sep = if self.space { ' ' } else { 'T' };
        let mut s = format!(
            "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}.{:06}",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.micros
        );
        if let Some(off) = self.offset {
            let sign = if off < 0 { '-' } else { '+' };
            let off = off.unsigned_abs();
            s.push_str(&format!("{sign}{:02}:{:02}", off / 60, off % 60));
        }
        s
    }
}

impl Json {
    pub fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Int(i) => json!(i),
            Json::UInt(u) => json!(u),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Str(s) => json!(s),
            Json::Time(t) => json!(t.text()),
            Json::Array(items) => Value::Array(items.iter().map(Json::value).collect()),
            Json::Object(pairs) => {
                Value::Object(pairs.iter().map(|(k, v)| (k.name(), v.value())).collect())
            }
        }
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub enum ContentType {
    Json,
    JsonShort,
    Msgpack,
    MsgpackShort,
    Pickle,
    Absent,
    Other(String),
}

#[derive(Debug, Clone, Arbitrary)]
pub enum Protocol {
    /// Headers carry `id`/`task`; body `[args, kwargs, embed]`.
    V2,
    /// Same headers; body an object with `args`/`kwargs` (kombu's hybrid).
    V2Hybrid,
    /// Everything in the body object.
    V1,
}

#[derive(Debug, Clone, Arbitrary)]
pub enum Body {
    /// Built from the parts below and serialized for the content type.
    Built,
    /// Arbitrary bytes as the body.
    Raw(Vec<u8>),
    /// Any JSON value serialized for the content type.
    Value(Json),
}

/// A task message built field by field, so that fuzzing reaches the
/// decoder's field handling rather than stopping at JSON syntax.
#[derive(Debug, Clone, Arbitrary)]
pub struct Message {
    content_type: ContentType,
    base64: bool,
    protocol: Protocol,
    id: Option<Json>,
    task: Option<Json>,
    /// Use well-formed `id`/`task` strings instead of the fields above.
    plain_ids: bool,
    args: Json,
    kwargs: Json,
    embed: Vec<(Key, Json)>,
    fields: Vec<(Key, Json)>,
    headers_not_an_object: Option<Json>,
    correlation_id: Option<Json>,
    priority: Option<Json>,
    delivery_info: Option<Json>,
    body: Body,
}

impl Message {
    fn content_type(&self) -> Option<String> {
        Some(match &self.content_type {
            ContentType::Json => "application/json".to_owned(),
            ContentType::JsonShort => "json".to_owned(),
            ContentType::Msgpack => "application/x-msgpack".to_owned(),
            ContentType::MsgpackShort => "application/msgpack".to_owned(),
            ContentType::Pickle => "application/x-python-serialize".to_owned(),
            ContentType::Absent => return None,
            ContentType::Other(s) => s.clone(),
        })
    }

    fn serialize(&self, value: &Value) -> Vec<u8> {
        match self.content_type {
            ContentType::Msgpack | ContentType::MsgpackShort => {
                rmp_serde::to_vec(value).expect("msgpack of a JSON value")
            }
            _ => serde_json::to_vec(value).expect("JSON of a JSON value"),
        }
    }

    fn id_task(&self) -> (Option<Value>, Option<Value>) {
        if self.plain_ids {
            (Some(json!("fuzz-id")), Some(json!("tori.echo")))
        } else {
            (
                self.id.as_ref().map(Json::value),
                self.task.as_ref().map(Json::value),
            )
        }
    }

    /// The envelope's JSON text, as a producer would LPUSH it.
    pub fn envelope_text(&self) -> String {
        let (id, task) = self.id_task();
        let mut extra: Map<String, Value> = self
            .fields
            .iter()
            .map(|(k, v)| (k.name(), v.value()))
            .collect();
        let embed: Map<String, Value> = self
            .embed
            .iter()
            .map(|(k, v)| (k.name(), v.value()))
            .collect();
        let mut headers = Map::new();
        let payload = match self.protocol {
            Protocol::V2 | Protocol::V2Hybrid => {
                id.map(|v| headers.insert("id".into(), v));
                task.map(|v| headers.insert("task".into(), v));
                headers.append(&mut extra);
                if matches!(self.protocol, Protocol::V2) {
                    json!([self.args.value(), self.kwargs.value(), embed])
                } else {
                    let mut body = embed;
                    body.insert("args".into(), self.args.value());
                    body.insert("kwargs".into(), self.kwargs.value());
                    Value::Object(body)
                }
            }
            Protocol::V1 => {
                let mut body = extra;
                id.map(|v| body.insert("id".into(), v));
                task.map(|v| body.insert("task".into(), v));
                body.insert("args".into(), self.args.value());
                body.insert("kwargs".into(), self.kwargs.value());
                body.append(&mut embed.clone());
                Value::Object(body)
            }
        };
        let body = match &self.body {
            Body::Built => self.serialize(&payload),
            Body::Raw(bytes) => bytes.clone(),
            Body::Value(v) => self.serialize(&v.value()),
        };
        let body = if self.base64 {
            BASE64.encode(&body)
        } else {
            // Without base64 the body travels as a JSON string.
            String::from_utf8_lossy(&body).into_owned()
        };
        let mut props = Map::new();
        props.insert("delivery_tag".into(), json!("fuzz-tag"));
        if self.base64 {
            props.insert("body_encoding".into(), json!("base64"));
        }
        for (key, value) in [
            ("correlation_id", &self.correlation_id),
            ("priority", &self.priority),
            ("delivery_info", &self.delivery_info),
        ] {
            if let Some(v) = value {
                props.insert(key.into(), v.value());
            }
        }
        let mut object = Map::new();
        object.insert("body".into(), Value::String(body));
        if let Some(ct) = self.content_type() {
            object.insert("content-type".into(), Value::String(ct));
        }
        object.insert("content-encoding".into(), json!("utf-8"));
        let headers = match &self.headers_not_an_object {
            Some(v) => v.value(),
            None => Value::Object(headers),
        };
        object.insert("headers".into(), headers);
        object.insert("properties".into(), Value::Object(props));
        serde_json::to_string(&object).expect("JSON of a JSON value")
    }

    /// What a correct decoder must return for a well-formed protocol 2
    /// message, when this is one.
    fn expected(&self) -> Option<(Vec<Value>, Map<String, Value>)> {
        let (Protocol::V2, Body::Built, true, None) = (
            &self.protocol,
            &self.body,
            self.plain_ids,
            &self.headers_not_an_object,
        ) else {
            return None;
        };
        if !matches!(
            self.content_type,
            ContentType::Json | ContentType::Msgpack | ContentType::Absent
        ) || !self.base64
        {
            return None;
        }
        // Extra headers that the decoder validates may refuse the message
        // (`retries` and `timelimit` since issue #25; found by fuzzing).
        let validated = ["id", "task", "eta", "expires", "retries", "timelimit"];
        if self
            .fields
            .iter()
            .any(|(k, _)| validated.contains(&k.name().as_str()))
        {
            return None;
        }
        // What the body's own serializer gives back (serde_json parses
        // some floats 1 ULP off without its `float_roundtrip` feature,
        // which is not what is checked here).
        let back = |v: Value| match self.content_type {
            ContentType::Msgpack => v,
            _ => serde_json::from_slice(&serde_json::to_vec(&v).expect("JSON")).unwrap_or(v),
        };
        match (back(self.args.value()), back(self.kwargs.value())) {
            (Value::Array(a), Value::Object(k)) => Some((a, k)),
            _ => None,
        }
    }
}

/// A task message built from structured parts (content type, protocol,
/// headers, body), through the envelope to the decoded task.
pub fn task_message(message: &Message) {
    let text = message.envelope_text();
    let env = match Envelope::parse(text.as_bytes()) {
        Ok(env) => env,
        Err(EnvelopeError::NotJson(e)) if is_depth_error(&e) => return,
        Err(e) => panic!("a well-formed envelope is refused: {e}"),
    };
    check_envelope(&env);
    let decoded = check_decode(&env);
    if let Some((args, kwargs)) = message.expected() {
        match decoded {
            Ok(msg) => {
                assert_eq!(msg.id, "fuzz-id");
                assert_eq!(msg.task, "tori.echo");
                assert_eq!(msg.args, args);
                assert_eq!(msg.kwargs, kwargs);
            }
            Err(DecodeError::Malformed(e)) if is_depth_error(&e) => {}
            Err(e) => panic!("a well-formed protocol 2 message is refused: {e}"),
        }
    }
}

// ------------------------------------------------------------- pool frames

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Bytes on the pipe between the parent and a pool process, in both
/// directions, read by the blocking reader (the child) and the async one
/// (the parent). The results are ignored on purpose: only a panic, a hang
/// or a runaway allocation is a finding here.
pub fn ipc_frame(data: &[u8]) {
    // As they come: length prefix and all.
    let _ = ipc::read_frame::<ToChild>(&mut &data[..]);
    let _ = ipc::read_frame::<FromChild>(&mut &data[..]);
    // The same bytes as one frame's body, so the JSON is reached directly.
    let mut framed = (data.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    let _ = ipc::read_frame::<ToChild>(&mut &framed[..]);
    let _ = ipc::read_frame::<FromChild>(&mut &framed[..]);
    runtime().block_on(async {
        let _ = ipc::read_frame_async::<FromChild>(&mut &framed[..]).await;
        let _ = ipc::read_frame_async::<ToChild>(&mut &data[..]).await;
    });
}

// ------------------------------------------------------------------ canvas

fn origin(result: &Value) -> Origin<'_> {
    Origin {
        result,
        parent_id: "fuzz-parent",
        root_id: "fuzz-root",
        origin: "fuzz@host",
        default_queue: "celery",
    }
}

/// Starts `sig` (after `rest`, if a chain) the way the worker starts a
/// workflow step; every message it would publish must be a task message
/// any worker can decode.
fn check_expand(sig: &Value, rest: Option<Vec<Value>>, result: &Value) {
    let _ = canvas::task_ids(sig);
    let deep = depth(sig)
        + rest
            .as_ref()
            .map_or(0, |r| r.iter().map(depth).max().unwrap_or(0));
    let Ok(expansion) = canvas::expand(sig, rest, &origin(result)) else {
        return;
    };
    for (env, _route) in &expansion.messages {
        assert!(
            !canvas::message_id(env).is_empty(),
            "published without an id"
        );
        let text = env.to_json();
        match Envelope::parse(text.as_bytes()) {
            Ok(parsed) => match TaskMessage::decode(&parsed) {
                Ok(_) => {}
                // `time_limit`/`soft_time_limit` options are copied into
                // the `timelimit` header as they are, as Celery copies
                // them; one that is no number of seconds is refused by the
                // worker that receives the step, with a stored FAILURE
                // (the policy `outgoing::built_messages_decode_to_the_signature`
                // checks too). Found by fuzzing `canvas` (issue #25).
                Err(DecodeError::Invalid { message, .. }) if message.starts_with("timelimit") => {}
                // A signature tree deeper than the worker carries (one
                // depth policy, `protocol::limits`) is published and
                // refused by the receiving worker with a stored FAILURE,
                // as README "What is not done yet" says. Found by fuzzing
                // `canvas` (issue #25).
                Err(DecodeError::Malformed(e)) if e.contains("levels deep") => {
                    assert!(
                        deep + 4 >= tori_worker::protocol::limits::MAX_DEPTH,
                        "depth limit at depth {deep}: {e}"
                    )
                }
                Err(DecodeError::Malformed(e)) if is_depth_error(&e) => {
                    assert!(
                        deep + 4 >= SERDE_JSON_DEPTH,
                        "depth error at depth {deep}: {e}"
                    )
                }
                Err(e) => panic!("a published message does not decode: {e}\n{text}"),
            },
            Err(EnvelopeError::NotJson(e)) if is_depth_error(&e) => {
                assert!(
                    deep + 4 >= SERDE_JSON_DEPTH,
                    "depth error at depth {deep}: {e}"
                )
            }
            Err(e) => panic!("a published envelope does not parse: {e}"),
        }
    }
}

/// Canvas input as JSON text: a signature, or `[signature, rest…]` for a
/// chain link with what follows it.
pub fn canvas_raw(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check_expand(&value, None, &json!(1));
    if let Value::Array(mut items) = value {
        if !items.is_empty() {
            let sig = items.remove(0);
            check_expand(&sig, Some(items), &json!([1, 2]));
        }
    }
}

/// A signature tree in the shapes the Python client builds.
#[derive(Debug, Clone, Arbitrary)]
pub enum Sig {
    Task {
        name: Option<Json>,
        immutable: bool,
        args: Vec<Json>,
        options: Vec<(SigOption, Json)>,
    },
    Group {
        members: Vec<Sig>,
        options: Vec<(SigOption, Json)>,
    },
    Chord {
        header: Vec<Sig>,
        header_as_group: bool,
        body: Option<Box<Sig>>,
        options: Vec<(SigOption, Json)>,
    },
    Chain {
        links: Vec<Sig>,
        options: Vec<(SigOption, Json)>,
    },
    /// Whatever a hostile producer puts where a signature should be.
    Junk(Json),
}

#[derive(Debug, Clone, Arbitrary)]
pub enum SigOption {
    Known(u8),
    Other(String),
}

const SIG_OPTIONS: &[&str] = &[
    "task_id",
    "group_id",
    "group_index",
    "chord",
    "chain",
    "link",
    "link_error",
    "queue",
    "routing_key",
    "exchange",
    "priority",
    "reply_to",
    "root_id",
    "parent_id",
    "shadow",
    "ignore_result",
    "time_limit",
    "soft_time_limit",
];

fn sig_options(options: &[(SigOption, Json)]) -> Value {
    Value::Object(
        options
            .iter()
            .map(|(k, v)| {
                let key = match k {
                    SigOption::Known(i) => SIG_OPTIONS[*i as usize % SIG_OPTIONS.len()].to_owned(),
                    SigOption::Other(s) => s.clone(),
                };
                (key, v.value())
            })
            .collect(),
    )
}

impl Sig {
    pub fn value(&self) -> Value {
        match self {
            Sig::Task {
                name,
                immutable,
                args,
                options,
            } => json!({
                "task": name.as_ref().map_or(json!("tori.echo"), Json::value),
                "args": args.iter().map(Json::value).collect::<Vec<_>>(),
                "kwargs": {},
                "options": sig_options(options),
                "subtask_type": null,
                "immutable": immutable,
            }),
            Sig::Group { members, options } => json!({
                "task": "celery.group",
                "args": [],
                "kwargs": {"tasks": members.iter().map(Sig::value).collect::<Vec<_>>()},
                "options": sig_options(options),
                "subtask_type": "group",
                "immutable": false,
            }),
            Sig::Chord {
                header,
                header_as_group,
                body,
                options,
            } => {
                let members: Vec<Value> = header.iter().map(Sig::value).collect();
                let header = if *header_as_group {
                    json!({
                        "task": "celery.group",
                        "args": [],
                        "kwargs": {"tasks": members},
                        "options": {},
                        "subtask_type": "group",
                        "immutable": false,
                    })
                } else {
                    Value::Array(members)
                };
                json!({
                    "task": "celery.chord",
                    "args": [],
                    "kwargs": {
                        "header": header,
                        "body": body.as_ref().map_or(Value::Null, |b| b.value()),
                        "kwargs": {},
                    },
                    "options": sig_options(options),
                    "subtask_type": "chord",
                    "immutable": false,
                })
            }
            Sig::Chain { links, options } => json!({
                "task": "celery.chain",
                "args": [],
                "kwargs": {"tasks": links.iter().map(Sig::value).collect::<Vec<_>>()},
                "options": sig_options(options),
                "subtask_type": "chain",
                "immutable": false,
            }),
            Sig::Junk(j) => j.value(),
        }
    }
}

/// A structured workflow step: the signature, and the rest of the chain
/// when it is a chain link (`None` for a callback).
#[derive(Debug, Clone, Arbitrary)]
pub struct Step {
    sig: Sig,
    rest: Option<Vec<Sig>>,
    result: Json,
}

pub fn canvas(step: &Step) {
    let sig = step.sig.value();
    let rest = step
        .rest
        .as_ref()
        .map(|r| r.iter().map(Sig::value).collect());
    check_expand(&sig, rest, &step.result.value());
}
