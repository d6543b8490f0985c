//! The kombu-compatible Redis transport (SPEC §1).
//!
//! Knows queues, envelopes and delivery tags; knows nothing of tasks.
//! Everything here interoperates with Python workers on the same database:
//! they restore our stale messages and we restore theirs.

pub mod keys;
pub mod scripts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisError, Value as RedisValue};
use serde_json::{json, Value};

use crate::protocol::{pyjson, Envelope};
use crate::redis_link::RedisLink;
use keys::{Keys, SEP};

/// A message popped from a queue and recorded in `unacked`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The queue (not list key) it came from.
    pub queue: String,
    /// The exact bytes that were in the list (and are in `unacked`).
    pub raw: String,
    pub envelope: Envelope,
}

/// What a fetch produced for one popped item.
#[derive(Debug)]
pub enum Fetched {
    Message(Delivery),
    /// Not a kombu envelope; already moved to the dead-letter list.
    DeadLettered {
        queue: String,
        raw: String,
    },
    /// Recorded in `unacked` under `tag`, but not parseable here (e.g. not
    /// UTF-8); the caller must dead-letter it.
    Unreadable {
        queue: String,
        raw: String,
        tag: String,
        error: String,
    },
    /// Recorded in `unacked` under `tag`, but larger than
    /// `max_message_size`, so not parsed; the caller must settle it.
    TooLarge {
        queue: String,
        raw: String,
        tag: String,
        size: usize,
        limit: usize,
    },
}

/// How to reach the queues, as configured.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub queues: Vec<String>,
    pub keys: Keys,
    pub visibility_timeout: Duration,
    pub worker_name: String,
    /// Messages larger than this many bytes are not parsed
    /// ([`Fetched::TooLarge`]); `None` for no limit.
    pub max_message_size: Option<usize>,
    /// Most records kept in the dead-letter list (`--dead-letter-max`);
    /// 0 = no limit.
    pub dead_letter_max: u64,
}

/// Dead letters this process wrote, and old records its pushes trimmed
/// off the list (for `/metrics`).
#[derive(Debug, Default)]
pub struct DeadLetterCounts {
    pub written: AtomicU64,
    pub trimmed: AtomicU64,
}

/// Commands on the shared transport keys.
#[derive(Debug, Clone)]
pub struct Broker {
    link: RedisLink,
    /// Separate connection for BRPOP, which blocks the connection it runs on.
    blocking: RedisLink,
    config: BrokerConfig,
    /// Early acks waiting for the next batched write (see `ack_deferred`).
    early_acks: Arc<Mutex<EarlyAcks>>,
    dead_letters: Arc<DeadLetterCounts>,
}

/// Early acks gathered until their write goes out, and who waits on each.
#[derive(Debug, Default)]
struct EarlyAcks {
    tags: Vec<String>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), RedisError>>>,
}

/// kombu's `unacked` hash value: `[message, exchange, routing_key]`.
fn unacked_entry(raw: &str, exchange: &str, routing_key: &str) -> String {
    format!(
        "[{raw}, {}, {}]",
        serde_json::Value::from(exchange),
        serde_json::Value::from(routing_key)
    )
}

/// An ack's MULTI/ZREM/HDEL/EXEC replies: an error if Redis refused any.
fn ack_replies(replies: Result<Vec<RedisValue>, RedisError>) -> Result<(), RedisError> {
    for reply in replies? {
        if let RedisValue::ServerError(e) = reply {
            return Err(e.into());
        }
    }
    Ok(())
}

/// kombu's ack of `tags`: forget them in `unacked_index` and `unacked` in
/// one transaction.
fn ack_cmds_for<T: AsRef<str>>(keys: &Keys, tags: &[T]) -> Vec<redis::Cmd> {
    let mut zrem = redis::cmd("ZREM");
    zrem.arg(&keys.unacked_index);
    let mut hdel = redis::cmd("HDEL");
    hdel.arg(&keys.unacked);
    for tag in tags {
        zrem.arg(tag.as_ref());
        hdel.arg(tag.as_ref());
    }
    vec![redis::cmd("MULTI"), zrem, hdel, redis::cmd("EXEC")]
}

