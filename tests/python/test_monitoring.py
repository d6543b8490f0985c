"""Monitoring integration tests (issue 5): ops tools see and steer tori-worker.

Everything here is driven by the real tools against the real binary and a
private redis-server per test:

* the ``celery`` CLI (``celery -b URL inspect|control ...``, no app module,
  ``-j`` JSON output): ping, stats, active, registered, active_queues,
  revoked, conf list the tori-worker node with values that match how it was
  started; ``control terminate SIGTERM <id>`` stops a running
  ``tori.sleep(60)`` and its state becomes REVOKED at once. (Celery 5.7's
  CLI has no ``revoke --terminate`` option; ``terminate <signal> <id>`` is
  its spelling of ``revoke(id, terminate=True, signal=...)``.)
* ``app.control.add_consumer`` / ``cancel_consumer`` change what is consumed.
* Flower 2.2 (``flower_factory``): ``/api/workers?refresh=1`` has the
  worker's stats, registered tasks, queues and conf; ``/api/tasks`` has the
  tori tasks with state, args and runtime (built by Flower from task
  events); the worker stays online while a CPU-bound task occupies every
  pool process, and goes offline right after SIGTERM (worker-offline).
* Flower's dashboard rendered in headless Chromium shows the worker and its
  processed count; the screenshot is kept in ``tests/artifacts/``.
* ``celery control rate_limit`` changes throughput measurably.

``active``'s ``worker_pid`` names the pool process really running each task.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import re
import signal
import struct
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from celery.exceptions import TaskRevokedError

from tori_harness import artifacts_dir, free_port, http_get, run_celery_cli, wait_for

CLI_TIMEOUT = "2"  # seconds the CLI waits for replies (``--timeout``)
PASSWORD = "mon-s3cret-pw"
SPIN_SECONDS = 24  # CPU-bound task length in the "stays online" test
SCREENSHOT = "flower-dashboard.png"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def cli_json(broker: str, *args: str):
    """Run ``celery -b broker <args>`` and parse its ``-j`` output."""
    proc = run_celery_cli(broker, *args, timeout=60)
    shown = "celery " + " ".join(args)
    assert proc.returncode == 0, (f"`{shown}` exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"`{shown}` did not print JSON: {proc.stdout[-2000:]!r}\n"
                             f"stderr: {proc.stderr[-2000:]}") from None


def inspect_cli(broker: str, command: str, *args: str, node: str | None = None) -> dict:
    """``celery inspect <command>``: {node: reply} (broadcast unless ``node``)."""
    argv = ["inspect", command, *args, "--timeout", CLI_TIMEOUT, "-j"]
    if node:
        argv += ["-d", node]
    return cli_json(broker, *argv)


def control_cli(broker: str, command: str, *args: str, node: str | None = None) -> dict:
    """``celery control <command>``: its -j output is a list of {node: reply}."""
    argv = ["control", command, *args, "--timeout", CLI_TIMEOUT, "-j"]
    if node:
        argv += ["-d", node]
    replies = cli_json(broker, *argv)
    assert isinstance(replies, list), replies
    merged: dict = {}
    for r in replies:
        merged.update(r)
    return merged


def _stat_fields(path: str):
    """Fields after ``comm`` of a /proc stat file, or None when it is gone."""
    try:
        data = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2:].split()


def ppid_of(pid: int):
    """Parent pid from /proc, or None when ``pid`` is gone or a zombie."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return None if f is None or f[0] in ("Z", "X") else int(f[1])


def is_running(pid: int) -> bool:
    """True if any thread of ``pid`` is running or runnable (state R)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any((_stat_fields(f"/proc/{pid}/task/{t}/stat") or ["?"])[0] == "R" for t in tids)


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of ``pid`` (all threads), 0.0 if it is gone."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def queue_names(app, node: str) -> set[str]:
    reply = app.control.inspect(destination=[node], timeout=2).active_queues() or {}
    assert node in reply, f"no active_queues reply from {node}: {reply!r}"
    return {q["name"] for q in reply[node]}


def flower_status(flower, node: str):
    """Flower's online flag for ``node`` (None while Flower does not know it)."""
    return flower.get_json("/api/workers?status=1").get(node)


def wait_online(flower, node: str, timeout: float = 15.0) -> None:
    wait_for(lambda: flower_status(flower, node) is True, timeout, interval=0.2,
             message=lambda: f"Flower never saw {node} online: "
                             f"{flower.get_json('/api/workers?status=1')!r}")


def flower_worker_rows(flower) -> dict:
    """Flower's dashboard data (``/workers?json=1``) by hostname: event
    counters (``task-received`` ...), heartbeat fields (``active``,
    ``processed``, ``loadavg``, ``heartbeats``) and ``status``."""
    return {row["hostname"]: row for row in flower.get_json("/workers?json=1")["data"]}


