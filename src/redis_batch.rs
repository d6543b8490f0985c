//! Group commit for Redis writes: many callers, one round trip.
//!
//! At a few thousand tasks a second most of the parent's time went to
//! system calls and wake-ups, one socket write and one read per ack and
//! per stored result. Writes that are ready in the same instant are now
//! sent as one pipeline: a caller submits its commands and waits for its
//! own replies, so nothing about ordering or durability changes for it
//! (an ack still returns only once Redis applied it). With one caller the
//! batch is one request and costs what a plain call cost; under load the
//! round trips per task fall with the batch size.
//!
//! Every batched write must be safe to repeat: after a connection error
//! the whole batch is sent again (the caller cannot know whether Redis
//! applied it), which is what the single-call retry did too.
//!
//! A write may also be *deferred*: it waits for the next ordinary write to
//! ride along with, or for [`LINGER`] at most. Early acks use it: the ack
//! of a task and the result of the same (or another) task then share one
//! round trip, where each cost one.

use redis::{Cmd, RedisError, Value};
use tokio::sync::{mpsc, oneshot};

use crate::redis_link::RedisLink;

/// Requests taken into one pipeline at most.
const MAX_REQUESTS: usize = 256;

/// The longest a deferred write waits for company.
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Commands built by a deferred write's owner when its batch is sent.
type Builder = Box<dyn FnOnce() -> Vec<Cmd> + Send>;

struct Request {
    cmds: Vec<Cmd>,
    /// Makes `cmds` when the batch is sent, so that everything its owner
    /// gathered until then goes in this one request.
    build: Option<Builder>,
    deferred: bool,
    reply: oneshot::Sender<Result<Vec<Value>, RedisError>>,
}

/// The submitting side; the loop runs on the link's runtime.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("cmds", &self.cmds.len())
            .field("built_when_sent", &self.build.is_some())
            .finish()
    }
}

impl Batcher {
    /// Starts the loop that sends batches over `link`. It ends when every
    /// `Batcher` handle is gone.
    /// The loop holds the link weakly, so dropping the last handle of the
    /// link ends it.
    pub(crate) fn start(link: std::sync::Weak<crate::redis_link::LinkInner>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(link, rx));
        Self { tx }
    }

    /// Sends `cmds` (in order, not as a transaction of their own) with
    /// whatever else is waiting, retrying while Redis is away. Returns one
    /// reply per command; a command Redis refused is a
    /// [`Value::ServerError`] in its place, an error that retrying cannot
    /// fix ends the whole request.
    pub(crate) async fn submit(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, RedisError> {
        self.enqueue(cmds, None, false).await
    }

    /// Like [`Batcher::submit`], but the commands wait up to [`LINGER`]
    /// for an ordinary write to share the round trip with. The request is
    /// queued when this is called, not when the future is first polled, so
    /// a caller can defer a write and go on.
    pub(crate) fn submit_deferred(
        &self,
        cmds: Vec<Cmd>,
    ) -> impl std::future::Future<Output = Result<Vec<Value>, RedisError>> + Send + 'static {
        self.enqueue(cmds, None, true)
    }

    /// [`Batcher::submit_deferred`] whose commands `build` makes when the
    /// batch goes out (never, if the loop has stopped). A caller that
    /// gathers small writes (acks) until then sends them as one request.
    pub(crate) fn submit_deferred_with(
        &self,
        build: impl FnOnce() -> Vec<Cmd> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<Vec<Value>, RedisError>> + Send + 'static {
        self.enqueue(Vec::new(), Some(Box::new(build)), true)
    }

    fn enqueue(
        &self,
        cmds: Vec<Cmd>,
        build: Option<Builder>,
        deferred: bool,
    ) -> impl std::future::Future<Output = Result<Vec<Value>, RedisError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(Request {
                cmds,
                build,
                deferred,
                reply,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(stopped());
            }
            rx.await.unwrap_or_else(|_| Err(stopped()))
        }
    }
}

fn stopped() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Io,
        "the Redis write batcher has stopped (the worker is exiting)",
    ))
}

async fn run(
    weak: std::sync::Weak<crate::redis_link::LinkInner>,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    // Deferred requests wait in `batch` until `due` or an ordinary request.
    let mut batch: Vec<Request> = Vec::new();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let wake = match due {
            None => rx.recv().await.map_or(Wake::Closed, Wake::Got),
            Some(at) => tokio::select! {
                r = rx.recv() => r.map_or(Wake::Closed, Wake::Got),
                _ = tokio::time::sleep_until(at) => Wake::Linger,
            },
        };
        let closed = matches!(wake, Wake::Closed);
        match wake {
            Wake::Got(r) if r.deferred && batch.len() + 1 < MAX_REQUESTS => {
                due.get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
                batch.push(r);
                continue;
            }
            Wake::Got(r) => batch.push(r),
            Wake::Linger => {}
            Wake::Closed if batch.is_empty() => return,
            Wake::Closed => {}
        }
        due = None;
        let Some(link) = RedisLink::upgrade(&weak) else {
            return;
        };
        while !closed && batch.len() < MAX_REQUESTS {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        send(&link, &mut batch).await;
        if closed {
            return;
        }
    }
}