/// The early-ack queue survives a panicking holder: it is plain data.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `unacked_index` score of a lease: the time in whole seconds, rounded
/// up. kombu writes the float time, and Redis keeps a fractional score of a
/// small sorted set as text printed with `%.17g`: that made ZADD the
/// costliest command of a reservation (4.5 µs a call against 1.9 µs for a
/// whole number, measured on one Redis 7.0). Rounded up, a message looks at
/// most a second younger, so it is restored at most a second after kombu
/// would restore it, never before; kombu's restore only compares scores.
fn lease_score() -> u64 {
    now_epoch().ceil() as u64
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Broker {
    pub fn new(link: RedisLink, blocking: RedisLink, config: BrokerConfig) -> Self {
        Self {
            link,
            blocking,
            config,
            early_acks: Arc::default(),
            dead_letters: Arc::default(),
        }
    }

    /// Dead letters written and old records trimmed, since start.
    pub fn dead_letter_counts(&self) -> &DeadLetterCounts {
        &self.dead_letters
    }

    /// Counts `written` new dead letters whose push trimmed `trimmed` old
    /// ones, and says so: trimmed records are gone for good.
    fn count_dead_letters(&self, written: u64, trimmed: u64) {
        if trimmed > 0 {
            self.dead_letters
                .trimmed
                .fetch_add(trimmed, Ordering::Relaxed);
            tracing::warn!(
                trimmed,
                max = self.config.dead_letter_max,
                dead_letter = %self.config.keys.dead_letter,
                "dead-letter list is full (--dead-letter-max): dropped its oldest records"
            );
        }
        // After the trimmed count: whoever sees a write counted sees what
        // it trimmed.
        self.dead_letters
            .written
            .fetch_add(written, Ordering::Relaxed);
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.config.keys
    }

    /// The connection blocking fetches (BRPOP) use.
    pub fn blocking_link(&self) -> &RedisLink {
        &self.blocking
    }

    pub fn link(&self) -> &RedisLink {
        &self.link
    }

    /// Declares the consumed queues the way a Python worker does, so Python
    /// producers and `celery inspect active_queues` see the same bindings.
    pub async fn declare_queues(&self, queues: &[String]) -> Result<(), RedisError> {
        let prefix = &self.config.keys.prefix;
        self.link
            .retry("declare queues", |mut c| {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for q in queues {
                    let member = keys::binding_member(q, "", q);
                    pipe.sadd(keys::binding_key(prefix, q), &member).ignore();
                    pipe.sadd(keys::binding_permanent_key(prefix, q), &member)
                        .ignore();
                }
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await
    }

    /// Takes up to `max` waiting messages in one atomic step each, waiting
    /// up to `wait` (BRPOP) when every queue is empty. `order` is the
    /// current round-robin order of `queues`, rotated in place like kombu.
    pub async fn fetch(
        &self,
        order: &mut Vec<String>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Fetched>, RedisError> {
        let mut got = self.reserve(order, max, None).await?;
        if !got.is_empty() || max == 0 {
            return Ok(got);
        }
        let list_keys = keys::consume_keys(&self.config.keys.prefix, order);
        // The message as bytes: one that is not UTF-8 is still taken and
        // recorded (then dead-lettered), never lost to a failed conversion
        // after BRPOP already removed it from its list.
        let popped: Option<(String, Vec<u8>)> = self
            .blocking
            .run(|mut c| {
                let cmd = redis::cmd("BRPOP")
                    .arg(&list_keys)
                    .arg(wait.as_secs_f64())
                    .clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        if let Some((key, msg)) = popped {
            let index = list_keys
                .iter()
                .position(|k| *k == key)
                .map(|i| i + 1)
                .unwrap_or(1);
            // Record it at once; this is the one window kombu also has.
            got = self
                .link
                .retry("reserve popped message", |c| {
                    self.reserve_with(c, order.clone(), max, Some((msg.clone(), index)))
                })
                .await?;
            rotate(order, &got);
        }
        Ok(got)
    }

    async fn reserve(
        &self,
        order: &mut Vec<String>,
        max: usize,
        preset: Option<(Vec<u8>, usize)>,
    ) -> Result<Vec<Fetched>, RedisError> {
        let snapshot = order.clone();
        let got = self
            .link
            .run(|c| self.reserve_with(c, snapshot, max, preset))
            .await?;
        rotate(order, &got);
        Ok(got)
    }

    async fn reserve_with(
        &self,
        mut conn: MultiplexedConnection,
        order: Vec<String>,
        max: usize,
        preset: Option<(Vec<u8>, usize)>,
    ) -> Result<Vec<Fetched>, RedisError> {
        let k = &self.config.keys;
        let list_keys = keys::consume_keys(&k.prefix, &order);
        let mut inv = scripts::RESERVE.prepare_invoke();
        inv.key(&k.unacked)
            .key(&k.unacked_index)
            .key(&k.dead_letter);
        for key in &list_keys {
            inv.key(key);
        }
        let (preset_msg, preset_index) = preset.unwrap_or_default();
        inv.arg(lease_score())
            .arg(max)
            .arg(order.len())
            .arg(&self.config.worker_name)
            .arg(preset_msg)
            .arg(preset_index)
            .arg(self.config.dead_letter_max)
            .arg(uuid::Uuid::new_v4().simple().to_string());
        let reply: Vec<RedisValue> = inv.invoke_async(&mut conn).await?;
        let mut out = Vec::with_capacity(reply.len() / 6);
        let mut fix = redis::pipe();
        fix.atomic();
        let mut needs_fix = false;
        let mut items = reply.into_iter();
        let trimmed: u64 = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => 0,
        };
        while let (Some(q), Some(msg), Some(status), Some(tag), Some(ex), Some(rk)) = (
            items.next(),
            items.next(),
            items.next(),
            items.next(),
            items.next(),
            items.next(),
        ) {
            let (q, status, tag, ex, rk) = (&q, &status, &tag, &ex, &rk);
            let q: usize = redis::from_redis_value_ref(q)?;
            // Taken, not copied: the message is the largest part of a reply.
            let raw: Vec<u8> = match msg {
                RedisValue::BulkString(bytes) => bytes,
                other => redis::from_redis_value(other)?,
            };
            let status: i64 = redis::from_redis_value_ref(status)?;
            let tag: String = redis::from_redis_value_ref(tag)?;
            let recorded = (
                tag.as_str(),
                redis::from_redis_value_ref::<String>(ex)?,
                redis::from_redis_value_ref::<String>(rk)?,
            );
            let queue = order.get(q.saturating_sub(1)).cloned().unwrap_or_default();
            if let Some(limit) = self.config.max_message_size.filter(|l| raw.len() > *l) {
                if status == 1 {
                    // Not parsed: the envelope alone would copy the body.
                    out.push(Fetched::TooLarge {
                        queue,
                        size: raw.len(),
                        raw: String::from_utf8(raw)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                        tag,
                        limit,
                    });
                } else {
                    out.push(Fetched::DeadLettered {
                        queue,
                        raw: String::from_utf8_lossy(&raw).into_owned(),
                    });
                }
                continue;
            }
            let raw = match String::from_utf8(raw) {
                Ok(raw) => raw,
                // Already dead-lettered by the script (no delivery tag):
                // nothing of ours to settle.
                Err(e) if status != 1 => {
                    out.push(Fetched::DeadLettered {
                        queue,
                        raw: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    });
                    continue;
                }
                Err(e) => {
                    let raw = String::from_utf8_lossy(e.as_bytes()).into_owned();
                    out.push(Fetched::Unreadable {
                        queue,
                        raw,
                        tag,
                        error: "message is not UTF-8".into(),
                    });
                    continue;
                }
            };
            if status == 1 {
                match Envelope::parse(raw.as_bytes()) {
                    Ok(envelope) => {
                        let actual = (
                            envelope.delivery_tag(),
                            envelope.exchange(),
                            envelope.routing_key(),
                        );
                        if actual != (recorded.0, recorded.1.as_str(), recorded.2.as_str()) {
                            // The script's text search read another
                            // layout wrongly: record it as parsed.
                            tracing::warn!(recorded = ?recorded, parsed = ?actual, "unusual envelope layout; re-recording its unacked entry");
                            needs_fix = true;
                            fix.zrem(&k.unacked_index, &tag)
                                .hdel(&k.unacked, &tag)
                                .zadd(&k.unacked_index, actual.0, now_epoch())
                                .hset(
                                    &k.unacked,
                                    actual.0,
                                    unacked_entry(&raw, actual.1, actual.2),
                                );
                        }
                        out.push(Fetched::Message(Delivery {
                            queue,
                            raw,
                            envelope,
                        }))
                    }
                    Err(e) => out.push(Fetched::Unreadable {
                        queue,
                        raw,
                        tag,
                        error: e.to_string(),
                    }),
                }
            } else {
                out.push(Fetched::DeadLettered { queue, raw });
            }
        }
        let dead = out
            .iter()
            .filter(|f| matches!(f, Fetched::DeadLettered { .. }))
            .count() as u64;
        if dead > 0 {
            self.count_dead_letters(dead, trimmed);
        }
        if needs_fix {
            // Not retried with the reservation (that would pop again): if
            // this fails, the wrongly keyed entry is restored by the sweep
            // after the visibility timeout, so the message is not lost.
            if let Err(e) = fix.query_async::<()>(&mut conn).await {
                tracing::error!(error = %e, "could not re-record an unacked entry; the message may run twice");
            }
        }
        Ok(out)
    }

    /// Acknowledges: the message is done and forgotten (MULTI ZREM/HDEL,
    /// as kombu does). Goes out with the other writes ready at the same
    /// moment (`RedisLink::batched`); returns once Redis applied it.
    pub async fn ack(&self, tag: &str) -> Result<(), RedisError> {
        ack_replies(self.link.batched(self.ack_cmds(tag)).await)
    }

    /// An ack that may wait a moment (`redis_batch::LINGER`) to travel with
    /// the next write, such as the task's own result: for an early ack,
    /// which nothing waits on. Queued when called.
    ///
    /// Every early ack queued until that write goes out shares one
    /// MULTI/ZREM/HDEL/EXEC naming all their tags, where each used to send
    /// its own four commands: during a drain those were about a third of
    /// Redis's commands, and Redis shares the cores with the pool.
    pub fn ack_deferred(
        &self,
        tag: &str,
    ) -> impl std::future::Future<Output = Result<(), RedisError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let first = {
            let mut acks = lock(&self.early_acks);
            acks.tags.push(tag.to_owned());
            acks.waiters.push(tx);
            acks.tags.len() == 1
        };
        if first {
            self.send_early_acks();
        }
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "the ack was dropped before it was sent (the worker is exiting)",
                )))
            })
        }
    }

    /// Queues one deferred write that takes every early ack gathered when it
    /// is sent, and hands each waiter the shared outcome.
    fn send_early_acks(&self) {
        let gathered = self.early_acks.clone();
        let taken: Arc<Mutex<Vec<_>>> = Arc::default();
        let keys = self.config.keys.clone();
        let waiters = taken.clone();
        let replies = self.link.batched_deferred_with(move || {
            let acks = std::mem::take(&mut *lock(&gathered));
            *lock(&waiters) = acks.waiters;
            ack_cmds_for(&keys, &acks.tags)
        });
        let gathered = self.early_acks.clone();
        tokio::spawn(async move {
            let outcome = ack_replies(replies.await);
            let mut waiters = std::mem::take(&mut *lock(&taken));
            if waiters.is_empty() {
                // Never built: the write loop stopped first. Whoever queued
                // behind this write is told so instead of waiting for ever.
                waiters = std::mem::take(&mut *lock(&gathered)).waiters;
            }
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        });
    }

    fn ack_cmds(&self, tag: &str) -> Vec<redis::Cmd> {
        ack_cmds_for(&self.config.keys, &[tag])
    }

    /// Moves an unacked message to the dead-letter list with a reason, in
    /// one step, so it is neither lost nor redelivered forever. Returns
    /// `false`, and leaves the message alone, when it is no longer ours: a
    /// sweep restored it meanwhile, so it waits on its queue for its next
    /// delivery, and it must not sit in the dead-letter list as well.
    pub async fn dead_letter(
        &self,
        delivery_tag: Option<&str>,
        queue: &str,
        raw: &str,
        reason: &str,
    ) -> Result<bool, RedisError> {
        let k = &self.config.keys;
        let max = self.config.dead_letter_max;
        let record = crate::dead_letter::new_record(
            reason,
            queue,
            now_epoch(),
            &self.config.worker_name,
            raw,
        );
        let Some(tag) = delivery_tag else {
            // LPUSH and the cap's LTRIM in one transaction; LPUSH's reply
            // (the length) says how many the trim dropped.
            let (len,): (u64,) = self
                .link
                .retry("dead-letter", |mut c| {
                    let mut pipe = redis::pipe();
                    pipe.atomic().lpush(&k.dead_letter, &record);
                    if max > 0 {
                        pipe.ltrim(&k.dead_letter, 0, max as isize - 1).ignore();
                    }
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            let trimmed = if max > 0 { len.saturating_sub(max) } else { 0 };
            self.count_dead_letters(1, trimmed);
            return Ok(true);
        };
        let (moved, trimmed): (i64, u64) = self
            .link
            .retry("dead-letter", |mut c| {
                let mut inv = scripts::DEAD_LETTER_OWNED.prepare_invoke();
                inv.key(&k.unacked)
                    .key(&k.unacked_index)
                    .key(&k.dead_letter)
                    .arg(tag)
                    .arg(&record)
                    .arg(max);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        if moved == 1 {
            self.count_dead_letters(1, trimmed);
        } else {
            tracing::warn!(
                delivery_tag = tag,
                reason,
                "not dead-lettered: the message was restored to its queue meanwhile and will be delivered again"
            );
        }
        Ok(moved == 1)
    }

    /// Keeps our in-flight messages from looking abandoned: the sweep (ours
    /// or a Python worker's) restores only entries older than the
    /// visibility timeout, so refreshing their score means a long task is
    /// never handed to a second worker. `XX`: never resurrect an entry that
    /// was already acked or restored.
    pub async fn refresh_leases(&self, tags: &[String]) -> Result<(), RedisError> {
        if tags.is_empty() {
            return Ok(());
        }
        let k = &self.config.keys;
        let now = lease_score();
        for chunk in tags.chunks(500) {
            self.link
                .run(|mut c| {
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(&k.unacked_index).arg("XX");
                    for tag in chunk {
                        cmd.arg(now).arg(tag);
                    }
                    async move { cmd.query_async::<()>(&mut c).await }
                })
                .await?;
        }
        Ok(())
    }

    /// Where a message published to (exchange, routing_key) goes: for the
    /// default exchange the routing key is the queue; otherwise the
    /// exchange's binding table decides (direct match).
    pub async fn route(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, RedisError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let key = keys::binding_key(&self.config.keys.prefix, exchange);
        let members: Vec<String> = self
            .link
            .retry("read bindings", |mut c| {
                let key = key.clone();
                async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await }
            })
            .await?;
        let mut queues: Vec<String> = members
            .iter()
            .filter_map(|m| keys::parse_binding_member(m))
            .filter(|(rk, _, _)| *rk == routing_key)
            .map(|(_, _, q)| q.to_owned())
            .collect();
        queues.dedup();
        Ok(queues)
    }

    /// Publishes a new message (LPUSH, the back of the queue).
    pub async fn publish(
        &self,
        envelope: &Envelope,
        exchange: &str,
        routing_key: &str,
    ) -> Result<usize, RedisError> {
        let queues = self.route(exchange, routing_key).await?;
        let body = envelope.to_json();
        let prefix = &self.config.keys.prefix;
        let priority = envelope.priority();
        let lists: Vec<String> = queues
            .iter()
            .map(|q| keys::queue_list_key(prefix, q, priority))
            .collect();
        if lists.is_empty() {
            tracing::warn!(
                exchange,
                routing_key,
                "published message matched no queue; kombu drops it too"
            );
            return Ok(0);
        }
        self.link
            .retry("publish", |mut c| {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for list in &lists {
                    pipe.lpush(list, &body).ignore();
                }
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await?;
        Ok(lists.len())
    }

    /// Restores one unacked message to the consuming end of its queue with
    /// `redelivered` set (kombu's `restore_by_tag`). With `requeue` it goes
    /// to the back instead (kombu's `basic_reject(requeue=True)`).
    /// Returns false if the message was no longer in `unacked`.
    pub async fn restore(&self, tag: &str, requeue: bool) -> Result<bool, RedisError> {
        let k = &self.config.keys;
        let stored: Option<String> = self
            .link
            .retry("read unacked", |mut c| {
                let cmd = redis::cmd("HGET").arg(&k.unacked).arg(tag).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        let Some(stored) = stored else {
            let _: () = self
                .link
                .retry("drop stale index entry", |mut c| {
                    let cmd = redis::cmd("ZREM").arg(&k.unacked_index).arg(tag).clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            return Ok(false);
        };
        let parsed: Option<(Envelope, String, String)> =
            serde_json::from_str::<Value>(&stored).ok().and_then(|v| {
                let arr = v.as_array()?;
                let env = Envelope::parse(pyjson::to_string(arr.first()?).as_bytes()).ok()?;
                let ex = arr.get(1)?.as_str()?.to_owned();
                let rk = arr.get(2)?.as_str()?.to_owned();
                Some((env, ex, rk))
            });
        let Some((mut envelope, exchange, routing_key)) = parsed else {
            tracing::error!(
                delivery_tag = tag,
                "unacked entry is unreadable; moving it to the dead-letter list"
            );
            self.dead_letter(Some(tag), "", &stored, "unreadable unacked entry")
                .await?;
            return Ok(false);
        };
        envelope.mark_redelivered();
        let queues = self.route(&exchange, &routing_key).await?;
        if queues.is_empty() {
            tracing::error!(
                delivery_tag = tag,
                exchange,
                routing_key,
                "no queue to restore to; moving it to the dead-letter list"
            );
            self.dead_letter(Some(tag), "", &stored, "no queue bound for restore")
                .await?;
            return Ok(false);
        }
        let prefix = &k.prefix;
        let lists: Vec<String> = queues
            .iter()
            .map(|q| keys::queue_list_key(prefix, q, envelope.priority()))
            .collect();
        let message = envelope.to_json();
        let outcome: i64 = self
            .link
            .retry("restore", |mut c| {
                let mut inv = scripts::RESTORE.prepare_invoke();
                inv.key(&k.unacked).key(&k.unacked_index);
                for l in &lists {
                    inv.key(l);
                }
                inv.arg(tag)
                    .arg(&stored)
                    .arg(&message)
                    .arg(if requeue { "L" } else { "R" });
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(outcome == 1)
    }

    /// kombu's `restore_visible`: under `unacked_mutex`, puts back every
    /// message whose lease is older than the visibility timeout. Returns
    /// how many were restored; 0 when another consumer holds the mutex.
    pub async fn restore_visible(&self) -> Result<usize, RedisError> {
        let k = &self.config.keys;
        let token = uuid::Uuid::new_v4().to_string();
        let acquired: Option<String> = self
            .link
            .run(|mut c| {
                let cmd = redis::cmd("SET")
                    .arg(&k.unacked_mutex)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(300_000)
                    .clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        if acquired.is_none() {
            return Ok(0);
        }
        let ceiling = now_epoch() - self.config.visibility_timeout.as_secs_f64();
        let result = async {
            let stale: Vec<String> = self
                .link
                .run(|mut c| {
                    let cmd = redis::cmd("ZRANGEBYSCORE")
                        .arg(&k.unacked_index)
                        .arg("-inf")
                        .arg(ceiling)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(1000)
                        .clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            let mut restored = 0;
            for tag in &stale {
                if self.restore(tag, false).await? {
                    tracing::warn!(delivery_tag = %tag, "restored a message whose lease expired (its worker died or stalled)");
                    restored += 1;
                }
            }
            Ok::<usize, RedisError>(restored)
        }
        .await;
        let _ = self
            .link
            .run(|mut c| {
                let mut inv = scripts::RELEASE_MUTEX.prepare_invoke();
                inv.key(&k.unacked_mutex).arg(&token);
                async move { inv.invoke_async::<i64>(&mut c).await }
            })
            .await;
        result
    }

    /// Parks a far-future ETA message in Redis instead of memory. It leaves
    /// `unacked` in the same step, so no visibility timeout can duplicate
    /// it. Returns false if the message was no longer ours.
    pub async fn park_eta(&self, delivery: &Delivery, due_epoch: f64) -> Result<bool, RedisError> {
        let k = &self.config.keys;
        let list = keys::queue_list_key(&k.prefix, &delivery.queue, delivery.envelope.priority());
        let member = pyjson::to_string(&json!([list, delivery.raw]));
        let tag = delivery.envelope.delivery_tag();
        let parked: i64 = self
            .link
            .retry("park eta", |mut c| {
                let mut inv = scripts::PARK_ETA.prepare_invoke();
                inv.key(&k.unacked).key(&k.unacked_index).key(&k.eta_parked);
                inv.arg(tag).arg(due_epoch).arg(&member);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(parked == 1)
    }

    /// Moves parked ETA messages due within `lead` back to their queues.
    pub async fn release_due_eta(&self, lead: Duration) -> Result<usize, RedisError> {
        let k = &self.config.keys;
        let due_before = now_epoch() + lead.as_secs_f64();
        self.link
            .run(|mut c| {
                let mut inv = scripts::RELEASE_DUE_ETA.prepare_invoke();
                inv.key(&k.eta_parked).arg(due_before).arg(1000);
                async move { inv.invoke_async(&mut c).await }
            })
            .await
    }

    /// Counts one more delivery of `task_id` that killed its pool process
    /// and returns the total (kept 7 days).
    pub async fn count_lost_delivery(&self, task_id: &str) -> Result<u64, RedisError> {
        let key = format!("{}{task_id}", self.config.keys.lost_prefix);
        self.count_one_more(&key, "count lost delivery").await
    }

    /// INCR of a counter kept 7 days after its last count.
    async fn count_one_more(&self, key: &str, what: &str) -> Result<u64, RedisError> {
        let (count,): (u64,) = self
            .link
            .retry(what, |mut c| {
                let mut pipe = redis::pipe();
                pipe.atomic().incr(key, 1).expire(key, 7 * 86_400).ignore();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(count)
    }

    /// Counts one more round of the delivery `tag` that ended unsettled
    /// (its handler panicked, and so did settling that) and returns the
    /// total (kept 7 days; a restored message keeps its tag).
    pub async fn count_unsettled_round(&self, tag: &str) -> Result<u64, RedisError> {
        let key = format!("{}{tag}", self.config.keys.unsettled_prefix);
        self.count_one_more(&key, "count unsettled round").await
    }

    /// How many rounds of the delivery `tag` ended unsettled so far.
    pub async fn unsettled_rounds(&self, tag: &str) -> Result<u64, RedisError> {
        let key = format!("{}{tag}", self.config.keys.unsettled_prefix);
        let count: Option<u64> = self
            .link
            .retry("read unsettled rounds", |mut c| {
                let cmd = redis::cmd("GET").arg(&key).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        Ok(count.unwrap_or(0))
    }

    /// Length of each consumed queue including its priority lists.
    pub async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<(String, u64)>, RedisError> {
        let prefix = &self.config.keys.prefix;
        let mut out = Vec::new();
        for q in queues {
            let lists: Vec<String> = keys::PRIORITY_STEPS
                .iter()
                .map(|s| keys::queue_list_key(prefix, q, *s))
                .collect();
            let lens: Vec<u64> = self
                .link
                .run(|mut c| {
                    let mut pipe = redis::pipe();
                    for l in &lists {
                        pipe.llen(l);
                    }
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            out.push((q.clone(), lens.iter().sum()));
        }
        Ok(out)
    }
}

/// Applies kombu's round-robin rule: a queue that just delivered moves to
/// the end of the cycle.
fn rotate(order: &mut Vec<String>, fetched: &[Fetched]) {
    for f in fetched {
        let queue = match f {
            Fetched::Message(d) => &d.queue,
            Fetched::DeadLettered { queue, .. }
            | Fetched::Unreadable { queue, .. }
            | Fetched::TooLarge { queue, .. } => queue,
        };
        if let Some(i) = order.iter().position(|q| q == queue) {
            let q = order.remove(i);
            order.push(q);
        }
    }
}

/// The separator, re-exported for callers that format list keys.
pub const KEY_SEP: &str = SEP;

/// A broker on `link` consuming `celery`, keeping at most
/// `dead_letter_max` dead letters (0: all), for unit tests.
#[cfg(test)]
pub(crate) fn test_broker(link: &RedisLink, keys: &Keys, dead_letter_max: u64) -> Broker {
    Broker::new(
        link.clone(),
        link.clone(),
        BrokerConfig {
            queues: vec!["celery".into()],
            keys: keys.clone(),
            visibility_timeout: Duration::from_secs(3600),
            worker_name: "test@host".into(),
            max_message_size: None,
            dead_letter_max,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::{command_calls, redis_and_link};

    async fn record_unacked(link: &RedisLink, keys: &Keys, tags: &[String]) {
        let mut conn = link.conn().await.unwrap();
        for tag in tags {
            let _: () = redis::pipe()
                .cmd("ZADD")
                .arg(&keys.unacked_index)
                .arg(1)
                .arg(tag)
                .cmd("HSET")
                .arg(&keys.unacked)
                .arg(tag)
                .arg("[{}, \"\", \"celery\"]")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    async fn unacked_left(link: &RedisLink, keys: &Keys) -> (u64, u64) {
        let mut conn = link.conn().await.unwrap();
        redis::pipe()
            .cmd("ZCARD")
            .arg(&keys.unacked_index)
            .cmd("HLEN")
            .arg(&keys.unacked)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    fn test_broker(link: &RedisLink, keys: &Keys) -> Broker {
        super::test_broker(link, keys, 0)
    }

    fn vector_message() -> String {
        std::fs::read_to_string(format!(
            "{}/tests/vectors/broker/task_delay_add_2_3.raw",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .trim_end()
        .to_owned()
    }

    /// A message that is not UTF-8, popped by the blocking fetch (the
    /// queue was empty when it asked), is recorded and handed back as
    /// unreadable: converting it to text once failed after BRPOP had
    /// already removed it from its list, and the message was lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_that_is_not_utf8_is_never_lost_by_the_blocking_fetch() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let broker = test_broker(&link, &keys);
        let mut raw = vector_message().into_bytes();
        let at = raw.windows(8).position(|w| w == b"\"origin\"").unwrap() + 11;
        raw.splice(at..at, [0xff, 0xfe]);
        let pusher = {
            let link = link.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                // Its own connection: the link's is busy with the BRPOP.
                let mut conn = link
                    .client()
                    .await
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let _: () = redis::cmd("LPUSH")
                    .arg("celery")
                    .arg(raw)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            })
        };
        let mut order = vec!["celery".to_owned()];
        let mut got = Vec::new();
        for _ in 0..5 {
            got = broker
                .fetch(&mut order, 1, Duration::from_secs(1))
                .await
                .expect("a fetch of a non-UTF-8 message succeeds");
            if !got.is_empty() {
                break;
            }
        }
        pusher.await.unwrap();
        assert!(
            matches!(got.as_slice(), [Fetched::Unreadable { error, .. }] if error.contains("UTF-8")),
            "{got:?}"
        );
        assert_eq!(unacked_left(&link, &keys).await, (1, 1));
    }

    /// A message over `max_message_size` is recorded but not parsed.
    #[tokio::test(flavor = "current_thread")]
    async fn a_message_over_the_size_limit_is_not_parsed() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let mut broker = test_broker(&link, &keys);
        let raw = vector_message();
        broker.config.max_message_size = Some(raw.len() - 1);
        let mut conn = link.conn().await.unwrap();
        let _: () = redis::cmd("LPUSH")
            .arg("celery")
            .arg(&raw)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut order = vec!["celery".to_owned()];
        let got = broker
            .fetch(&mut order, 1, Duration::from_secs(1))
            .await
            .unwrap();
        match got.as_slice() {
            [Fetched::TooLarge {
                raw: kept,
                size,
                limit,
                ..
            }] => {
                assert_eq!((kept, *size, *limit), (&raw, raw.len(), raw.len() - 1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(unacked_left(&link, &keys).await, (1, 1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lease_is_scored_in_whole_seconds_never_behind_the_clock() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let broker = test_broker(&link, &keys);
        let raw = std::fs::read_to_string(format!(
            "{}/tests/vectors/broker/task_delay_add_2_3.raw",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut conn = link.conn().await.unwrap();
        let _: () = redis::cmd("LPUSH")
            .arg("celery")
            .arg(raw.trim_end())
            .query_async(&mut conn)
            .await
            .unwrap();
        let before = now_epoch();
        let mut order = vec!["celery".to_owned()];
        let got = broker
            .fetch(&mut order, 1, Duration::from_secs(1))
            .await
            .unwrap();
        let Some(Fetched::Message(delivery)) = got.first() else {
            panic!("no message reserved: {got:?}");
        };
        let score: f64 = redis::cmd("ZSCORE")
            .arg(&keys.unacked_index)
            .arg(delivery.envelope.delivery_tag())
            .query_async(&mut conn)
            .await
            .unwrap();
        // Never older than the reservation (a sweep must not restore it
        // early), at most a second newer, and whole.
        assert_eq!(score.fract(), 0.0, "{score}");
        assert!(
            score >= before && score < before + 2.0,
            "{score} vs {before}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn early_acks_queued_together_share_one_transaction() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let broker = test_broker(&link, &keys);
        let tags: Vec<String> = (0..5).map(|i| format!("tag-{i}")).collect();
        record_unacked(&link, &keys, &tags).await;
        let acks: Vec<_> = tags.iter().map(|t| broker.ack_deferred(t)).collect();
        for ack in acks {
            ack.await.unwrap();
        }
        assert_eq!(unacked_left(&link, &keys).await, (0, 0));
        assert_eq!(
            command_calls(&link, "zrem").await,
            1,
            "one ZREM for five acks"
        );
        assert_eq!(command_calls(&link, "exec").await, 1);

        // One queued after that write went out gets a write of its own.
        let late = vec!["tag-late".to_owned()];
        record_unacked(&link, &keys, &late).await;
        broker.ack_deferred(&late[0]).await.unwrap();
        assert_eq!(unacked_left(&link, &keys).await, (0, 0));
        assert_eq!(command_calls(&link, "zrem").await, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_a_message_still_ours_is_dead_lettered() {
        let (_server, link) = redis_and_link();
        let keys = Keys::new("", "tori.dead_letter");
        let broker = test_broker(&link, &keys);
        let dead = |link: RedisLink| async move {
            let mut conn = link.conn().await.unwrap();
            redis::cmd("LLEN")
                .arg("tori.dead_letter")
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        };
        let held = vec!["held".to_owned()];
        record_unacked(&link, &keys, &held).await;
        assert!(broker
            .dead_letter(Some("held"), "celery", "{}", "bad")
            .await
            .unwrap());
        assert_eq!(unacked_left(&link, &keys).await, (0, 0));
        assert_eq!(dead(link.clone()).await, 1);

        // A sweep restored it meanwhile (its unacked entry is gone): it is
        // on its queue again, so it must not be in the dead-letter list too.
        assert!(!broker
            .dead_letter(Some("restored"), "celery", "{}", "bad")
            .await
            .unwrap());
        assert_eq!(dead(link.clone()).await, 1);

        // Without a tag there is nothing to own: always recorded.
        assert!(broker
            .dead_letter(None, "celery", "{}", "bad")
            .await
            .unwrap());
        assert_eq!(dead(link).await, 2);
    }
}