class _TableRows(HTMLParser):
    """Text of every ``<tr>``'s cells (``td``/``th``) in a document."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------
# 1. celery inspect / control (CLI)
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_celery_cli_inspect_lists_worker_and_terminate_revokes(
        redis_server, redis_client, worker_factory, celery_app_factory):
    # A password on the broker, so `conf`/`stats` must mask it.
    redis_client.config_set("requirepass", PASSWORD)
    broker = f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    node = "cli@tests"
    # --concurrency 3 differs from this machine's default (its CPU count).
    worker = worker_factory(broker, "--concurrency", "3", queues=["celery", "mon.extra"],
                            hostname=node)
    app = celery_app_factory(broker)

    sleeper = app.send_task("tori.sleep", args=[60])
    wait_for(lambda: (app.control.inspect(destination=[node], timeout=1).active() or {})
             .get(node), timeout=15, interval=0.2,
             message="tori.sleep(60) never showed up as active")

    # What an operator types, broadcast (no -d), all at once.
    commands = ["ping", "stats", "active", "registered", "active_queues", "revoked", "conf"]
    with cf.ThreadPoolExecutor(len(commands)) as ex:
        futures = {c: ex.submit(inspect_cli, broker, c) for c in commands}
        out = {c: f.result() for c, f in futures.items()}
    for c in commands:
        assert set(out[c]) == {node}, f"inspect {c}: replies from {set(out[c])}, want {node}"

    assert out["ping"][node] == {"ok": "pong"}

    stats = out["stats"][node]
    assert stats["pid"] == worker.pid
    pool = stats["pool"]
    assert pool["max-concurrency"] == 3, pool
    procs = pool["processes"]
    assert len(procs) == 3 and len(set(procs)) == 3, pool
    for pid in procs:
        assert ppid_of(pid) == worker.pid, f"stats pool process {pid} is not a live child of the worker"
    assert stats["prefetch_count"] == 12, stats["prefetch_count"]  # multiplier 4 (Celery's default) x 3
    assert isinstance(stats["clock"], str) and int(stats["clock"]) > 0, stats["clock"]
    assert isinstance(stats["uptime"], int) and 0 <= stats["uptime"] < 300, stats["uptime"]
    assert stats["total"].get("tori.noop", 0) >= 1, stats["total"]  # the readiness probe
    assert {"utime", "stime", "maxrss"} <= set(stats["rusage"]), stats["rusage"]
    assert (stats["broker"]["hostname"], stats["broker"]["port"], stats["broker"]["transport"]) \
        == ("127.0.0.1", redis_server.port, "redis"), stats["broker"]
    assert PASSWORD not in json.dumps(stats)

    active = out["active"][node]
    assert len(active) == 1, active
    req = active[0]
    assert (req["id"], req["name"], req["type"]) == (sleeper.id, "tori.sleep", "tori.sleep"), req
    assert req["args"] == [60] and req["kwargs"] == {}, req
    assert req["hostname"] == node
    assert req["worker_pid"] in procs, (req["worker_pid"], procs)
    assert abs(time.time() - req["time_start"]) < 60, req["time_start"]
    assert req["delivery_info"]["routing_key"] == "celery", req["delivery_info"]

    registered = out["registered"][node]
    assert {"tori.echo", "tori.noop", "tori.sleep", "tori.fail"} <= set(registered), registered
    assert "tori.chaos.spin" not in registered  # chaos tasks only with --enable-chaos-tasks

    queues = out["active_queues"][node]
    assert sorted(q["name"] for q in queues) == ["celery", "mon.extra"], queues
    for q in queues:
        assert q["routing_key"] == q["name"] and q["exchange"]["name"] == q["name"], q

    assert out["revoked"][node] == []

    conf = out["conf"][node]
    assert conf["worker_concurrency"] == 3, conf
    assert "********" in conf["broker_url"] and PASSWORD not in json.dumps(conf), conf

    # terminate: the CLI's form of revoke(id, terminate=True, signal=SIGTERM).
    # A bystander task runs in another pool process meanwhile and must live.
    bystander = app.send_task("tori.sleep", args=[2])
    wait_for(lambda: len((app.control.inspect(destination=[node], timeout=1).active() or {})
                         .get(node) or []) == 2, timeout=10, interval=0.1,
             message="the bystander tori.sleep(2) never started")
    t0 = time.monotonic()
    replies = control_cli(broker, "terminate", "SIGTERM", sleeper.id)
    cli_took = time.monotonic() - t0
    assert replies == {node: {"ok": f"terminate: {sleeper.id}"}}
    wait_for(lambda: sleeper.state == "REVOKED", timeout=3, interval=0.05,
             message=lambda: f"state {sleeper.state} after terminate (CLI took {cli_took:.1f}s)")
    assert time.monotonic() - t0 < 10
    assert isinstance(sleeper.result, TaskRevokedError) and "terminated" in str(sleeper.result), \
        repr(sleeper.result)
    assert bystander.get(timeout=10) == 2  # its process was not the one killed

    revoked = inspect_cli(broker, "revoked", node=node)[node]
    assert sleeper.id in revoked, revoked
    inspector = app.control.inspect(destination=[node], timeout=2)
    assert inspector.active()[node] == []
    # Exactly one pool process (the one running the task) was killed and replaced.
    procs2 = inspector.stats()[node]["pool"]["processes"]
    gone = set(procs) - set(procs2)
    assert len(procs2) == 3 and len(gone) == 1, (procs, procs2)
    assert ppid_of(gone.pop()) is None


# --------------------------------------------------------------------------
# 2. add_consumer / cancel_consumer
# --------------------------------------------------------------------------

def test_add_and_cancel_consumer_change_consumed_queues(
        redis_server, redis_client, worker_factory, app):
    node = "consumer@tests"
    worker_factory(redis_server.url(), "--concurrency", "2", hostname=node)
    q = "mon.added"

    early = app.send_task("tori.echo", args=["early"], queue=q)
    time.sleep(1.5)
    assert early.state == "PENDING" and redis_client.llen(q) == 1, "queue consumed before add_consumer"

    reply = app.control.add_consumer(q, reply=True, destination=[node], timeout=5)
    assert reply == [{node: {"ok": f"add consumer {q}"}}]
    assert early.get(timeout=10) == {"args": ["early"], "kwargs": {}}
    assert queue_names(app, node) == {"celery", q}
    assert app.send_task("tori.echo", args=["later"], queue=q).get(timeout=10) \
        == {"args": ["later"], "kwargs": {}}

    reply = app.control.cancel_consumer(q, reply=True, destination=[node], timeout=5)
    assert reply == [{node: {"ok": f"no longer consuming from {q}"}}]
    assert queue_names(app, node) == {"celery"}
    # A BRPOP issued before the cancel (1 s timeout) may still cover the queue.
    time.sleep(1.5)
    orphan = app.send_task("tori.echo", args=["orphan"], queue=q)
    time.sleep(2.5)
    assert orphan.state == "PENDING" and redis_client.llen(q) == 1, \
        f"{q} still consumed after cancel_consumer (state {orphan.state})"
    # ...while the worker goes on consuming its other queue.
    assert app.send_task("tori.echo", args=["default"]).get(timeout=10) \
        == {"args": ["default"], "kwargs": {}}


# --------------------------------------------------------------------------
# 3. Flower API
# --------------------------------------------------------------------------

def test_flower_api_lists_worker_and_tori_tasks(redis_server, worker_factory, flower_factory, app):
    url = redis_server.url()
    node = "flower-api@tests"
    worker_factory(url, "-E", "--concurrency", "2", hostname=node)
    flower = flower_factory(url)
    wait_online(flower, node)

    sleeper = app.send_task("tori.sleep", args=[3])
    echo = app.send_task("tori.echo", args=[7, "x"], kwargs={"k": [1, 2]})
    fail = app.send_task("tori.fail", args=["boom-from-test"])
    # Celery sends task-failed whether or not the result is stored.
    fail_ignored = app.send_task("tori.fail", args=["ignored-failure"], ignore_result=True)

    info = flower.get_json("/api/workers?refresh=1")[node]
    stats = info["stats"]
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2, stats["pool"]
    assert stats["prefetch_count"] == 8 and "rusage" in stats and "broker" in stats, stats
    assert {"tori.echo", "tori.sleep", "tori.fail", "tori.noop"} <= set(info["registered"]), \
        info["registered"]
    assert [q["name"] for q in info["active_queues"]] == ["celery"], info["active_queues"]
    assert info["conf"]["worker_send_task_events"] is True, info["conf"]

    # Flower's worker view asks `active` with safe=True: args as repr strings.
    def sleeper_active():
        act = flower.get_json(f"/api/workers?refresh=1&workername={node}")[node].get("active") or []
        return next((a for a in act if a["id"] == sleeper.id), None)
    running = wait_for(sleeper_active, timeout=10, interval=0.3,
                       message="Flower's refresh never listed the running tori.sleep")
    assert running["name"] == "tori.sleep" and running["args"] == "[3]", running

    assert echo.get(timeout=10) == {"args": [7, "x"], "kwargs": {"k": [1, 2]}}
    assert sleeper.get(timeout=15) == 3
    with pytest.raises(RuntimeError, match="boom-from-test"):
        fail.get(timeout=10)

    ids = {echo.id, sleeper.id, fail.id, fail_ignored.id}

    def tasks_final():
        tasks = flower.get_json("/api/tasks")
        done = all(tasks.get(i, {}).get("state") in ("SUCCESS", "FAILURE") for i in ids)
        return tasks if done else None
    tasks = wait_for(tasks_final, timeout=10, interval=0.3,
                     message=lambda: f"Flower /api/tasks: "
                                     f"{ {i: t.get('state') for i, t in flower.get_json('/api/tasks').items()} }")

    t = tasks[echo.id]
    assert (t["name"], t["state"], t["worker"]) == ("tori.echo", "SUCCESS", node), t
    assert t["args"] == "[7, 'x']" and t["kwargs"] == "{'k': [1, 2]}", t
    assert t["result"] == "{'args': [7, 'x'], 'kwargs': {'k': [1, 2]}}", t
    assert isinstance(t["runtime"], float) and 0 <= t["runtime"] < 5, t
    assert t["received"] and t["started"] and t["succeeded"], t

    t = tasks[sleeper.id]
    # tori.sleep answers a float ("3.0" where Python's sleep(3) would say "3").
    assert (t["name"], t["state"], t["args"]) == ("tori.sleep", "SUCCESS", "[3]"), t
    assert float(t["result"]) == 3, t
    assert 2.9 <= t["runtime"] < 10, t

    t = tasks[fail.id]
    assert (t["name"], t["state"], t["args"]) == ("tori.fail", "FAILURE", "['boom-from-test']"), t
    assert t["exception"] == "RuntimeError('boom-from-test')", t
    assert "boom-from-test" in (t["traceback"] or ""), t

    t = tasks[fail_ignored.id]
    assert (t["state"], t["exception"]) == ("FAILURE", "RuntimeError('ignored-failure')"), t
    assert app.backend.get(app.backend.get_key_for_task(fail_ignored.id)) is None, \
        "ignore_result=True stored a result"


@pytest.mark.slow
def test_flower_keeps_cpu_bound_worker_online_then_offline_after_sigterm(
        redis_server, worker_factory, flower_factory, app):
    url = redis_server.url()
    node = "busy@tests"
    worker = worker_factory(url, "--enable-chaos-tasks", "--concurrency", "2", hostname=node)
    flower = flower_factory(url)
    wait_online(flower, node)

    # One tight CPU loop per pool process (2 processes on a 2-core machine).
    spins = [app.send_task("tori.chaos.spin", args=[SPIN_SECONDS]) for _ in range(2)]
    spin_ids = {s.id for s in spins}

    def both_running():
        act = (app.control.inspect(destination=[node], timeout=1).active() or {}).get(node) or []
        return act if {a["id"] for a in act} == spin_ids else None
    wait_for(both_running, timeout=15, interval=0.2,
             message="the two tori.chaos.spin tasks never ran at the same time")
    # Every pool process burns CPU (checked below from /proc: `active`'s
    # worker_pid cannot tell, see test_active_worker_pid_names_the_running_process).
    stats = app.control.inspect(destination=[node], timeout=2).stats()[node]
    procs = stats["pool"]["processes"]
    assert len(procs) == 2, procs
    cpu0 = {pid: cpu_seconds(pid) for pid in procs}

    start = time.monotonic()
    samples: list[tuple[float, object]] = []
    busy_heartbeat = 0
    pinged = None
    cpu1, cpu_window = dict(cpu0), 0.0
    running = {pid: 0 for pid in procs}  # samples in which it was running/runnable
    while not all(s.ready() for s in spins):
        elapsed = time.monotonic() - start
        if elapsed < SPIN_SECONDS - 6:
            cpu1 = {pid: cpu_seconds(pid) for pid in procs}
            cpu_window = elapsed
        assert elapsed < SPIN_SECONDS + 30, "spin tasks did not finish"
        samples.append((round(elapsed, 1), flower_status(flower, node)))
        for pid in procs:
            running[pid] += is_running(pid)
        row = flower_worker_rows(flower).get(node, {})
        busy_heartbeat = max(busy_heartbeat, row.get("active") or 0)
        if pinged is None and elapsed > SPIN_SECONDS / 2:
            pinged = app.control.ping(destination=[node], timeout=2)
        time.sleep(1)
    assert [s.get(timeout=5) > 0 for s in spins] == [True, True]

    offline = [s for s in samples if s[1] is not True]
    assert not offline, f"Flower showed {node} not online while busy: {offline} (all: {samples})"
    assert len(samples) >= SPIN_SECONDS - 8, f"load was too short to prove anything: {samples}"
    assert all(n >= 0.8 * len(samples) for n in running.values()), \
        f"pool processes not runnable all along (R samples of {len(samples)}): {running}"
    assert busy_heartbeat == 2, f"heartbeats never reported both processes active ({busy_heartbeat})"
    assert pinged == [{node: {"ok": "pong"}}], f"ping while busy: {pinged!r}"
    # CPU actually burnt by each (a loose bound: the machine may be shared).
    burnt = {pid: round(cpu1[pid] - cpu0[pid], 1) for pid in procs}
    assert all(b >= 0.1 * cpu_window for b in burnt.values()), \
        f"not every pool process was busy: CPU s {burnt} in {cpu_window:.0f}s"

    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: flower_status(flower, node) is False, timeout=6, interval=0.2,
             message=lambda: f"still {flower_status(flower, node)!r} after SIGTERM")
    went_offline = time.monotonic() - t0
    # Told by worker-offline, not by the 4 s heartbeat expiry.
    row = flower_worker_rows(flower)[node]
    assert row.get("worker-offline") == 1 and row.get("heartbeats") == [], \
        f"no worker-offline event seen by Flower ({went_offline:.1f}s): {row}"
    assert worker.proc.wait(15) == 0


# --------------------------------------------------------------------------
# 4. Flower dashboard in headless Chromium
# --------------------------------------------------------------------------

def test_flower_dashboard_in_chromium_shows_worker_and_processed_count(
        redis_server, worker_factory, flower_factory, chromium, app):
    url = redis_server.url()
    node = "dash@tests"
    worker_factory(url, "-E", "--concurrency", "2", hostname=node)
    flower = flower_factory(url)
    wait_online(flower, node)
    # tasks already run (the readiness probe) count in the heartbeats' `processed`
    ran_before = sum(app.control.inspect(destination=[node], timeout=2)
                     .stats()[node]["total"].values())

    results = [app.send_task("tori.echo", args=[i]) for i in range(5)]
    results.append(app.send_task("tori.fail", args=["dashboard"]))
    for r in results:
        wait_for(r.ready, timeout=10, message=f"task {r.id} never finished")

    # Flower's dashboard "Processed" column is its count of task-received
    # events for the worker (Failed / Succeeded: task-failed / -succeeded).
    def counted():
        row = flower_worker_rows(flower).get(node, {})
        got = (row.get("task-received"), row.get("task-succeeded"), row.get("task-failed"))
        return row if got == (6, 5, 1) else None
    wait_for(counted, timeout=10, interval=0.3,
             message=lambda: f"Flower's counters: {flower_worker_rows(flower).get(node)}")
    # The heartbeats' own `processed` counts every task the worker finished.
    wait_for(lambda: flower_worker_rows(flower)[node].get("processed") == ran_before + 6,
             timeout=6,
             message=lambda: f"heartbeat processed: {flower_worker_rows(flower)[node].get('processed')}")

    # The dashboard ("/") is rendered server-side (Tornado template fills the
    # workers table) and then decorated by its JS (status badge, totals), so
    # --dump-dom of "/" itself carries the row; no CDP needed.
    png = artifacts_dir() / SCREENSHOT
    dom = chromium(flower.url("/"), png)
    (artifacts_dir() / "flower-dashboard.html").write_text(dom)

    assert node in dom
    parser = _TableRows()
    parser.feed(dom)
    rows = [r for r in parser.rows if r and r[0] == node]
    assert len(rows) == 1, f"no dashboard row for {node}: {parser.rows}"
    cells = rows[0]
    # Worker | Status | Active | Processed | Failed | Succeeded | Load Average
    assert len(cells) >= 6, cells
    assert cells[1] == "Online", cells
    assert (cells[3], cells[4], cells[5]) == ("6", "1", "5"), cells

    assert png.stat().st_size > 10_000, f"suspiciously small screenshot ({png.stat().st_size} B)"
    assert png_size(png) == (1400, 900)


# --------------------------------------------------------------------------
# 5. rate limit from the CLI
# --------------------------------------------------------------------------

def test_rate_limit_from_cli_changes_throughput(redis_server, worker_factory, app):
    broker = redis_server.url()
    node = "rate@tests"
    worker_factory(broker, "--concurrency", "2", hostname=node)

    def twenty_noops() -> float:
        t0 = time.monotonic()
        results = [app.send_task("tori.noop") for _ in range(20)]
        for r in results:
            assert r.get(timeout=60) is None
        return time.monotonic() - t0

    before = twenty_noops()
    assert before < 2.0, f"20 noops took {before:.2f}s without a rate limit"

    assert control_cli(broker, "rate_limit", "tori.noop", "5/s") \
        == {node: {"ok": "new rate limit set successfully"}}
    registered = app.control.inspect(destination=[node], timeout=2).registered("rate_limit")
    assert "tori.noop [rate_limit=5/s]" in registered[node], registered

    limited = twenty_noops()
    # 5/s: 20 tasks need >= 19 intervals of 0.2 s
    assert limited >= 3.5, f"20 noops at 5/s took only {limited:.2f}s (before: {before:.2f}s)"
    assert limited < 15, f"20 noops at 5/s took {limited:.2f}s"

    assert control_cli(broker, "rate_limit", "tori.noop", "0", node=node) \
        == {node: {"ok": "rate limit disabled successfully"}}
    unlimited = twenty_noops()
    assert unlimited < 2.0, f"20 noops took {unlimited:.2f}s after the limit was removed"


# --------------------------------------------------------------------------
# worker_pid in `active`
# --------------------------------------------------------------------------

def test_active_worker_pid_names_the_running_process(redis_server, worker_factory, app):
    """Two tasks running at once must name their two different pool processes."""
    node = "pids@tests"
    worker_factory(redis_server.url(), "--concurrency", "2", hostname=node)
    sleeps = [app.send_task("tori.sleep", args=[2]) for _ in range(2)]
    inspector = app.control.inspect(destination=[node], timeout=1)

    def both_active():
        act = (inspector.active() or {}).get(node) or []
        return act if {a["id"] for a in act} == {r.id for r in sleeps} else None
    active = wait_for(both_active, timeout=10, interval=0.1,
                      message="the two tori.sleep(2) never ran together")
    procs = inspector.stats()[node]["pool"]["processes"]
    for r in sleeps:
        assert r.get(timeout=10) == 2
    pids = sorted(a["worker_pid"] for a in active)
    assert set(pids) <= set(procs), (pids, procs)
    assert pids == sorted(procs), f"active worker_pid {pids}, pool processes {procs}"


# --------------------------------------------------------------------------
# pool_grow / pool_shrink
# --------------------------------------------------------------------------

def test_pool_grow_and_shrink_change_processes_and_parallelism(redis_server, worker_factory, app):
    """pool_grow adds pool processes that run tasks in parallel; pool_shrink
    retires them (never below one) and prefetch follows."""
    node = "resize@tests"
    worker_factory(redis_server.url(), "--concurrency", "1", hostname=node)
    inspector = app.control.inspect(destination=[node], timeout=1)

    def pool():
        st = inspector.stats()[node]
        return st["pool"]["max-concurrency"], st["pool"]["processes"], st["prefetch_count"]

    size, procs, prefetch = pool()
    assert (size, len(procs), prefetch) == (1, 1, 4)
    assert app.control.pool_grow(2, destination=[node], reply=True, timeout=1) == [
        {node: {"ok": "pool will grow"}}]
    grown = wait_for(lambda: (lambda p: p if len(p[1]) == 3 else None)(pool()), timeout=10,
                     message="pool did not grow to 3 processes")
    assert grown[0] == 3 and grown[2] == 12
    t = time.monotonic()
    results = [app.send_task("tori.sleep", args=[1]) for _ in range(3)]
    assert [r.get(timeout=15) for r in results] == [1, 1, 1]
    assert time.monotonic() - t < 2.5, "three 1 s tasks on three processes must overlap"

    assert app.control.pool_shrink(2, destination=[node], reply=True, timeout=1) == [
        {node: {"ok": "pool will shrink"}}]
    shrunk = wait_for(lambda: (lambda p: p if len(p[1]) == 1 else None)(pool()), timeout=10,
                      message="pool did not shrink to 1 process")
    assert shrunk[0] == 1 and shrunk[2] == 4
    reply = app.control.pool_shrink(1, destination=[node], reply=True, timeout=1)
    assert "error" in reply[0][node]
    t = time.monotonic()
    results = [app.send_task("tori.sleep", args=[1]) for _ in range(2)]
    assert [r.get(timeout=15) for r in results] == [1, 1]
    assert time.monotonic() - t >= 1.9, "one process must run the two tasks one after the other"


def test_pool_restart_replaces_every_process_once_its_task_is_done(redis_server, worker_factory, app):
    """Without --pool-restarts, pool_restart gets Celery's refusal (its
    `worker_pool_restarts` is off by default too); with it, every pool
    process is replaced, a busy one only after its task, and tasks keep
    running."""
    url = redis_server.url()
    worker_factory(url, "--concurrency", "1", hostname="norestart@tests", queues=["norestart"])
    assert app.control.pool_restart(destination=["norestart@tests"], reply=True, timeout=1) == [
        {"norestart@tests": {"error": "ValueError('Pool restarts not enabled')"}}]

    node = "restart@tests"
    worker_factory(url, "--concurrency", "2", "--pool-restarts", hostname=node)
    inspector = app.control.inspect(destination=[node], timeout=1)

    def processes():
        procs = inspector.stats()[node]["pool"]["processes"]
        return procs if len(procs) == 2 else None

    before = wait_for(processes, timeout=10, message="two pool processes never came up")
    busy = app.send_task("tori.sleep", args=[1])
    wait_for(lambda: inspector.active()[node], timeout=10, message="the sleep never started")
    assert app.control.pool_restart(destination=[node], reply=True, timeout=1) == [
        {node: {"ok": "reload started"}}]
    assert busy.get(timeout=15) == 1, "the busy process finishes its task first"
    after = wait_for(lambda: (lambda p: p if p and not set(p) & set(before) else None)(processes()),
                     timeout=15, message=lambda: f"processes {processes()} still include {before}")
    assert len(after) == 2
    assert app.send_task("tori.echo", args=[1]).get(timeout=10) == {"args": [1], "kwargs": {}}


# --------------------------------------------------------------------------
# Prometheus metrics and health
# --------------------------------------------------------------------------

def test_metrics_and_healthz(redis_server, worker_factory, app):
    """/metrics counts tasks by name and outcome, runtimes and queue length;
    /healthz is 200 while the worker polls."""
    port = free_port()
    worker_factory(redis_server.url(), "--concurrency", "2", "--metrics-addr",
                   f"127.0.0.1:{port}", hostname="metrics@tests")
    assert app.send_task("tori.echo", args=[1]).get(timeout=10) == {"args": [1], "kwargs": {}}
    with pytest.raises(RuntimeError):
        app.send_task("tori.fail", args=["x"]).get(timeout=10)
    app.send_task("tori.noop", queue="metrics.waiting")  # nobody consumes it
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert 'tori_tasks_total{worker="metrics@tests",task="tori.echo",state="succeeded"} 1' in body
    assert 'tori_tasks_total{worker="metrics@tests",task="tori.fail",state="failed"} 1' in body
    assert 'tori_task_runtime_seconds_count{worker="metrics@tests",task="tori.echo"} 1' in body
    assert 'tori_queue_length{queue="celery"} 0' in body
    assert 'tori_pool_size{worker="metrics@tests"} 2' in body
    assert "tori_last_poll_timestamp_seconds" in body
    status, body = http_get(f"http://127.0.0.1:{port}/healthz")
    assert (status, body.strip()) == (200, "ok")
    status, _ = http_get(f"http://127.0.0.1:{port}/nope")
    assert status == 404


# --------------------------------------------------------------------------
# autoscale
# --------------------------------------------------------------------------

def test_autoscale_follows_the_backlog_and_the_control_command(redis_server, worker_factory, app):
    """--autoscale 3,1 starts one process, grows to 3 under a backlog (the
    three sleeps then overlap), shrinks back after AUTOSCALE_KEEPALIVE; the
    `autoscale` control command changes the bounds; a worker without
    --autoscale answers Celery's error."""
    node = "autoscale@tests"
    worker_factory(redis_server.url(), "--autoscale", "3,1", hostname=node,
                   env={"AUTOSCALE_KEEPALIVE": "2"})
    inspector = app.control.inspect(destination=[node], timeout=1)

    def procs() -> int:
        return len(inspector.stats()[node]["pool"]["processes"])

    st = inspector.stats()[node]
    assert st["autoscaler"] == {"max": 3, "min": 1, "current": 1, "qty": 0}, st["autoscaler"]
    t = time.monotonic()
    results = [app.send_task("tori.sleep", args=[2]) for _ in range(4)]
    wait_for(lambda: procs() == 3, timeout=10, message="autoscaler did not grow to 3")
    assert [r.get(timeout=30) for r in results] == [2, 2, 2, 2]
    elapsed = time.monotonic() - t
    assert elapsed < 7.5, f"4 x 2 s on 1 process would take 8 s; took {elapsed:.1f}"
    wait_for(lambda: procs() == 1, timeout=20, message="autoscaler did not shrink back to 1")

    reply = app.control.autoscale(2, 1, destination=[node], reply=True, timeout=1)
    assert reply == [{node: {"ok": "autoscale now max=2 min=1"}}]
    assert inspector.stats()[node]["autoscaler"]["max"] == 2
    results = [app.send_task("tori.sleep", args=[2]) for _ in range(4)]
    wait_for(lambda: procs() == 2, timeout=10, message="autoscaler did not grow to the new max")
    time.sleep(1.5)
    assert procs() == 2, "never above the new max"
    assert [r.get(timeout=30) for r in results] == [2, 2, 2, 2]

    other = "fixed@tests"
    worker_factory(redis_server.url(), "--concurrency", "1", hostname=other)
    reply = app.control.autoscale(4, 2, destination=[other], reply=True, timeout=1)
    assert reply == [{other: {"error": "ValueError('Autoscale not enabled')"}}]


