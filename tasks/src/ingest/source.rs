//! Where a `file_ref` points, and reading it within the limits.
//!
//! A reference is one of:
//! - a path under the local storage root (`TORI_STORAGE_ROOT`; relative
//!   paths are taken from it), or a `file://` URL inside it;
//! - an object URL inside the object storage root (`TORI_STORAGE_URL`,
//!   e.g. `s3://bucket/uploads`: the same variable the Python bridge's
//!   `storage_from_env` writes uploads under).
//!
//! Anything else is refused before any storage is touched, so a producer
//! cannot make the worker read (or probe the existence of) files outside
//! the roots it was given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::artifacts::ArtifactStore;
use super::objects::{block_on, StoreUrl};
use super::task::{exc, runtime, value_error};
use crate::task::TaskError;

pub const ENV_ROOT: &str = "TORI_STORAGE_ROOT";
pub const ENV_URL: &str = "TORI_STORAGE_URL";

/// How long one object read may keep retrying a failing store before the
/// task fails with the store's error (object_store's default is 3 min).
const OBJECT_RETRY_TIMEOUT: Duration = Duration::from_secs(20);

/// The roots file references may point into.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The local root, canonical; `Err` says why there is none.
    local: Result<PathBuf, String>,
    /// The object storage root, when configured (`Err`: misconfigured).
    remote: Option<Result<RemoteRoot, String>>,
}

