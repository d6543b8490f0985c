"""Settings from the environment (all optional)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from tori_bridge import broker_url_from_env, result_backend_from_env

from .auth import ApiKeys, keys_from_env, truthy


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass
class Settings:
    broker_url: str
    result_backend: str
    #: SQLAlchemy URL of the jobs table (SQLite file by default;
    #: ``postgresql+psycopg://user:pw@host/db`` for PostgreSQL).
    database_url: str = "sqlite:///tori_shim.db"
    #: Largest accepted upload.
    max_upload_bytes: int = 100 * 1024 * 1024
    #: POST /jobs answers 503 while the queue holds more messages than this.
    max_queue: int = 200
    #: Seconds in the Retry-After header of such a 503.
    retry_after: int = 10
    #: The Celery queue pdf_ingestion is sent to (and whose length is watched).
    queue: str = "celery"
    #: Interval of the SSE stream's polls of the result backend, seconds.
    sse_poll: float = 0.25
    #: An SSE stream ends (event ``timeout``) after this many seconds.
    sse_max_seconds: int = 3600
    #: Options passed to pdf_ingestion (``options`` argument), e.g. {"embed": False}.
    ingest_options: Optional[dict[str, Any]] = field(default=None)
    #: Bearer API keys (hashes) and their owners. Empty and ``no_auth`` false:
    #: create_app refuses to build the app.
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    #: Serve without authentication (every caller is owner ``anonymous``);
    #: only loopback clients are then answered.
    no_auth: bool = False

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        return cls(
            broker_url=broker_url_from_env(env),
            result_backend=result_backend_from_env(env),
            database_url=env.get("TORI_SHIM_DATABASE_URL") or "sqlite:///tori_shim.db",
            max_upload_bytes=_int(env, "TORI_SHIM_MAX_UPLOAD_BYTES", 100 * 1024 * 1024),
            max_queue=_int(env, "TORI_SHIM_MAX_QUEUE", 200),
            retry_after=_int(env, "TORI_SHIM_RETRY_AFTER", 10),
            queue=env.get("TORI_QUEUE") or "celery",
            sse_poll=float(env.get("TORI_SHIM_SSE_POLL") or 0.25),
            sse_max_seconds=_int(env, "TORI_SHIM_SSE_MAX_SECONDS", 3600),
            api_keys=keys_from_env(env),
            no_auth=truthy(env.get("TORI_SHIM_NO_AUTH")),
        )
