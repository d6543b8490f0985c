//! Remote control over the pidbox (SPEC §5): `celery inspect`, `celery
//! control` and Flower talk to the worker here.
//!
//! Requests arrive by `PSUBSCRIBE /{db}.celery.pidbox` on a connection of
//! their own, so task work never delays a reply (Flower calls a worker
//! "unknown" when `stats` goes unanswered). Replies go to the requester's
//! reply queue, found through the `reply.celery.pidbox` binding table.

mod commands;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use serde_json::{json, Map, Value};

use crate::broker::keys;
use crate::protocol::{pyjson, Envelope};
use crate::redis_link::Backoff;
use crate::worker::Ctx;

pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// A decoded control request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    pub ticket: Option<String>,
    pub reply_to: Option<(String, String)>,
    pub clock: Option<u64>,
}

impl Request {
    pub fn decode(envelope: &Envelope) -> Option<Self> {
        let body: Value = serde_json::from_slice(&envelope.body().ok()?).ok()?;
        let obj = body.as_object()?;
        let reply_to = obj
            .get("reply_to")
            .and_then(Value::as_object)
            .and_then(|r| {
                Some((
                    r.get("exchange")?.as_str()?.to_owned(),
                    r.get("routing_key")?.as_str()?.to_owned(),
                ))
            });
        Some(Self {
            method: obj.get("method")?.as_str()?.to_owned(),
            arguments: obj
                .get("arguments")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            destination: obj.get("destination").and_then(Value::as_array).map(|d| {
                d.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }),
            pattern: obj
                .get("pattern")
                .and_then(Value::as_str)
                .map(str::to_owned),
            matcher: obj
                .get("matcher")
                .and_then(Value::as_str)
                .map(str::to_owned),
            ticket: obj.get("ticket").and_then(Value::as_str).map(str::to_owned),
            reply_to,
            clock: envelope.headers().get("clock").and_then(Value::as_u64),
        })
    }

    /// Whether `node` should handle it: listed in `destination`, matching
    /// `pattern` (glob), or everyone when neither is given.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(dest) = &self.destination {
            if !dest.is_empty() {
                return dest.iter().any(|d| d == node);
            }
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(pattern), Some("glob") | None) => glob_match(pattern, node),
            // A regex matcher (pcre) needs a regex engine; treat the
            // pattern as a literal prefix rather than ignore it.
            (Some(pattern), Some(_)) => node.starts_with(pattern.trim_end_matches(".*")),
            (None, _) => true,
        }
    }
}

/// fnmatch-style `*` and `?` matching.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

/// How often the pidbox subscription is checked with PING. A subscription
/// only ever reads, so when its Redis goes away without a FIN or RST (the
/// host rebooted or was replaced behind a partition) nothing else would
/// notice: the worker would stay deaf to `celery inspect`/`control`
/// forever while its other links reconnect. kombu's redis transport does
/// the same with `health_check_interval` (25 s).
const SUBSCRIPTION_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
/// How long connecting + subscribing, or a PING, may take before the
/// connection is called dead; the other links' response timeout.
const SUBSCRIPTION_REPLY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