#[derive(Debug, Clone)]
struct RemoteRoot {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket`.
    bucket_url: String,
    prefix: ObjectPath,
}

/// A reference resolved inside a root.
#[derive(Debug)]
pub enum Resolved {
    File(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        key: ObjectPath,
    },
}

impl Sources {
    /// From `TORI_STORAGE_ROOT` and `TORI_STORAGE_URL`. A `file://`
    /// storage URL serves as the local root when `TORI_STORAGE_ROOT` is
    /// unset.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let url = var(ENV_URL);
        let root = var(ENV_ROOT).or_else(|| {
            let u = url.as_deref()?;
            u.starts_with("file://")
                .then(|| url::Url::parse(u).ok()?.to_file_path().ok())
                .flatten()
                .map(|p| p.to_string_lossy().into_owned())
        });
        let local = match root {
            Some(r) => canonical_root(Path::new(&r)),
            None => Err(format!(
                "[no_storage_root] {ENV_ROOT} is not set: the worker reads \
                 PDFs only under a configured storage root"
            )),
        };
        let sources = Self {
            local,
            remote: None,
        };
        match url.filter(|u| !u.starts_with("file://")) {
            Some(u) => sources.with_remote(&u),
            None => sources,
        }
    }

    /// Only the local root `root`.
    pub fn local(root: &Path) -> Self {
        Self {
            local: canonical_root(root),
            remote: None,
        }
    }

    /// Adds the object storage root `url` (`s3://bucket/prefix`).
    pub fn with_remote(mut self, url: &str) -> Self {
        let bad = |e: String| format!("[storage_config] {ENV_URL}={url}: {e}");
        self.remote = Some(
            match StoreUrl::parse_with_retry(url, OBJECT_RETRY_TIMEOUT) {
                Ok(StoreUrl::Remote {
                    store,
                    bucket_url,
                    prefix,
                }) => Ok(RemoteRoot {
                    store,
                    bucket_url,
                    prefix,
                }),
                Ok(StoreUrl::Local(_)) => Err(bad("a file:// URL is a local root".into())),
                Err(e) => Err(bad(e)),
            },
        );
        self
    }

    /// The local root, if usable.
    pub fn local_root(&self) -> Option<&Path> {
        self.local.as_deref().ok()
    }

    /// Where artifacts go when `TORI_ARTIFACTS_URL` is unset: `artifacts/`
    /// under the local root, else under the object storage root.
    pub fn default_artifacts(&self) -> Result<ArtifactStore, String> {
        match (&self.local, &self.remote) {
            (Ok(root), _) => ArtifactStore::local(&root.join("artifacts")),
            (Err(_), Some(Ok(r))) => Ok(ArtifactStore::in_store(
                r.store.clone(),
                r.prefix.clone().join("artifacts"),
                &r.bucket_url,
            )),
            (Err(e), _) => Err(format!(
                "[artifacts_unconfigured] no {} and no storage root: {e}",
                super::artifacts::ENV_URL
            )),
        }
    }

    /// Resolves `file_ref` inside a root, or a specific error.
    pub fn resolve(&self, file_ref: &str) -> Result<Resolved, TaskError> {
        if file_ref.is_empty() || file_ref.contains('\0') {
            return Err(value_error(
                "[bad_file_ref] empty or invalid file reference",
            ));
        }
        if let Some(rest) = file_ref.strip_prefix("file://") {
            return self.resolve_local(file_ref, rest);
        }
        match file_ref.split_once("://") {
            Some(("s3" | "s3a", _)) => self.resolve_object(file_ref),
            Some((scheme, _)) => Err(value_error(format!(
                "[unsupported_scheme] {scheme}:// file references are not supported \
                 (paths under {ENV_ROOT}, file:// URLs in it, or s3:// URLs under {ENV_URL})"
            ))),
            None => self.resolve_local(file_ref, file_ref),
        }
    }

    fn resolve_local(&self, file_ref: &str, path_part: &str) -> Result<Resolved, TaskError> {
        let root = self.local.as_ref().map_err(|e| runtime(e.clone()))?;
        if path_part.is_empty() {
            return Err(value_error(
                "[bad_file_ref] empty or invalid file reference",
            ));
        }
        let candidate = root.join(path_part); // an absolute path replaces root
                                              // Refuse what is outside the root by its name alone, before the
                                              // file system is touched: otherwise the error would tell a
                                              // producer which files exist outside the root.
        if !lexically_normal(&candidate).starts_with(root) {
            return Err(outside(file_ref));
        }
        let resolved = candidate
            .canonicalize()
            .map_err(|e| exc("FileNotFoundError", format!("[not_found] {file_ref}: {e}")))?;
        // Symlinks may still point out of the root.
        if !resolved.starts_with(root) {
            return Err(outside(file_ref));
        }
        if !resolved.is_file() {
            return Err(value_error(format!(
                "[not_a_file] {file_ref} is not a regular file"
            )));
        }
        Ok(Resolved::File(resolved))
    }

    fn resolve_object(&self, file_ref: &str) -> Result<Resolved, TaskError> {
        let root = match &self.remote {
            None => {
                return Err(exc(
                    "PermissionError",
                    format!(
                        "[outside_storage_root] {file_ref}: no object storage root is \
                         configured (set {ENV_URL}=s3://bucket/prefix on the worker)"
                    ),
                ))
            }
            Some(Err(e)) => return Err(runtime(e.clone())),
            Some(Ok(r)) => r,
        };
        let url = url::Url::parse(file_ref)
            .map_err(|e| value_error(format!("[bad_file_ref] {file_ref}: {e}")))?;
        let same_bucket = format!("s3://{}", url.host_str().unwrap_or_default()) == root.bucket_url
            && url.query().is_none()
            && url.fragment().is_none();
        // `from_url_path` percent-decodes, then refuses `.`/`..` and empty
        // segments, so `%2e%2e` cannot climb out of the prefix either.
        let key = ObjectPath::from_url_path(url.path().trim_start_matches('/'))
            .map_err(|e| value_error(format!("[bad_file_ref] {file_ref}: {e}")))?;
        if !same_bucket || !key.prefix_matches(&root.prefix) || key == root.prefix {
            return Err(outside(file_ref));
        }
        Ok(Resolved::Object {
            store: root.store.clone(),
            key,
        })
    }

    /// Reads `file_ref`, refusing more than `max_bytes` before reading.
    pub fn read(&self, file_ref: &str, max_bytes: u64) -> Result<Vec<u8>, TaskError> {
        let too_large = |size: u64| {
            value_error(format!(
                "[too_large] {file_ref} has {size} bytes, more than the limit of {max_bytes}"
            ))
        };
        let read_failed =
            |e: &dyn std::fmt::Display| exc("OSError", format!("[read_failed] {file_ref}: {e}"));
        match self.resolve(file_ref)? {
            Resolved::File(path) => {
                let size = std::fs::metadata(&path).map_err(|e| read_failed(&e))?.len();
                if size > max_bytes {
                    return Err(too_large(size));
                }
                std::fs::read(&path).map_err(|e| read_failed(&e))
            }
            Resolved::Object { store, key } => {
                let fetched = block_on(async {
                    let meta = store.head(&key).await?;
                    if meta.size > max_bytes {
                        return Ok(Err(meta.size));
                    }
                    let bytes = store.get(&key).await?.bytes().await?;
                    Ok(Ok(bytes))
                })
                .map_err(runtime)?;
                match fetched {
                    Ok(Ok(bytes)) if bytes.len() as u64 > max_bytes => {
                        Err(too_large(bytes.len() as u64))
                    }
                    Ok(Ok(bytes)) => Ok(bytes.to_vec()),
                    Ok(Err(size)) => Err(too_large(size)),
                    Err(object_store::Error::NotFound { .. }) => Err(exc(
                        "FileNotFoundError",
                        format!("[not_found] {file_ref}: no such object"),
                    )),
                    Err(e) => Err(read_failed(&e)),
                }
            }
        }
    }
}

