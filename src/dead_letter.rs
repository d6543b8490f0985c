//! The dead-letter list as an operator works with it: the record format,
//! record ids, and the operations behind `tori-worker dead-letter` (list,
//! show, requeue, purge). The worker only pushes records (see
//! `Broker::dead_letter` and the reserve script); everything that reads or
//! removes them is here.
//!
//! A record is a JSON object `{"id", "reason", "queue", "received_at",
//! "worker", "raw"}`, newest at the head of the list. Records written
//! before ids existed get one derived from their text, so every record can
//! be addressed, and the same record always has the same id.

use std::collections::HashSet;

use base64::Engine as _;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::Digest as _;

use crate::broker::keys::{self, Keys};
use crate::protocol::pyjson;
use crate::redis_link::RedisLink;

/// Records read per LRANGE, so a long list of large messages is never
/// held in memory at once by `list` or an id lookup.
const PAGE: isize = 100;

/// A new record with a fresh random id (uuid4, hex).
pub fn new_record(reason: &str, queue: &str, received_at: f64, worker: &str, raw: &str) -> String {
    pyjson::to_string(&json!({
        "id": uuid::Uuid::new_v4().simple().to_string(),
        "reason": reason,
        "queue": queue,
        "received_at": received_at,
        "worker": worker,
        "raw": raw,
    }))
}

/// The id of a record that carries none (written by an older version):
/// the first 16 hex digits of the SHA-256 of its exact text.
pub fn derived_id(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One record as stored: its exact text (which removing it needs) and,
/// when the text is a JSON object, its fields.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub text: String,
    pub fields: Option<Map<String, Value>>,
}

/// What `list` shows of a record.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub received_at: Option<f64>,
    pub queue: Option<String>,
    pub reason: Option<String>,
    pub worker: Option<String>,
    pub task_id: Option<String>,
    pub task_name: Option<String>,
    pub raw_size: usize,
}

/// A requeued record: where its message went.
#[derive(Debug, Clone, Serialize)]
pub struct Requeued {
    pub id: String,
    pub queue: String,
    pub task_id: Option<String>,
    pub task_name: Option<String>,
}

/// A record `requeue --all` left in place, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub id: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no dead letter with id {0:?}")]
    NotFound(String),
    #[error("dead letter {0} was removed meanwhile (requeued or purged by someone else, or trimmed by --dead-letter-max)")]
    Gone(String),
    #[error("dead letter {0} holds no raw message to requeue")]
    NoRaw(String),
    #[error("dead letter {0} names no queue to requeue to; pass --queue")]
    NoQueue(String),
    #[error("the broker is unreachable or refused the command: {0}")]
    Redis(#[from] RedisError),
}

impl Record {
    pub fn parse(text: String) -> Self {
        let fields = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
        let id = fields
            .as_ref()
            .and_then(|f| f.get("id"))
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| derived_id(&text));
        Self { id, text, fields }
    }

    fn str_field(&self, name: &str) -> Option<&str> {
        self.fields.as_ref()?.get(name)?.as_str()
    }

    /// The message as it was received.
    pub fn raw(&self) -> Option<&str> {
        self.str_field("raw")
    }

    pub fn summary(&self) -> Summary {
        let raw = self.raw();
        let (task_id, task_name) = raw.map(task_identity).unwrap_or_default();
        Summary {
            id: self.id.clone(),
            received_at: self
                .fields
                .as_ref()
                .and_then(|f| f.get("received_at"))
                .and_then(Value::as_f64),
            queue: self.str_field("queue").map(str::to_owned),
            reason: self.str_field("reason").map(str::to_owned),
            worker: self.str_field("worker").map(str::to_owned),
            task_id,
            task_name,
            raw_size: raw.map_or(self.text.len(), str::len),
        }
    }

    /// The whole record with its id, for `show`: an id derived for an old
    /// record is added, and a record that is not a JSON object is shown as
    /// its text.
    pub fn to_json(&self) -> Value {
        match &self.fields {
            Some(fields) => {
                let mut out = Map::new();
                out.insert("id".into(), Value::from(self.id.clone()));
                for (k, v) in fields {
                    if k != "id" {
                        out.insert(k.clone(), v.clone());
                    }
                }
                Value::Object(out)
            }
            None => json!({"id": self.id, "record": self.text}),
        }
    }
}

