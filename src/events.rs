//! Celery events (SPEC §4): what Flower and `celery events` watch.
//!
//! Events are fanout messages: `PUBLISH /{db}.celeryev/<group>.<name>`
//! carrying a kombu envelope whose body is one JSON event. Worker events
//! (online, heartbeat, offline) are always sent — they are how monitors
//! know the worker is alive; task events only while enabled (`-E`, or
//! `enable_events` from Flower/`celery control`).
//!
//! Task events are buffered and published as JSON lists on
//! `task.multi`, as the Python worker does: one PUBLISH per batch instead
//! of three per task is what keeps `-E` cheap. The buffer is flushed
//! [`GATHER`] after its first event (Celery flushes on the next turn of
//! its event loop, so monitors see an idle worker's events at once), when
//! it holds 96 events, and before `worker-offline`. Each task
//! event is written straight to JSON text ([`Fields`]) instead of a map
//! of values: three events per task made that map building a visible part
//! of the parent's CPU, and with events off nothing is built at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::protocol::{pyjson, Envelope};
use crate::redis_link::RedisLink;

/// `sw_ident` shown by Flower; ours, so nobody mistakes us for py-celery.
pub const SW_IDENT: &str = "tori-worker";
pub const SW_VER: &str = env!("CARGO_PKG_VERSION");

/// Lamport clock shared by events and remote control (SPEC §4.5).
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// Advances for a message we send.
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// Merges a clock value we received: max(local, theirs) + 1.
    pub fn adjust(&self, theirs: u64) -> u64 {
        let mut current = self.0.load(Ordering::SeqCst);
        loop {
            let next = current.max(theirs) + 1;
            match self
                .0
                .compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(actual) => current = actual,
            }
        }
    }
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Publishes events for one node.
#[derive(Debug)]
pub struct Events {
    link: RedisLink,
    node: String,
    prefix: String,
    db: i64,
    task_events: AtomicBool,
    pub clock: Clock,
    /// Our pid, read once (`getpid` is a system call, three per task).
    pid: u32,
    /// `"hostname": "<node>", ` as JSON text, written into every event.
    hostname_json: String,
    /// Task events waiting for the next flush, already written as the
    /// batch's JSON list (open, without its closing bracket).
    buffer: Mutex<Pending>,
    /// Signalled by the first event into an empty buffer.
    queued: tokio::sync::Notify,
    full: tokio::sync::Notify,
}

/// Events per `task.multi` message at most. Celery flushes at 24; at tens
/// of thousands of events a second each PUBLISH (a round trip on the
/// events connection and a wake-up of the flusher) cost ~2 µs per task at
/// 24, so batches are larger. Receivers take lists of any length, and
/// [`GATHER`] still bounds how late an event is.
const BATCH: usize = 96;
/// How long the flusher lets events gather after the first one: the
/// events of one burst of work share a PUBLISH, and an event is never
/// later than this (it used to be 100 ms; a Python worker flushes on the
/// next turn of its loop). Under a drain a batch fills in less.
const GATHER: Duration = Duration::from_millis(5);

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Minus the local UTC offset in hours, as Celery reports it. Every event
/// carries it, and asking chrono for the local offset stats
/// `/etc/localtime` each time, so it is recomputed at most once a minute
/// (often enough for a daylight-saving change).
fn utcoffset() -> f64 {
    static CACHE: std::sync::Mutex<Option<(std::time::Instant, f64)>> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    match *cache {
        Some((at, v)) if at.elapsed() < std::time::Duration::from_secs(60) => v,
        _ => {
            let offset = chrono::Local::now().offset().local_minus_utc();
            let v = -f64::from(offset) / 3600.0;
            *cache = Some((std::time::Instant::now(), v));
            v
        }
    }
}

impl Events {
    pub fn new(link: RedisLink, node: &str, prefix: &str, task_events: bool) -> Self {
        let db = link.db();
        let hostname_json = format!("\"hostname\": {}", pyjson::to_string(node));
        Self {
            pid: std::process::id(),
            hostname_json,
            link,
            node: node.to_owned(),
            prefix: prefix.to_owned(),
            db,
            task_events: AtomicBool::new(task_events),
            clock: Clock::default(),
            buffer: Mutex::new(Pending::default()),
            queued: tokio::sync::Notify::new(),
            full: tokio::sync::Notify::new(),
        }
    }

