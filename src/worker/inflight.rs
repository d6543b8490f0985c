//! Messages this worker holds unacknowledged, and what each is doing.
//!
//! The table answers three questions: which leases to refresh, which
//! messages to put back at shutdown, and (later) what `inspect active` /
//! `reserved` / `scheduled` list. A message leaves it when acked, parked
//! or restored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Received, waiting for a slot.
    Reserved,
    /// Waiting in memory for its ETA.
    Scheduled,
    /// Running in the pool.
    Active,
    /// Put back on its queue (by shutdown, a requeue, or parked for its
    /// ETA): no longer this worker's; its handler must stop.
    Restored,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// Unique per delivery: a message put back on its queue (worker lost)
    /// comes back with the same delivery tag, possibly while the first
    /// handler is still finishing; the serial keeps that handler from
    /// removing the new delivery's entry.
    pub serial: u64,
    pub task_id: String,
    pub task_name: String,
    pub queue: String,
    pub phase: Phase,
    /// Whether the message was already acknowledged (early ack); such an
    /// entry is only tracked for reporting, not for leases or restore.
    pub acked: bool,
    /// Its handler may have sent something that a failure would
    /// contradict: the next steps of its workflow or a retry. A panic from
    /// here on must not fail what comes after it. (A requeue or an ETA
    /// parking marks the entry `Restored` instead.)
    pub settling: bool,
    pub eta: Option<DateTime<Utc>>,
    pub args: Value,
    pub kwargs: Value,
    pub argsrepr: String,
    pub kwargsrepr: String,
    /// Epoch seconds when it started running.
    pub time_start: Option<f64>,
    /// Pid of the process running it, set by the pool (0 = not running).
    pub worker_pid: Arc<AtomicU32>,
    pub exchange: String,
    pub routing_key: String,
    pub priority: u8,
    pub redelivered: bool,
    /// Notified by `revoke(terminate=True)`: the pool kills the process
    /// running it.
    pub terminate: Arc<Notify>,
    /// The signal `revoke(terminate=True, signal=...)` asked for.
    pub terminate_signal: Arc<AtomicI32>,
}

impl Entry {
    /// Celery's request-info object (`inspect active/reserved`), keys in
    /// Celery's order. With `safe`, args/kwargs are their repr strings.
    pub fn request_info(&self, node: &str, safe: bool) -> Value {
        let (args, kwargs) = if safe {
            (json!(self.argsrepr), json!(self.kwargsrepr))
        } else {
            (self.args.clone(), self.kwargs.clone())
        };
        json!({
            "id": self.task_id,
            "name": self.task_name,
            "args": args,
            "kwargs": kwargs,
            "type": self.task_name,
            "hostname": node,
            "time_start": self.time_start,
            "acknowledged": self.acked,
            "delivery_info": {
                "exchange": self.exchange,
                "routing_key": self.routing_key,
                "priority": self.priority,
                "redelivered": self.redelivered,
            },
            "worker_pid": match self.worker_pid.load(Ordering::Relaxed) {
                0 => None,
                pid => Some(pid),
            },
        })
    }
}

