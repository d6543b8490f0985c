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
use std::ops::ControlFlow;
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
    /// A number no f64 can hold (`1e400`). Python's `json` reads it as
    /// `inf`; the worker refuses the message instead of carrying a
    /// different value or losing the field (issue #25).
    #[error(
        "number {0} is beyond the range of a 64-bit float (Python would read it as inf); refused"
    )]
    NumberOutOfRange(String),
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
        // The body is the bulk of the text and a plain string: the scan
        // below need not walk it when it is a slice of `text`.
        let body = match &wire.body {
            Cow::Borrowed(b) => {
                let start = b.as_ptr() as usize - text.as_ptr() as usize;
                Some(start..start + b.len())
            }
            Cow::Owned(_) => None,
        };
        if scan_json(text, body, TYPED_DEPTH, |_| ControlFlow::Break(())).is_break() {
            return None;
        }
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
                // object, after `scan_json` found nothing the object
                // reading would refuse.
                _ => Map::new(),
            })
    }
}

/// Nesting the typed reading takes on trust; deeper text goes to the
/// object reading, which decides exactly (serde_json stops at 128 levels).
const TYPED_DEPTH: usize = 64;

/// What [`scan_json`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    /// Containers nested deeper than the scan's limit.
    Deep,
    /// A number token, at this range of the text, that no f64 holds.
    OutOfRange(std::ops::Range<usize>),
    /// A `\u` escape of a UTF-16 surrogate that is not half of a pair
    /// (`"\ud999"`): serde_json checks only that it has four hex digits
    /// when skipping a string, and refuses it when reading one.
    LoneSurrogate,
}

