"""Writing uploads where tori-worker reads them, and returning the reference.

* :class:`LocalStorage` — a directory, the worker's ``TORI_STORAGE_ROOT``.
  References are paths relative to that root (``uploads/ab/<sha256>.pdf``),
  which ``pdf_ingestion`` resolves under its own root: the two sides may
  mount the directory at different paths.
* :class:`ObjectStorage` — any ``object_store`` URL (``s3://bucket/prefix``,
  ``gs://``, ``az://``, ``file://``) through ``obstore`` (the Python binding
  of the same Rust crate); needs the ``s3`` extra. References are full URLs.
  Note: tori-worker's ``pdf_ingestion`` reads local paths and ``file://``
  only so far (it answers ``[unsupported_scheme]`` for ``s3://``).

Uploads are content-addressed: the object name is the SHA-256 of the bytes,
never the client's file name, so names cannot escape the root and the same
bytes are stored once. Writing is streamed: :meth:`Storage.begin` returns a
:class:`PendingUpload` that hashes and counts as it writes and enforces a
size limit before anything is committed.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Optional, Union

#: Bytes kept from the start of an upload (for magic-byte checks).
HEAD_BYTES = 1024
HEAD_BYTES_PDF = HEAD_BYTES


class StorageError(RuntimeError):
    """Storage is misconfigured or unreachable."""


class UploadTooLarge(ValueError):
    """The upload exceeded ``max_bytes``."""

    def __init__(self, max_bytes: int):
        super().__init__(f"upload exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StoredFile:
    ref: str
    """What to pass to ``ingest_pdf_task.delay(ref)``."""
    sha256: str
    size: int
    url: str
    """Where the bytes are (``file:///...`` or the object URL)."""


class PendingUpload:
    """An upload being written to a local temporary file. Call
    :meth:`write` per chunk, then :meth:`commit` (or :meth:`discard`).
    As a context manager it discards unless committed."""

    def __init__(self, storage: "Storage", tmp_path: Path, max_bytes: Optional[int]):
        self._storage = storage
        self.tmp_path = tmp_path
        self.max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._f: Optional[IO[bytes]] = open(tmp_path, "xb")
        self.size = 0
        self.head = b""
        self.committed: Optional[StoredFile] = None

    def write(self, chunk: bytes) -> None:
        if self._f is None:
            raise ValueError("upload already closed")
        if not chunk:
            return
        if self.max_bytes is not None and self.size + len(chunk) > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self._hash.update(chunk)
        self._f.write(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def commit(self, suffix: str = ".pdf") -> StoredFile:
        self._close()
        self.committed = self._storage._commit(self, suffix)
        return self.committed

    def discard(self) -> None:
        self._close()
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "PendingUpload":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.committed is None:
            self.discard()


class Storage(ABC):
    """Base class: :meth:`begin` a streamed upload or :meth:`save` bytes."""

    prefix: str = "uploads"

    @abstractmethod
    def _tmp_dir(self) -> Path:
        """Where uploads are staged before they are committed."""

    @abstractmethod
    def _commit(self, upload: PendingUpload, suffix: str) -> StoredFile:
        """Moves a finished upload to its content-addressed key."""

    def key_for(self, sha256: str, suffix: str = ".pdf") -> str:
        return f"{self.prefix}/{sha256[:2]}/{sha256}{suffix}"

    def begin(self, max_bytes: Optional[int] = None) -> PendingUpload:
        tmp = self._tmp_dir()
        tmp.mkdir(parents=True, exist_ok=True)
        return PendingUpload(self, tmp / f"{uuid.uuid4().hex}.part", max_bytes)

    def save(self, data: Union[bytes, IO[bytes], Iterable[bytes]], *,
             max_bytes: Optional[int] = None, suffix: str = ".pdf",
             chunk_size: int = 1 << 16) -> StoredFile:
        """Stores ``data`` (bytes, a binary file object such as FastAPI's
        ``UploadFile.file``, or an iterable of chunks); returns the reference."""
        with self.begin(max_bytes) as up:
            if isinstance(data, (bytes, bytearray, memoryview)):
                up.write(bytes(data))
            elif hasattr(data, "read"):
                while True:
                    chunk = data.read(chunk_size)
                    if not chunk:
                        break
                    up.write(chunk)
            else:
                for chunk in data:
                    up.write(chunk)
            return up.commit(suffix)


class LocalStorage(Storage):
    """A directory shared with the worker (its ``TORI_STORAGE_ROOT``)."""

    def __init__(self, root: Union[str, Path], prefix: str = "uploads"):
        self.root = Path(root).resolve()
        self.prefix = prefix.strip("/")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _tmp_dir(self) -> Path:
        return self.root / ".incoming"

    def path_of(self, ref: str) -> Path:
        return self.root / ref

    def _commit(self, upload: PendingUpload, suffix: str) -> StoredFile:
        key = self.key_for(upload.sha256, suffix)
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and dest.stat().st_size == upload.size:
            upload.tmp_path.unlink()  # same bytes already stored
        else:
            os.replace(upload.tmp_path, dest)
        return StoredFile(ref=key, sha256=upload.sha256, size=upload.size, url=dest.as_uri())


class ObjectStorage(Storage):
    """An object store by URL through ``obstore`` (``pip install tori-bridge[s3]``).

    ``options`` go to ``obstore.store.from_url`` (e.g. ``endpoint``,
    ``access_key_id``, ``secret_access_key``, ``region``,
    ``client_options={"allow_http": True}`` for MinIO over http)."""

    def __init__(self, url: str, prefix: str = "uploads", **options: Any):
        try:
            import obstore.store
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise StorageError("ObjectStorage needs obstore: pip install 'tori-bridge[s3]'") from e
        self.url = url.rstrip("/")
        self.prefix = prefix.strip("/")
        self.store = obstore.store.from_url(self.url, **options)
        self._tmp = Path(tempfile.gettempdir()) / "tori-bridge-uploads"

    def __repr__(self) -> str:
        return f"ObjectStorage({self.url!r})"

    def _tmp_dir(self) -> Path:
        return self._tmp

    def _commit(self, upload: PendingUpload, suffix: str) -> StoredFile:
        import obstore

        key = self.key_for(upload.sha256, suffix)
        try:
            obstore.put(self.store, key, upload.tmp_path)
        except Exception as e:
            raise StorageError(f"could not store {key} in {self.url}: {e}") from e
        finally:
            upload.tmp_path.unlink(missing_ok=True)
        url = f"{self.url}/{key}"
        return StoredFile(ref=url, sha256=upload.sha256, size=upload.size, url=url)


def storage_from_env(env: Optional[Mapping[str, str]] = None) -> Storage:
    """``TORI_STORAGE_URL`` (an object-store URL; ``file://`` = local), else
    ``TORI_STORAGE_ROOT`` (the directory the worker reads)."""
    env = os.environ if env is None else env
    url = env.get("TORI_STORAGE_URL")
    if url:
        if url.startswith("file://"):
            return LocalStorage(url[len("file://"):])
        return ObjectStorage(url)
    root = env.get("TORI_STORAGE_ROOT")
    if root:
        return LocalStorage(root)
    raise StorageError(
        "no storage configured: set TORI_STORAGE_ROOT to the directory tori-worker reads "
        "(the same value as the worker's TORI_STORAGE_ROOT), or TORI_STORAGE_URL")