#[derive(Debug, Default)]
pub struct InFlight {
    entries: Mutex<HashMap<String, Entry>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every update is a single insert/remove/assign).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, tag: &str, entry: Entry) {
        self.lock().insert(tag.to_owned(), entry);
    }

    pub fn remove(&self, tag: &str) -> Option<Entry> {
        self.lock().remove(tag)
    }

    /// Removes `tag` only if it is still the delivery `serial`.
    pub fn remove_delivery(&self, tag: &str, serial: u64) {
        let mut map = self.lock();
        if map.get(tag).is_some_and(|e| e.serial == serial) {
            map.remove(tag);
        }
    }

    /// A fresh delivery serial.
    pub fn next_serial() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves `tag` to `phase` unless shutdown already restored it; returns
    /// false when the handler must abandon the message.
    pub fn advance(&self, tag: &str, phase: Phase) -> bool {
        match self.lock().get_mut(tag) {
            Some(e) if e.phase != Phase::Restored => {
                e.phase = phase;
                true
            }
            _ => false,
        }
    }

    /// Records that the task started running.
    pub fn set_started(&self, tag: &str, time_start: f64) {
        if let Some(e) = self.lock().get_mut(tag) {
            e.time_start = Some(time_start);
        }
    }

    /// Entries in `phase`, for inspect replies.
    pub fn in_phase(&self, phase: Phase) -> Vec<Entry> {
        self.lock()
            .values()
            .filter(|e| e.phase == phase)
            .cloned()
            .collect()
    }

    /// Reads part of an entry without cloning all of it (the per-task
    /// path asks a few times per message).
    pub fn view<R>(&self, tag: &str, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        self.lock().get(tag).map(f)
    }

    pub fn by_task_id(&self, task_id: &str) -> Option<Entry> {
        self.lock().values().find(|e| e.task_id == task_id).cloned()
    }

    pub fn mark_acked(&self, tag: &str) {
        if let Some(e) = self.lock().get_mut(tag) {
            e.acked = true;
        }
    }

    /// Marks `tag` acked for an early ack, unless shutdown already put it
    /// back on its queue (then acking would delete the entry of whichever
    /// worker takes it next): whether the ack may go out.
    pub fn mark_acked_unless_restored(&self, tag: &str) -> bool {
        match self.lock().get_mut(tag) {
            Some(e) if e.phase != Phase::Restored => {
                e.acked = true;
                true
            }
            _ => false,
        }
    }

    /// See [`Entry::settling`].
    pub fn mark_settling(&self, tag: &str) {
        if let Some(e) = self.lock().get_mut(tag) {
            e.settling = true;
        }
    }

    /// Tags whose lease must be kept fresh (everything not yet acked).
    pub fn lease_tags(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, e)| !e.acked && e.phase != Phase::Restored)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Marks every not-yet-started message as restored and returns their
    /// tags, so shutdown can put them back while their handlers stand down.
    pub fn take_unstarted(&self) -> Vec<String> {
        let mut map = self.lock();
        let mut tags = Vec::new();
        for (tag, e) in map.iter_mut() {
            if matches!(e.phase, Phase::Reserved | Phase::Scheduled) && !e.acked {
                e.phase = Phase::Restored;
                tags.push(tag.clone());
            }
        }
        tags
    }

    /// Marks running, unacked (late-ack) messages as restored: used when a
    /// shutdown gives up waiting for them.
    pub fn take_running_unacked(&self) -> Vec<(String, Entry)> {
        let mut map = self.lock();
        let mut out = Vec::new();
        for (tag, e) in map.iter_mut() {
            if e.phase == Phase::Active && !e.acked {
                e.phase = Phase::Restored;
                out.push((tag.clone(), e.clone()));
            }
        }
        out
    }

    pub fn count(&self, phase: Phase) -> usize {
        self.lock().values().filter(|e| e.phase == phase).count()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Running tasks that were acked early: lost if the process must stop.
    pub fn running_acked(&self) -> Vec<Entry> {
        self.lock()
            .values()
            .filter(|e| e.phase == Phase::Active && e.acked)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(phase: Phase) -> Entry {
        Entry {
            serial: InFlight::next_serial(),
            task_id: "id".into(),
            task_name: "t".into(),
            queue: "q".into(),
            phase,
            acked: false,
            settling: false,
            eta: None,
            args: json!([]),
            kwargs: json!({}),
            argsrepr: "()".into(),
            kwargsrepr: "{}".into(),
            time_start: None,
            worker_pid: Arc::default(),
            exchange: String::new(),
            routing_key: "q".into(),
            priority: 0,
            redelivered: false,
            terminate: Arc::default(),
            terminate_signal: Arc::default(),
        }
    }

    #[test]
    fn shutdown_takes_only_unstarted_and_blocks_their_start() {
        let f = InFlight::default();
        f.insert("a", entry(Phase::Reserved));
        f.insert("b", entry(Phase::Active));
        f.insert("c", entry(Phase::Scheduled));
        let mut taken = f.take_unstarted();
        taken.sort();
        assert_eq!(taken, vec!["a", "c"]);
        assert!(
            !f.advance("a", Phase::Active),
            "a restored message must not start"
        );
        assert_eq!(f.lease_tags(), vec!["b".to_owned()]);
    }

    #[test]
    fn an_early_ack_never_follows_a_shutdown_restore() {
        let f = InFlight::default();
        f.insert("a", entry(Phase::Active));
        f.insert("b", entry(Phase::Active));
        // Shutdown gave up on "a" and put it back on its queue.
        assert_eq!(f.take_running_unacked().len(), 2);
        f.insert("b", entry(Phase::Active));
        assert!(
            !f.mark_acked_unless_restored("a"),
            "a restored message must not be acked"
        );
        assert!(f.mark_acked_unless_restored("b"));
        assert!(!f.mark_acked_unless_restored("gone"));
        assert_eq!(f.view("a", |e| e.acked), Some(false));
        assert_eq!(f.view("b", |e| e.acked), Some(true));
    }

    #[test]
    fn acked_entries_need_no_lease() {
        let f = InFlight::default();
        f.insert("a", entry(Phase::Active));
        f.mark_acked("a");
        assert!(f.lease_tags().is_empty());
        assert_eq!(f.running_acked().len(), 1);
    }

    #[test]
    fn a_finished_handler_does_not_remove_the_redelivered_entry() {
        let t = InFlight::default();
        let first = entry(Phase::Active);
        let first_serial = first.serial;
        t.insert("tag", first);
        // Put back on the queue and fetched again before the first handler
        // cleaned up: same tag, new delivery.
        let second = entry(Phase::Reserved);
        let second_serial = second.serial;
        t.insert("tag", second);
        t.remove_delivery("tag", first_serial);
        assert_eq!(t.view("tag", |e| e.serial), Some(second_serial));
        t.remove_delivery("tag", second_serial);
        assert!(t.view("tag", |_| ()).is_none());
    }
}
