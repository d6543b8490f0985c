//! Ingestion artifacts in object storage, keyed by the PDF's SHA-256:
//! `<prefix>/<sha256>/pages.jsonl`, `chunks.jsonl` and, written last as
//! the completion marker, `result.json`. Re-ingesting the same bytes finds
//! `result.json` and returns it without extracting or embedding.
//!
//! Where: `TORI_ARTIFACTS_URL` (`file:///dir` or `s3://bucket/prefix`; S3
//! endpoint, region and credentials from the standard `AWS_*` variables,
//! e.g. `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true`), else the directory
//! `artifacts/` under the storage root.

use std::path::Path;
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::objects::{block_on, join_url, StoreUrl};
use super::source::Sources;

pub const ENV_URL: &str = "TORI_ARTIFACTS_URL";
pub const PAGES: &str = "pages.jsonl";
pub const CHUNKS: &str = "chunks.jsonl";
pub const RESULT: &str = "result.json";

/// URLs of one document's artifacts (part of the task result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactUrls {
    pub pages: String,
    pub chunks: String,
    pub result: String,
}

/// A configured artifact store: an object store plus a key prefix.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The URL `prefix` is reachable at, without a trailing slash.
    base_url: String,
}

impl ArtifactStore {
    /// From `TORI_ARTIFACTS_URL`, else `artifacts/` under the storage
    /// root (see [`Sources::default_artifacts`]).
    pub fn from_env(sources: &Sources) -> Result<Self, String> {
        match std::env::var(ENV_URL).ok().filter(|v| !v.is_empty()) {
            Some(url) => Self::from_url(&url),
            None => sources.default_artifacts(),
        }
    }

    /// `file:///dir` or `s3://bucket/prefix` (S3 settings from `AWS_*`).
    pub fn from_url(url: &str) -> Result<Self, String> {
        match StoreUrl::parse(url)
            .map_err(|e| format!("[artifacts_config] {ENV_URL}={url}: {e}"))?
        {
            StoreUrl::Local(dir) => Self::local(&dir),
            StoreUrl::Remote {
                store,
                bucket_url,
                prefix,
            } => Ok(Self {
                store,
                base_url: join_url(&bucket_url, &prefix),
                prefix,
            }),
        }
    }

    /// Under `prefix` of an already built `store` reachable at `bucket_url`.
    pub fn in_store(store: Arc<dyn ObjectStore>, prefix: ObjectPath, bucket_url: &str) -> Self {
        Self {
            store,
            base_url: join_url(bucket_url, &prefix),
            prefix,
        }
    }

    /// A directory on the local file system (created if missing).
    pub fn local(dir: &Path) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| {
            format!(
                "[artifacts_config] artifacts directory {}: {e}",
                dir.display()
            )
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let dir = dir.canonicalize().map_err(|e| err(&e))?;
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| err(&e))?;
        let base_url = url::Url::from_directory_path(&dir)
            .map_err(|()| err(&"not an absolute path"))?
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            store: Arc::new(store),
            prefix: ObjectPath::default(),
            base_url,
        })
    }

    fn key(&self, sha256: &str, name: &str) -> ObjectPath {
        self.prefix.clone().join(sha256).join(name)
    }

    /// The URLs the artifacts of `sha256` live (or will live) at.
    pub fn urls(&self, sha256: &str) -> ArtifactUrls {
        let url = |name: &str| format!("{}/{sha256}/{name}", self.base_url);
        ArtifactUrls {
            pages: url(PAGES),
            chunks: url(CHUNKS),
            result: url(RESULT),
        }
    }

    /// The stored `result.json` of `sha256`, or `None` when the document
    /// has no complete artifact set.
    pub fn get_result(&self, sha256: &str) -> Result<Option<Vec<u8>>, String> {
        self.get(sha256, RESULT)
    }

    /// One artifact of `sha256` (`None`: not stored).
    pub fn get(&self, sha256: &str, name: &str) -> Result<Option<Vec<u8>>, String> {
        let key = self.key(sha256, name);
        let store = &self.store;
        block_on(async {
            match store.get(&key).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?
        .map_err(|e| format!("[artifacts_read] {}: {e}", self.describe(&key)))
    }

    /// Writes one artifact of `sha256` (atomically: a reader sees the old
    /// object, none, or the whole new one).
    pub fn put(&self, sha256: &str, name: &str, bytes: Vec<u8>) -> Result<(), String> {
        let key = self.key(sha256, name);
        let store = &self.store;
        block_on(async { store.put(&key, PutPayload::from(bytes)).await })?
            .map(|_| ())
            .map_err(|e| format!("[artifacts_write] {}: {e}", self.describe(&key)))
    }

    fn describe(&self, key: &ObjectPath) -> String {
        let rel = key
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(key.as_ref());
        format!("{}/{}", self.base_url, rel.trim_start_matches('/'))
    }
}
