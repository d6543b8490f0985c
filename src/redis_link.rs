//! One Redis connection that heals itself.
//!
//! Every Redis operation in the worker goes through a [`RedisLink`]: it
//! connects lazily, drops the connection after an I/O error so the next
//! call reconnects, and [`RedisLink::retry`] repeats an operation with
//! backoff until it succeeds. That is how "Redis went away" becomes a pause
//! instead of a lost ack or result.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, TlsCertificates, Value,
};
use thiserror::Error;
use tokio::sync::Mutex;

pub use crate::redis_url::redact_url;
use crate::redis_url::{CertReqs, Endpoint, RedisSettings, TransportOptions, UrlError};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error(transparent)]
    BadUrl(#[from] UrlError),
    /// A TLS file named in the settings cannot be used.
    #[error("{option} {path}: {why}")]
    TlsFile {
        option: &'static str,
        path: String,
        why: String,
    },
    #[error("invalid Redis settings for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: RedisError,
    },
    /// The TLS handshake failed: retrying cannot fix it, so start-up stops.
    #[error("TLS with Redis ({role}) at {url} failed: {why}")]
    Tls {
        role: &'static str,
        url: String,
        why: String,
    },
}

/// TLS files read once, when the link is opened, so a missing or malformed
/// file is reported at start with the option that names it.
#[derive(Clone)]
struct TlsMaterial {
    certificates: TlsCertificates,
    verify: bool,
    check_hostname: bool,
}

impl TlsMaterial {
    fn load(tls: &crate::redis_url::TlsSettings) -> Result<Self, LinkError> {
        let read = |option: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| LinkError::TlsFile {
                option,
                path: path.display().to_string(),
                why: e.to_string(),
            })
        };
        let root_cert = match &tls.ca_certs {
            Some(path) => Some(read("ssl_ca_certs", path)?),
            None => None,
        };
        let client_tls = match (&tls.certfile, &tls.keyfile) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read("ssl_certfile", cert)?,
                client_key: read("ssl_keyfile", key)?,
            }),
            _ => None,
        };
        let material = Self {
            certificates: TlsCertificates {
                client_tls,
                root_cert,
            },
            verify: tls.cert_reqs == CertReqs::Required,
            check_hostname: tls.check_hostname,
        };
        // Build one client now: the PEM files are parsed here, so a file
        // that is not PEM fails at start, naming the option.
        if let Err(e) = material.client_for("localhost", 1, RedisConnectionInfo::default()) {
            let (option, path) = if e.to_string().contains("root certificate") {
                ("ssl_ca_certs", tls.ca_certs.as_ref())
            } else {
                ("ssl_certfile/ssl_keyfile", tls.certfile.as_ref())
            };
            return Err(LinkError::TlsFile {
                option,
                path: path.map(|p| p.display().to_string()).unwrap_or_default(),
                why: e.to_string(),
            });
        }
        Ok(material)
    }

    fn client_for(
        &self,
        host: &str,
        port: u16,
        redis: RedisConnectionInfo,
    ) -> Result<Client, RedisError> {
        let addr = ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: !self.verify,
            tls_params: None,
        };
        let info = nodelay(addr.into_connection_info()?.set_redis_settings(redis));
        let client = Client::build_with_tls(info, self.certificates.clone())?;
        if self.verify && !self.check_hostname {
            let mut info = client.get_connection_info().clone();
            let mut addr = info.addr().clone();
            addr.set_danger_accept_invalid_hostnames(true);
            info = info.set_addr(addr);
            return Client::open(info);
        }
        Ok(client)
    }
}

/// TCP_NODELAY, as redis-py (so Celery and kombu) sets it: the redis
/// crate leaves Nagle on, which holds a small write back while an earlier
/// one on the same multiplexed connection is unacknowledged. On loopback it
/// measured the same either way (throughput and latency within noise);
/// across a network it avoids waiting on the peer's delayed ACK.
fn nodelay(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    info.set_tcp_settings(tcp)
}

fn redis_info(settings: &RedisSettings) -> RedisConnectionInfo {
    let mut info = RedisConnectionInfo::default().set_db(settings.db);
    if let Some(user) = &settings.username {
        info = info.set_username(user);
    }
    if let Some(pw) = &settings.password {
        info = info.set_password(pw);
    }
    info
}