/// Subscribes to the pidbox and serves requests until the worker stops.
pub(crate) async fn mailbox(ctx: Arc<Ctx>) {
    let node = ctx.cfg.node_name.clone();
    let link = ctx.broker.link().clone();
    let prefix = ctx.cfg.key_prefix.clone();
    let channel = format!("{prefix}/{}.{PIDBOX_EXCHANGE}", link.db());
    // Like a Python worker, bind our pidbox queue so tools that read the
    // binding table see us.
    let binding = keys::binding_member("", "", &format!("{node}.{PIDBOX_EXCHANGE}"));
    let binding_key = keys::binding_key(&prefix, PIDBOX_EXCHANGE);
    let mut backoff = Backoff::default();
    loop {
        if ctx.stopping() {
            break;
        }
        // Bounded: the client connects without the links' timeouts, and
        // across a partition a SYN is retried by the kernel for ~2 min.
        let subscribed = tokio::time::timeout(SUBSCRIPTION_REPLY_WITHIN, async {
            let mut pubsub = link.pubsub().await?;
            pubsub.psubscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await
        .unwrap_or_else(|_| Err(timed_out("subscribing")));
        let pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, "remote control: cannot subscribe; retrying");
                tokio::select! { _ = tokio::time::sleep(delay) => continue, _ = ctx.stopped() => break }
            }
        };
        backoff.reset();
        // Bound again on every (re)subscription: a Redis restarted empty
        // has lost the binding made before.
        let _ = link
            .run(|mut c| {
                let (k, m) = (binding_key.clone(), binding.clone());
                async move {
                    redis::cmd("SADD")
                        .arg(k)
                        .arg(m)
                        .query_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        tracing::info!(%channel, "remote control listening");
        let (mut sink, mut stream) = pubsub.split();
        let mut health = tokio::time::interval_at(
            tokio::time::Instant::now() + SUBSCRIPTION_PING_EVERY,
            SUBSCRIPTION_PING_EVERY,
        );
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = health.tick() => {
                    // Requests arriving meanwhile wait in the client's
                    // buffer; a live Redis answers in well under a second.
                    match tokio::time::timeout(SUBSCRIPTION_REPLY_WITHIN, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => tracing::warn!(error = %e, "remote control: PING on the subscription failed"),
                        Err(_) => tracing::warn!("remote control: no reply to PING on the subscription"),
                    }
                    None
                }
                _ = ctx.stopped() => None,
            };
            let Some(msg) = msg else { break };
            let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
            let ctx = ctx.clone();
            // Each request on its own task: a slow one (revoke writes to
            // the backend) never holds up `ping`.
            tokio::spawn(async move { handle(&ctx, &payload).await });
        }
        if ctx.stopping() {
            break;
        }
        tracing::warn!("remote control: subscription lost; reconnecting");
    }
    let _ = link
        .run(|mut c| async move {
            redis::cmd("SREM")
                .arg(binding_key)
                .arg(binding)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
}

async fn handle(ctx: &Ctx, payload: &[u8]) {
    let Ok(envelope) = Envelope::parse(payload) else {
        tracing::warn!(
            size = payload.len(),
            "remote control: ignoring a malformed request"
        );
        return;
    };
    let Some(req) = Request::decode(&envelope) else {
        tracing::warn!("remote control: ignoring a request without a method");
        return;
    };
    if let Some(clock) = req.clock {
        ctx.events.clock.adjust(clock);
    }
    if !req.is_for(&ctx.cfg.node_name) {
        return;
    }
    tracing::debug!(method = %req.method, "remote control request");
    // As kombu's `Node.dispatch` turns an exception into `{"error":
    // repr(exc)}`, a panic (a tori-worker bug) becomes an error reply,
    // rather than a requester left waiting out its timeout.
    let reply = match AssertUnwindSafe(commands::dispatch(ctx, &req))
        .catch_unwind()
        .await
    {
        Ok(reply) => reply,
        Err(payload) => {
            let why = crate::pool::threads::panic_message(payload.as_ref());
            tracing::error!(method = %req.method, panic = %why, "remote control: the command panicked (a tori-worker bug)");
            Some(json!({"error": format!(
                "WorkerInternalError({})",
                tasks::task::py_repr(&json!(format!("{} panicked: {why}", req.method)))
            )}))
        }
    };
    if let (Some(ticket), Some((_, routing_key)), Some(value)) = (&req.ticket, &req.reply_to, reply)
    {
        if let Err(e) = send_reply(ctx, ticket, routing_key, value).await {
            tracing::warn!(error = %e, method = %req.method, "remote control: could not send the reply");
        }
    }
}

async fn send_reply(
    ctx: &Ctx,
    ticket: &str,
    routing_key: &str,
    value: Value,
) -> Result<(), redis::RedisError> {
    let mut body = Map::new();
    body.insert(ctx.cfg.node_name.clone(), value);
    let mut headers = Map::new();
    headers.insert("ticket".into(), json!(ticket));
    headers.insert("clock".into(), json!(ctx.events.clock.tick()));
    let mut env = Envelope::new(
        pyjson::to_string(&body).as_bytes(),
        crate::protocol::task_message::CONTENT_TYPE_JSON,
        headers,
        Map::new(),
        REPLY_EXCHANGE,
        routing_key,
        0,
    );
    env.set_delivery_mode(1);
    // Route through the binding table: if the requester already gave up
    // (binding gone) nothing is pushed and no list is left behind.
    ctx.broker
        .publish(&env, REPLY_EXCHANGE, routing_key)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_captured_ping() {
        let raw = std::fs::read(format!(
            "{}/tests/vectors/pidbox/ping.request.raw",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let env = Envelope::parse(&raw).unwrap();
        let req = Request::decode(&env).unwrap();
        assert_eq!(req.method, "ping");
        assert_eq!(
            req.ticket.as_deref(),
            Some("4ad96548-2a27-4fce-907d-bcc567994105")
        );
        assert_eq!(req.reply_to.as_ref().unwrap().0, "reply.celery.pidbox");
        assert_eq!(req.clock, Some(32));
        assert!(req.is_for("anyone@host"));
    }

    #[test]
    fn destination_and_pattern() {
        let mut req = Request {
            method: "ping".into(),
            arguments: Map::new(),
            destination: Some(vec!["a@h".into()]),
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
            clock: None,
        };
        assert!(req.is_for("a@h"));
        assert!(!req.is_for("b@h"));
        req.destination = None;
        req.pattern = Some("tori*@*".into());
        req.matcher = Some("glob".into());
        assert!(req.is_for("tori1@vm"));
        assert!(!req.is_for("celery@vm"));
    }
}
