"""Fixtures for the tori-worker integration tests.

* ``redis_factory`` / ``redis_server`` / ``redis_client``: private
  redis-server processes on free ports (data in the test's tmp dir).
* ``celery_app_factory`` / ``app``: JSON-only Celery client apps.
* ``worker_factory``: starts ``tori-worker`` (``$TORI_WORKER_BIN``, default
  ``/work/main/target/release/tori-worker``), logs to a file, waits until
  ``tori.noop`` round-trips, SIGTERMs it at teardown (SIGKILL after 15 s).
* ``python_worker_factory``: a real Python Celery prefork worker with
  Python implementations of the tori.* tasks.
* ``flower_factory``: real Flower servers (``celery flower``, unauthenticated
  API) on free ports; ``chromium``: renders a URL in headless Chromium
  (screenshot + DOM).

When a test fails, the tails of every worker and redis log it used are
attached to the failure report.
"""
from __future__ import annotations

import itertools
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tori_harness import (  # noqa: E402
    PY_WORKER_MODULE,
    FlowerServer,
    RedisServer,
    WorkerProcess,
    chromium_bin,
    clean_env,
    make_client_app,
    python_worker_cmd,
    render_page,
    tail_file,
    tori_bin,
    wait_worker_ready,
)


# --------------------------------------------------------------------------
# failure reports: attach log tails
# --------------------------------------------------------------------------

def _register_log(request, label: str, path_getter) -> None:
    logs = getattr(request.node, "_tori_logs", None)
    if logs is None:
        logs = []
        request.node._tori_logs = logs
    logs.append((label, path_getter))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for label, path_getter in getattr(item, "_tori_logs", []):
            path = path_getter()
            rep.sections.append((f"{label} log tail [{path}]", tail_file(path, 120)))


# --------------------------------------------------------------------------
# redis
# --------------------------------------------------------------------------

class RedisFactory:
    def __init__(self, request, tmp_path: Path):
        self._request = request
        self._tmp = tmp_path
        self.servers: list[RedisServer] = []

    def __call__(self, appendonly: bool = False, extra_args: Iterable[str] = ()) -> RedisServer:
        srv = RedisServer(self._tmp, appendonly=appendonly, extra_args=extra_args)
        self.servers.append(srv)
        srv.start()
        _register_log(self._request, srv.label, lambda s=srv: s.log_path)
        return srv

    def close(self) -> None:
        for srv in self.servers:
            srv.close()