    pub fn task_events_enabled(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Returns the previous state.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// Builds the event object with Celery's field order: hostname,
    /// utcoffset, pid, clock, specific fields, timestamp, type.
    pub fn event(&self, kind: &str, fields: Map<String, Value>) -> Map<String, Value> {
        let mut ev = Map::new();
        ev.insert("hostname".into(), json!(self.node));
        ev.insert("utcoffset".into(), json!(utcoffset()));
        ev.insert("pid".into(), json!(std::process::id()));
        ev.insert("clock".into(), json!(self.clock.tick()));
        for (k, v) in fields {
            ev.insert(k, v);
        }
        ev.insert("timestamp".into(), json!(epoch()));
        ev.insert("type".into(), json!(kind));
        ev
    }

    /// The PUBLISH channel and envelope for one event, or for a batch
    /// (`routing_key` `task.multi`, body a JSON list).
    fn envelope_for(&self, routing_key: &str, body: &str) -> (String, String) {
        let mut headers = Map::new();
        headers.insert("hostname".into(), json!(self.node));
        let mut env = Envelope::new(
            body.as_bytes(),
            crate::protocol::task_message::CONTENT_TYPE_JSON,
            headers,
            Map::new(),
            "celeryev",
            routing_key,
            0,
        );
        env.set_delivery_mode(1);
        let channel = format!("{}/{}.celeryev/{}", self.prefix, self.db, routing_key);
        (channel, env.to_json())
    }

    /// The PUBLISH channel and envelope for one event.
    pub fn envelope(&self, event: &Map<String, Value>) -> (String, String) {
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let routing_key = kind.replacen('-', ".", 1);
        self.envelope_for(&routing_key, &pyjson::to_string(event))
    }

    async fn publish(&self, channel: String, payload: String, what: &str) {
        let result = self
            .link
            .run(|mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, what, "could not publish event");
        }
    }

    /// Sends one event now; failures are logged, never fatal (events are
    /// best-effort in Celery too).
    pub async fn send(&self, kind: &str, fields: Map<String, Value>) {
        let event = self.event(kind, fields);
        let (channel, payload) = self.envelope(&event);
        self.publish(channel, payload, kind).await;
    }

    /// Queues a task event if task events are enabled; [`Events::flusher`]
    /// publishes the batch. `fill` writes the event's own fields and runs
    /// only when events are on. The event is written straight into the
    /// batch's JSON list: no allocation of its own, no join at flush.
    pub fn task(&self, kind: &str, fill: impl FnOnce(&mut Fields)) {
        if !self.task_events_enabled() {
            return;
        }
        let count = {
            let mut pending = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let mut f = Fields {
                out: std::mem::take(&mut pending.list),
            };
            f.out.push(if pending.count == 0 { b'[' } else { b',' });
            if pending.count > 0 {
                f.out.push(b' ');
            }
            self.write_task_event(&mut f, kind, fill);
            pending.list = f.out;
            pending.count += 1;
            pending.count
        };
        if count == 1 {
            self.queued.notify_one();
        }
        if count >= BATCH {
            self.full.notify_one();
        }
    }

    /// One task event as JSON, with Celery's field order: hostname,
    /// utcoffset, pid, clock, the event's fields, timestamp, type.
    fn write_task_event(&self, f: &mut Fields, kind: &str, fill: impl FnOnce(&mut Fields)) {
        f.out.push(b'{');
        f.out.extend_from_slice(self.hostname_json.as_bytes());
        f.field("utcoffset", &utcoffset())
            .field("pid", &self.pid)
            .field("clock", &self.clock.tick());
        fill(f);
        f.field("timestamp", &epoch()).field("type", kind);
        f.out.push(b'}');
    }

    #[cfg(test)]
    fn task_event_text(&self, kind: &str, fill: impl FnOnce(&mut Fields)) -> String {
        let mut f = Fields { out: Vec::new() };
        self.write_task_event(&mut f, kind, fill);
        String::from_utf8(f.out).expect("event JSON is ASCII (ensure_ascii)")
    }

