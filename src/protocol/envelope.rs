//! The kombu message envelope: the JSON object that sits in a Redis list.
//!
//! The envelope is kept as the JSON object it arrived as (key order
//! included), because a message that goes back to a queue — restore,
//! requeue, dead-letter — must be the same message any Python peer would
//! restore, with only `redelivered` added.
//!
//! Why two representations: building that ordered object for every
//! message consumed (an `IndexMap` per level, a `String` per key) was the
//! largest user-space cost of the worker's parent on a no-op drain, while
//! a consumer only reads a handful of fields. An envelope read off the
//! wire therefore keeps its text and the fields consumers read, typed, and
//! builds the full object only when something asks for it (a restore, a
//! retry, an unusual reader). Anything the typed reading does not accept
//! exactly — duplicate keys, unexpected types, a non-object — falls back
//! to the full object, so both paths give the same answers.

use std::borrow::Cow;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use thiserror::Error;

use super::pyjson;

/// Why bytes popped from a queue are not a usable kombu envelope. Such
/// messages go to the dead-letter list: no producer fix can be inferred.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("envelope is not a JSON object")]
    NotAnObject,
    #[error("envelope has no string `body`")]
    MissingBody,
    #[error("envelope has no `properties` object")]
    MissingProperties,
    #[error("envelope has no `properties.delivery_tag`")]
    MissingDeliveryTag,
    #[error("body is not valid base64: {0}")]
    BadBase64(String),
}

/// A kombu envelope (see SPEC §1.3).
#[derive(Debug, Clone)]
pub struct Envelope {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Read off the wire and not changed since.
    Read(Box<ReadEnvelope>),
    /// Built here, or changed after reading: the object is the truth.
    Object(Map<String, Value>),
}

/// The fields consumers read, plus the text for everything else.
#[derive(Debug, Clone)]
struct ReadEnvelope {
    raw: Box<str>,
    /// Where the `headers` object's text sits in `raw` (absent or null:
    /// none).
    headers: Option<std::ops::Range<usize>>,
    body: String,
    content_type: Option<String>,
    content_encoding: Option<String>,
    base64: bool,
    delivery_tag: String,
    exchange: String,
    routing_key: String,
    priority: u8,
    redelivered: bool,
    /// The whole object, built on first request.
    object: OnceLock<Map<String, Value>>,
}

/// A JSON value that was present, `null` included (serde's `Option`
/// would read `null` as absent, which the object reading does not).
#[derive(Debug, Default)]
pub(crate) struct Present(pub(crate) Option<Value>);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(|v| Present(Some(v)))
    }
}

impl Present {
    pub(crate) fn get(&self) -> Option<&Value> {
        self.0.as_ref()
    }
}

#[derive(Deserialize)]
struct WireEnvelope<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(rename = "content-type", default, borrow)]
    content_type: Option<Cow<'a, str>>,
    #[serde(rename = "content-encoding", default, borrow)]
    content_encoding: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    headers: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: &'a RawValue,
}

#[derive(Deserialize)]
struct WireProperties<'a> {
    #[serde(borrow)]
    delivery_tag: Cow<'a, str>,
    #[serde(default)]
    body_encoding: Present,
    #[serde(default)]
    priority: Present,
    #[serde(default, borrow)]
    delivery_info: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireDeliveryInfo<'a> {
    #[serde(default, borrow)]
    exchange: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    routing_key: Option<Cow<'a, str>>,
    #[serde(default)]
    redelivered: Present,
}

#[derive(Deserialize)]
struct WireHeaders {
    #[serde(default)]
    redelivered: Present,
}

/// Parses `raw` as `T` only if it is a JSON object: serde's derived
/// structs also accept arrays, which the object reading would refuse.
fn object_of<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    if !raw.get().starts_with('{') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

fn priority_of(value: Option<&Value>) -> u8 {
    value
        .and_then(Value::as_u64)
        .map(|p| p.min(255) as u8)
        .unwrap_or(0)
}