# --------------------------------------------------------------------------
# --statedb: revoked ids survive a restart
# --------------------------------------------------------------------------

def test_statedb_keeps_revoked_ids_across_restarts(redis_server, worker_factory, app, tmp_path):
    """A task revoked before its message reaches any worker stays revoked
    when the worker restarts with the same --statedb (Celery's option);
    without the file the id would be forgotten and the task would run."""
    state = tmp_path / "tori-state.json"
    first = worker_factory(redis_server.url(), "--concurrency", "1", "--statedb", str(state),
                           hostname="state1@tests")
    task_id = "statedb-revoked-0001"
    reply = app.control.revoke(task_id, destination=["state1@tests"], reply=True, timeout=1)
    assert reply and "flagged as revoked" in reply[0]["state1@tests"]["ok"]
    first.terminate(timeout=15)
    saved = json.loads(state.read_text())
    assert [e[0] for e in saved["revoked"]] == [task_id] and saved["clock"] > 0

    second = worker_factory(redis_server.url(), "--concurrency", "1", "--statedb", str(state),
                            hostname="state2@tests")
    inspector = app.control.inspect(destination=["state2@tests"], timeout=1)
    assert inspector.revoked() == {"state2@tests": [task_id]}
    res = app.send_task("tori.echo", args=["must not run"], task_id=task_id)
    other = app.send_task("tori.echo", args=["runs"])
    assert other.get(timeout=15) == {"args": ["runs"], "kwargs": {}}
    wait_for(lambda: "discarding" in second.log_text() and task_id in second.log_text(),
             timeout=10, message="revoked message not discarded")
    assert res.state == "REVOKED"