    /// The `task.multi` envelope for a batch, written directly: the body is
    /// base64 (no escaping needed) and the rest is fixed, so going through
    /// [`Envelope`] and serde for ~10 KB per batch was wasted work. Same
    /// bytes as `envelope_for` (tested).
    fn batch_envelope(&self, body: &[u8]) -> String {
        use base64::Engine as _;
        let mut out = String::with_capacity(body.len() * 4 / 3 + 400);
        out.push_str("{\"body\": \"");
        base64::engine::general_purpose::STANDARD.encode_string(body, &mut out);
        out.push_str("\", \"content-encoding\": \"utf-8\", \"content-type\": \"");
        out.push_str(crate::protocol::task_message::CONTENT_TYPE_JSON);
        out.push_str("\", \"headers\": {");
        out.push_str(&self.hostname_json);
        out.push_str("}, \"properties\": {\"delivery_mode\": 1, \"delivery_info\": {\"exchange\": \"celeryev\", \"routing_key\": \"task.multi\"}, \"priority\": 0, \"body_encoding\": \"base64\", \"delivery_tag\": \"");
        out.push_str(&uuid::Uuid::new_v4().to_string());
        out.push_str("\"}}");
        out
    }

    /// Publishes buffered task events as one `task.multi` message. Events
    /// have a connection of their own: in the acks' pipeline a 10 KB
    /// PUBLISH delayed the acks (measured: −16 % instead of −8 % no-op
    /// throughput with `-E`).
    pub async fn flush(&self) {
        let mut list = {
            let mut pending = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            if pending.count == 0 {
                return;
            }
            pending.count = 0;
            std::mem::take(&mut pending.list)
        };
        list.push(b']');
        let payload = self.batch_envelope(&list);
        let channel = format!("{}/{}.celeryev/task.multi", self.prefix, self.db);
        let sent = self
            .link
            .batched(vec![redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .clone()])
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not publish task events");
        }
    }

    /// Flushes [`GATHER`] after an event arrives in an empty buffer, or
    /// as soon as a batch is full, until `stop` resolves; then flushes
    /// once more.
    pub async fn flusher(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = self.queued.notified() => {}
                _ = self.full.notified() => {}
                _ = &mut stop => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(GATHER) => {}
                _ = self.full.notified() => {}
                _ = &mut stop => break,
            }
            self.flush().await;
        }
        self.flush().await;
    }
}

/// Task events not yet published.
#[derive(Debug, Default)]
struct Pending {
    list: Vec<u8>,
    count: usize,
}

/// The fields of one task event, written as JSON text in call order.
#[derive(Debug)]
pub struct Fields {
    out: Vec<u8>,
}

impl Fields {
    /// Appends `"key": value`; `key` is a literal field name (ASCII, no
    /// quotes), so it is written as is.
    pub fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> &mut Self {
        self.out.extend_from_slice(b", \"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\": ");
        pyjson::write_to(&mut self.out, value);
        self
    }
}

/// Fields shared by worker-online/heartbeat/offline.
pub fn worker_fields(freq: f64, active: usize, processed: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("freq".into(), json!(freq));
    m.insert("active".into(), json!(active));
    m.insert("processed".into(), json!(processed));
    m.insert("loadavg".into(), json!(loadavg()));
    m.insert("sw_ident".into(), json!(SW_IDENT));
    m.insert("sw_ver".into(), json!(SW_VER));
    m.insert("sw_sys".into(), json!("Linux"));
    m
}

