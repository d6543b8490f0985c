"""Task stubs: the names and signatures of the tasks tori-worker runs.

Calling ``.delay()`` / ``.apply_async()`` on a stub enqueues a normal Celery
message that tori-worker executes. The stub bodies never run in a healthy
deployment: a Python Celery worker (or ``task_always_eager``) that executes
one raises :class:`TaskRunsInToriWorker`, so a mis-routed queue fails loudly
instead of silently doing nothing.

The names and parameters must equal ``tori-worker tasks --json``; the test
suite checks :data:`WORKER_TASKS` against the binary.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from celery import Celery, Task

from .app import make_celery_app


class TaskRunsInToriWorker(RuntimeError):
    """A tori-worker task stub was executed by Python instead of tori-worker."""


def _refuse(name: str) -> Any:
    raise TaskRunsInToriWorker(
        f"{name} is implemented by tori-worker (Rust), not in Python: this stub only "
        f"enqueues. A Python Celery worker (or task_always_eager) just executed it, so "
        f"the message was routed to a worker that cannot run it. Run tori-worker on "
        f"this queue, or route {name!r} to a queue only tori-worker consumes "
        f"(task_routes={{{name!r}: {{'queue': 'tori'}}}} and `tori-worker -Q tori`)."
    )


# -- the stub bodies (their signatures are the contract) ----------------------

def _pdf_ingestion(file_ref: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Ingest the PDF at ``file_ref``: a path under the worker's storage root
    (``TORI_STORAGE_ROOT``), a ``file://`` URL in it, or an ``s3://`` URL under the
    worker's ``TORI_STORAGE_URL``. ``options``: chunk_tokens, chunk_overlap,
    max_pages, max_bytes, max_stream_bytes, embed, backend (pdfium | pdf_oxide |
    pdf-extract). Returns an :class:`tori_bridge.models.IngestResult` dict."""
    return _refuse("pdf_ingestion")  # type: ignore[no-any-return]


def _ingest_pdf_clean_task(file_ref: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Alias of ``pdf_ingestion`` (the seed's task name)."""
    return _refuse("ingest_pdf_clean_task")  # type: ignore[no-any-return]


def _echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Returns ``{"args": args, "kwargs": kwargs}``."""
    return _refuse("tori.echo")  # type: ignore[no-any-return]


def _noop() -> None:
    """Returns None (throughput benchmarks)."""
    _refuse("tori.noop")


def _sleep(seconds: float) -> float:
    """Sleeps cooperatively (soft limits stop it); returns ``seconds``."""
    return _refuse("tori.sleep")  # type: ignore[no-any-return]


def _fail(message: str = "tori.fail was asked to fail") -> None:
    """Fails; the caller sees ``RuntimeError(message)``."""
    _refuse("tori.fail")


def _flaky(times: int, countdown: float = 0.2) -> int:
    """Retries itself ``times`` times, then returns ``times``."""
    return _refuse("tori.flaky")  # type: ignore[no-any-return]


def _whoami() -> dict[str, Any]:
    """``{"pid": ..., "registry_inits": ...}`` of the worker process that ran it."""
    return _refuse("tori.whoami")  # type: ignore[no-any-return]


#: task name -> (stub function, Celery options). Aliases are separate names.
WORKER_TASKS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "pdf_ingestion": (_pdf_ingestion, {"acks_late": True}),
    "ingest_pdf_clean_task": (_ingest_pdf_clean_task, {"acks_late": True}),
    "tori.echo": (_echo, {}),
    "tori.noop": (_noop, {}),
    "tori.sleep": (_sleep, {}),
    "tori.fail": (_fail, {}),
    "tori.flaky": (_flaky, {}),
    "tori.whoami": (_whoami, {}),
}

#: alias -> canonical name (as ``tori-worker tasks --json`` lists them).
ALIASES: dict[str, str] = {"ingest_pdf_clean_task": "pdf_ingestion"}


def stub_params(fn: Callable[..., Any]) -> list[str]:
    """Parameter names in the worker's notation (``*args``, ``**kwargs``)."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            out.append(p.name)
    return out


@dataclass(frozen=True)
class Stubs:
    """The stubs bound to one Celery app."""

    app: Celery
    ingest_pdf_task: Task
    ingest_pdf_clean_task: Task
    echo: Task
    noop: Task
    sleep: Task
    fail: Task
    flaky: Task
    whoami: Task

    def by_name(self) -> dict[str, Task]:
        return {t.name: t for t in (self.ingest_pdf_task, self.ingest_pdf_clean_task, self.echo,
                                    self.noop, self.sleep, self.fail, self.flaky, self.whoami)}


def define_stubs(app: Celery) -> Stubs:
    """Registers the stubs on ``app`` (your own Celery app) and returns them."""

    def make(name: str) -> Task:
        fn, opts = WORKER_TASKS[name]
        # shared=False: the stubs go to this app only, not to every app in the process.
        return app.task(name=name, shared=False, **opts)(fn)

    return Stubs(
        app=app,
        ingest_pdf_task=make("pdf_ingestion"),
        ingest_pdf_clean_task=make("ingest_pdf_clean_task"),
        echo=make("tori.echo"),
        noop=make("tori.noop"),
        sleep=make("tori.sleep"),
        fail=make("tori.fail"),
        flaky=make("tori.flaky"),
        whoami=make("tori.whoami"),
    )


#: The default app, configured from the environment when this module is
#: first imported (set CELERY_BROKER_URL / CELERY_RESULT_BACKEND / REDIS_URL
#: before that). It is made Celery's current *and* default app (the default
#: counts in other threads, e.g. FastAPI's threadpool), so seed-style code
#: calling a bare ``AsyncResult(task_id)`` reads this app's result backend.
app: Celery = make_celery_app(set_as_current=True)
app.set_default()
_default = define_stubs(app)

ingest_pdf_task: Task = _default.ingest_pdf_task
ingest_pdf_clean_task: Task = _default.ingest_pdf_clean_task
echo: Task = _default.echo
noop: Task = _default.noop
sleep: Task = _default.sleep
fail: Task = _default.fail
flaky: Task = _default.flaky
whoami: Task = _default.whoami