# --------------------------------------------------------------------------
# task-received only for tasks the worker will run
# --------------------------------------------------------------------------

def test_tasks_refused_on_receipt_send_no_task_received(redis_server, worker_factory, app):
    """Celery sends task-received only after a message passed the checks made on
    receipt (strategy.py): an unknown task gets task-failed alone (consumer
    on_unknown_task), a revoked or already expired one task-revoked alone.
    Flower counts task-received as "Processed", so an extra one is visible."""
    import datetime as dt

    from tori_harness import EventLog

    worker_factory(redis_server.url(), "-E", "--concurrency", "1", hostname="recv1@tests")
    revoked_id = "receipt-revoked-0001"
    reply = app.control.revoke(revoked_id, destination=["recv1@tests"], reply=True, timeout=1)
    assert reply and "flagged as revoked" in reply[0]["recv1@tests"]["ok"]
    events = EventLog(app)
    try:
        unknown = app.send_task("tori.no_such_task", args=[1])
        revoked = app.send_task("tori.echo", args=["revoked"], task_id=revoked_id)
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
        expired = app.send_task("tori.echo", args=["expired"], expires=past)
        fine = app.send_task("tori.echo", args=["fine"])
        assert fine.get(timeout=15) == {"args": ["fine"], "kwargs": {}}
        expected = {
            unknown.id: ["task-failed"],
            revoked.id: ["task-revoked"],
            expired.id: ["task-revoked"],
            fine.id: ["task-received", "task-started", "task-succeeded"],
        }
        wait_for(lambda: {t: events.types(t) for t in expected} == expected, 10,
                 message=lambda: f"events {({t: events.types(t) for t in expected})}, "
                                 f"expected {expected}")
        assert [r.state for r in (unknown, revoked, expired)] == ["FAILURE", "REVOKED", "REVOKED"]
        by_id = {e["uuid"]: e for e in events.events if e["type"] == "task-revoked"}
        assert by_id[expired.id]["expired"] is True and by_id[revoked.id]["expired"] is False
    finally:
        events.close()