/// How a link finds its server: a fixed address, or the master the
/// sentinels name at each (re)connection.
enum Connector {
    Fixed(Client),
    Sentinel(SentinelConnector),
}

struct SentinelConnector {
    /// `host:port` of each sentinel, for logs, and a client for it.
    nodes: Vec<(String, Client)>,
    master_name: String,
    master_info: RedisConnectionInfo,
    tls: Option<TlsMaterial>,
    /// The sentinel that answered last is asked first next time.
    preferred: AtomicUsize,
    /// The master last connected to, to log a change once.
    current: std::sync::Mutex<Option<(String, u16)>>,
}

/// How long one sentinel may take to answer before the next is asked.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(1500);

impl SentinelConnector {
    fn new(settings: &RedisSettings, tls: Option<TlsMaterial>) -> Result<Self, LinkError> {
        let Endpoint::Sentinel {
            nodes,
            master_name,
            username,
            password,
            tls: sentinel_tls,
        } = &settings.endpoint
        else {
            unreachable!("a sentinel connector for a sentinel endpoint")
        };
        let mut sentinel_info = RedisConnectionInfo::default();
        if let Some(u) = username {
            sentinel_info = sentinel_info.set_username(u);
        }
        if let Some(p) = password {
            sentinel_info = sentinel_info.set_password(p);
        }
        let client_error = |source| LinkError::Client {
            url: settings.redacted().to_owned(),
            source,
        };
        let mut clients = Vec::new();
        for (host, port) in nodes {
            let client = match (&tls, sentinel_tls) {
                (Some(material), true) => material
                    .client_for(host, *port, sentinel_info.clone())
                    .map_err(client_error)?,
                _ => Client::open(nodelay(
                    ConnectionAddr::Tcp(host.clone(), *port)
                        .into_connection_info()
                        .map_err(client_error)?
                        .set_redis_settings(sentinel_info.clone()),
                ))
                .map_err(client_error)?,
            };
            clients.push((format!("{host}:{port}"), client));
        }
        Ok(Self {
            nodes: clients,
            master_name: master_name.clone(),
            master_info: redis_info(settings),
            tls,
            preferred: AtomicUsize::new(0),
            current: std::sync::Mutex::new(None),
        })
    }

    /// Asks the sentinels, the last one that answered first, where the
    /// master is, and returns a client for it.
    async fn master(&self, role: &'static str) -> Result<Client, RedisError> {
        let (host, port) = self.master_addr().await?;
        let changed = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            let changed = current.as_ref() != Some(&(host.clone(), port));
            *current = Some((host.clone(), port));
            changed
        };
        if changed {
            tracing::info!(role, master_name = %self.master_name, master = %format!("{host}:{port}"), "Redis Sentinel names the master");
        }
        match &self.tls {
            Some(material) => material.client_for(&host, port, self.master_info.clone()),
            None => Client::open(nodelay(
                ConnectionAddr::Tcp(host, port)
                    .into_connection_info()?
                    .set_redis_settings(self.master_info.clone()),
            )),
        }
    }

    async fn master_addr(&self) -> Result<(String, u16), RedisError> {
        let n = self.nodes.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(SENTINEL_TIMEOUT))
            .set_response_timeout(Some(SENTINEL_TIMEOUT));
        let mut failures = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let (name, client) = &self.nodes[i];
            let asked = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master_name)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match asked.await {
                Ok(Some(addr)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(addr);
                }
                Ok(None) => failures.push(format!("{name}: does not know {:?}", self.master_name)),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!(
                "no sentinel named a master for {:?} ({})",
                self.master_name,
                failures.join("; ")
            ),
        )
        .into())
    }
}

/// A lazily (re)connected multiplexed connection.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<LinkInner>,
}

pub(crate) struct LinkInner {
    connector: Connector,
    settings: RedisSettings,
    role: &'static str,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
    batcher: OnceLock<crate::redis_batch::Batcher>,
    /// Once connected, a TLS failure is logged and retried (a certificate
    /// being rotated); before, it ends start-up.
    connected_once: AtomicBool,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("url", &self.inner.settings.redacted())
            .field("role", &self.inner.role)
            .finish()
    }
}