/// 1/5/15-minute load averages rounded to 2 decimals.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = (field.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clock_follows_lamport() {
        let c = Clock::default();
        assert_eq!(c.tick(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
    }

    /// Events for node `node` on a link that is never connected.
    fn offline_events(node: &str) -> Events {
        let link =
            RedisLink::open("redis://127.0.0.1:1/0", "test", Duration::from_secs(1)).unwrap();
        Events::new(link, node, "", true)
    }

    #[test]
    fn task_event_text_has_celery_field_order_and_types() {
        let events = offline_events("w@h\u{e9}");
        let text = events.task_event_text("task-received", |ev| {
            ev.field("uuid", "id-1")
                .field("args", "(1, 'x')")
                .field("retries", &0)
                .field("eta", &None::<String>);
        });
        let ev: Map<String, Value> = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = ev.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "hostname",
                "utcoffset",
                "pid",
                "clock",
                "uuid",
                "args",
                "retries",
                "eta",
                "timestamp",
                "type"
            ]
        );
        assert_eq!(ev["hostname"], json!("w@h\u{e9}"));
        assert!(text.is_ascii(), "ensure_ascii like Python: {text}");
        assert_eq!(ev["args"], json!("(1, 'x')"));
        assert_eq!(ev["eta"], Value::Null);
        assert_eq!(ev["type"], json!("task-received"));
        assert!(ev["timestamp"].as_f64().unwrap() > 1.7e9);
        assert_eq!(ev["clock"], json!(1));

        // Off: the fields are not even written.
        events.set_task_events(false);
        events.task("task-started", |_| panic!("built while events are off"));
        events.set_task_events(true);
        events.task("task-started", |ev| {
            ev.field("uuid", "id-1");
        });
        events.task("task-succeeded", |ev| {
            ev.field("uuid", "id-1").field("runtime", &0.5);
        });
        let mut list = events.buffer.lock().unwrap().list.clone();
        assert_eq!(events.buffer.lock().unwrap().count, 2);
        list.push(b']');
        let batch: Value = serde_json::from_slice(&list).unwrap();
        assert_eq!(batch[0]["type"], json!("task-started"));
        assert_eq!(batch[1]["type"], json!("task-succeeded"));
        assert_eq!(batch[1]["runtime"], json!(0.5));

        // The hand-written batch envelope is the one Envelope would build.
        let fast: Value = serde_json::from_str(&events.batch_envelope(&list)).unwrap();
        let (channel, slow) =
            events.envelope_for("task.multi", std::str::from_utf8(&list).unwrap());
        let mut slow: Value = serde_json::from_str(&slow).unwrap();
        slow["properties"]["delivery_tag"] = fast["properties"]["delivery_tag"].clone();
        assert_eq!(fast, slow);
        assert_eq!(
            serde_json::to_string(&fast).unwrap(),
            serde_json::to_string(&slow).unwrap(),
            "same key order"
        );
        assert_eq!(channel, "/0.celeryev/task.multi");
        let env = Envelope::parse(events.batch_envelope(&list).as_bytes()).unwrap();
        assert_eq!(env.body().unwrap(), list);
    }

    #[test]
    fn event_envelope_matches_celery_shape() {
        let events = offline_events("w@h");
        let ev = events.event("worker-heartbeat", worker_fields(2.0, 0, 0));
        let keys: Vec<&str> = ev.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "hostname",
                "utcoffset",
                "pid",
                "clock",
                "freq",
                "active",
                "processed",
                "loadavg",
                "sw_ident",
                "sw_ver",
                "sw_sys",
                "timestamp",
                "type"
            ]
        );
        let (channel, payload) = events.envelope(&ev);
        assert_eq!(channel, "/0.celeryev/worker.heartbeat");
        let env = Envelope::parse(payload.as_bytes()).unwrap();
        assert_eq!(env.exchange(), "celeryev");
        assert_eq!(env.routing_key(), "worker.heartbeat");
        assert_eq!(env.properties()["delivery_mode"], json!(1));
        assert_eq!(env.headers()["hostname"], json!("w@h"));
        let body: Value = serde_json::from_slice(&env.body().unwrap()).unwrap();
        assert_eq!(body["type"], json!("worker-heartbeat"));
        // Same property keys as a captured Celery event.
        let captured = std::fs::read(format!(
            "{}/tests/vectors/events/worker-heartbeat.raw",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let captured = Envelope::parse(&captured).unwrap();
        let ours: Vec<&String> = env.properties().keys().collect();
        let theirs: Vec<&String> = captured.properties().keys().collect();
        assert_eq!(ours, theirs);
    }
}
