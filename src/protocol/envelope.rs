//! The kombu message envelope: the JSON object that sits in a Redis list.
//!
//! The envelope is kept as the JSON object it arrived as (key order
//! included), because a message that goes back to a queue — restore,
//! requeue, dead-letter — must be the same message any Python peer would
//! restore, with only `redelivered` added.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
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
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    object: Map<String, Value>,
}

impl Envelope {
    /// Parses and validates the parts every consumer relies on: a body, a
    /// properties object and a delivery tag.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let envelope = Self { object };
        if !matches!(envelope.object.get("body"), Some(Value::String(_))) {
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
        Self { object }
    }

    /// The payload bytes, base64-decoded when `body_encoding` says so.
    pub fn body(&self) -> Result<Vec<u8>, EnvelopeError> {
        let body = self
            .object
            .get("body")
            .and_then(Value::as_str)
            .unwrap_or("");
        match self
            .properties()
            .get("body_encoding")
            .and_then(Value::as_str)
        {
            Some("base64") => BASE64
                .decode(body.trim())
                .map_err(|e| EnvelopeError::BadBase64(e.to_string())),
            _ => Ok(body.as_bytes().to_vec()),
        }
    }

    pub fn content_type(&self) -> &str {
        self.object
            .get("content-type")
            .and_then(Value::as_str)
            .unwrap_or("application/json")
    }

    pub fn content_encoding(&self) -> &str {
        self.object
            .get("content-encoding")
            .and_then(Value::as_str)
            .unwrap_or("utf-8")
    }

    fn properties_opt(&self) -> Option<&Map<String, Value>> {
        self.object.get("properties").and_then(Value::as_object)
    }

    pub fn properties(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.properties_opt()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    fn properties_mut(&mut self) -> &mut Map<String, Value> {
        let slot = self
            .object
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
        self.object
            .get("headers")
            .and_then(Value::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    fn headers_mut(&mut self) -> &mut Map<String, Value> {
        let slot = self
            .object
            .entry("headers")
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot.as_object_mut().expect("just made an object")
    }

    pub fn delivery_tag(&self) -> &str {
        self.properties()
            .get("delivery_tag")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn delivery_info(&self) -> Option<&Map<String, Value>> {
        self.properties()
            .get("delivery_info")
            .and_then(Value::as_object)
    }

    /// The exchange the publisher used (`""` = default exchange).
    pub fn exchange(&self) -> &str {
        self.delivery_info()
            .and_then(|d| d.get("exchange"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn routing_key(&self) -> &str {
        self.delivery_info()
            .and_then(|d| d.get("routing_key"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// Message priority 0..=255 (kombu clamps to its priority steps).
    pub fn priority(&self) -> u8 {
        self.properties()
            .get("priority")
            .and_then(Value::as_u64)
            .map(|p| p.min(255) as u8)
            .unwrap_or(0)
    }

    /// True when kombu (or we) put this message back after a failed
    /// delivery.
    pub fn redelivered(&self) -> bool {
        let flag = |m: Option<&Map<String, Value>>| {
            m.and_then(|m| m.get("redelivered"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        flag(Some(self.headers())) || flag(self.delivery_info())
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
        pyjson::to_string(&self.object)
    }

    pub fn as_object(&self) -> &Map<String, Value> {
        &self.object
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
