"""The Celery client app, configured like tori-worker: same env vars, JSON only."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from celery import Celery

DEFAULT_BROKER_URL = "redis://localhost:6379/0"

#: Content types tori-worker accepts (pickle etc. end as ContentDisallowed).
JSON_ONLY: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}


def _env(env: Mapping[str, str], *names: str) -> Optional[str]:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def broker_url_from_env(env: Optional[Mapping[str, str]] = None) -> str:
    """``CELERY_BROKER_URL``, then ``REDIS_URL``, then ``redis://localhost:6379/0``
    (the worker reads the same variables in the same order)."""
    env = os.environ if env is None else env
    return _env(env, "CELERY_BROKER_URL", "REDIS_URL") or DEFAULT_BROKER_URL


def result_backend_from_env(env: Optional[Mapping[str, str]] = None) -> str:
    """``CELERY_RESULT_BACKEND``, then ``REDIS_URL``, then the broker URL."""
    env = os.environ if env is None else env
    return _env(env, "CELERY_RESULT_BACKEND", "REDIS_URL") or broker_url_from_env(env)


def make_celery_app(
    name: str = "tori_bridge",
    *,
    broker: Optional[str] = None,
    backend: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    set_as_current: bool = False,
    **conf: Any,
) -> Celery:
    """A Celery app that talks to tori-worker.

    Broker and backend come from the arguments, else from the environment
    (see :func:`broker_url_from_env`). Serialization is JSON only, which
    tori-worker requires. ``TORI_VISIBILITY_TIMEOUT`` (the worker's env var)
    is copied into ``broker_transport_options`` so Python and Rust agree.
    Extra keyword arguments are Celery settings (``task_routes=...`` etc.).
    """
    env = os.environ if env is None else env
    broker_url = broker or broker_url_from_env(env)
    backend_url = backend or _env(env, "CELERY_RESULT_BACKEND", "REDIS_URL") or broker_url
    app = Celery(name, broker=broker_url, backend=backend_url, set_as_current=set_as_current)
    settings: dict[str, Any] = dict(JSON_ONLY)
    settings.update(
        task_default_queue=env.get("TORI_QUEUE") or "celery",
        broker_connection_retry_on_startup=True,
        enable_utc=True,
        timezone="UTC",
    )
    vt = env.get("TORI_VISIBILITY_TIMEOUT")
    if vt:
        settings["broker_transport_options"] = {"visibility_timeout": int(vt)}
    settings.update(conf)
    app.conf.update(settings)
    return app
