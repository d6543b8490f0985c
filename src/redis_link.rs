//! One Redis connection that heals itself.
//!
//! Every Redis operation in the worker goes through a [`RedisLink`]: it
//! connects lazily, drops the connection after an I/O error so the next
//! call reconnects, and [`RedisLink::retry`] repeats an operation with
//! backoff until it succeeds. That is how "Redis went away" becomes a pause
//! instead of a lost ack or result.

use std::future::Future;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, RedisError, Value};
use thiserror::Error;
use tokio::sync::Mutex;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("invalid Redis URL {url:?}: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: RedisError,
    },
}

/// Hides the password of a Redis URL for logs, like Celery does.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!(
                "{}://{}:********@{}",
                &url[..scheme_end],
                user,
                &rest[at + 1..]
            )
        }
        None => url.to_owned(),
    }
}

/// A lazily (re)connected multiplexed connection.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<LinkInner>,
}

pub(crate) struct LinkInner {
    client: Client,
    url_for_logs: String,
    role: &'static str,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
    batcher: OnceLock<crate::redis_batch::Batcher>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("url", &self.inner.url_for_logs)
            .field("role", &self.inner.role)
            .finish()
    }
}

impl RedisLink {
    /// `role` names the link in logs (`broker`, `consumer`, `backend`).
    /// `response_timeout` must exceed any blocking command's timeout.
    pub fn open(
        url: &str,
        role: &'static str,
        response_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let bad_url = |source| LinkError::BadUrl {
            url: redact_url(url),
            source,
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(bad_url)?;
        // TCP_NODELAY, as redis-py (so Celery and kombu) sets it: the redis
        // crate leaves Nagle on, which holds a small write back while an
        // earlier one on the same multiplexed connection is unacknowledged.
        // On loopback it measured the same either way (throughput and
        // latency within noise); across a network it avoids waiting on the
        // peer's delayed ACK.
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = Client::open(info.set_tcp_settings(tcp)).map_err(bad_url)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout));
        Ok(Self {
            inner: Arc::new(LinkInner {
                client,
                url_for_logs: redact_url(url),
                role,
                config,
                conn: Mutex::new(None),
                batcher: OnceLock::new(),
            }),
        })
    }

    /// The underlying client, for connections that are not multiplexed
    /// (pub/sub subscriptions).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The Redis database number (fanout channel names include it).
    pub fn db(&self) -> i64 {
        self.inner
            .client
            .get_connection_info()
            .redis_settings()
            .db()
    }

    pub fn url_for_logs(&self) -> &str {
        &self.inner.url_for_logs
    }

    /// The current connection, connecting first if needed.
    pub async fn conn(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&self.inner.config)
            .await?;
        tracing::info!(role = self.inner.role, url = %self.inner.url_for_logs, "connected to Redis");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `cmds` in one pipeline with the writes other callers have
    /// ready at the same moment (see `redis_batch`), retrying while Redis
    /// is away. One reply per command; refused commands are
    /// [`Value::ServerError`]s in place.
    pub async fn batched(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, RedisError> {
        self.batcher().submit(cmds).await
    }

    /// [`RedisLink::batched`] for a write that may wait (up to
    /// `redis_batch::LINGER`) to share a round trip with the next one. It
    /// is queued now; the future only waits for the replies.
    pub fn batched_deferred(
        &self,
        cmds: Vec<Cmd>,
    ) -> impl Future<Output = Result<Vec<Value>, RedisError>> + Send + 'static {
        self.batcher().submit_deferred(cmds)
    }

    /// [`RedisLink::batched_deferred`] whose commands `build` makes when
    /// the batch is sent, so its owner can fold everything it gathered
    /// until then into one request.
    pub fn batched_deferred_with(
        &self,
        build: impl FnOnce() -> Vec<Cmd> + Send + 'static,
    ) -> impl Future<Output = Result<Vec<Value>, RedisError>> + Send + 'static {
        self.batcher().submit_deferred_with(build)
    }

    fn batcher(&self) -> &crate::redis_batch::Batcher {
        self.inner
            .batcher
            .get_or_init(|| crate::redis_batch::Batcher::start(Arc::downgrade(&self.inner)))
    }

    pub(crate) fn upgrade(inner: &Weak<LinkInner>) -> Option<Self> {
        inner.upgrade().map(|inner| Self { inner })
    }

    /// Moves the next calls to a fresh connection; calls in flight finish
    /// on the old one, which closes after them. A connection's buffers stay
    /// as large as the largest command or reply it ever carried, so after a
    /// message of tens of megabytes this is how that memory is given back.
    pub async fn renew(&self) {
        self.reset().await;
    }

    /// Forgets the connection after an error that may have broken it.
    pub async fn reset(&self) {
        *self.inner.conn.lock().await = None;
    }

    /// Runs `op` once; on a connection-level error the link is reset so the
    /// next call reconnects.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, RedisError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = self.conn().await;
        let result = match conn {
            Ok(conn) => op(conn).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            if is_connection_error(e) {
                self.reset().await;
            }
        }
        result
    }

    /// Runs `op` until it succeeds, backing off between attempts. Used for
    /// writes that must not be lost (acks, results, republishes): while
    /// Redis is away, the worker waits rather than drops them. Errors that
    /// retrying cannot fix (a script bug, a wrong type) are returned.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RedisError>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut backoff = Backoff::default();
        loop {
            match self.run(&mut op).await {
                Ok(v) => {
                    if backoff.attempts > 0 {
                        tracing::info!(
                            role = self.inner.role,
                            what,
                            attempts = backoff.attempts,
                            "Redis operation succeeded after retrying"
                        );
                    }
                    return Ok(v);
                }
                Err(e) if is_retryable(&e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(role = self.inner.role, what, error = %e, retry_in_ms = delay.as_millis() as u64, "Redis unavailable; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Errors after which the connection should be re-established.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Errors worth retrying: the server is away, busy loading, or failing
/// over. Anything else (WRONGTYPE, a Lua error) will not fix itself.
pub fn is_retryable(e: &RedisError) -> bool {
    if is_connection_error(e) {
        return true;
    }
    matches!(
        e.code(),
        Some("LOADING")
            | Some("BUSY")
            | Some("TRYAGAIN")
            | Some("MASTERDOWN")
            | Some("READONLY")
            | Some("CLUSTERDOWN")
    )
}

/// Exponential backoff with jitter, 100 ms doubling to 5 s.
#[derive(Debug, Default)]
pub struct Backoff {
    pub attempts: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let base_ms = 100u64.saturating_mul(1 << self.attempts.min(6)).min(5_000);
        Duration::from_millis(base_ms / 2 + fastrand::u64(0..=base_ms / 2))
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_disable_nagle_and_keep_the_url() {
        let link = RedisLink::open(
            "redis://:pw@127.0.0.1:6390/3",
            "test",
            Duration::from_secs(1),
        )
        .unwrap();
        let info = link.inner.client.get_connection_info();
        assert!(info.tcp_settings().nodelay());
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.addr().to_string(), "127.0.0.1:6390");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:secret@host:6379/0"),
            "redis://:********@host:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:pw@h/1"),
            "rediss://user:********@h/1"
        );
        assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
    }

    #[test]
    fn parses_the_url_forms_celery_users_write() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://:pw@127.0.0.1:6379/3",
            "rediss://127.0.0.1:6380/0",
            "unix:///tmp/redis.sock?db=2",
            "redis+unix:///tmp/redis.sock",
        ] {
            RedisLink::open(url, "test", Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let link =
            RedisLink::open("redis://:pw@127.0.0.1:6379/3", "t", Duration::from_secs(1)).unwrap();
        assert_eq!(link.db(), 3);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        for _ in 0..20 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(first <= Duration::from_millis(200));
        assert!(late <= Duration::from_secs(5) && late >= Duration::from_millis(2_500));
    }
}
