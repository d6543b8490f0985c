//! Redis connection settings as Celery users write them: the URL forms
//! kombu and Celery's result backend accept, the `broker_use_ssl` /
//! `redis_backend_use_ssl` dictionaries, and the transport options JSON
//! (`broker_transport_options` / `result_backend_transport_options`).
//!
//! Pure parsing, no I/O: [`RedisSettings`] says where to connect and how;
//! `redis_link` turns it into connections. Every way a settings value is
//! shown ([`RedisSettings::redacted`], `Debug`, [`redact_url`]) hides the
//! secrets in it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

/// Redis's default ports.
pub const REDIS_PORT: u16 = 6379;
pub const SENTINEL_PORT: u16 = 26379;

const MASK: &str = "********";

/// Query parameters whose values are secrets (redis-py's `password`, the
/// redis crate's `pass`).
const SECRET_PARAMS: &[&str] = &["password", "pass", "sentinel_password"];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UrlError {
    #[error("{url}: unsupported scheme {scheme:?} (use redis://, rediss://, unix://, redis+socket://, socket:// or sentinel://)")]
    Scheme { url: String, scheme: String },
    #[error("{url}: {why}")]
    Invalid { url: String, why: String },
    #[error("{option}: {why}")]
    Option { option: String, why: String },
}

/// Where the Redis server is.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        path: PathBuf,
    },
    /// The master of `master_name`, as the sentinels in `nodes` name it.
    Sentinel {
        nodes: Vec<(String, u16)>,
        master_name: String,
        /// AUTH for the sentinels themselves (`sentinel_kwargs`), which
        /// is not the master's password.
        username: Option<String>,
        password: Option<String>,
        /// Sentinels speak TLS too (`sentinel_kwargs: {"ssl": true}`).
        tls: bool,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { host, port } => write!(f, "Tcp({host}:{port})"),
            Self::Unix { path } => write!(f, "Unix({})", path.display()),
            Self::Sentinel {
                nodes, master_name, ..
            } => f
                .debug_struct("Sentinel")
                .field("nodes", nodes)
                .field("master_name", master_name)
                .finish_non_exhaustive(),
        }
    }
}

/// Whether and how the server's certificate is checked (Python's
/// `ssl.CERT_*`; `optional` is `required` for a client, as in Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqs {
    Required,
    None,
}

/// TLS as redis-py takes it (`ssl_*` parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_reqs: CertReqs,
    /// PEM file of the CAs to trust instead of the system store.
    pub ca_certs: Option<PathBuf>,
    /// Client certificate and key (PEM), for `tls-auth-clients`.
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub check_hostname: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_reqs: CertReqs::Required,
            ca_certs: None,
            certfile: None,
            keyfile: None,
            check_hostname: true,
        }
    }
}

/// Everything needed to reach one Redis database.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    pub endpoint: Endpoint,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsSettings>,
    pub connect_timeout: Option<Duration>,
    /// `socket_timeout`: how long a reply may take.
    pub socket_timeout: Option<Duration>,
    /// The URL as given, secrets masked.
    redacted: String,
    /// Parameters and options understood but not used, for a warning.
    pub ignored: Vec<String>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisSettings")
            .field(&self.redacted)
            .finish()
    }
}

impl std::fmt::Display for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl RedisSettings {
    /// The URL with every secret masked: for logs and `inspect` replies.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.endpoint, Endpoint::Sentinel { .. })
    }
}

/// Celery's transport options JSON, the keys this worker reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransportOptions {
    pub master_name: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    pub sentinel_tls: bool,
    pub visibility_timeout: Option<f64>,
    pub global_keyprefix: Option<String>,
    pub socket_timeout: Option<f64>,
    pub socket_connect_timeout: Option<f64>,
    /// Keys Celery knows that this worker does not apply.
    pub ignored: Vec<String>,
}

/// Transport option keys kombu or Celery read that change nothing here:
/// accepted without complaint, listed for a warning.
const KNOWN_UNUSED: &[&str] = &[
    "max_connections",
    "health_check_interval",
    "retry_on_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "client_name",
    "polling_interval",
    "unacked_restore_limit",
    "unacked_mutex_expire",
    "min_other_sentinels",
    "sentinel_fanout_compat",
    "retry_policy",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "fanout_patterns",
    "priority_steps",
    "queue_order_strategy",
];

