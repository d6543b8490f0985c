//! What input and artifacts share about object storage: parsing a store
//! URL into a store plus key prefix, and driving `object_store`'s async
//! calls from synchronous task code.
//!
//! Tasks run in synchronous pool processes, so calls are driven by one
//! small current-thread tokio runtime per process, created on first use
//! (a task never runs inside another runtime).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, RetryConfig};

fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the object-store runtime: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Runs `f` to completion on this process's object-store runtime.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    Ok(runtime()?.block_on(f))
}

/// A parsed store URL.
#[derive(Debug)]
pub enum StoreUrl {
    /// `file:///dir`.
    Local(PathBuf),
    /// `s3://bucket/prefix` (endpoint, region and credentials from the
    /// standard `AWS_*` variables).
    Remote {
        store: Arc<dyn ObjectStore>,
        /// `s3://bucket`, the part of every object URL before its key.
        bucket_url: String,
        prefix: ObjectPath,
    },
}

impl StoreUrl {
    /// Parses `url`; errors name the problem but not the variable (callers
    /// add which setting it came from).
    pub fn parse(url: &str) -> Result<Self, String> {
        Self::parse_with_retry(url, Duration::from_secs(180))
    }

    /// Like [`Self::parse`], giving up retrying a failing request after
    /// `retry_timeout` (a task's read should fail while its time limit
    /// still leaves room to report why).
    pub fn parse_with_retry(url: &str, retry_timeout: Duration) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        match parsed.scheme() {
            "file" => parsed
                .to_file_path()
                .map(StoreUrl::Local)
                .map_err(|()| "not a local path".to_owned()),
            "s3" | "s3a" => {
                let bucket = parsed.host_str().unwrap_or_default();
                if bucket.is_empty() {
                    return Err("no bucket".into());
                }
                let store = AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(RetryConfig {
                        retry_timeout,
                        ..RetryConfig::default()
                    })
                    .build()
                    .map_err(|e| e.to_string())?;
                let prefix = ObjectPath::from_url_path(parsed.path().trim_matches('/'))
                    .map_err(|e| e.to_string())?;
                Ok(StoreUrl::Remote {
                    store: Arc::new(store),
                    bucket_url: format!("s3://{bucket}"),
                    prefix,
                })
            }
            other => Err(format!(
                "unsupported scheme {other}:// (use file:// or s3://)"
            )),
        }
    }
}

/// `base/prefix` as a URL without a trailing slash.
pub fn join_url(base: &str, prefix: &ObjectPath) -> String {
    if prefix.as_ref().is_empty() {
        base.to_owned()
    } else {
        format!("{base}/{prefix}")
    }
}