# --------------------------------------------------------------------------
# a task's event follows its stored result
# --------------------------------------------------------------------------

def _events_of_publish(command: str) -> list[tuple[str, str]]:
    """(type, uuid) of the task events in a MONITOR'd ``PUBLISH`` line. Event
    envelopes carry their JSON body base64-encoded: one event, or a list of
    them when the dispatcher sent a group (``task.multi``)."""
    import base64

    m = re.search(r'"body": "([A-Za-z0-9+/=]+)"', command)
    if not command.startswith("PUBLISH ") or not m:
        return []
    try:
        body = json.loads(base64.b64decode(m.group(1)))
    except ValueError:
        return []
    return [(ev["type"], ev.get("uuid")) for ev in (body if isinstance(body, list) else [body])
            if isinstance(ev, dict) and str(ev.get("type", "")).startswith("task-")]


@contextlib.contextmanager
def _monitored(client):
    """Every command Redis executes while the block runs, in Redis's own
    order (MONITOR): the list fills on a thread and is complete on exit."""
    commands: list[str] = []
    stop = False

    def watch():
        with client.monitor() as m:
            for cmd in m.listen():
                commands.append(cmd["command"])
                if stop and "monitor-done-marker" in cmd["command"]:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # MONITOR is live once it shows a command sent after it started.
    def monitor_live():
        client.get("monitor-live-marker")
        return any("monitor-live-marker" in c for c in commands)

    wait_for(monitor_live, 10, message="MONITOR never started")
    try:
        yield commands
    finally:
        stop = True
        client.get("monitor-done-marker")
        watcher.join(5)