/// The message inside a raw text: kombu's `unacked` entry
/// `[message, exchange, routing_key]` (what a failed restore dead-letters)
/// holds one; anything else is the message itself.
fn unwrap_unacked_entry(raw: &str) -> Option<(Value, Option<String>)> {
    let value: Value = serde_json::from_str(raw).ok()?;
    if let Value::Array(items) = &value {
        if let [message @ Value::Object(_), Value::String(_), Value::String(rk)] = items.as_slice()
        {
            return Some((message.clone(), Some(rk.clone())));
        }
    }
    Some((value, None))
}

/// The task id and name of a raw message, when they can be read: from the
/// headers (protocol 2) or a JSON body (protocol 1).
pub fn task_identity(raw: &str) -> (Option<String>, Option<String>) {
    let Some((message, _)) = unwrap_unacked_entry(raw) else {
        return (None, None);
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    if let Some(headers) = message.get("headers").filter(|h| h.get("id").is_some()) {
        return (text(headers, "id"), text(headers, "task"));
    }
    let body = message.get("body").and_then(Value::as_str).and_then(|b| {
        match message
            .pointer("/properties/body_encoding")
            .and_then(Value::as_str)
        {
            Some("base64") => base64::engine::general_purpose::STANDARD.decode(b).ok(),
            _ => Some(b.as_bytes().to_vec()),
        }
    });
    match body.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
        Some(body) if body.is_object() => (text(&body, "id"), text(&body, "task")),
        _ => (None, None),
    }
}

/// Where a requeue sends a record's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub queue: String,
    /// The queue's list for the message's priority.
    pub list: String,
    pub message: String,
}

/// The message as a new delivery: without the `redelivered` flag, which
/// would make a worker that finds a stored final state (a message refused
/// before running stores its FAILURE first) ack it without running it,
/// and an operator who requeues wants it run. Unchanged, byte for byte,
/// when it carries no such flag.
fn fresh_delivery(message: String) -> String {
    let Ok(mut value) = serde_json::from_str::<Value>(&message) else {
        return message;
    };
    let mut changed = false;
    for path in ["/headers", "/properties/delivery_info"] {
        if let Some(Value::Object(map)) = value.pointer_mut(path) {
            changed |= map.remove("redelivered").is_some();
        }
    }
    if changed {
        pyjson::to_string(&value)
    } else {
        message
    }
}

/// The message to push and its list: `queue` when given, else the
/// record's queue (a queue name, or the list key the reserve script
/// records), else the message's own routing key.
pub fn requeue_target(
    record: &Record,
    keys: &Keys,
    queue: Option<&str>,
) -> Result<Target, DeadLetterError> {
    let raw = record
        .raw()
        .ok_or_else(|| DeadLetterError::NoRaw(record.id.clone()))?;
    let (message, message_value, entry_rk) = match unwrap_unacked_entry(raw) {
        Some((value, Some(rk))) => (pyjson::to_string(&value), Some(value), Some(rk)),
        Some((value, None)) => (raw.to_owned(), Some(value), None),
        None => (raw.to_owned(), None, None),
    };
    let routing_key = || {
        message_value
            .as_ref()?
            .pointer("/properties/delivery_info/routing_key")?
            .as_str()
            .map(str::to_owned)
    };
    let queue = queue
        .map(str::to_owned)
        .or_else(|| {
            record
                .str_field("queue")
                .map(|q| keys::queue_of_list_key(&keys.prefix, q).to_owned())
        })
        .filter(|q| !q.is_empty())
        .or(entry_rk)
        .or_else(routing_key)
        .filter(|q| !q.is_empty())
        .ok_or_else(|| DeadLetterError::NoQueue(record.id.clone()))?;
    let priority = message_value
        .as_ref()
        .and_then(|m| m.pointer("/properties/priority"))
        .and_then(Value::as_u64)
        .map_or(0, |p| p.min(255) as u8);
    let message = fresh_delivery(message);
    Ok(Target {
        list: keys::queue_list_key(&keys.prefix, &queue, priority),
        queue,
        message,
    })
}

/// Removes one record and pushes its message onto a queue in one step:
/// a record is never both requeued and kept, nor removed unrequeued.
/// KEYS: dead-letter list, destination list. ARGV: the record's exact
/// text, the message. Returns 1, or 0 when the record is no longer there.
pub static REQUEUE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"#,
    )
});

/// The dead-letter list of one broker.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    link: RedisLink,
    keys: Keys,
}