/// What woke the batch loop.
enum Wake {
    Got(Request),
    /// The oldest deferred request has waited long enough.
    Linger,
    /// Every submitting handle is gone.
    Closed,
}

/// Sends one batch and hands each request its slice of the replies.
async fn send(link: &RedisLink, batch: &mut Vec<Request>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for req in batch.iter_mut() {
        if let Some(build) = req.build.take() {
            req.cmds = build();
        }
        for cmd in &req.cmds {
            pipe.add_command(cmd.clone());
        }
    }
    let result: Result<Vec<Value>, RedisError> = link
        .retry("batched write", |mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async(&mut c).await }
        })
        .await;
    match result {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            for req in batch.drain(..) {
                let mine: Vec<Value> = replies.by_ref().take(req.cmds.len()).collect();
                let _ = req.reply.send(if mine.len() == req.cmds.len() {
                    Ok(mine)
                } else {
                    Err(RedisError::from((
                        redis::ErrorKind::Parse,
                        "pipeline returned fewer replies than commands",
                    )))
                });
            }
        }
        Err(e) => {
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::{command_calls, free_port, redis_and_link, spawn_redis};
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_callers_get_their_own_replies_and_errors() {
        let (_server, link) = redis_and_link();
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let link = link.clone();
            calls.spawn(async move {
                let key = format!("k{i}");
                let cmds = if i == 7 {
                    // INCR on a non-number: refused, for this caller only.
                    vec![
                        redis::cmd("SET").arg(&key).arg("text").clone(),
                        redis::cmd("INCR").arg(&key).clone(),
                    ]
                } else {
                    vec![
                        redis::cmd("SET").arg(&key).arg(i).clone(),
                        redis::cmd("GET").arg(&key).clone(),
                    ]
                };
                (i, link.batched(cmds).await)
            });
        }
        while let Some(done) = calls.join_next().await {
            let (i, replies) = done.unwrap();
            let replies = replies.unwrap();
            assert_eq!(replies.len(), 2, "caller {i}");
            if i == 7 {
                assert!(matches!(&replies[1], Value::ServerError(_)), "{replies:?}");
            } else {
                let got: u32 = redis::from_redis_value(replies[1].clone()).unwrap();
                assert_eq!(got, i, "caller {i} got another caller's reply");
            }
        }
        // Every caller's write reached the server exactly once.
        assert_eq!(command_calls(&link, "set").await, 200);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_deferred_write_waits_for_company_but_never_past_the_next_write() {
        use futures_util::FutureExt;
        let (_server, link) = redis_and_link();
        link.batched(vec![redis::cmd("PING")]).await.unwrap();

        // Alone: sent when the linger runs out, not before.
        let started = tokio::time::Instant::now();
        let alone = link.batched_deferred(vec![redis::cmd("SET").arg("a").arg(1).clone()]);
        alone.await.unwrap();
        assert!(started.elapsed() >= LINGER, "{:?}", started.elapsed());

        // Followed by an ordinary write: it goes no later than that write,
        // and first, as it was queued first.
        let mut deferred =
            Box::pin(link.batched_deferred(vec![redis::cmd("SET").arg("b").arg(1).clone()]));
        let ordinary = link
            .batched(vec![
                redis::cmd("GET").arg("b").clone(),
                redis::cmd("SET").arg("b").arg(2).clone(),
            ])
            .await
            .unwrap();
        let got: Option<u32> = redis::from_redis_value(ordinary[0].clone()).unwrap();
        assert_eq!(got, Some(1), "the deferred write was not applied first");
        assert!(
            deferred.as_mut().now_or_never().is_some(),
            "the deferred write is still waiting after a later write was answered"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_built_when_sent_takes_what_was_gathered_until_then() {
        use std::sync::{Arc, Mutex};
        let (_server, link) = redis_and_link();
        link.batched(vec![redis::cmd("PING")]).await.unwrap();
        let gathered = Arc::new(Mutex::new(vec![1u32]));
        let taken = gathered.clone();
        let write = link.batched_deferred_with(move || {
            let values = std::mem::take(&mut *taken.lock().unwrap());
            vec![redis::cmd("RPUSH").arg("gathered").arg(values).clone()]
        });
        // Gathered after the write was queued but before it went out.
        gathered.lock().unwrap().extend([2, 3]);
        let replies = write.await.unwrap();
        assert_eq!(replies, vec![Value::Int(3)]);
        assert!(gathered.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waits_for_redis_to_come_back() {
        let port = free_port();
        let link = RedisLink::open(
            &format!("redis://127.0.0.1:{port}/0"),
            "test",
            Duration::from_secs(5),
        )
        .unwrap();
        let call = tokio::spawn({
            let link = link.clone();
            async move { link.batched(vec![redis::cmd("PING")]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !call.is_finished(),
            "a write must wait, not fail, while Redis is away"
        );
        let _server = spawn_redis(port);
        let replies = tokio::time::timeout(Duration::from_secs(15), call)
            .await
            .expect("the write did not go through after Redis came back")
            .unwrap()
            .unwrap();
        assert_eq!(replies, vec![Value::SimpleString("PONG".into())]);
    }
}
