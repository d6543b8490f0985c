"""Reading task state straight from the result backend (no exception
re-raising, PROGRESS meta included)."""
from __future__ import annotations

import json
from typing import Any, Optional

from celery import Celery

from .models import IngestProgress, TaskError, TaskStatus


def read_task_meta(app: Celery, task_id: str) -> Optional[dict[str, Any]]:
    """The raw ``celery-task-meta-<id>`` document, or None while there is none."""
    backend = app.backend
    raw = backend.get(backend.get_key_for_task(task_id))
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    meta = json.loads(raw)
    return meta if isinstance(meta, dict) else None


def status_from_meta(task_id: str, meta: Optional[dict[str, Any]]) -> TaskStatus:
    """A :class:`TaskStatus` from a raw meta document (None = PENDING)."""
    if meta is None:
        return TaskStatus(task_id=task_id, state="PENDING")
    state = str(meta.get("status") or "PENDING")
    result = meta.get("result")
    if state == "PROGRESS" and isinstance(result, dict):
        try:
            progress: Optional[IngestProgress] = IngestProgress.model_validate(result)
        except ValueError:
            progress = None
        return TaskStatus(task_id=task_id, state=state, progress=progress, result=result)
    done = meta.get("date_done")
    done = str(done) if done else None
    if state in ("FAILURE", "RETRY", "REVOKED"):
        return TaskStatus(task_id=task_id, state=state, error=TaskError.from_meta(result),
                          date_done=done)
    return TaskStatus(task_id=task_id, state=state, result=result, date_done=done)


def get_status(app: Celery, task_id: str) -> TaskStatus:
    return status_from_meta(task_id, read_task_meta(app, task_id))