fn flag_of(value: Option<&Value>) -> bool {
    value.and_then(Value::as_bool).unwrap_or(false)
}

impl ReadEnvelope {
    /// The typed reading; `None` when the text needs the object reading
    /// to be understood (or rejected) exactly.
    fn read(text: &str) -> Option<Self> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let wire: WireEnvelope<'_> = serde_json::from_str(text).ok()?;
        let properties: WireProperties<'_> = object_of(wire.properties)?;
        if properties.delivery_tag.is_empty() {
            return None;
        }
        let info: Option<WireDeliveryInfo<'_>> = match properties.delivery_info {
            Some(raw) => Some(object_of(raw)?),
            None => None,
        };
        let headers_redelivered = match wire.headers {
            Some(h) => object_of::<WireHeaders>(h)?.redelivered,
            None => Present(None),
        };
        // The headers' text is a slice of `text`: remember where.
        let headers = wire.headers.map(|h| {
            let start = h.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + h.get().len()
        });
        let info = info.as_ref();
        Some(Self {
            headers,
            body: wire.body.into_owned(),
            content_type: wire.content_type.map(Cow::into_owned),
            content_encoding: wire.content_encoding.map(Cow::into_owned),
            base64: properties.body_encoding.get().and_then(Value::as_str) == Some("base64"),
            delivery_tag: properties.delivery_tag.into_owned(),
            exchange: info
                .and_then(|i| i.exchange.as_deref())
                .unwrap_or("")
                .to_owned(),
            routing_key: info
                .and_then(|i| i.routing_key.as_deref())
                .unwrap_or("")
                .to_owned(),
            priority: priority_of(properties.priority.get()),
            redelivered: flag_of(headers_redelivered.get())
                || flag_of(info.and_then(|i| i.redelivered.get())),
            raw: text.into(),
            object: OnceLock::new(),
        })
    }

    fn object(&self) -> &Map<String, Value> {
        self.object
            .get_or_init(|| match serde_json::from_str(&self.raw) {
                Ok(Value::Object(object)) => object,
                // Cannot happen: the typed reading accepted this text as an
                // object.
                _ => Map::new(),
            })
    }
}

/// The task a raw message is for, read without decoding (or copying) its
/// body: the `id`/`task` headers, else the `correlation_id` property. For
/// a message the worker will not decode (too large, or not a readable
/// envelope), so that its task still ends in a stored state. `None` when
/// not even that can be read.
pub fn peek_task(raw: &[u8]) -> Option<(String, Option<String>)> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        headers: Option<PeekHeaders>,
        #[serde(default)]
        properties: Option<PeekProperties>,
    }
    #[derive(Deserialize)]
    struct PeekHeaders {
        #[serde(default)]
        id: Option<Value>,
        #[serde(default)]
        task: Option<Value>,
    }
    #[derive(Deserialize)]
    struct PeekProperties {
        #[serde(default)]
        correlation_id: Option<Value>,
    }
    let text = String::from_utf8_lossy(raw);
    let peek: Peek = serde_json::from_str(&text).ok()?;
    let string = |v: Option<Value>| match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    };
    let (id, task) = match peek.headers {
        Some(h) => (string(h.id), string(h.task)),
        None => (None, None),
    };
    let id = id.or_else(|| string(peek.properties.and_then(|p| p.correlation_id)))?;
    Some((id, task))
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.as_object() == other.as_object()
    }
}