impl TransportOptions {
    /// Parses `--broker-transport-options` / `--result-backend-transport-options`.
    pub fn parse(json: &str, option: &str) -> Result<Self, UrlError> {
        let bad = |why: String| UrlError::Option {
            option: option.to_owned(),
            why,
        };
        let map = json_object(json, option, r#"{"master_name": "mymaster"}"#)?;
        let mut out = Self::default();
        for (key, v) in map {
            match key.as_str() {
                "master_name" => out.master_name = Some(string(&v, &key).map_err(bad)?),
                "visibility_timeout" => {
                    out.visibility_timeout = Some(number(&v, &key).map_err(bad)?)
                }
                "global_keyprefix" => out.global_keyprefix = Some(string(&v, &key).map_err(bad)?),
                "socket_timeout" => out.socket_timeout = Some(number(&v, &key).map_err(bad)?),
                "socket_connect_timeout" => {
                    out.socket_connect_timeout = Some(number(&v, &key).map_err(bad)?)
                }
                "sentinel_kwargs" => {
                    let Value::Object(kw) = v else {
                        return Err(bad("sentinel_kwargs must be an object".into()));
                    };
                    for (k, v) in kw {
                        match k.as_str() {
                            "password" => {
                                out.sentinel_password =
                                    Some(string(&v, "sentinel_kwargs.password").map_err(bad)?)
                            }
                            "username" => {
                                out.sentinel_username =
                                    Some(string(&v, "sentinel_kwargs.username").map_err(bad)?)
                            }
                            "ssl" => out.sentinel_tls = v.as_bool().unwrap_or(false),
                            other => out.ignored.push(format!("sentinel_kwargs.{other}")),
                        }
                    }
                }
                "fanout_prefix" | "sep" | "ack_emulation" | "unacked_key" | "unacked_index_key"
                | "unacked_mutex_key" => {
                    // These change key names; a worker that silently used
                    // the defaults would miss messages the producers wrote.
                    return Err(bad(format!(
                        "{key} is not supported: tori-worker uses kombu's default key names"
                    )));
                }
                k if KNOWN_UNUSED.contains(&k) => out.ignored.push(key),
                _ => out.ignored.push(key),
            }
        }
        Ok(out)
    }
}

fn string(v: &Value, key: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{key} must be a string"))
}

fn number(v: &Value, key: &str) -> Result<f64, String> {
    let n = v
        .as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| format!("{key} must be a number"))?;
    crate::protocol::limits::seconds(n)
        .filter(|d| !d.is_zero())
        .map(|_| n)
        .ok_or_else(|| format!("{key} must be a positive number of seconds"))
}

/// A JSON object given on the command line; `example` is shown when it
/// is not one.
fn json_object(
    json: &str,
    option: &str,
    example: &str,
) -> Result<serde_json::Map<String, Value>, UrlError> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(UrlError::Option {
            option: option.to_owned(),
            why: format!("must be a JSON object, e.g. '{example}'"),
        }),
        Err(e) => Err(UrlError::Option {
            option: option.to_owned(),
            why: format!("not JSON ({e}); e.g. '{example}'"),
        }),
    }
}

/// Celery's `broker_use_ssl` / `redis_backend_use_ssl` dictionary.
pub fn parse_use_ssl(json: &str, option: &str) -> Result<BTreeMap<String, String>, UrlError> {
    let bad = |why: String| UrlError::Option {
        option: option.to_owned(),
        why,
    };
    let map = json_object(
        json,
        option,
        r#"{"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/redis/ca.pem"}"#,
    )?;
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let text = match v {
            Value::String(s) => s,
            Value::Bool(b) => if b { "true" } else { "false" }.to_owned(),
            Value::Number(n) => n.to_string(),
            Value::Null => continue,
            _ => return Err(bad(format!("{k} must be a string, number or boolean"))),
        };
        out.insert(k, text);
    }
    Ok(out)
}