def _events_before_their_state(commands: list[str], ours: set[str], wanted: dict[str, str]):
    """The task events of ``wanted`` (event type -> state) for tasks in
    ``ours``, as (index, type, task id), and those of them published before
    the first write of their state."""
    stored: dict[tuple[str, str], int] = {}  # (task id, state) -> first write
    seen: list[tuple[int, str, str]] = []
    for i, c in enumerate(commands):
        m = re.match(r'(?:SETEX|SET) celery-task-meta-(\S+) (?:\d+ )?(\{.*)', c)
        if m:
            state = re.search(r'"status": "([A-Z]+)"', m.group(2))
            if state:
                stored.setdefault((m.group(1), state.group(1)), i)
            continue
        seen += [(i, kind, tid) for kind, tid in _events_of_publish(c)
                 if kind in wanted and tid in ours]
    late = [(kind, tid) for i, kind, tid in seen
            if stored.get((tid, wanted[kind]), len(commands)) > i]
    return seen, late


def test_task_events_follow_the_stored_result(redis_server, worker_factory, app, redis_client):
    """As in Celery, where the pool process stores the result before the parent
    sends task-succeeded/-failed/-retried, whoever reacts to one of those
    events (Flower, a monitor calling AsyncResult) finds the state already
    stored. Checked in Redis's own command order (MONITOR), not by timing:
    for every such event, the write of that task's state comes first."""
    worker_factory(redis_server.url(), "-E", "--concurrency", "2")
    with _monitored(redis_client) as commands:
        # Enough tasks to fill the event buffer (96 events) several times:
        # a full buffer is published at once, not after the gathering delay.
        ok = [app.send_task("tori.echo", args=[i]) for i in range(150)]
        bad = [app.send_task("tori.fail", args=[f"no {i}"]) for i in range(10)]
        flaky = [app.send_task("tori.flaky", args=[1], kwargs={"countdown": 0.05}) for _ in range(5)]
        for r in ok + flaky:
            r.get(timeout=30)
        for r in bad:
            with pytest.raises(RuntimeError):
                r.get(timeout=30)
        time.sleep(0.5)  # the last events leave after the last stores

    wanted = {"task-succeeded": "SUCCESS", "task-failed": "FAILURE", "task-retried": "RETRY"}
    seen, late = _events_before_their_state(commands, {r.id for r in ok + bad + flaky}, wanted)
    expected = len(ok) + len(bad) + 2 * len(flaky)  # flaky: task-retried, then task-succeeded
    assert len(seen) == expected, f"{len(seen)} task events captured, expected {expected}"
    assert not late, f"events sent before their state was stored: {late[:5]}"


def test_task_started_is_sent_once_a_process_has_the_job(redis_server, worker_factory, app,
                                                         redis_client):
    """Celery sends task-started when a pool process accepted the job. With
    one task per process, each job waits for a process that is still
    starting: task-started must wait too, and (with --track-started) come
    after the STARTED its process is named in, in Redis's own order."""
    worker_factory(redis_server.url(), "-E", "--track-started", "--concurrency", "1",
                   "--max-tasks-per-child", "1")
    with _monitored(redis_client) as commands:
        tasks = [app.send_task("tori.echo", args=[i]) for i in range(6)]
        for r in tasks:
            r.get(timeout=30)
        time.sleep(0.5)  # the last events leave after the last stores

    seen, late = _events_before_their_state(commands, {r.id for r in tasks},
                                            {"task-started": "STARTED"})
    assert len(seen) == len(tasks), f"{len(seen)} task-started events captured, expected {len(tasks)}"
    assert not late, f"task-started sent before the job was in a process: {late}"