fn outside(file_ref: &str) -> TaskError {
    exc(
        "PermissionError",
        format!("[outside_storage_root] {file_ref} is outside the storage root"),
    )
}

fn canonical_root(root: &Path) -> Result<PathBuf, String> {
    root.canonicalize().map_err(|e| {
        format!(
            "[no_storage_root] the storage root {} is not usable: {e}",
            root.display()
        )
    })
}

/// Resolves `.` and `..` by name only (no file system access).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> (tempdir::Dir, Sources) {
        let dir = tempdir::Dir::new();
        std::fs::write(dir.path().join("a.pdf"), b"%PDF-1.4").unwrap();
        let s = Sources::local(dir.path()).with_remote("s3://bucket/uploads");
        (dir, s)
    }

    fn reason(r: Result<Resolved, TaskError>) -> String {
        match r {
            Err(TaskError::Failed { exception, .. }) => {
                format!("{} {:?}", exception.name, exception.args)
            }
            Err(other) => format!("{other:?}"),
            Ok(r) => format!("ok {r:?}"),
        }
    }

    #[test]
    fn object_refs_must_stay_under_the_storage_url() {
        let (_d, s) = sources();
        assert!(matches!(
            s.resolve("s3://bucket/uploads/ab/cd.pdf"),
            Ok(Resolved::Object { .. })
        ));
        for bad in [
            "s3://bucket/other/cd.pdf",
            "s3://other-bucket/uploads/cd.pdf",
            "s3://bucket/uploads",
            "s3://bucket/uploadsX/cd.pdf",
        ] {
            let r = reason(s.resolve(bad));
            assert!(r.contains("[outside_storage_root]"), "{bad}: {r}");
        }
        for bad in [
            "s3://bucket/uploads/../secret.pdf",
            "s3://bucket/uploads/%2e%2e/secret.pdf",
        ] {
            let r = reason(s.resolve(bad));
            assert!(
                r.contains("[bad_file_ref]") || r.contains("[outside_storage_root]"),
                "{bad}: {r}"
            );
        }
        let r = reason(s.resolve("gs://bucket/uploads/a.pdf"));
        assert!(r.contains("[unsupported_scheme]"), "{r}");
    }

    #[test]
    fn object_refs_without_a_storage_url_are_refused() {
        let d = tempdir::Dir::new();
        let s = Sources::local(d.path());
        let r = reason(s.resolve("s3://bucket/uploads/a.pdf"));
        assert!(r.contains("PermissionError") && r.contains(ENV_URL), "{r}");
    }

    #[test]
    fn local_refs_stay_under_the_root() {
        let (d, s) = sources();
        assert!(matches!(s.resolve("a.pdf"), Ok(Resolved::File(_))));
        let url = format!(
            "file://{}",
            d.path().canonicalize().unwrap().join("a.pdf").display()
        );
        assert!(matches!(s.resolve(&url), Ok(Resolved::File(_))));
        for bad in ["../a.pdf", "/etc/passwd", "file:///etc/passwd"] {
            let r = reason(s.resolve(bad));
            assert!(r.contains("[outside_storage_root]"), "{bad}: {r}");
        }
    }

    /// A throwaway directory (no dev-dependency needed for one use).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "tori-sources-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