impl RedisLink {
    /// [`RedisLink::connect_to`] a URL with no TLS dictionary or transport
    /// options.
    pub fn open(
        url: &str,
        role: &'static str,
        response_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let settings = crate::redis_url::parse(url, None, &TransportOptions::default())?;
        Self::connect_to(&settings, role, response_timeout)
    }

    /// `role` names the link in logs (`broker`, `consumer`, `backend`).
    /// `response_timeout` must exceed any blocking command's timeout; a
    /// `socket_timeout` in the settings replaces it, but not below 2 s
    /// (BRPOP waits 1 s).
    pub fn connect_to(
        settings: &RedisSettings,
        role: &'static str,
        response_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let client_error = |source| LinkError::Client {
            url: settings.redacted().to_owned(),
            source,
        };
        let tls = settings.tls.as_ref().map(TlsMaterial::load).transpose()?;
        let connector = match &settings.endpoint {
            Endpoint::Tcp { host, port } => Connector::Fixed(match &tls {
                Some(material) => material
                    .client_for(host, *port, redis_info(settings))
                    .map_err(client_error)?,
                None => Client::open(nodelay(
                    ConnectionAddr::Tcp(host.clone(), *port)
                        .into_connection_info()
                        .map_err(client_error)?
                        .set_redis_settings(redis_info(settings)),
                ))
                .map_err(client_error)?,
            }),
            Endpoint::Unix { path } => Connector::Fixed(
                Client::open(
                    ConnectionAddr::Unix(path.clone())
                        .into_connection_info()
                        .map_err(client_error)?
                        .set_redis_settings(redis_info(settings)),
                )
                .map_err(client_error)?,
            ),
            Endpoint::Sentinel { .. } => {
                Connector::Sentinel(SentinelConnector::new(settings, tls)?)
            }
        };
        let response_timeout = settings
            .socket_timeout
            .map(|t| t.max(Duration::from_secs(2)))
            .unwrap_or(response_timeout);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(
                settings.connect_timeout.unwrap_or(Duration::from_secs(5)),
            ))
            .set_response_timeout(Some(response_timeout));
        Ok(Self {
            inner: Arc::new(LinkInner {
                connector,
                settings: settings.clone(),
                role,
                config,
                conn: Mutex::new(None),
                batcher: OnceLock::new(),
                connected_once: AtomicBool::new(false),
            }),
        })
    }

    /// A client for the server as of now (after asking the sentinels, with
    /// Sentinel), for connections that are not multiplexed.
    pub async fn client(&self) -> Result<Client, RedisError> {
        match &self.inner.connector {
            Connector::Fixed(client) => Ok(client.clone()),
            Connector::Sentinel(sentinel) => sentinel.master(self.inner.role).await,
        }
    }

    /// A pub/sub connection to the server (the master, with Sentinel).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        let client = self.client().await?;
        let pubsub = client.get_async_pubsub().await;
        if let Err(e) = &pubsub {
            self.note_failure(e);
        }
        pubsub
    }

    /// The settings this link connects with.
    pub fn settings(&self) -> &RedisSettings {
        &self.inner.settings
    }

    /// The Redis database number (fanout channel names include it).
    pub fn db(&self) -> i64 {
        self.inner.settings.db
    }

    /// The link's name in logs.
    pub fn role(&self) -> &'static str {
        self.inner.role
    }

    pub fn url_for_logs(&self) -> &str {
        self.inner.settings.redacted()
    }

    /// The current connection, connecting first if needed.
    pub async fn conn(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = match self.connect().await {
            Ok(conn) => conn,
            Err(e) => {
                self.note_failure(&e);
                return Err(e);
            }
        };
        self.inner.connected_once.store(true, Ordering::Relaxed);
        tracing::info!(role = self.inner.role, url = %self.inner.settings.redacted(), "connected to Redis");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let client = self.client().await?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&self.inner.config)
            .await?;
        if let Connector::Sentinel(sentinel) = &self.inner.connector {
            // A sentinel that has not yet seen a failover names the old
            // master; if that one is back as a replica, writes would fail
            // with READONLY. Check, as redis-py's sentinel connections do.
            let role: Value = redis::cmd("ROLE").query_async(&mut conn).await?;
            let is_master = matches!(&role, Value::Array(items)
                if matches!(items.first(), Some(Value::BulkString(b)) if b == b"master"));
            if !is_master {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!(
                        "the server the sentinels name as master of {:?} is not a master (failover in progress)",
                        sentinel.master_name
                    ),
                )
                .into());
            }
        }
        Ok(conn)
    }

    /// Logs a TLS failure in its own words (not as "unavailable").
    fn note_failure(&self, e: &RedisError) {
        if let Some(why) = tls_failure(e) {
            tracing::error!(role = self.inner.role, url = %self.inner.settings.redacted(), %why, "TLS with Redis failed");
        }
    }

    /// Connects once, waiting while Redis is unavailable, and fails at
    /// once when TLS fails (a certificate that retrying will not fix).
    pub async fn ready(&self) -> Result<(), LinkError> {
        let mut backoff = Backoff::default();
        loop {
            match self.conn().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(why) = tls_failure(&e) {
                        return Err(LinkError::Tls {
                            role: self.inner.role,
                            url: self.inner.settings.redacted().to_owned(),
                            why,
                        });
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(role = self.inner.role, url = %self.inner.settings.redacted(), error = %e, retry_in_ms = delay.as_millis() as u64, "Redis unavailable at start-up; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
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
            // READONLY: the server was demoted to a replica (a Sentinel
            // failover); a new connection finds the new master.
            if is_connection_error(e) || e.code() == Some("READONLY") {
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
                Err(e)
                    if tls_failure(&e).is_some()
                        && !self.inner.connected_once.load(Ordering::Relaxed) =>
                {
                    return Err(e)
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

/// What went wrong in a TLS handshake, with the setting that fixes it, or
/// `None` when `e` is not a TLS failure.
pub fn tls_failure(e: &RedisError) -> Option<String> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    fn rustls_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // The redis crate keeps an I/O error as `Arc<dyn Error>`; the
        // handshake's own error is inside the `io::Error`, which does not
        // report it as its source.
        if let Some(shared) = err.downcast_ref::<Shared>() {
            let inner: &(dyn std::error::Error + 'static) = &**shared;
            return rustls_in(inner);
        }
        err.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = rustls_in(err) {
            return Some(explain_tls(tls));
        }
        source = err.source();
    }
    None
}

fn explain_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer) | E::InvalidCertificate(C::BadSignature) => {
            "the server's certificate is not signed by a CA this worker trusts: set ssl_ca_certs to the CA's PEM file (in the URL, e.g. rediss://host:6379/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis/ca.pem, or in --broker-use-ssl / --redis-backend-use-ssl), or add the CA to the system store or SSL_CERT_FILE"
        }
        E::InvalidCertificate(C::NotValidForName)
        | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name the host in the URL: connect by a name the certificate holds, or set ssl_check_hostname=false"
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        E::InvalidCertificate(_) => "the server's certificate was refused",
        E::AlertReceived(A::CertificateRequired)
        | E::AlertReceived(A::HandshakeFailure)
        | E::AlertReceived(A::BadCertificate)
        | E::AlertReceived(A::UnknownCA) => {
            "the server refused the handshake; it may require a client certificate (set ssl_certfile and ssl_keyfile) or not trust the one sent"
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the server does not speak TLS here: use redis:// for a plain-text port, or the server's TLS port"
        }
        _ => "the TLS handshake failed",
    };
    format!("{e}: {hint}")
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
        let Connector::Fixed(client) = &link.inner.connector else {
            panic!("a TCP URL connects directly")
        };
        let info = client.get_connection_info();
        assert!(info.tcp_settings().nodelay());
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.addr().to_string(), "127.0.0.1:6390");
    }

    #[test]
    fn parses_the_url_forms_celery_users_write() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://:pw@127.0.0.1:6379/3",
            "rediss://127.0.0.1:6380/0",
            "unix:///tmp/redis.sock?db=2",
            "redis+unix:///tmp/redis.sock",
            "redis+socket:///tmp/redis.sock?virtual_host=1",
            "socket:///tmp/redis.sock",
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
