"""Process and protocol helpers for the tori-worker integration tests.

Everything here is plain Python (no pytest fixtures) so it can also be used
from a throwaway script; the fixtures in ``conftest.py`` wrap these classes
and make sure every process is stopped at teardown.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional

import redis
from celery import Celery

REDIS_SERVER_BIN = os.environ.get("REDIS_SERVER_BIN", "/usr/bin/redis-server")
DEFAULT_TORI_BIN = "/work/main/target/release/tori-worker"

# Env vars that would silently redirect a worker to another broker/backend.
_URL_ENV_VARS = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REDIS_URL")

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def tori_bin() -> str:
    return os.environ.get("TORI_WORKER_BIN", DEFAULT_TORI_BIN)


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (never 6379), and never one
    handed out before in this process: kombu keeps producer connections in
    a process-wide pool keyed by broker URL (``kombu.pools``), so a later
    test whose redis-server got an earlier test's port would be handed that
    dead server's connection ("Connection closed by server"; seen once in
    CI)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379 and port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise RuntimeError("could not find a free port")


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
             message: "str | Callable[[], str]" = "condition not met"):
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises AssertionError with ``message`` (a string or a callable producing
    one, evaluated lazily so it can describe the final state) on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s: {msg}")
        time.sleep(interval)


def tail_file(path: Path, lines: int = 120, max_bytes: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return f"<{path} does not exist>"
    text = ANSI_RE.sub("", data.decode("utf-8", "replace"))
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# log parsing (contract: every task log line has task_id=<id> task_name=<n>)
# --------------------------------------------------------------------------

def _id_pattern(task_id: str) -> "re.Pattern[str]":
    # Accept both `task_id=abc` and tracing's Debug form `task_id="abc"`.
    return re.compile(r'task_id="?' + re.escape(task_id) + r'(?![\w-])')


def task_lines(text: str, task_id: str) -> list[str]:
    pat = _id_pattern(task_id)
    return [ln for ln in text.splitlines() if pat.search(ln)]


def count_task_events(texts: Iterable[str], task_id: str, word: str) -> int:
    """Number of log lines (over all given logs) mentioning ``task_id`` and
    containing ``word`` as a whole, lower-case word (e.g. started,
    succeeded, failed)."""
    wpat = re.compile(r"\b" + re.escape(word) + r"\b")
    return sum(1 for t in texts for ln in task_lines(t, task_id) if wpat.search(ln))


def event_order(text: str, task_ids: Iterable[str], word: str) -> list[str]:
    """Task ids in the order of their first ``word`` log line in ``text``."""
    ids = list(task_ids)
    pats = {tid: _id_pattern(tid) for tid in ids}
    wpat = re.compile(r"\b" + re.escape(word) + r"\b")
    seen: list[str] = []
    for ln in text.splitlines():
        if not wpat.search(ln):
            continue
        for tid, pat in pats.items():
            if tid not in seen and pat.search(ln):
                seen.append(tid)
    return seen


class EventLog:
    """Task events as Celery's own receiver gets them (the path Flower
    uses), collected on a thread while the test runs. The constructor
    returns once the receiver's subscription is live in Redis (events are
    plain pub/sub: anything sent before that is gone), and the receiver
    keeps one subscription until ``close()``."""

    def __init__(self, app, timeout: float = 10.0):
        self.events: list[dict] = []
        client = redis.Redis.from_url(app.conf.broker_url)
        patterns_before = client.execute_command("PUBSUB", "NUMPAT")
        self._conn = app.connection_for_read()
        self._recv = app.events.Receiver(self._conn, handlers={"*": self.events.append})
        self._thread = threading.Thread(
            target=lambda: self._recv.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        self._thread.start()
        try:
            wait_for(lambda: client.execute_command("PUBSUB", "NUMPAT") > patterns_before, timeout,
                     message="Celery's event receiver never subscribed")
        finally:
            client.close()

    def types(self, task_id: str) -> list[str]:
        return [e["type"] for e in list(self.events) if e.get("uuid") == task_id]

    def close(self):
        self._recv.should_stop = True
        self._thread.join(5)
        self._conn.release()


# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------

class RedisServer:
    """A private redis-server on a free port, data dir under ``workdir``."""

    def __init__(self, workdir: Path, appendonly: bool = False, extra_args: Iterable[str] = ()):
        self.workdir = Path(workdir)
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._clients: list[redis.Redis] = []
        self.starts = 0

    # -- paths / urls ------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.workdir / f"redis-{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def label(self) -> str:
        return f"redis-server :{self.port}"

    # -- lifecycle -----------------------------------------------------------
    def _cmd(self) -> list[str]:
        cmd = [
            REDIS_SERVER_BIN,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--save", "",
        ]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start (or restart on the same port and dir if it ran before)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        attempts = 1 if self.port is not None else 5
        last_err = ""
        for _ in range(attempts):
            if self.port is None or attempts > 1:
                self.port = free_port()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(
                self._cmd(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ping(timeout):
                self.starts += 1
                return self
            last_err = tail_file(self.log_path, 20)
            self._hard_stop()
            if "already in use" not in last_err:
                break
        raise RuntimeError(f"redis-server failed to start on port {self.port}:\n{last_err}")

    def _wait_ping(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
                try:
                    if c.ping():
                        return True
                finally:
                    c.close()
            except redis.exceptions.RedisError:
                pass
            time.sleep(0.05)
        return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: redis flushes AOF / exits), kill if it hangs."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._hard_stop()

    def _hard_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        self.stop()

    def client(self, db: int = 0, decode_responses: bool = True, **kw) -> redis.Redis:
        c = redis.Redis(host="127.0.0.1", port=self.port, db=db,
                        decode_responses=decode_responses, socket_timeout=10, **kw)
        self._clients.append(c)
        return c


# --------------------------------------------------------------------------
# Celery client apps
# --------------------------------------------------------------------------

def make_client_app(broker: str, backend: Optional[str] = None, name: str = "tori_tests",
                    **conf) -> Celery:
    """A JSON-only Celery *client* app (never runs tasks itself)."""
    app = Celery(name, broker=broker, backend=backend or broker, set_as_current=False)
    settings = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
        task_default_queue="celery",
        enable_utc=True,
        timezone="UTC",
    )
    settings.update(conf)
    app.conf.update(settings)
    return app


# --------------------------------------------------------------------------
# worker processes (tori-worker and real Python Celery workers)
# --------------------------------------------------------------------------

class WorkerProcess:
    """A worker subprocess whose stdout+stderr go to ``log_path``."""

    def __init__(self, cmd: list[str], log_path: Path, label: str, env: dict,
                 cwd: Optional[str] = None, queues: Iterable[str] = ("celery",),
                 hostname: Optional[str] = None):
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.label = label
        self.queues = list(queues)
        self.hostname = hostname
        self.returncode: Optional[int] = None
        self.stop_hung = False
        self._logf = open(self.log_path, "ab", buffering=0)
        self._logf.write(("$ " + " ".join(cmd) + "\n").encode())
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
        self.pid = self.proc.pid

    # -- state ----------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return ANSI_RE.sub("", data.decode("utf-8", "replace"))

    def tail(self, lines: int = 80) -> str:
        return tail_file(self.log_path, lines)

    def describe(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited rc={rc}"
        return f"{self.label} (pid {self.pid}, {state}); log tail:\n{self.tail(60)}"

    # -- stopping -------------------------------------------------------------
    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful); SIGKILL the process group if it hangs."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop_hung = True
                self.kill()
        self.returncode = self.proc.poll()
        self._close_log()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (worker plus any children)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.returncode = self.proc.returncode
        self._close_log()

    def _close_log(self) -> None:
        # keep the file usable for reading; only close our write handle
        try:
            self._logf.close()
        except Exception:
            pass


def clean_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _URL_ENV_VARS}
    env.setdefault("RUST_BACKTRACE", "1")
    env["NO_COLOR"] = "1"
    if extra:
        env.update(extra)
    return env


def wait_worker_ready(worker: WorkerProcess, app: Celery, queue: str = "celery",
                      timeout: float = 60.0, require_own_log: bool = False,
                      resend_every: float = 15.0) -> None:
    """Readiness = ``app.send_task('tori.noop').get()`` succeeds (polling).

    With ``require_own_log`` (several workers on one broker) the noop must
    also have been executed by *this* worker (its id in this worker's log).
    """
    deadline = time.monotonic() + timeout
    res = app.send_task("tori.noop", queue=queue)
    sent_at = time.monotonic()
    pending = [res]
    while True:
        if not worker.alive():
            raise AssertionError(f"worker exited before becoming ready: {worker.describe()}")
        for r in pending:
            if r.ready():
                if r.state != "SUCCESS":
                    raise AssertionError(
                        f"readiness task tori.noop ended {r.state}: {r.result!r}\n"
                        f"{worker.describe()}")
                if not require_own_log or task_lines(worker.log_text(), r.id):
                    return
                # executed by another worker: try again with a fresh noop
                pending.remove(r)
                nxt = app.send_task("tori.noop", queue=queue)
                pending.append(nxt)
                sent_at = time.monotonic()
                break
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"worker not ready after {timeout:.0f}s (tori.noop on queue {queue!r} "
                f"never succeeded)\n{worker.describe()}")
        if time.monotonic() - sent_at >= resend_every:
            pending.append(app.send_task("tori.noop", queue=queue))
            sent_at = time.monotonic()
        time.sleep(0.1)


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------

def meta_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def read_meta(client: redis.Redis, task_id: str) -> Optional[dict]:
    raw = client.get(meta_key(task_id))
    return None if raw is None else json.loads(raw)


def result_when_ready(result, timeout: float, interval: float = 0.02):
    """``result.get()`` once the stored state is final, found by polling.

    For a result whose id the client did not subscribe to when it sent the
    message (the last task of a chain, a chord body), ``get()`` sends
    SUBSCRIBE on its pub/sub connection without waiting for the reply and
    then GETs the state on another connection. Redis does not run commands
    of different connections in the order they arrived (its level-triggered
    epoll hands back recently served connections first), so a worker's
    SET+PUBLISH can run after the GET and before the SUBSCRIBE: ``get()``
    then waits for a message that was already sent. Captured on loopback
    (tcpdump) with both the Python client and tori-worker behaving as
    written; a Python worker fast enough would hit it too. Polling reads the
    stored state, which is never lost, so a test that is about what the
    worker stored is not at the mercy of that client race.
    """
    wait_for(result.ready, timeout, interval,
             message=lambda: f"{result.id} not ready; stored: "
                             f"{result.backend.client.get(meta_key(result.id))!r}")
    return result.get(timeout=timeout)


def observe_states(result, timeout: float, interval: float = 0.02) -> list[str]:
    """Poll ``result.state`` until ready; return the distinct states seen in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        st = result.state
        if not seen or seen[-1] != st:
            seen.append(st)
        if st in ("SUCCESS", "FAILURE", "REVOKED"):
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"task {result.id} not ready after {timeout}s; states seen: {seen}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# malformed envelopes
# --------------------------------------------------------------------------

def good_envelope_dict(task: str, task_id: str, args=(), kwargs=None) -> dict:
    """A minimal well-formed protocol-2 envelope (used to derive garbage)."""
    import base64
    import uuid
    body = json.dumps([list(args), kwargs or {},
                       {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
                    "expires": None, "group": None, "group_index": None, "retries": 0,
                    "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                    "argsrepr": repr(tuple(args)), "kwargsrepr": repr(kwargs or {}),
                    "origin": "gen0@tests", "ignore_result": False,
                    "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()),
                       "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }


GARBAGE_KINDS = (
    "not_json_text",
    "truncated_json",
    "json_not_object",
    "json_without_body",
    "bad_base64_body",
    "missing_id_header",
    "missing_task_header",
)


def garbage_message(kind: str, marker: str) -> str:
    """A malformed envelope of the given kind that contains ``marker`` verbatim."""
    import copy
    import uuid
    base = good_envelope_dict("tori.echo", str(uuid.uuid4()), args=[marker])
    env = copy.deepcopy(base)
    env["headers"]["x_marker"] = marker
    if kind == "not_json_text":
        return f"this is not json at all <{marker}>"
    if kind == "truncated_json":
        return json.dumps(env)[:60] + f' "{marker}'
    if kind == "json_not_object":
        return json.dumps(["not", "an", "envelope", marker])
    if kind == "json_without_body":
        del env["body"]
        return json.dumps(env)
    if kind == "bad_base64_body":
        env["body"] = f"!!!*not~base64*{marker}*!!!"
        return json.dumps(env)
    if kind == "missing_id_header":
        del env["headers"]["id"]
        return json.dumps(env)
    if kind == "missing_task_header":
        # body stays a protocol-2 array, so this is not a protocol-1 message
        del env["headers"]["task"]
        return json.dumps(env)
    raise ValueError(kind)


def dead_letter_entries(client: redis.Redis, key: str = "tori.dead_letter") -> list[dict]:
    out = []
    for item in client.lrange(key, 0, -1):
        try:
            out.append(json.loads(item))
        except ValueError:
            out.append({"__unparseable__": item})
    return out


def entry_raw_text(entry: dict) -> str:
    raw = entry.get("raw")
    return raw if isinstance(raw, str) else json.dumps(raw)


# --------------------------------------------------------------------------
# Python Celery worker app (reverse compatibility test)
# --------------------------------------------------------------------------

PY_WORKER_MODULE = '''\
"""Python Celery worker implementing the tori.* tasks (generated by the tests)."""
import os
import time

from celery import Celery

URL = os.environ["TORI_TEST_REDIS_URL"]
app = Celery("pyworker_app", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": 5,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)


@app.task(name="tori.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="tori.noop")
def noop():
    return None


@app.task(name="tori.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="tori.fail")
def fail(message="tori.fail was asked to fail"):
    raise RuntimeError(message)


@app.task(name="tori.errback_probe")
def errback_probe(task_id):
    """An old-style errback (one argument: the failed task's id), which a
    Celery worker publishes as a task instead of calling it in place."""
    return task_id
'''


def python_worker_cmd(concurrency: int = 2, hostname: str = "pyworker@%h") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "pyworker_app", "worker",
            "--pool", "prefork", "-c", str(concurrency), "-n", hostname,
            "--loglevel", "info", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]


# --------------------------------------------------------------------------
# the real `celery` CLI, Flower and headless Chromium (monitoring tests)
# --------------------------------------------------------------------------

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"


def artifacts_dir() -> Path:
    """``tests/artifacts/`` (gitignored): files kept after a run, e.g. screenshots."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


def celery_cli() -> list[str]:
    """argv prefix of the real ``celery`` command of this interpreter's venv."""
    exe = Path(sys.executable).with_name("celery")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "celery"]


def run_celery_cli(broker: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``celery -b <broker> <args...>`` (no app module), captured text output."""
    return subprocess.run(celery_cli() + ["-b", broker, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=clean_env())


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class FlowerServer:
    """Real Flower (``celery --broker=URL flower``) on a free 127.0.0.1 port.

    Its HTTP API is opened with ``FLOWER_UNAUTHENTICATED_API=true``; stdout and
    stderr go to ``log_path``. Ready = ``/healthcheck`` answers ``OK``.
    """

    def __init__(self, broker: str, workdir: Path, extra_args: Iterable[str] = (),
                 name: str = "flower"):
        self.broker = broker
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)
        self.log_path = self.workdir / f"{name}.log"
        self.label = f"flower ({name})"
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._logf = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 30.0) -> "FlowerServer":
        last = ""
        for _ in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            cmd = celery_cli() + [f"--broker={self.broker}", "flower", f"--port={self.port}",
                                  "--address=127.0.0.1", *self.extra_args]
            self._logf = open(self.log_path, "ab", buffering=0)
            self._logf.write(("$ " + " ".join(cmd) + "\n").encode())
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
                env=clean_env({"FLOWER_UNAUTHENTICATED_API": "true", "PYTHONUNBUFFERED": "1"}),
                cwd=str(self.workdir), start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    status, body = http_get(self.url("/healthcheck"), timeout=2)
                    if status == 200 and body.strip() == "OK":
                        return self
                except OSError:
                    pass
                time.sleep(0.1)
            timed_out = self.proc.poll() is None
            last = tail_file(self.log_path, 30)
            self.close()
            if timed_out:  # not a port clash: retrying would not help
                break
        raise RuntimeError(f"flower did not become ready on port {self.port}:\n{last}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get_json(self, path: str, timeout: float = 15.0):
        status, body = http_get(self.url(path), timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path} -> HTTP {status}: {body[:500]}")
        return json.loads(body)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._logf is not None:
            try:
                self._logf.close()
            except Exception:
                pass


def chromium_bin() -> Optional[str]:
    """``$CHROMIUM_BIN``, else ``chromium`` / ``chromium-browser`` on PATH."""
    if os.environ.get("CHROMIUM_BIN"):
        return os.environ["CHROMIUM_BIN"]
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def render_page(url: str, screenshot: Path, workdir: Path, window: str = "1400,900",
                virtual_time_ms: int = 8000, timeout: float = 90.0,
                binary: Optional[str] = None) -> str:
    """Load ``url`` in headless Chromium (fresh profile under ``workdir``),
    save a PNG of the window to ``screenshot`` and return the DOM as it is
    after the page's scripts ran (``--dump-dom``). Chromium's stderr goes to
    ``workdir/chromium.log``."""
    binary = binary or chromium_bin()
    if not binary:
        raise FileNotFoundError("chromium not found (Debian package `chromium`)")
    workdir = Path(workdir)
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    if screenshot.exists():
        screenshot.unlink()
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
           f"--screenshot={screenshot}", f"--window-size={window}",
           f"--virtual-time-budget={virtual_time_ms}", "--dump-dom", url]
    with open(workdir / "chromium.log", "ab") as err:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=err, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}:\n"
                           f"{tail_file(workdir / 'chromium.log', 30)}")
    return proc.stdout.decode("utf-8", "replace")