/// The UTF-16 unit a `\uXXXX` escape at the start of `bytes` writes.
fn escaped_unit(bytes: &[u8]) -> Option<u16> {
    let hex = bytes.strip_prefix(b"\\u")?.get(..4)?;
    u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Walks JSON `text` outside its strings (not looking inside `skip`, the
/// inside of one string) and shows `visit` what serde_json would refuse
/// when building a `Value` but not when only checking syntax, as the typed
/// reading does for the headers and for fields it skips: numbers beyond
/// f64, nesting beyond `max_depth` and lone surrogate escapes (the last
/// two found by fuzzing, issue #25). Stops when `visit` breaks. Assumes
/// syntactically valid JSON (it only ever sees text serde_json accepted,
/// or is asked to find the token serde_json refused).
fn scan_json(
    text: &str,
    skip: Option<std::ops::Range<usize>>,
    max_depth: usize,
    mut visit: impl FnMut(Finding) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        if in_string {
            if let Some(skip) = skip.as_ref().filter(|s| s.contains(&i)) {
                i = skip.end;
                continue;
            }
            match bytes[i] {
                b'\\' => match escaped_unit(&bytes[i..]) {
                    // A pair (how Python's json writes an emoji) is fine.
                    Some(0xD800..=0xDBFF)
                        if matches!(escaped_unit(&bytes[i + 6..]), Some(0xDC00..=0xDFFF)) =>
                    {
                        i += 12
                    }
                    Some(0xD800..=0xDFFF) => {
                        visit(Finding::LoneSurrogate)?;
                        i += 6;
                    }
                    _ => i += 2,
                },
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match bytes[i] {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    visit(Finding::Deep)?;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let token = &text[start..i];
                // Only an exponent or ~309 digits can leave f64's range;
                // Rust's parse rounds as serde_json does, and reads an
                // out-of-range number as infinite.
                let may_overflow = token.len() > 300 || token.contains(['e', 'E']);
                if may_overflow && token.parse::<f64>().is_ok_and(f64::is_infinite) {
                    visit(Finding::OutOfRange(start..i))?;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    ControlFlow::Continue(())
}

/// Every number in `text` that no f64 holds.
fn out_of_range_numbers(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut found = Vec::new();
    let _ = scan_json(text, None, usize::MAX, |f| {
        if let Finding::OutOfRange(range) = f {
            found.push(range);
        }
        ControlFlow::Continue(())
    });
    found
}

/// The error for bytes serde_json would not read as a `Value`: a number
/// beyond f64 is named as such (the text is JSON, and Python reads it),
/// anything else is not JSON.
fn json_error(bytes: &[u8], error: &serde_json::Error) -> EnvelopeError {
    let message = error.to_string();
    if message.starts_with("number out of range") {
        let text = String::from_utf8_lossy(bytes);
        if let Some(range) = out_of_range_numbers(&text).first() {
            let number: String = text[range.clone()].chars().take(40).collect();
            let more = if range.len() > 40 { "…" } else { "" };
            return EnvelopeError::NumberOutOfRange(format!(
                "{number}{more} (line {}, column {})",
                error.line(),
                error.column()
            ));
        }
    }
    EnvelopeError::NotJson(message)
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
    let peek: Peek = match serde_json::from_str(&text) {
        Ok(peek) => peek,
        // A number beyond f64 in a field read as a `Value` (`"task":
        // 1e400`) must not hide a readable id: read again with such
        // numbers as null.
        Err(_) => {
            let found = out_of_range_numbers(&text);
            if found.is_empty() {
                return None;
            }
            let mut nulled = String::with_capacity(text.len());
            let mut at = 0;
            for range in found {
                nulled.push_str(&text[at..range.start]);
                nulled.push_str("null");
                at = range.end;
            }
            nulled.push_str(&text[at..]);
            serde_json::from_str(&nulled).ok()?
        }
    };
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
        let value: Value = serde_json::from_slice(bytes).map_err(|e| json_error(bytes, &e))?;
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
    /// f64 (`1e400`; Python reads it as `inf`) passed the typed reading,
    /// which keeps header text raw, but not the object reading, whose
    /// failure left an empty object: every reader of it then saw no body
    /// (a restore or dead-letter wrote the message without it, `retry_of`
    /// panicked). Policy: such a message is refused with its own error, and
    /// its task id stays readable, so the worker stores a DecodeError
    /// FAILURE for it and dead-letters the raw text (`unrunnable`).
    #[test]
    fn an_out_of_range_number_does_not_empty_the_envelope() {
        let digits = format!("1{}", "0".repeat(400));
        for (number, text) in [
            ("1e400", r#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": 1e400}, "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#.to_owned()),
            ("-1E+999", r#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": [{"y": -1E+999}]}, "properties": {"delivery_tag": "t"}}"#.to_owned()),
            ("1e400", r#"{"body": "eA==", "headers": {"task": 1e400, "id": "i"}, "properties": {"delivery_tag": "t"}}"#.to_owned()),
            ("1e400", r#"{"body": "eA==", "headers": {"task": "t", "id": "i"}, "properties": {"delivery_tag": "t", "x": 1e400}}"#.to_owned()),
            ("1e400", r#"{"x": 1e400, "body": "e\nA==", "headers": {"task": "t", "id": "i"}, "properties": {"delivery_tag": "t"}}"#.to_owned()),
            (&digits[..40], format!(r#"{{"body": "eA==", "headers": {{"task": "t", "id": "i", "x": {digits}}}, "properties": {{"delivery_tag": "t"}}}}"#)),
        ] {
            match Envelope::parse(text.as_bytes()) {
                Err(EnvelopeError::NumberOutOfRange(why)) => {
                    assert!(why.starts_with(number), "{why} for {text}")
                }
                other => panic!("{text}: {other:?}"),
            }
            // The id is still read, so the task gets a stored FAILURE.
            let (id, _) = peek_task(text.as_bytes()).expect(&text);
            assert_eq!(id, "i");
        }
    }

    /// Found by fuzzing (`task_message_raw`, issue #25): a lone surrogate
    /// escape in a field the typed reading skips passed it (serde_json
    /// only checks its hex digits there) and emptied the object, so the
    /// body read as empty. It is refused now, with the id still readable;
    /// a surrogate pair, how Python's json writes an emoji, stays on the
    /// typed reading.
    #[test]
    fn a_lone_surrogate_escape_is_refused_not_emptied() {
        for text in [
            r#"{"body": "eA==", "headers": {"task": "t", "id": "i"}, "properties": {"delivery_tag": "t", "x": "a\ud999b"}}"#,
            r#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": ["\udc00"]}, "properties": {"delivery_tag": "t"}}"#,
            r#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": "\ud83d\ud83d"}, "properties": {"delivery_tag": "t"}}"#,
        ] {
            match Envelope::parse(text.as_bytes()) {
                // serde_json's words: "lone leading surrogate in hex escape",
                // "unexpected end of hex escape"…
                Err(EnvelopeError::NotJson(why)) => assert!(why.contains("escape"), "{why}"),
                other => panic!("{text}: {other:?}"),
            }
            assert_eq!(peek_task(text.as_bytes()).unwrap().0, "i");
        }
        let text = br#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": "\ud83d\ude00"}, "properties": {"delivery_tag": "t"}}"#;
        let env = Envelope::parse(text).unwrap();
        assert!(env.is_read());
        assert_eq!(env.headers()["x"], json!("\u{1F600}"));
        assert_eq!(env.as_object().get("body"), Some(&json!("eA==")));
    }

    /// Numbers f64 does hold, however written, are read as before.
    #[test]
    fn numbers_within_f64_are_read() {
        let text = br#"{"body": "eA==", "headers": {"task": "t", "id": "i", "x": [1e308, -1.7976931348623157e308, 1e-400, 2.5E+3]}, "properties": {"delivery_tag": "t"}}"#;
        let env = Envelope::parse(text).unwrap();
        assert!(env.is_read());
        assert_eq!(env.as_object().get("body"), Some(&json!("eA==")));
        assert_eq!(env.headers()["x"], json!([1e308, -f64::MAX, 0.0, 2500.0]));
    }

    /// Headers nested deeper than the typed reading trusts are judged by
    /// the object reading: read in full when serde_json can, refused when
    /// not; never accepted with an empty object.
    #[test]
    fn deep_headers_are_read_whole_or_refused() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let envelope = |depth: usize| {
            format!(
                r#"{{"body": "eA==", "headers": {{"id": "i", "task": "t", "x": {}}}, "properties": {{"delivery_tag": "t"}}}}"#,
                nested(depth)
            )
        };
        let env = Envelope::parse(envelope(100).as_bytes()).unwrap();
        assert_eq!(env.as_object().get("body"), Some(&json!("eA==")));
        assert_eq!(env.headers()["id"], json!("i"));
        assert!(matches!(
            Envelope::parse(envelope(200).as_bytes()),
            Err(EnvelopeError::NotJson(_))
        ));
        assert_eq!(peek_task(envelope(200).as_bytes()).unwrap().0, "i");
    }

    /// The scan skips strings, escapes included, and the body it is told
    /// to skip.
    #[test]
    fn the_scan_reads_only_what_is_outside_strings() {
        let found = |text: &str| out_of_range_numbers(text);
        assert!(found(r#"{"a": "1e400", "b\"1e400": "\\", "c": 1}"#).is_empty());
        let text = r#"{"a": "x\"", "b": 1e400}"#;
        assert_eq!(&text[found(text)[0].clone()], "1e400");
        // Skipping the body's inside leaves the scan in the string, so
        // the closing quote ends it and what follows is still read.
        let text = r#"{"body": "a[{\"1e400", "x": [[-1e400]]}"#;
        let body = 10..text.find("\", \"x").unwrap();
        assert_eq!(&text[body.clone()], r#"a[{\"1e400"#);
        let mut seen = Vec::new();
        let _ = scan_json(text, Some(body), 2, |f| {
            seen.push(f);
            ControlFlow::Continue(())
        });
        let number = text.rfind("-1e400").unwrap();
        assert_eq!(
            seen,
            [Finding::Deep, Finding::OutOfRange(number..number + 6)]
        );
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