impl Envelope {
    /// Parses and validates the parts every consumer relies on: a body, a
    /// properties object and a delivery tag.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if let Some(read) = std::str::from_utf8(bytes).ok().and_then(ReadEnvelope::read) {
            return Ok(Self {
                repr: Repr::Read(Box::new(read)),
            });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let envelope = Self {
            repr: Repr::Object(object),
        };
        if !matches!(envelope.as_object().get("body"), Some(Value::String(_))) {
            return Err(EnvelopeError::MissingBody);
        }
        if envelope.properties_opt().is_none() {
            return Err(EnvelopeError::MissingProperties);
        }
        if envelope.delivery_tag().is_empty() {
            return Err(EnvelopeError::MissingDeliveryTag);
        }
        Ok(envelope)
    }

    /// Builds a fresh envelope the way kombu's `Channel.prepare_message`
    /// does, ready to LPUSH. `body` is the serialized payload.
    pub fn new(
        body: &[u8],
        content_type: &str,
        headers: Map<String, Value>,
        mut properties: Map<String, Value>,
        exchange: &str,
        routing_key: &str,
        priority: u8,
    ) -> Self {
        properties.insert("delivery_mode".into(), json!(2));
        properties.insert(
            "delivery_info".into(),
            json!({"exchange": exchange, "routing_key": routing_key}),
        );
        properties.insert("priority".into(), json!(priority));
        properties.insert("body_encoding".into(), json!("base64"));
        properties.insert(
            "delivery_tag".into(),
            json!(uuid::Uuid::new_v4().to_string()),
        );
        let mut object = Map::new();
        object.insert("body".into(), Value::String(BASE64.encode(body)));
        object.insert("content-encoding".into(), json!("utf-8"));
        object.insert("content-type".into(), json!(content_type));
        object.insert("headers".into(), Value::Object(headers));
        object.insert("properties".into(), Value::Object(properties));
        Self {
            repr: Repr::Object(object),
        }
    }

    /// The payload bytes, base64-decoded when `body_encoding` says so.
    pub fn body(&self) -> Result<Vec<u8>, EnvelopeError> {
        let (body, base64) = match &self.repr {
            Repr::Read(r) => (r.body.as_str(), r.base64),
            Repr::Object(object) => (
                object.get("body").and_then(Value::as_str).unwrap_or(""),
                self.properties()
                    .get("body_encoding")
                    .and_then(Value::as_str)
                    == Some("base64"),
            ),
        };
        if base64 {
            BASE64
                .decode(body.trim())
                .map_err(|e| EnvelopeError::BadBase64(e.to_string()))
        } else {
            Ok(body.as_bytes().to_vec())
        }
    }

    pub fn content_type(&self) -> &str {
        match &self.repr {
            Repr::Read(r) => r.content_type.as_deref(),
            Repr::Object(o) => o.get("content-type").and_then(Value::as_str),
        }
        .unwrap_or("application/json")
    }

    pub fn content_encoding(&self) -> &str {
        match &self.repr {
            Repr::Read(r) => r.content_encoding.as_deref(),
            Repr::Object(o) => o.get("content-encoding").and_then(Value::as_str),
        }
        .unwrap_or("utf-8")
    }

    fn properties_opt(&self) -> Option<&Map<String, Value>> {
        self.as_object()
            .get("properties")
            .and_then(Value::as_object)
    }

    pub fn properties(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.properties_opt()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    /// The object, for changing it: from here on it is the truth.
    fn object_mut(&mut self) -> &mut Map<String, Value> {
        if let Repr::Read(read) = &mut self.repr {
            let object = match read.object.take() {
                Some(object) => object,
                None => read.object().clone(),
            };
            self.repr = Repr::Object(object);
        }
        match &mut self.repr {
            Repr::Object(object) => object,
            Repr::Read(_) => unreachable!("just replaced"),
        }
    }

    fn properties_mut(&mut self) -> &mut Map<String, Value> {
        let slot = self
            .object_mut()
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot.as_object_mut().expect("just made an object")
    }

    /// Application headers; an absent or non-object `headers` reads empty.
    pub fn headers(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.as_object()
            .get("headers")
            .and_then(Value::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    /// The JSON text of the headers object as it arrived (`{}` when there
    /// is none), for readers that parse only the headers they need; `None`
    /// when only [`Envelope::headers`] can tell (a built or changed
    /// envelope).
    pub fn headers_text(&self) -> Option<&str> {
        match &self.repr {
            Repr::Read(r) => Some(r.headers.clone().map_or("{}", |range| &r.raw[range])),
            Repr::Object(_) => None,
        }
    }

    fn headers_mut(&mut self) -> &mut Map<String, Value> {
        let slot = self
            .object_mut()
            .entry("headers")
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot.as_object_mut().expect("just made an object")
    }

    pub fn delivery_tag(&self) -> &str {
        match &self.repr {
            Repr::Read(r) => &r.delivery_tag,
            Repr::Object(_) => self
                .properties()
                .get("delivery_tag")
                .and_then(Value::as_str)
                .unwrap_or(""),
        }
    }

    fn delivery_info(&self) -> Option<&Map<String, Value>> {
        self.properties()
            .get("delivery_info")
            .and_then(Value::as_object)
    }

    /// The exchange the publisher used (`""` = default exchange).
    pub fn exchange(&self) -> &str {
        match &self.repr {
            Repr::Read(r) => &r.exchange,
            Repr::Object(_) => self
                .delivery_info()
                .and_then(|d| d.get("exchange"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        }
    }

    pub fn routing_key(&self) -> &str {
        match &self.repr {
            Repr::Read(r) => &r.routing_key,
            Repr::Object(_) => self
                .delivery_info()
                .and_then(|d| d.get("routing_key"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        }
    }

    /// Message priority 0..=255 (kombu clamps to its priority steps).
    pub fn priority(&self) -> u8 {
        match &self.repr {
            Repr::Read(r) => r.priority,
            Repr::Object(_) => priority_of(self.properties().get("priority")),
        }
    }

    /// True when kombu (or we) put this message back after a failed
    /// delivery.
    pub fn redelivered(&self) -> bool {
        match &self.repr {
            Repr::Read(r) => r.redelivered,
            Repr::Object(_) => {
                let flag =
                    |m: Option<&Map<String, Value>>| flag_of(m.and_then(|m| m.get("redelivered")));
                flag(Some(self.headers())) || flag(self.delivery_info())
            }
        }
    }

    /// Marks the message as redelivered in both places kombu does
    /// (`headers` and `properties.delivery_info`).
    pub fn mark_redelivered(&mut self) {
        self.headers_mut()
            .insert("redelivered".into(), Value::Bool(true));
        let props = self.properties_mut();
        let info = props
            .entry("delivery_info")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(info) = info {
            info.insert("redelivered".into(), Value::Bool(true));
        }
    }

    /// Gives the message a new delivery tag; used when a message is
    /// republished as a new delivery rather than restored.
    pub fn renew_delivery_tag(&mut self) {
        self.properties_mut().insert(
            "delivery_tag".into(),
            json!(uuid::Uuid::new_v4().to_string()),
        );
    }

    /// 1 = transient (events, replies), 2 = persistent (tasks).
    pub fn set_delivery_mode(&mut self, mode: u8) {
        self.properties_mut()
            .insert("delivery_mode".into(), json!(mode));
    }

    pub fn set_header(&mut self, key: &str, value: Value) {
        self.headers_mut().insert(key.to_owned(), value);
    }

    /// Serialized as kombu would (Python `json.dumps` formatting).
    pub fn to_json(&self) -> String {
        pyjson::to_string(self.as_object())
    }

    pub fn as_object(&self) -> &Map<String, Value> {
        match &self.repr {
            Repr::Read(r) => r.object(),
            Repr::Object(object) => object,
        }
    }

    /// Whether the typed reading took this envelope (tests compare it
    /// with the object reading).
    #[cfg(test)]
    pub(crate) fn is_read(&self) -> bool {
        matches!(self.repr, Repr::Read(_))
    }

    /// The same envelope, answered from its object from now on.
    #[cfg(test)]
    pub(crate) fn into_object(mut self) -> Self {
        self.object_mut();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: &[u8] = include_bytes!("../../tests/vectors/broker/task_delay_add_2_3.raw");

    #[test]
    fn parses_a_captured_envelope() {
        let env = Envelope::parse(DELAY).unwrap();
        assert_eq!(env.content_type(), "application/json");
        assert_eq!(env.delivery_tag(), "c266b3d1-822f-441d-880c-88f4a4e8147d");
        assert_eq!(env.exchange(), "");
        assert_eq!(env.routing_key(), "celery");
        assert_eq!(env.priority(), 0);
        assert!(!env.redelivered());
        assert_eq!(
            env.body().unwrap(),
            br#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
    }

    #[test]
    fn reserializes_byte_exact() {
        let env = Envelope::parse(DELAY).unwrap();
        assert_eq!(env.to_json().as_bytes(), DELAY);
    }

    #[test]
    fn redelivered_matches_kombu_restore_capture() {
        let restored: &[u8] = include_bytes!("../../tests/vectors/broker/restored_at_shutdown.raw");
        let mut expected = Envelope::parse(restored).unwrap();
        assert!(expected.redelivered());
        // Strip the flags, re-add them, and compare with kombu's bytes.
        let mut plain = expected.clone();
        plain.headers_mut().remove("redelivered");
        if let Some(Value::Object(info)) = plain.properties_mut().get_mut("delivery_info") {
            info.remove("redelivered");
        }
        assert!(!plain.redelivered());
        plain.mark_redelivered();
        assert_eq!(plain.to_json().as_bytes(), restored);
        expected.mark_redelivered();
        assert_eq!(expected.to_json().as_bytes(), restored);
    }

    /// Every accessor, read both ways.
    fn answers(env: &Envelope) -> Value {
        json!({
            "body": env.body().map_err(|e| e.to_string()),
            "content_type": env.content_type(),
            "content_encoding": env.content_encoding(),
            "delivery_tag": env.delivery_tag(),
            "exchange": env.exchange(),
            "routing_key": env.routing_key(),
            "priority": env.priority(),
            "redelivered": env.redelivered(),
            "headers": env.headers(),
            "properties": env.properties(),
            "json": env.to_json(),
        })
    }

    #[test]
    fn typed_reading_answers_like_the_object_reading() {
        let mut read = 0;
        for (path, env) in crate::protocol::broker_vector_envelopes() {
            read += usize::from(env.is_read());
            let object = env.clone().into_object();
            assert!(!object.is_read());
            assert_eq!(answers(&env), answers(&object), "{}", path.display());
        }
        assert!(read >= 20, "typed reading took only {read} vectors");
    }

    #[test]
    fn unusual_layouts_fall_back_to_the_object_reading() {
        let cases: &[(&str, bool)] = &[
            // Duplicate key: the last one counts, as in Python.
            (
                r#"{"body": "a", "body": "Yg==", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#,
                false,
            ),
            (
                r#"{"body": "x", "properties": {"delivery_tag": "t", "delivery_tag": "u"}}"#,
                false,
            ),
            // Types the typed reading does not take.
            (
                r#"{"body": "x", "content-type": 3, "properties": {"delivery_tag": "t"}}"#,
                false,
            ),
            (
                r#"{"body": "x", "headers": "h", "properties": {"delivery_tag": "t"}}"#,
                false,
            ),
            (
                r#"{"body": "x", "headers": [1], "properties": {"delivery_tag": "t"}}"#,
                false,
            ),
            (
                r#"{"body": "x", "properties": {"delivery_tag": "t", "delivery_info": ["e", "r"]}}"#,
                false,
            ),
            (
                r#"{"body": "x", "properties": {"delivery_tag": "t", "delivery_info": {"exchange": 1}}}"#,
                false,
            ),
            (
                r#"{"body": "x", "headers": {"redelivered": true, "redelivered": false}, "properties": {"delivery_tag": "t"}}"#,
                false,
            ),
            // Taken typed, with the same answers.
            (
                r#"{"body": "x", "headers": null, "properties": {"delivery_tag": "t", "priority": 300, "delivery_info": null}}"#,
                true,
            ),
            (
                r#"{"body": "x", "headers": {"redelivered": true}, "properties": {"delivery_tag": "t"}}"#,
                true,
            ),
            (
                r#"{"body": "x", "headers": {"redelivered": "yes"}, "properties": {"delivery_tag": "t", "body_encoding": 7, "delivery_info": {"redelivered": true, "routing_key": "q"}}}"#,
                true,
            ),
            (
                r#"  {"body": "\u00e9t\u00e9", "content-encoding": "utf-8", "headers": {"a": {"b": [1, 2]}}, "properties": {"delivery_tag": "t\"q"}, "extra": [1]}"#,
                true,
            ),
        ];
        for (text, typed) in cases {
            let env = Envelope::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(env.is_read(), *typed, "{text}");
            let value: Value = serde_json::from_str(text).unwrap();
            let Value::Object(object) = value else {
                unreachable!()
            };
            let object = Envelope {
                repr: Repr::Object(object),
            };
            assert_eq!(answers(&env), answers(&object), "{text}");
        }
        // An array is not an envelope, even with the right items in order.
        assert_eq!(
            Envelope::parse(br#"["x", null, null, null, {"delivery_tag": "t"}]"#),
            Err(EnvelopeError::NotAnObject)
        );
        assert_eq!(
            Envelope::parse(br#"{"body": "x", "properties": ["t"]}"#),
            Err(EnvelopeError::MissingProperties)
        );
        assert_eq!(
            Envelope::parse(br#"{"body": "x", "properties": {"delivery_tag": ""}}"#),
            Err(EnvelopeError::MissingDeliveryTag)
        );
    }

    #[test]
    fn changing_a_read_envelope_keeps_every_other_field() {
        let mut env = Envelope::parse(DELAY).unwrap();
        assert!(env.is_read());
        env.set_header("x", json!(1));
        assert!(!env.is_read());
        assert_eq!(env.delivery_tag(), "c266b3d1-822f-441d-880c-88f4a4e8147d");
        assert_eq!(env.routing_key(), "celery");
        assert_eq!(env.headers()["x"], json!(1));
        assert_eq!(env.headers()["task"], json!("capapp.add"));
    }

    /// Found by fuzzing (`task_message_raw`, issue #25): a number beyond
    /// f64 (`1e400`; Python reads it as `inf`) passes the typed reading,
    /// which keeps header text raw, but not the object reading, whose
    /// failure `ReadEnvelope::object` turns into an empty map. Every
    /// reader of the object then sees no body: a restore or dead-letter
    /// writes the message without its body, and `retry_of` panics on its
    /// `expect`. Not fixed here (the fix is a choice of policy for
    /// out-of-range numbers, part of the nesting/size work).
    #[test]
    #[ignore = "issue #25: out-of-range numbers empty the envelope's object"]
    fn an_out_of_range_number_does_not_empty_the_envelope() {
        let text = br#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": 1e400}, "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#;
        if let Ok(env) = Envelope::parse(text) {
            assert_eq!(env.as_object().get("body"), Some(&json!("eA==")));
            let mut restored = env.clone();
            restored.mark_redelivered();
            assert!(Envelope::parse(restored.to_json().as_bytes()).is_ok());
        }
    }

    #[test]
    fn rejects_garbage_with_specific_errors() {
        assert!(matches!(
            Envelope::parse(b"\xff\x00"),
            Err(EnvelopeError::NotJson(_))
        ));
        assert_eq!(Envelope::parse(b"[1]"), Err(EnvelopeError::NotAnObject));
        assert_eq!(Envelope::parse(b"{}"), Err(EnvelopeError::MissingBody));
        assert_eq!(
            Envelope::parse(br#"{"body": "x"}"#),
            Err(EnvelopeError::MissingProperties)
        );
        assert_eq!(
            Envelope::parse(br#"{"body": "x", "properties": {}}"#),
            Err(EnvelopeError::MissingDeliveryTag)
        );
        let bad = Envelope::parse(
            br#"{"body": "%%%", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#,
        )
        .unwrap();
        assert!(matches!(bad.body(), Err(EnvelopeError::BadBase64(_))));
    }
}
