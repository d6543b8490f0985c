"""The FastAPI app: upload jobs, their status and events, a status page."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Optional

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tori_bridge import (
    Storage,
    TaskStatus,
    TERMINAL_STATES,
    define_stubs,
    make_celery_app,
    status_from_meta,
    storage_from_env,
)

from .auth import ANONYMOUS, AuthConfigError, is_loopback
from .config import Settings
from .db import Job, make_engine, make_sessionmaker, utcnow
from .upload import StreamedUpload, UploadRejected

log = logging.getLogger("tori_shim")

#: kombu's separator between a queue name and its priority (``celery\x06\x163``).
PRIORITY_SEP = "\x06\x16"


# -- response models (for the OpenAPI docs) -----------------------------------

class Progress(BaseModel):
    stage: Optional[str] = None
    page: Optional[int] = None
    pages: Optional[int] = None
    fraction: float = Field(0.0, ge=0, le=1)


class JobCreated(BaseModel):
    job_id: str
    task_id: str
    duplicate: bool = Field(description="true: the same bytes were uploaded before; "
                                        "this is that job")
    status: str
    filename: str
    sha256: str
    size: int
    file_ref: str


class JobView(BaseModel):
    job_id: str
    task_id: str
    task_status: str
    task_result: Optional[Any] = Field(
        None, description="SUCCESS: the pdf_ingestion result (IngestResult); "
                          "FAILURE: {exc_type, exc_message, reason}")
    progress: Progress
    filename: str
    sha256: str
    submitted_at: Optional[str] = None
    finished_at: Optional[str] = None


class JobSummary(BaseModel):
    job_id: str
    task_id: str
    filename: str
    sha256: str
    size: int
    submitted_at: Optional[str]
    finished_at: Optional[str]
    status: str
    error: Optional[str]


class JobList(BaseModel):
    jobs: list[JobSummary]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_a_pdf")
    detail: Any = Field(description="what went wrong, for people")


_ERR: dict[str, Any] = {"model": ErrorBody}
#: Every route but /healthz and the page answers these without a valid key.
_AUTH: dict[int | str, dict[str, Any]] = {401: {**_ERR, "description": "no or unknown API key"}}


def error(status: int, code: str, detail: Any, headers: Optional[dict[str, str]] = None
          ) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
                 503: "unavailable"}


# -- the caller ----------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="`Authorization: Bearer KEY`, a key of TORI_SHIM_API_KEYS")


def _unauthorized(detail: str, invalid: bool) -> StarletteHTTPException:
    # RFC 6750: say which scheme to use, and whether the token given was bad.
    challenge = 'Bearer realm="tori-shim"' + (', error="invalid_token"' if invalid else "")
    return StarletteHTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def caller(request: Request,
           cred: Optional[HTTPAuthorizationCredentials] = Security(_bearer)) -> str:
    """The owner the request acts for (a FastAPI dependency; tests and later
    routers can override it)."""
    settings: Settings = request.app.state.settings
    if settings.no_auth:
        # Without keys only this machine may talk to the shim, whatever
        # address the server was bound to (uvicorn started by hand).
        if request.client is None or not is_loopback(request.client.host):
            raise StarletteHTTPException(
                403, "authentication is off (--no-auth): only loopback clients are answered")
        return ANONYMOUS
    if cred is None:
        raise _unauthorized("send an API key: Authorization: Bearer KEY", invalid=False)
    owner = settings.api_keys.owner_of(cred.credentials)
    if owner is None:
        raise _unauthorized("unknown API key", invalid=True)
    return owner


# -- the app ---------------------------------------------------------------

def create_app(settings: Optional[Settings] = None, storage: Optional[Storage] = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if not settings.api_keys and not settings.no_auth:
        raise AuthConfigError(
            "no API keys configured: set TORI_SHIM_API_KEYS=owner:key[,owner2:key2] or "
            "TORI_SHIM_API_KEYS_FILE, or serve without authentication with --no-auth "
            "(TORI_SHIM_NO_AUTH=1, loopback only)")
    if settings.no_auth:
        log.warning("authentication is OFF (--no-auth / TORI_SHIM_NO_AUTH): every caller is "
                    "owner %r and only loopback clients are answered", ANONYMOUS)
    else:
        log.info("authentication: %d API keys for owners %s", len(settings.api_keys),
                 ", ".join(settings.api_keys.owners))
    storage = storage or storage_from_env()
    celery_app = make_celery_app("tori_shim", broker=settings.broker_url,
                                 backend=settings.result_backend,
                                 task_default_queue=settings.queue)
    stubs = define_stubs(celery_app)
    engine = make_engine(settings.database_url)
    Session = make_sessionmaker(engine)
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    backend_async = aioredis.Redis.from_url(settings.result_backend, socket_timeout=5)
    backend_sync = redis.Redis.from_url(settings.result_backend, socket_timeout=5)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await backend_async.aclose()
        broker.close()
        backend_sync.close()
        engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="tori-shim",
        version="0.1.0",
        # Served below behind the caller dependency instead.
        openapi_url=None, docs_url=None, redoc_url=None,
        description=(
            "Upload PDFs for ingestion by tori-worker (Celery task `pdf_ingestion`) and "
            "follow them. Every route but `/healthz` needs `Authorization: Bearer KEY`; a "
            "caller sees only its own jobs. Errors are JSON "
            "`{\"error\": code, \"detail\": message}`."),
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.celery = celery_app
    app.state.engine = engine

    # -- errors as JSON -----------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error(exc.status_code, code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid_request", exc.errors())

    # -- helpers --------------------------------------------------------------
    def queue_depth() -> int:
        keys = [settings.queue] + [f"{settings.queue}{PRIORITY_SEP}{p}" for p in range(1, 10)]
        pipe = broker.pipeline(transaction=False)
        for k in keys:
            pipe.llen(k)
        return int(sum(pipe.execute()))

    def meta_key(task_id: str) -> str:
        return str(celery_app.backend.get_key_for_task(task_id).decode())

    def decode_meta(raw: "bytes | str | None") -> Optional[dict[str, Any]]:
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def view(job: Job, st: TaskStatus) -> dict[str, Any]:
        progress: dict[str, Any] = {"fraction": 0.0}
        result: Any = None
        if st.progress is not None:
            p = st.progress
            progress = {"stage": p.stage, "page": p.page, "pages": p.pages,
                        "fraction": round(p.fraction, 4)}
        if st.state == "SUCCESS":
            result = st.result
            pages = result.get("pages") if isinstance(result, dict) else None
            progress = {"stage": "done", "page": pages, "pages": pages, "fraction": 1.0}
        elif st.error is not None:
            result = {"exc_type": st.error.exc_type, "exc_message": st.error.exc_message,
                      "reason": st.error.reason}
            if st.state in TERMINAL_STATES:
                progress = {"stage": "failed", "fraction": 1.0}
        s = job.summary()
        return {"job_id": job.job_id, "task_id": job.task_id, "task_status": st.state,
                "task_result": result, "progress": progress, "filename": job.filename,
                "sha256": job.sha256, "submitted_at": s["submitted_at"],
                "finished_at": s["finished_at"]}

    def record_terminal(job_id: str, st: TaskStatus) -> Optional[Job]:
        """Writes a terminal state into the jobs table (once)."""
        with Session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            if job.status not in TERMINAL_STATES and st.state in TERMINAL_STATES:
                job.status = st.state
                job.finished_at = _parse_time(st.date_done) or utcnow()
                if st.error is not None:
                    job.error = f"{st.error.exc_type}: {st.error.exc_message}"
                elif st.state == "SUCCESS":
                    job.result = st.result
                s.commit()
            return job

    def status_of(job: Job, meta: Optional[dict[str, Any]]) -> TaskStatus:
        if meta is None and job.status in TERMINAL_STATES:
            # the backend entry expired: answer from the table
            if job.status == "SUCCESS":
                return TaskStatus(task_id=job.task_id, state="SUCCESS", result=job.result)
            return status_from_meta(job.task_id, {"status": job.status, "result": {
                "exc_type": (job.error or "Error: ").split(":", 1)[0],
                "exc_message": (job.error or ": ").split(": ", 1)[-1]}})
        return status_from_meta(job.task_id, meta)

    def load_job(job_id: str, owner: str) -> Job:
        with Session() as s:
            job = s.get(Job, job_id)
        # Another owner's job is "not found", exactly like a missing one, so
        # ids cannot be probed.
        if job is None or job.owner != owner:
            raise StarletteHTTPException(404, f"no job with id {job_id!r}")
        return job

    def current_view(job_id: str, owner: str) -> dict[str, Any]:
        job = load_job(job_id, owner)
        st = status_of(job, decode_meta(backend_sync.get(meta_key(job.task_id))))
        if st.ready and job.status not in TERMINAL_STATES:
            job = record_terminal(job_id, st) or job
        return view(job, st)

    # -- routes -------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        page = resources.files("tori_shim").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(page)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_owner: str = Depends(caller)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(_owner: str = Depends(caller)) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tori-shim API")

    @app.get("/healthz", summary="Liveness and dependencies",
             description="Open to all; error texts, storage and queue numbers only with a key.",
             responses={503: {"description": "a dependency is down"}})
    def healthz(request: Request) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        try:
            checks["queue_depth"] = queue_depth()
            checks["redis"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["redis"] = f"error: {e}"
            ok = False
        try:
            with engine.connect() as c:
                c.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["database"] = f"error: {e}"
            ok = False
        checks["storage"] = repr(storage)
        checks["max_queue"] = settings.max_queue
        # The key is optional here, so read by hand (not Security(), which
        # would mark the route as requiring it in the OpenAPI document).
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        cred = (HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
                if scheme.lower() == "bearer" and token.strip() else None)
        try:
            caller(request, cred)
        except StarletteHTTPException:
            # Load balancers and probes need only up/down; host names, paths
            # and driver errors are for the operator.
            checks = {k: v if v == "ok" else "error" for k, v in checks.items()
                      if k in ("redis", "database")}
        return JSONResponse({"status": "ok" if ok else "error", **checks},
                            status_code=200 if ok else 503)

    @app.post(
        "/jobs",
        summary="Upload a PDF and start its ingestion",
        status_code=202,
        response_model=JobCreated,
        responses={200: {"model": JobCreated, "description": "same bytes uploaded before: "
                                                             "the existing job"},
                   400: _ERR, 413: _ERR, 415: _ERR, 503: _ERR, **_AUTH},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "the PDF (plain file name, no directories)"}}}}}}},
    )
    async def create_job(request: Request, owner: str = Depends(caller)) -> JSONResponse:
        # Backpressure first: nothing is read or stored when the queue is full.
        try:
            depth = await run_in_threadpool(queue_depth)
        except redis.RedisError as e:
            return error(503, "broker_unavailable", f"the broker does not answer: {e}",
                         {"Retry-After": str(settings.retry_after)})
        if depth >= settings.max_queue:
            return error(503, "queue_full",
                         f"{depth} jobs are waiting (limit {settings.max_queue}); "
                         f"retry after {settings.retry_after} s",
                         {"Retry-After": str(settings.retry_after)})
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 65536:
            return error(413, "too_large", f"the upload ({declared} bytes) is larger than the "
                                           f"limit of {settings.max_upload_bytes} bytes",
                         {"Connection": "close"})
        try:
            up = StreamedUpload(request.headers.get("content-type", ""), storage,
                                settings.max_upload_bytes)
            await up.consume(request.stream())
        except UploadRejected as r:
            return error(r.status, r.code, r.detail)
        assert up.upload is not None and up.filename is not None
        pending = up.upload
        sha = pending.sha256

        def existing() -> Optional[Job]:
            with Session() as s:
                return s.execute(select(Job).where(Job.owner == owner, Job.sha256 == sha)
                                 ).scalar_one_or_none()

        def duplicate_answer(job: Job) -> JSONResponse:
            try:
                status = current_view(job.job_id, owner)["task_status"]
            except Exception:  # noqa: BLE001 - the table's word is good enough
                status = job.status
            body = JobCreated(job_id=job.job_id, task_id=job.task_id, duplicate=True,
                              status=status, filename=job.filename, sha256=job.sha256,
                              size=job.size, file_ref=job.file_ref)
            return JSONResponse(body.model_dump(), status_code=200)

        job = await run_in_threadpool(existing)
        if job is not None:
            pending.discard()
            return await run_in_threadpool(duplicate_answer, job)
        stored = await run_in_threadpool(pending.commit)
        job_id = str(uuid.uuid4())
        new = Job(job_id=job_id, task_id=job_id, owner=owner, filename=up.filename, sha256=sha,
                  file_ref=stored.ref, size=stored.size, status="PENDING",
                  submitted_at=utcnow())

        def insert() -> Optional[Job]:
            with Session() as s:
                s.add(new)
                try:
                    s.commit()
                except IntegrityError:  # the same bytes raced in: theirs wins
                    s.rollback()
                    return s.execute(select(Job).where(Job.owner == owner,
                                                       Job.sha256 == sha)).scalar_one()
            return None

        other = await run_in_threadpool(insert)
        if other is not None:
            return await run_in_threadpool(duplicate_answer, other)

        def enqueue() -> None:
            args: list[Any] = [stored.ref]
            if settings.ingest_options:
                args.append(settings.ingest_options)
            stubs.ingest_pdf_task.apply_async(args=args, task_id=job_id,
                                              queue=settings.queue, retry=False)

        try:
            await run_in_threadpool(enqueue)
        except Exception as e:  # noqa: BLE001 - any broker error
            def forget() -> None:
                with Session() as s:
                    j = s.get(Job, job_id)
                    if j is not None:
                        s.delete(j)
                        s.commit()
            await run_in_threadpool(forget)
            return error(503, "broker_unavailable", f"could not enqueue the job: {e}",
                         {"Retry-After": str(settings.retry_after)})
        log.info("job %s of %s: %s (%d bytes, sha256 %s) -> %s", job_id, owner, up.filename,
                 stored.size, sha, stored.ref)
        body = JobCreated(job_id=job_id, task_id=job_id, duplicate=False, status="PENDING",
                          filename=up.filename, sha256=sha, size=stored.size,
                          file_ref=stored.ref)
        return JSONResponse(body.model_dump(), status_code=202)

    @app.get("/jobs", response_model=JobList, responses=_AUTH,
             summary="The caller's recent jobs, newest first")
    def list_jobs(limit: int = Query(50, ge=1, le=500),
                  owner: str = Depends(caller)) -> dict[str, Any]:
        with Session() as s:
            jobs = list(s.execute(select(Job).where(Job.owner == owner)
                                  .order_by(Job.submitted_at.desc()).limit(limit)).scalars())
        open_jobs = [j for j in jobs if j.status not in TERMINAL_STATES]
        if open_jobs:
            raws = backend_sync.mget([meta_key(j.task_id) for j in open_jobs])
            for j, raw in zip(open_jobs, raws):
                st = status_of(j, decode_meta(raw))
                if st.ready:
                    record_terminal(j.job_id, st)
                    j.status = st.state
                    j.error = (f"{st.error.exc_type}: {st.error.exc_message}"
                               if st.error else None)
                    j.finished_at = _parse_time(st.date_done) or utcnow()
                else:
                    j.status = st.state
        return {"jobs": [j.summary() for j in jobs]}

    @app.get("/jobs/{job_id}", response_model=JobView, responses={404: _ERR, **_AUTH},
             summary="A job's status, progress and result")
    def get_job(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        return current_view(job_id, owner)

    @app.get("/jobs/{job_id}/events", summary="Server-sent events of a job",
             responses={404: _ERR, **_AUTH, 200: {"content": {"text/event-stream": {}},
                                         "description": "`event: progress` on every change, "
                                                        "then `event: done` (terminal state)"}})
    async def job_events(job_id: str, request: Request,
                         owner: str = Depends(caller)) -> StreamingResponse:
        job = await run_in_threadpool(load_job, job_id, owner)
        key = meta_key(job.task_id)

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            last: Optional[str] = None
            n = 0
            started = time.monotonic()
            last_sent = started
            while True:
                if await request.is_disconnected():
                    return
                try:
                    raw = await backend_async.get(key)
                except Exception as e:  # noqa: BLE001
                    yield _sse("error", {"error": "backend_unavailable", "detail": str(e)}, n)
                    await asyncio.sleep(1.0)
                    continue
                st = status_of(job, decode_meta(raw))
                payload = view(job, st)
                blob = json.dumps(payload, sort_keys=True)
                if blob != last:
                    last = blob
                    n += 1
                    last_sent = time.monotonic()
                    if st.ready:
                        await run_in_threadpool(record_terminal, job_id, st)
                        yield _sse("done", payload, n)
                        return
                    yield _sse("progress", payload, n)
                elif time.monotonic() - last_sent > 15:
                    last_sent = time.monotonic()
                    yield b": keep-alive\n\n"
                if time.monotonic() - started > settings.sse_max_seconds:
                    yield _sse("timeout", {"job_id": job_id, "detail": "stream time limit"}, n)
                    return
                await asyncio.sleep(settings.sse_poll)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    return app


def _parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _sse(event: str, data: Any, n: int) -> bytes:
    return f"id: {n}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()