@pytest.fixture
def redis_factory(request, tmp_path):
    factory = RedisFactory(request, tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    return redis_factory()


@pytest.fixture
def redis_client(redis_server):
    """Raw redis-py client (db 0, str responses) of ``redis_server``."""
    return redis_server.client()


# --------------------------------------------------------------------------
# Celery client apps
# --------------------------------------------------------------------------

@pytest.fixture
def celery_app_factory():
    apps = []

    def make(broker: str, backend: Optional[str] = None, **conf):
        a = make_client_app(broker, backend, **conf)
        apps.append(a)
        return a

    yield make
    for a in apps:
        try:
            a.close()
        except Exception:
            pass


@pytest.fixture
def app(celery_app_factory, redis_server):
    """JSON-only client app bound to ``redis_server`` (broker and backend)."""
    return celery_app_factory(redis_server.url())


# --------------------------------------------------------------------------
# tori-worker
# --------------------------------------------------------------------------

_worker_seq = itertools.count(1)


class WorkerFactory:
    """Start tori-worker processes; all are stopped at teardown."""

    def __init__(self, request, tmp_path: Path):
        self._request = request
        self._tmp = tmp_path
        self.workers: list[WorkerProcess] = []
        self._ready_apps = []

    def __call__(self, broker: Optional[str], *args: str,
                 queues: Optional[list[str]] = None,
                 result_backend: Optional[str] = None,
                 hostname: Optional[str] = None,
                 loglevel: str = "info",
                 env: Optional[dict] = None,
                 ready: bool = True,
                 ready_timeout: float = 60.0,
                 ready_broker: Optional[str] = None,
                 ready_backend: Optional[str] = None) -> WorkerProcess:
        """Start ``tori-worker``.

        ``broker=None`` omits ``--broker`` (configure through ``env``); then
        ``ready_broker``/``ready_backend`` tell the readiness probe where to go.
        """
        binary = tori_bin()
        if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
            pytest.fail(
                f"tori-worker binary not found or not executable: {binary}\n"
                "build it (cargo build --release) or set TORI_WORKER_BIN",
                pytrace=False)
        n = next(_worker_seq)
        hostname = hostname or f"tori{n}@tests"
        cmd = [binary]
        if broker is not None:
            cmd += ["--broker", broker]
        if result_backend is not None:
            cmd += ["--result-backend", result_backend]
        if queues:
            cmd += ["-Q", ",".join(queues)]
        cmd += ["--hostname", hostname, "--loglevel", loglevel]
        cmd += list(args)
        log_path = self._tmp / f"tori-worker-{n}.log"
        label = f"tori-worker #{n} ({hostname})"
        worker = WorkerProcess(cmd, log_path, label, env=clean_env(env),
                               queues=queues or ["celery"], hostname=hostname)
        self.workers.append(worker)
        _register_log(self._request, label, lambda p=log_path: p)
        if ready:
            rb = ready_broker or broker
            assert rb, "ready_broker is required when broker is None"
            self.wait_ready(worker, rb, ready_backend or result_backend or rb,
                            timeout=ready_timeout)
        return worker

    def wait_ready(self, worker: WorkerProcess, broker: str, backend: Optional[str] = None,
                   timeout: float = 60.0) -> None:
        probe = make_client_app(broker, backend or broker, name="tori_ready_probe")
        self._ready_apps.append(probe)
        others = [w for w in self.workers if w is not worker and w.alive()]
        wait_worker_ready(worker, probe, queue=worker.queues[0], timeout=timeout,
                          require_own_log=bool(others))

    def close(self) -> None:
        for w in self.workers:
            rc = w.terminate(timeout=15)
            if w.stop_hung:
                warnings.warn(f"{w.label} did not exit within 15 s of SIGTERM; killed")
            elif rc not in (0, None, -9):
                warnings.warn(f"{w.label} exited with code {rc} at teardown")
        for a in self._ready_apps:
            try:
                a.close()
            except Exception:
                pass


@pytest.fixture
def worker_factory(request, tmp_path):
    factory = WorkerFactory(request, tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def tori_worker(worker_factory, redis_server) -> WorkerProcess:
    """A ready tori-worker with default options on ``redis_server``."""
    return worker_factory(redis_server.url(), "--concurrency", "4")


# --------------------------------------------------------------------------
# real Python Celery worker
# --------------------------------------------------------------------------

@pytest.fixture
def python_worker_factory(request, tmp_path):
    workers: list[WorkerProcess] = []
    moddir = tmp_path / "pyworker"
    moddir.mkdir(exist_ok=True)
    (moddir / "pyworker_app.py").write_text(PY_WORKER_MODULE)

    def start(redis_url: str, concurrency: int = 2, *extra: str) -> WorkerProcess:
        n = len(workers) + 1
        log_path = tmp_path / f"python-worker-{n}.log"
        env = clean_env({"TORI_TEST_REDIS_URL": redis_url,
                         "PYTHONPATH": str(moddir), "PYTHONUNBUFFERED": "1"})
        label = f"python celery worker #{n}"
        w = WorkerProcess(python_worker_cmd(concurrency, hostname=f"py{n}@tests") + list(extra),
                          log_path, label, env=env, cwd=str(moddir))
        workers.append(w)
        _register_log(request, label, lambda p=log_path: p)
        return w

    yield start
    for w in workers:
        w.terminate(timeout=15)


# --------------------------------------------------------------------------
# Flower and headless Chromium (monitoring tests)
# --------------------------------------------------------------------------

@pytest.fixture
def flower_factory(request, tmp_path):
    """``start(broker, *extra_flower_args)`` -> a ready ``FlowerServer``;
    every server is stopped at teardown and its log attached on failure."""
    servers: list[FlowerServer] = []

    def start(broker: str, *extra_args: str, timeout: float = 30.0) -> FlowerServer:
        srv = FlowerServer(broker, tmp_path, extra_args, name=f"flower-{len(servers) + 1}")
        servers.append(srv)
        _register_log(request, srv.label, lambda s=srv: s.log_path)
        return srv.start(timeout)

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
def chromium(request, tmp_path):
    """``render(url, screenshot_path) -> DOM`` with headless Chromium.

    Fails (does not skip) when Chromium is missing: ``scripts/bootstrap``
    installs the Debian package ``chromium``; ``$CHROMIUM_BIN`` overrides."""
    binary = chromium_bin()
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail("chromium not found: install the Debian package `chromium` "
                    "(scripts/bootstrap does) or set CHROMIUM_BIN", pytrace=False)
    workdir = tmp_path / "chromium"
    workdir.mkdir(exist_ok=True)
    _register_log(request, "chromium", lambda: workdir / "chromium.log")

    def render(url: str, screenshot, **kw) -> str:
        return render_page(url, screenshot, workdir, binary=binary, **kw)

    return render