impl DeadLetters {
    pub fn new(link: RedisLink, keys: Keys) -> Self {
        Self { link, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// One attempt per command: an operator's command should fail fast
    /// with the reason rather than wait for Redis to come back.
    async fn conn(&self) -> Result<MultiplexedConnection, RedisError> {
        self.link.conn().await
    }

    async fn range(&self, start: isize, stop: isize) -> Result<Vec<String>, RedisError> {
        redis::cmd("LRANGE")
            .arg(&self.keys.dead_letter)
            .arg(start)
            .arg(stop)
            .query_async(&mut self.conn().await?)
            .await
    }

    /// Calls `visit` on each record, newest first, until it says stop.
    async fn scan(&self, mut visit: impl FnMut(Record) -> bool) -> Result<(), RedisError> {
        let mut start = 0;
        loop {
            let page = self.range(start, start + PAGE - 1).await?;
            let n = page.len() as isize;
            for text in page {
                if !visit(Record::parse(text)) {
                    return Ok(());
                }
            }
            if n < PAGE {
                return Ok(());
            }
            start += PAGE;
        }
    }

    /// Every record's summary, newest first.
    pub async fn list(&self) -> Result<Vec<Summary>, DeadLetterError> {
        let mut out = Vec::new();
        self.scan(|r| {
            out.push(r.summary());
            true
        })
        .await?;
        Ok(out)
    }

    /// The record with `id`.
    pub async fn find(&self, id: &str) -> Result<Record, DeadLetterError> {
        let mut found = None;
        self.scan(|r| {
            if r.id == id {
                found = Some(r);
                false
            } else {
                true
            }
        })
        .await?;
        found.ok_or_else(|| DeadLetterError::NotFound(id.to_owned()))
    }

    /// Requeues one record (see [`REQUEUE`]).
    pub async fn requeue(
        &self,
        record: &Record,
        queue: Option<&str>,
    ) -> Result<Requeued, DeadLetterError> {
        let target = requeue_target(record, &self.keys, queue)?;
        let moved: i64 = REQUEUE
            .key(&self.keys.dead_letter)
            .key(&target.list)
            .arg(&record.text)
            .arg(&target.message)
            .invoke_async(&mut self.conn().await?)
            .await?;
        if moved == 0 {
            return Err(DeadLetterError::Gone(record.id.clone()));
        }
        let (task_id, task_name) = task_identity(&target.message);
        tracing::info!(
            id = %record.id,
            queue = %target.queue,
            task_id = task_id.as_deref().unwrap_or(""),
            task_name = task_name.as_deref().unwrap_or(""),
            "dead letter requeued"
        );
        Ok(Requeued {
            id: record.id.clone(),
            queue: target.queue,
            task_id,
            task_name,
        })
    }

    /// Requeues every record present when called, oldest first (so their
    /// messages keep their order on the queue). Records that cannot be
    /// requeued are left and reported; records dead-lettered meanwhile
    /// (a requeued message that fails again) are left alone, so this ends.
    pub async fn requeue_all(
        &self,
        queue: Option<&str>,
    ) -> Result<(Vec<Requeued>, Vec<Skipped>), DeadLetterError> {
        let mut wanted = HashSet::new();
        self.scan(|r| {
            wanted.insert(r.id);
            true
        })
        .await?;
        let (mut requeued, mut skipped) = (Vec::new(), Vec::new());
        // Records left in place are counted from the tail (the oldest
        // end), where new pushes at the head do not move them.
        let mut left = 0;
        loop {
            let page = self.range(-(left + PAGE), -(left + 1)).await?;
            if page.is_empty() {
                break;
            }
            for text in page.into_iter().rev() {
                let record = Record::parse(text);
                if !wanted.remove(&record.id) {
                    left += 1;
                    continue;
                }
                match self.requeue(&record, queue).await {
                    Ok(r) => requeued.push(r),
                    // Someone else took it: nothing left here.
                    Err(DeadLetterError::Gone(_)) => {}
                    Err(e @ (DeadLetterError::NoRaw(_) | DeadLetterError::NoQueue(_))) => {
                        left += 1;
                        skipped.push(Skipped {
                            id: record.id,
                            error: e.to_string(),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((requeued, skipped))
    }

    /// Deletes every record; returns how many there were.
    pub async fn purge(&self) -> Result<u64, DeadLetterError> {
        let (n,): (u64,) = redis::pipe()
            .atomic()
            .llen(&self.keys.dead_letter)
            .del(&self.keys.dead_letter)
            .ignore()
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(n)
    }

    /// Deletes the record with `id`.
    pub async fn purge_one(&self, id: &str) -> Result<Record, DeadLetterError> {
        let record = self.find(id).await?;
        let removed: i64 = redis::cmd("LREM")
            .arg(&self.keys.dead_letter)
            .arg(1)
            .arg(&record.text)
            .query_async(&mut self.conn().await?)
            .await?;
        if removed == 0 {
            return Err(DeadLetterError::Gone(record.id));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Broker, Fetched};
    use crate::test_redis::redis_and_link;
    use std::time::Duration;

    fn envelope(task_id: &str, routing_key: &str, priority: u8) -> String {
        pyjson::to_string(&json!({
            "body": "W1tdLCB7fSwge31d",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "tori.noop", "id": task_id},
            "properties": {
                "delivery_info": {"exchange": "", "routing_key": routing_key},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": format!("tag-{task_id}"),
            },
        }))
    }

    async fn lrange(link: &RedisLink, key: &str) -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut link.conn().await.unwrap())
            .await
            .unwrap()
    }

    async fn lpush(link: &RedisLink, key: &str, value: &str) {
        let _: () = redis::cmd("LPUSH")
            .arg(key)
            .arg(value)
            .query_async(&mut link.conn().await.unwrap())
            .await
            .unwrap();
    }

    #[test]
    fn old_records_get_a_stable_derived_id_and_new_ones_their_own() {
        let old =
            r#"{"reason": "r", "queue": "celery", "received_at": 1.0, "worker": "w", "raw": "x"}"#;
        let a = Record::parse(old.to_owned());
        assert_eq!(a.id, Record::parse(old.to_owned()).id);
        assert_eq!(a.id.len(), 16);
        assert_ne!(a.id, derived_id(&old.replace("\"x\"", "\"y\"")));
        let new = Record::parse(new_record("r", "celery", 1.0, "w", "x"));
        assert_eq!(new.id.len(), 32);
        assert_eq!(new.to_json()["raw"], "x");
        assert_eq!(Record::parse("not json".into()).id, derived_id("not json"));
    }

    #[test]
    fn task_identity_reads_headers_and_protocol_1_bodies() {
        assert_eq!(
            task_identity(&envelope("t1", "celery", 0)),
            (Some("t1".into()), Some("tori.noop".into()))
        );
        let body = base64::engine::general_purpose::STANDARD
            .encode(r#"{"task": "tori.echo", "id": "t2", "args": []}"#);
        let v1 = json!({"body": body, "headers": {},
            "properties": {"body_encoding": "base64"}})
        .to_string();
        assert_eq!(
            task_identity(&v1),
            (Some("t2".into()), Some("tori.echo".into()))
        );
        assert_eq!(task_identity("garbage"), (None, None));
    }

    #[test]
    fn a_requeued_message_is_a_fresh_delivery() {
        let marked = r#"{"body": "e30=", "headers": {"id": "t", "redelivered": true}, "properties": {"delivery_tag": "d", "delivery_info": {"exchange": "", "routing_key": "celery", "redelivered": true}}}"#;
        let fresh: Value = serde_json::from_str(&fresh_delivery(marked.to_owned())).unwrap();
        assert!(fresh.pointer("/headers/redelivered").is_none());
        assert!(fresh
            .pointer("/properties/delivery_info/redelivered")
            .is_none());
        assert_eq!(fresh["headers"]["id"], "t");
        let plain = r#"{"body": "e30=",  "properties": {"delivery_tag": "d"}}"#;
        assert_eq!(
            fresh_delivery(plain.to_owned()),
            plain,
            "left byte for byte"
        );
    }

    #[test]
    fn requeue_goes_to_the_records_queue_at_the_messages_priority() {
        let keys = Keys::new("p:", "tori.dead_letter");
        let raw = envelope("t1", "celery", 0);
        // The reserve script records the list key, prefix and step included.
        let r = Record::parse(new_record("bad", "p:extra\x06\x166", 1.0, "w", &raw));
        let t = requeue_target(&r, &keys, None).unwrap();
        assert_eq!((t.queue.as_str(), t.list.as_str()), ("extra", "p:extra"));
        assert_eq!(t.message, raw);
        let t = requeue_target(&r, &keys, Some("other")).unwrap();
        assert_eq!(t.list, "p:other");
        // A failed restore records kombu's unacked entry and no queue.
        let hi = envelope("t2", "celery", 9);
        let entry = format!("[{hi}, \"\", \"routed\"]");
        let r = Record::parse(new_record("no queue", "", 1.0, "w", &entry));
        let t = requeue_target(&r, &keys, None).unwrap();
        assert_eq!(t.list, format!("p:routed{}9", keys::SEP));
        assert_eq!(t.message, hi);
        let r = Record::parse(new_record("bad", "", 1.0, "w", "not json"));
        assert!(matches!(
            requeue_target(&r, &keys, None),
            Err(DeadLetterError::NoQueue(_))
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requeue_moves_a_record_to_its_queue_once() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let dl = DeadLetters::new(link.clone(), keys.clone());
        let raw = envelope("t1", "celery", 0);
        let record = new_record("bad", "celery", 1.0, "w", &raw);
        lpush(&link, &keys.dead_letter, &record).await;
        lpush(&link, &keys.dead_letter, "legacy, not even JSON").await;
        let listed = dl.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, derived_id("legacy, not even JSON"));
        assert_eq!(listed[1].task_id.as_deref(), Some("t1"));
        let found = dl.find(&listed[1].id).await.unwrap();
        let done = dl.requeue(&found, None).await.unwrap();
        assert_eq!(done.queue, "celery");
        assert_eq!(lrange(&link, "celery").await, vec![raw.clone()]);
        assert_eq!(lrange(&link, &keys.dead_letter).await.len(), 1);
        // Requeued already: a second attempt neither pushes nor fails
        // silently.
        assert!(matches!(
            dl.requeue(&found, None).await,
            Err(DeadLetterError::Gone(_))
        ));
        assert_eq!(lrange(&link, "celery").await.len(), 1);
        assert!(matches!(
            dl.find("nope").await,
            Err(DeadLetterError::NotFound(_))
        ));
        // --all leaves what it cannot requeue, and says so.
        lpush(
            &link,
            &keys.dead_letter,
            &new_record("b", "celery", 2.0, "w", &envelope("t2", "celery", 0)),
        )
        .await;
        let (requeued, skipped) = dl.requeue_all(None).await.unwrap();
        assert_eq!(requeued.len(), 1);
        assert_eq!(requeued[0].task_id.as_deref(), Some("t2"));
        assert_eq!(skipped.len(), 1);
        assert_eq!(lrange(&link, "celery").await.len(), 2);
        assert_eq!(dl.purge().await.unwrap(), 1);
        assert!(lrange(&link, &keys.dead_letter).await.is_empty());
    }

    fn broker_with_max(link: &RedisLink, keys: &Keys, max: u64) -> Broker {
        crate::broker::test_broker(link, keys, max)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_push_keeps_only_the_newest_records() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let broker = broker_with_max(&link, &keys, 3);
        // The reserve script's own records (not kombu envelopes at all).
        for i in 0..4 {
            lpush(&link, "celery", &format!("garbage {i}")).await;
        }
        let mut order = vec!["celery".to_owned()];
        let got = broker
            .fetch(&mut order, 10, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(got.len(), 4);
        assert!(got
            .iter()
            .all(|f| matches!(f, Fetched::DeadLettered { .. })));
        let kept: Vec<Record> = lrange(&link, &keys.dead_letter)
            .await
            .into_iter()
            .map(Record::parse)
            .collect();
        let raws: Vec<_> = kept.iter().map(|r| r.raw().unwrap().to_owned()).collect();
        assert_eq!(raws, ["garbage 3", "garbage 2", "garbage 1"]);
        let ids: HashSet<_> = kept.iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids.len(), 3, "ids must be unique: {ids:?}");
        assert!(kept
            .iter()
            .all(|r| r.fields.as_ref().unwrap().contains_key("id")));
        let counts = broker.dead_letter_counts();
        assert_eq!(counts.trimmed.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(counts.written.load(std::sync::atomic::Ordering::Relaxed), 4);

        // The plain push (no delivery tag) and the owned one trim too.
        assert!(broker
            .dead_letter(None, "celery", "plain", "r")
            .await
            .unwrap());
        let _: () = redis::pipe()
            .zadd(&keys.unacked_index, "held", 1)
            .hset(&keys.unacked, "held", "[{}, \"\", \"celery\"]")
            .query_async(&mut link.conn().await.unwrap())
            .await
            .unwrap();
        assert!(broker
            .dead_letter(Some("held"), "celery", "owned", "r")
            .await
            .unwrap());
        let raws: Vec<_> = lrange(&link, &keys.dead_letter)
            .await
            .into_iter()
            .map(|t| Record::parse(t).raw().unwrap().to_owned())
            .collect();
        assert_eq!(raws, ["owned", "plain", "garbage 3"]);
        assert_eq!(counts.trimmed.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(counts.written.load(std::sync::atomic::Ordering::Relaxed), 6);

        // 0 = no limit.
        let unlimited = broker_with_max(&link, &keys, 0);
        assert!(unlimited
            .dead_letter(None, "celery", "more", "r")
            .await
            .unwrap());
        assert_eq!(lrange(&link, &keys.dead_letter).await.len(), 4);
    }
}