/// Parses a broker or result backend URL. `use_ssl` is the
/// `*_use_ssl` dictionary (its presence turns TLS on, as in kombu);
/// parameters in the URL's query win over it.
pub fn parse(
    url: &str,
    use_ssl: Option<&BTreeMap<String, String>>,
    options: &TransportOptions,
) -> Result<RedisSettings, UrlError> {
    let redacted = redact_url(url);
    let invalid = |why: String| UrlError::Invalid {
        url: redacted.clone(),
        why,
    };
    let parts: Vec<&str> = url
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let first = *parts.first().ok_or_else(|| invalid("empty URL".into()))?;
    let (scheme, rest) = first
        .split_once("://")
        .ok_or_else(|| invalid("no scheme (expected e.g. redis://host:6379/0)".into()))?;
    let scheme = scheme.to_ascii_lowercase();
    if parts.len() > 1 && scheme != "sentinel" {
        return Err(invalid("';' separates sentinel:// URLs only".into()));
    }
    let parsed = Parts::split(rest).map_err(&invalid)?;
    let mut query = parsed.query.clone();
    let mut settings = RedisSettings {
        endpoint: Endpoint::Tcp {
            host: String::new(),
            port: REDIS_PORT,
        },
        db: 0,
        username: parsed.username.clone(),
        password: parsed.password.clone(),
        tls: None,
        connect_timeout: None,
        socket_timeout: None,
        redacted: redacted.clone(),
        ignored: options.ignored.clone(),
    };
    let unix = matches!(
        scheme.as_str(),
        "unix" | "redis+unix" | "socket" | "redis+socket"
    );
    let mut tls_wanted = scheme == "rediss" || use_ssl.is_some();
    match scheme.as_str() {
        "redis" | "rediss" => {
            let (host, port) = host_port(&parsed.authority, REDIS_PORT).map_err(&invalid)?;
            settings.endpoint = Endpoint::Tcp { host, port };
            settings.db = db_from_path(&parsed.path).map_err(&invalid)?;
        }
        _ if unix => {
            // kombu's `socket:///path` keeps the path; a host part is not
            // meaningful for a socket.
            if !parsed.authority.is_empty() {
                return Err(invalid(format!(
                    "a socket URL has no host ({:?}); write {scheme}:///path/to/redis.sock",
                    parsed.authority
                )));
            }
            if parsed.path.is_empty() || parsed.path == "/" {
                return Err(invalid("no socket path".into()));
            }
            settings.endpoint = Endpoint::Unix {
                path: PathBuf::from(&parsed.path),
            };
            tls_wanted = false;
        }
        "sentinel" => {
            let master_name = options.master_name.clone().ok_or_else(|| {
                invalid("sentinel:// needs the master_name transport option, e.g. --broker-transport-options '{\"master_name\": \"mymaster\"}'".into())
            })?;
            let mut nodes = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let (s, r) = part
                    .split_once("://")
                    .ok_or_else(|| invalid(format!("sentinel {} has no scheme", i + 1)))?;
                if !s.eq_ignore_ascii_case("sentinel") {
                    return Err(invalid(format!(
                        "every part must be sentinel://, not {s}://"
                    )));
                }
                let p = Parts::split(r).map_err(&invalid)?;
                nodes.push(host_port(&p.authority, SENTINEL_PORT).map_err(&invalid)?);
                if i == 0 {
                    settings.db = db_from_path(&p.path).map_err(&invalid)?;
                }
            }
            settings.endpoint = Endpoint::Sentinel {
                nodes,
                master_name,
                username: options.sentinel_username.clone(),
                password: options.sentinel_password.clone(),
                tls: options.sentinel_tls,
            };
        }
        other => {
            return Err(UrlError::Scheme {
                url: redacted,
                scheme: other.to_owned(),
            })
        }
    }

    // Query parameters, in the names redis-py, kombu and the redis crate use.
    for key in ["db", "virtual_host"] {
        if let Some(v) = query.remove(key) {
            settings.db = db_from_path(&v).map_err(&invalid)?;
        }
    }
    for key in ["password", "pass"] {
        if let Some(v) = query.remove(key) {
            settings.password = Some(v);
        }
    }
    for key in ["username", "user"] {
        if let Some(v) = query.remove(key) {
            settings.username = Some(v);
        }
    }
    let secs = |key: &str, v: String| -> Result<Duration, UrlError> {
        v.trim()
            .parse::<f64>()
            .ok()
            .and_then(crate::protocol::limits::seconds)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(format!("{key}={v:?} is not a positive number of seconds")))
    };
    if let Some(v) = query.remove("socket_timeout") {
        settings.socket_timeout = Some(secs("socket_timeout", v)?);
    }
    if let Some(v) = query.remove("socket_connect_timeout") {
        settings.connect_timeout = Some(secs("socket_connect_timeout", v)?);
    }
    if settings.socket_timeout.is_none() {
        settings.socket_timeout = options.socket_timeout.map(Duration::from_secs_f64);
    }
    if settings.connect_timeout.is_none() {
        settings.connect_timeout = options.socket_connect_timeout.map(Duration::from_secs_f64);
    }

    // TLS: the dictionary first, the URL's own parameters over it.
    let mut ssl: BTreeMap<String, String> = use_ssl.cloned().unwrap_or_default();
    for key in [
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    ] {
        if let Some(v) = query.remove(key) {
            ssl.insert(key.to_owned(), v);
        }
    }
    if tls_wanted {
        settings.tls = Some(tls_settings(&ssl).map_err(&invalid)?);
    } else if !ssl.is_empty() && !unix {
        return Err(invalid(format!(
            "{} given for a plain-text URL: use rediss:// for TLS",
            ssl.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    settings.ignored.extend(query.into_keys());
    Ok(settings)
}

fn tls_settings(ssl: &BTreeMap<String, String>) -> Result<TlsSettings, String> {
    let mut tls = TlsSettings::default();
    for (key, value) in ssl {
        let v = value.trim();
        match key.as_str() {
            "ssl_cert_reqs" => {
                tls.cert_reqs = match v.to_ascii_lowercase().as_str() {
                    "required" | "cert_required" | "ssl.cert_required" | "2" => CertReqs::Required,
                    // A client always gets the server's certificate, so
                    // Python treats "optional" as "required" on this side.
                    "optional" | "cert_optional" | "ssl.cert_optional" | "1" => CertReqs::Required,
                    "none" | "cert_none" | "ssl.cert_none" | "0" => CertReqs::None,
                    _ => {
                        return Err(format!(
                            "ssl_cert_reqs={v:?}: expected required, optional or none (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"
                        ))
                    }
                }
            }
            "ssl_ca_certs" => tls.ca_certs = Some(PathBuf::from(v)),
            "ssl_certfile" => tls.certfile = Some(PathBuf::from(v)),
            "ssl_keyfile" => tls.keyfile = Some(PathBuf::from(v)),
            "ssl_check_hostname" => {
                tls.check_hostname = match v.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => return Err(format!("ssl_check_hostname={v:?}: expected true or false")),
                }
            }
            // Other redis-py ssl_* keys (ssl_password, ssl_ciphers, ...)
            // are not supported; refusing them beats ignoring a setting
            // that was meant to protect the connection.
            other => return Err(format!("{other} is not supported (supported: ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname)")),
        }
    }
    if tls.certfile.is_some() != tls.keyfile.is_some() {
        return Err(
            "ssl_certfile and ssl_keyfile go together (a client certificate and its key)".into(),
        );
    }
    if tls.cert_reqs == CertReqs::None {
        tls.check_hostname = false;
    }
    Ok(tls)
}

/// `[userinfo@]authority[/path][?query]`, percent-decoded.
#[derive(Debug, Default, Clone)]
struct Parts {
    username: Option<String>,
    password: Option<String>,
    authority: String,
    path: String,
    query: BTreeMap<String, String>,
}

impl Parts {
    fn split(rest: &str) -> Result<Self, String> {
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        // The userinfo ends at the last '@' before the path starts (a
        // socket URL's path starts right after it: `socket://:pw@/tmp/r.sock`).
        let path_start = before_query.find('/').unwrap_or(before_query.len());
        let (userinfo, after) = match before_query[..path_start].rfind('@') {
            Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
            None => (None, before_query),
        };
        let path_start = after.find('/').unwrap_or(after.len());
        let mut parts = Parts {
            authority: decode(&after[..path_start])?,
            path: decode(&after[path_start..])?,
            ..Parts::default()
        };
        if let Some(info) = userinfo {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            parts.username = Some(decode(user)?).filter(|u| !u.is_empty());
            parts.password = pass.map(decode).transpose()?;
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            parts.query.insert(decode(k)?, decode(v)?);
        }
        Ok(parts)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not UTF-8 once percent-decoded"))
}

fn host_port(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {authority:?}"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p:?} is not a port number"))?,
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok((host.to_owned(), port))
}

/// `/3`, `3`, `/` or empty (database 0), as kombu's virtual host.
fn db_from_path(path: &str) -> Result<i64, String> {
    let p = path.trim().trim_start_matches('/');
    if p.is_empty() {
        return Ok(0);
    }
    p.parse::<i64>()
        .ok()
        .filter(|db| *db >= 0)
        .ok_or_else(|| format!("database {p:?} is not a number"))
}

/// Masks the secrets of any URL form for showing it: the password in the
/// userinfo of each `;`-separated part and secret query parameters. Works
/// on URLs that do not parse too, since those are shown in errors.
pub fn redact_url(url: &str) -> String {
    url.split(';').map(redact_one).collect::<Vec<_>>().join(";")
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let path_start = before_query.find('/').unwrap_or(before_query.len());
    let mut out = head.to_owned();
    match before_query[..path_start].rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                // `redis://secret@host`: redis-py reads a lone userinfo
                // as the password.
                None => out.push_str(MASK),
            }
            out.push_str(&before_query[at..]);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                    format!("{k}={MASK}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(url: &str) -> RedisSettings {
        parse(url, None, &TransportOptions::default()).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn tcp_urls() {
        let s = p("redis://:pw@10.0.0.1:6390/3");
        assert_eq!(
            s.endpoint,
            Endpoint::Tcp {
                host: "10.0.0.1".into(),
                port: 6390
            }
        );
        assert_eq!(
            (s.db, s.password.as_deref(), s.username),
            (3, Some("pw"), None)
        );
        assert!(s.tls.is_none());
        let s = p("redis://user:p%40ss@host");
        assert_eq!(s.username.as_deref(), Some("user"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert_eq!(
            s.endpoint,
            Endpoint::Tcp {
                host: "host".into(),
                port: 6379
            }
        );
        let s = p("redis://[::1]:7000/1");
        assert_eq!(
            s.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert_eq!(p("redis://h/0?db=5").db, 5);
        assert!(parse("redis://h/x", None, &TransportOptions::default()).is_err());
        assert!(parse("redis://h:99999/0", None, &TransportOptions::default()).is_err());
        assert!(matches!(
            parse("amqp://h", None, &TransportOptions::default()),
            Err(UrlError::Scheme { .. })
        ));
    }

    #[test]
    fn tls_parameters_in_the_forms_celery_users_write() {
        let s = p("rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fca.pem");
        let tls = s.tls.unwrap();
        assert_eq!(tls.cert_reqs, CertReqs::Required);
        assert_eq!(tls.ca_certs, Some(PathBuf::from("/etc/ca.pem")));
        assert!(tls.check_hostname);
        for (v, want) in [
            ("CERT_REQUIRED", CertReqs::Required),
            ("CERT_OPTIONAL", CertReqs::Required),
            ("optional", CertReqs::Required),
            ("CERT_NONE", CertReqs::None),
            ("none", CertReqs::None),
        ] {
            let s = p(&format!("rediss://h?ssl_cert_reqs={v}"));
            assert_eq!(s.tls.as_ref().unwrap().cert_reqs, want, "{v}");
        }
        assert!(
            !p("rediss://h?ssl_cert_reqs=none")
                .tls
                .unwrap()
                .check_hostname
        );
        assert!(
            !p("rediss://h?ssl_check_hostname=false")
                .tls
                .unwrap()
                .check_hostname
        );
        // A plain URL with TLS parameters is a mistake worth a clear error.
        let e = parse(
            "redis://h?ssl_ca_certs=/x",
            None,
            &TransportOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rediss://"), "{e}");
        let e = parse(
            "rediss://h?ssl_certfile=/c",
            None,
            &TransportOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ssl_keyfile"), "{e}");
        assert!(parse(
            "rediss://h?ssl_cert_reqs=maybe",
            None,
            &TransportOptions::default()
        )
        .is_err());
    }

    #[test]
    fn use_ssl_dictionary_turns_tls_on_and_the_url_wins() {
        let dict = parse_use_ssl(
            r#"{"ssl_cert_reqs": 2, "ssl_ca_certs": "/a.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}"#,
            "--broker-use-ssl",
        )
        .unwrap();
        let s = parse(
            "redis://h/0?ssl_ca_certs=/b.pem",
            Some(&dict),
            &TransportOptions::default(),
        )
        .unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.ca_certs, Some(PathBuf::from("/b.pem")));
        assert_eq!(tls.certfile, Some(PathBuf::from("/c.pem")));
        assert!(parse_use_ssl("[1]", "--broker-use-ssl").is_err());
    }

    #[test]
    fn socket_urls_in_kombu_and_redis_py_forms() {
        for (url, db, pw) in [
            ("unix:///run/r.sock?db=2", 2, None),
            ("redis+unix:///run/r.sock", 0, None),
            ("socket:///run/r.sock", 0, None),
            ("redis+socket:///run/r.sock?virtual_host=4", 4, None),
            ("redis+socket:///run/r.sock?virtual_host=/4", 4, None),
            (
                "socket://:secret@/run/r.sock?virtual_host=1",
                1,
                Some("secret"),
            ),
            ("unix:///run/r.sock?db=2&pass=secret", 2, Some("secret")),
            ("unix:///run/r.sock?db=2&password=secret", 2, Some("secret")),
        ] {
            let s = p(url);
            assert_eq!(
                s.endpoint,
                Endpoint::Unix {
                    path: "/run/r.sock".into()
                },
                "{url}"
            );
            assert_eq!(s.db, db, "{url}");
            assert_eq!(s.password.as_deref(), pw, "{url}");
            assert!(!s.redacted().contains("secret"), "{}", s.redacted());
        }
        assert!(parse(
            "socket://host/run/r.sock",
            None,
            &TransportOptions::default()
        )
        .is_err());
    }

    #[test]
    fn sentinel_urls_with_transport_options() {
        let opts = TransportOptions::parse(
            r#"{"master_name": "mymaster", "sentinel_kwargs": {"password": "spw"}, "visibility_timeout": 7200, "global_keyprefix": "p:", "max_connections": 10}"#,
            "--broker-transport-options",
        )
        .unwrap();
        assert_eq!(opts.visibility_timeout, Some(7200.0));
        assert_eq!(opts.global_keyprefix.as_deref(), Some("p:"));
        assert_eq!(opts.ignored, vec!["max_connections".to_owned()]);
        let s = parse(
            "sentinel://:mpw@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://[::1]:26380",
            None,
            &opts,
        )
        .unwrap();
        assert_eq!(s.db, 2);
        assert_eq!(s.password.as_deref(), Some("mpw"));
        let Endpoint::Sentinel {
            nodes,
            master_name,
            password,
            ..
        } = &s.endpoint
        else {
            panic!("{:?}", s)
        };
        assert_eq!(master_name, "mymaster");
        assert_eq!(password.as_deref(), Some("spw"));
        assert_eq!(
            nodes,
            &vec![
                ("10.0.0.1".to_owned(), 26379),
                ("10.0.0.2".to_owned(), 26379),
                ("::1".to_owned(), 26380)
            ]
        );
        let debug = format!("{s:?} {s}");
        assert!(!debug.contains("mpw") && !debug.contains("spw"), "{debug}");
        let e = parse("sentinel://h:26379", None, &TransportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("master_name"), "{e}");
        assert!(TransportOptions::parse(r#"{"sep": ":"}"#, "--x").is_err());
        assert!(TransportOptions::parse(r#"{"visibility_timeout": -1}"#, "--x").is_err());
    }

    #[test]
    fn redacts_every_form() {
        for (url, want) in [
            (
                "redis://:secret@host:6379/0",
                "redis://:********@host:6379/0",
            ),
            ("rediss://user:secret@h/1", "rediss://user:********@h/1"),
            ("redis://secret@h/1", "redis://********@h/1"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            (
                "unix:///r.sock?db=2&pass=secret",
                "unix:///r.sock?db=2&pass=********",
            ),
            (
                "unix:///r.sock?password=secret&db=1",
                "unix:///r.sock?password=********&db=1",
            ),
            ("socket://:secret@/r.sock", "socket://:********@/r.sock"),
            (
                "sentinel://:secret@a:1/0;sentinel://:secret2@b:2",
                "sentinel://:********@a:1/0;sentinel://:********@b:2",
            ),
            ("not a url secret", "not a url secret"),
        ] {
            assert_eq!(redact_url(url), want);
        }
    }
}
