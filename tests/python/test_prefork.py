"""Prefork pool integration tests (issue 3): tori-worker driven by a real Celery client.

What is proven here, against the real binary and private redis-servers:

* ``--concurrency N`` means N child processes of the worker, each building
  its task registry exactly once (``tori.whoami`` → ``pid``, ``registry_inits``).
* Fault isolation with ``--enable-chaos-tasks``: panic (child survives),
  abort / segfault / exit (WorkerLostError, child replaced), memory cap
  (MemoryError naming the cap), hard time limit on a tight loop
  (TimeLimitExceeded), soft time limit on a cooperative task.
* ``--max-tasks-per-child`` recycles children.
* Warm (SIGTERM), cold (SIGQUIT) shutdown and ``kill -9`` of the parent lose
  nothing and run nothing to completion twice.
* Poison messages: ``--reject-on-worker-lost --max-redeliveries K`` gives up
  after K+1 deaths, dead-letters the message; without the flag a dead child
  fails the task at once.

(Whether a cold stop really kills the interrupted task is checked by
``test_cold_shutdown_running_task_not_run_twice``; small result/queue
helpers are shared with ``test_foundation.py``.)

Contract details the tests rely on: log lines about a task carry
``task_id=<id>`` and ``task_name=<name>``; a dead child is logged as
"pool process died while running a task; replacing it", a new one as
"pool process ready ... pid=<pid>".
"""
from __future__ import annotations

import datetime as dt
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from billiard.exceptions import WorkerLostError
from celery import chain, chord
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from test_foundation import echo_result, queued_task_ids, statuses, wait_unacked_empty
from tori_harness import (
    EventLog,
    count_task_events,
    dead_letter_entries,
    entry_raw_text,
    read_meta,
    task_lines,
    wait_for,
)

DEAD_LETTER = "tori.dead_letter"
CHAOS = "--enable-chaos-tasks"

DIED_LINE = "pool process died while running a task"
READY_RE = re.compile(r"pool process ready\b.*?\bpid=(\d+)")
LOST_PID_RE = re.compile(r"\(pid (\d+)\)")


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def proc_stat(pid: int):
    """(state, ppid) of ``pid`` from /proc/<pid>/stat, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def pid_dead(pid: int) -> bool:
    st = proc_stat(pid)
    return st is None or st[0] in ("Z", "X")


def child_pids(parent: int) -> set[int]:
    """Live (non-zombie) processes whose parent is ``parent``."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st and st[1] == parent and st[0] not in ("Z", "X"):
            out.add(int(name))
    return out


def wait_children(worker, n: int, timeout: float = 10.0) -> set[int]:
    """Wait until ``worker`` has exactly ``n`` live child processes; return them."""
    return wait_for(lambda: (lambda k: k if len(k) == n else None)(child_pids(worker.pid)),
                    timeout, message=lambda: (
                        f"worker {worker.pid} has children {sorted(child_pids(worker.pid))}, "
                        f"expected {n}\n{worker.describe()}"))


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# --------------------------------------------------------------------------
# result / log helpers
# --------------------------------------------------------------------------

def failure_info(client, task_id: str) -> tuple[str, str, str]:
    """(exc_type, exc_module, message) of a FAILURE stored in the backend."""
    meta = read_meta(client, task_id)
    assert meta is not None, f"no result stored for {task_id}"
    assert meta["status"] == "FAILURE", f"task {task_id}: {meta['status']} {meta['result']!r:.300}"
    res = meta["result"]
    msg = res.get("exc_message")
    if isinstance(msg, (list, tuple)):
        msg = " ".join(str(m) for m in msg)
    return res.get("exc_type"), res.get("exc_module"), str(msg)


def whoami_pids(app, n: int) -> list[dict]:
    """``n`` tori.whoami results, sent one after another."""
    return [app.send_task("tori.whoami").get(timeout=15) for _ in range(n)]


def ready_pids(worker) -> list[int]:
    return [int(m.group(1)) for m in READY_RE.finditer(worker.log_text())]


def n_lines(worker, phrase: str) -> int:
    return sum(1 for ln in worker.log_text().splitlines() if phrase in ln)


LOG_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?)\d*Z")


def started_at(text: str, task_id: str):
    """Wall-clock time (epoch seconds) of the first 'started' line of ``task_id``."""
    for ln in task_lines(text, task_id):
        if re.search(r"\bstarted\b", ln):
            m = LOG_TS_RE.match(ln)
            if m:
                return dt.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=dt.timezone.utc).timestamp()
    return None


def fresh_running(worker, ids, n: int, min_age: float = 0.05, max_age: float = 0.4):
    """The ``n`` running tasks if all of them started between ``min_age`` and
    ``max_age`` seconds ago, else None (so a stop lands well inside them)."""
    run = started_not_finished(worker, ids)
    if len(run) != n:
        return None
    text, now = worker.log_text(), time.time()
    ages = [now - (started_at(text, i) or 0) for i in run]
    return run if all(min_age <= a <= max_age for a in ages) else None


def started_not_finished(worker, ids) -> set[str]:
    text = [worker.log_text()]
    return {i for i in ids
            if count_task_events(text, i, "started")
            and not count_task_events(text, i, "succeeded")
            and not count_task_events(text, i, "failed")}


# --------------------------------------------------------------------------
# 1. N children, warm state built once per child
# --------------------------------------------------------------------------

def test_concurrency_two_children_init_once(worker_factory, redis_server, app):
    w = worker_factory(redis_server.url(), "--concurrency", "2")
    kids = wait_children(w, 2)
    for pid in kids:
        cmd = proc_cmdline(pid)
        assert "pool-child" in cmd, f"child {pid} of the worker is not a pool child: {cmd}"

    rs = [app.send_task("tori.whoami") for _ in range(100)]
    got = [r.get(timeout=30) for r in rs]
    pids = {g["pid"] for g in got}
    assert len(pids) == 2, f"100 tasks with --concurrency 2 ran in {len(pids)} processes: {pids}"
    bad = [g for g in got if g["registry_inits"] != 1]
    assert not bad, f"a pool process initialised its tasks more than once: {bad[:5]}"
    for pid in pids:
        st = proc_stat(pid)
        assert st is not None, f"pid {pid} that ran tasks is gone"
        assert st[1] == w.pid, f"pid {pid} has parent {st[1]}, not the worker {w.pid}"
    assert pids == kids, f"tasks ran in {pids}, worker children are {kids}"
    assert w.alive()
    assert child_pids(w.pid) == kids, "pool processes were replaced during plain tasks"
    # Pool processes run under SCHED_BATCH (a job's pipe write must not
    # hand them the parent's CPU); the parent keeps the normal policy.
    policies = {pid: os.sched_getscheduler(pid) for pid in kids}
    assert all(p == os.SCHED_BATCH for p in policies.values()), f"pool policies {policies}"
    assert os.sched_getscheduler(w.pid) == os.SCHED_OTHER


def test_max_tasks_per_child_recycles(worker_factory, redis_server, app):
    w = worker_factory(redis_server.url(), "--concurrency", "1", "--max-tasks-per-child", "3")
    got = whoami_pids(app, 10)
    seq = [g["pid"] for g in got]
    assert all(g["registry_inits"] == 1 for g in got), got
    runs: list[list[int]] = []
    for p in seq:
        if runs and runs[-1][0] == p:
            runs[-1].append(p)
        else:
            runs.append([p])
    lens = [len(r) for r in runs]
    assert len({r[0] for r in runs}) == len(runs), f"a recycled pid came back: {seq}"
    # the readiness probe (tori.noop) used one task of the first child
    assert all(n <= 3 for n in lens), f"a child ran more than 3 tasks: {seq}"
    assert all(n == 3 for n in lens[1:-1]), f"children recycled at the wrong count: {seq}"
    assert len(runs) >= 4, f"10 tasks with --max-tasks-per-child 3 used {len(runs)} processes: {seq}"
    for p in {r[0] for r in runs[:-1]}:
        wait_for(lambda p=p: pid_dead(p), 5, message=f"recycled child {p} still running")
    assert w.alive()
    assert child_pids(w.pid) == {seq[-1]}


# --------------------------------------------------------------------------
# 2. every chaos task inside a stream of 200 echoes
# --------------------------------------------------------------------------

CHAOS_CASES = [
    # key, task, args, apply options, exc_type, exc_module, kills its child
    ("panic", "tori.chaos.panic", [], {}, "TaskPanicked", "tori.exceptions", False),
    ("abort", "tori.chaos.abort", [], {}, "WorkerLostError", "billiard.exceptions", True),
    ("segfault", "tori.chaos.segfault", [], {}, "WorkerLostError", "billiard.exceptions", True),
    ("exit", "tori.chaos.exit", [3], {}, "WorkerLostError", "billiard.exceptions", True),
    ("alloc", "tori.chaos.alloc", [2000], {}, "MemoryError", "builtins", True),
    ("spin", "tori.chaos.spin", [60], {"time_limit": 2}, "TimeLimitExceeded",
     ("celery.exceptions", "billiard.exceptions"), True),
]
LOST_DETAIL = {"abort": "SIGABRT", "segfault": "SIGSEGV", "exit": "exit code 3"}


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_chaos_stream_isolated(worker_factory, redis_server, app, redis_client):
    w = worker_factory(redis_server.url(), "--concurrency", "2", CHAOS,
                       "--max-memory-per-child", "512000")
    kids_before = wait_children(w, 2)
    who_before = whoami_pids(app, 4)
    assert {g["pid"] for g in who_before} <= kids_before

    echoes = {}
    chaos = {}
    slots = {20 + 30 * k: case for k, case in enumerate(CHAOS_CASES)}
    for i in range(200):
        echoes[i] = app.send_task("tori.echo", args=[i], kwargs={"n": i})
        if i in slots:
            key, name, args, opts = slots[i][:4]
            chaos[key] = app.send_task(name, args=args, **opts)

    for i, r in echoes.items():
        assert r.get(timeout=60) == echo_result(i, n=i), f"echo #{i}"
    for key, _name, _args, _opts, exc_type, exc_module, _kills in CHAOS_CASES:
        r = chaos[key]
        r.get(timeout=60, propagate=False)
        assert r.state == "FAILURE", f"chaos {key}: {r.state}"
        t, m, msg = failure_info(redis_client, r.id)
        modules = exc_module if isinstance(exc_module, tuple) else (exc_module,)
        assert t == exc_type and m in modules, f"chaos {key}: {t} ({m}): {msg}"
        if key in LOST_DETAIL:
            assert "Worker exited prematurely" in msg and LOST_DETAIL[key] in msg, msg
    assert w.alive(), "the worker process died"

    # three children died, two were killed by the parent, the panic one survived
    n_killers = sum(1 for case in CHAOS_CASES if case[6])
    wait_for(lambda: len(ready_pids(w)) >= 2 + n_killers, 10,
             message=lambda: f"pool process ready pids: {ready_pids(w)}")
    time.sleep(0.3)
    spawned = ready_pids(w)
    assert len(spawned) == 2 + n_killers, (
        f"expected 2 initial + {n_killers} replacement pool processes (panic must not "
        f"replace its child), got {len(spawned)}: {spawned}")
    assert len(set(spawned)) == len(spawned)
    assert n_lines(w, DIED_LINE) == 3, f"{n_lines(w, DIED_LINE)} '{DIED_LINE}' lines"

    lost = {}
    for key in LOST_DETAIL:
        _t, _m, msg = failure_info(redis_client, chaos[key].id)
        found = LOST_PID_RE.findall(msg)
        assert found, f"WorkerLostError of {key} names no pid: {msg}"
        lost[key] = int(found[-1])
    assert set(lost.values()) <= set(spawned), f"lost pids {lost} were not pool processes {spawned}"
    for key, pid in lost.items():
        assert pid_dead(pid), f"child {pid} that ran chaos {key} is still alive"

    kids_after = wait_children(w, 2)
    assert kids_after <= set(spawned), f"children {kids_after} not among {spawned}"
    gone = set(spawned) - kids_after
    assert len(gone) == n_killers and set(lost.values()) <= gone
    for pid in gone:
        assert pid_dead(pid), f"replaced pool process {pid} is still alive"
    who_after = whoami_pids(app, 4)
    assert {g["pid"] for g in who_after} <= kids_after
    assert all(g["registry_inits"] == 1 for g in who_after), who_after
    wait_unacked_empty(redis_client)


# --------------------------------------------------------------------------
# 2b. a panic in the worker's own message handling (not in task code)
# --------------------------------------------------------------------------

HANDLER_PANIC = "tori.chaos.handler_panic"


def active_task_ids(app, node: str) -> list[str]:
    replies = app.control.inspect(destination=[node], timeout=2.0).active() or {}
    assert node in replies, f"{node} did not answer `inspect active`: {replies!r}"
    return [t["id"] for t in replies[node]]


@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_a_handler_panic_fails_its_task_and_strands_nothing(worker_factory, redis_server, app,
                                                            redis_client):
    """The worker's handling of one message panics (injected: no real input
    is known to do it any more). That task gets FAILURE WorkerInternalError,
    its message is acked, not held, leased and listed as active for the rest
    of the worker's life; a panic while decoding dead-letters the message;
    the tasks around them run as usual and the worker lives on."""
    w = worker_factory(redis_server.url(), "--concurrency", "2", CHAOS)
    echoes = [app.send_task("tori.echo", args=[i]) for i in range(10)]
    received = app.send_task(HANDLER_PANIC, args=["received"])
    decode = app.send_task(HANDLER_PANIC, args=["decode"])
    echoes += [app.send_task("tori.echo", args=[i]) for i in range(10, 20)]

    for i, r in enumerate(echoes):
        assert r.get(timeout=30) == echo_result(i), f"echo #{i}"
    received.get(timeout=30, propagate=False)
    t, m, msg = failure_info(redis_client, received.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions"), (t, m, msg)
    assert "panicked" in msg and '"received"' in msg, msg

    wait_for(lambda: any(decode.id in entry_raw_text(e) for e in dead_letter_entries(redis_client)),
             10, message=lambda: f"dead letters: {dead_letter_entries(redis_client)!r:.500}")
    [dl] = [e for e in dead_letter_entries(redis_client) if decode.id in entry_raw_text(e)]
    assert "decoder panicked" in dl["reason"], dl["reason"]
    # Its task id is readable, so its task ends in a stored state too.
    decode.get(timeout=10, propagate=False)
    t, m, msg = failure_info(redis_client, decode.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions"), (t, m, msg)
    assert "decoder panicked" in msg, msg

    wait_unacked_empty(redis_client)
    assert active_task_ids(app, w.hostname) == []
    assert w.alive()
    assert app.send_task("tori.echo", args=["after"]).get(timeout=15) == echo_result("after")
    log = w.log_text()
    assert "handling this task's message panicked" in log and "decoder panicked" in log, w.tail()


def _panicking_chain(app, point: str):
    """``handler_panic(point) | echo`` with an errback on the first task:
    (the chain's result, the first task's result, the errback's id)."""
    eb_id = f"errback-{os.getpid()}-{time.monotonic_ns()}"
    errback = app.signature("tori.echo", args=["eb"]).set(task_id=eb_id)
    res = chain(app.signature(HANDLER_PANIC, args=[point]).set(link_error=errback),
                app.signature("tori.echo", args=["next"])).apply_async()
    return res, res.parent, eb_id


@pytest.mark.chaos
@pytest.mark.timeout(60)
def test_a_handler_panic_fails_the_rest_of_its_chain_and_calls_its_errbacks(
        worker_factory, redis_server, app, redis_client):
    """The recovered FAILURE is settled as any failure is (Celery's
    ``mark_as_failure``): the rest of the chain fails with it and the
    errback is called with the failed task's id, so nothing downstream
    waits for ever."""
    worker_factory(redis_server.url(), "--concurrency", "1", CHAOS)
    res, first, eb_id = _panicking_chain(app, "received")
    assert app.AsyncResult(eb_id).get(timeout=30) == echo_result(first.id, "eb")
    first.get(timeout=10, propagate=False)
    t, m, _ = failure_info(redis_client, first.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions")
    assert read_meta(redis_client, first.id)["traceback"].startswith("tori-worker internal error")
    res.get(timeout=10, propagate=False)
    t, m, _ = failure_info(redis_client, res.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions"), "the chain's last link fails with it"
    wait_unacked_empty(redis_client)


@pytest.mark.chaos
@pytest.mark.timeout(60)
def test_a_handler_panic_after_the_next_link_is_out_fails_only_its_own_task(
        worker_factory, redis_server, app, redis_client):
    """The task succeeded and its next link was published; then the handler
    panics before storing the result. Only the task's own FAILURE is
    stored: the next link runs with the result it was sent, and no errback
    is called for a task whose workflow went on."""
    worker_factory(redis_server.url(), "--concurrency", "1", CHAOS)
    res, first, eb_id = _panicking_chain(app, "published")
    assert res.get(timeout=30, follow_parents=False) == echo_result("published", "next")
    first.get(timeout=10, propagate=False)
    t, m, _ = failure_info(redis_client, first.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions")
    wait_unacked_empty(redis_client)
    # Give a wrongly called errback time to show.
    assert app.send_task("tori.echo", args=[1]).get(timeout=15) == echo_result(1)
    time.sleep(1.0)
    assert read_meta(redis_client, eb_id) is None, "errback called"
    assert read_meta(redis_client, res.id)["status"] == "SUCCESS"


@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_a_handler_panic_after_the_result_is_stored_keeps_it(worker_factory, redis_server, app,
                                                             redis_client):
    """Acking late, the panic comes after SUCCESS is stored and before the
    ack: the stored outcome stands and the message is acked (not redelivered
    to run again), and monitors still hear of it (the event follows the
    store, so the panic came before it). A chord header that panics there
    is still counted, so its body runs."""
    w = worker_factory(redis_server.url(), "--concurrency", "1", CHAOS, "--acks-late", "-E")
    events = EventLog(app)
    try:
        r = app.send_task(HANDLER_PANIC, args=["stored"])
        assert r.get(timeout=30) == "stored"
        wait_for(lambda: events.types(r.id) == ["task-received", "task-started", "task-succeeded"],
                 10, message=lambda: f"events {events.types(r.id)}")
        [succeeded] = [e for e in events.events
                       if e.get("uuid") == r.id and e["type"] == "task-succeeded"]
        assert succeeded["result"] == "'stored'", succeeded
    finally:
        events.close()
    body = chord([app.signature(HANDLER_PANIC, args=["stored"]),
                  app.signature("tori.echo", args=[2])])(app.signature("tori.echo"))
    header_results = body.get(timeout=30)["args"][0]
    assert header_results == ["stored", echo_result(2)], header_results
    wait_unacked_empty(redis_client)
    assert active_task_ids(app, w.hostname) == []
    assert app.send_task("tori.echo", args=[1]).get(timeout=15) == echo_result(1)
    assert read_meta(redis_client, r.id)["status"] == "SUCCESS"
    assert w.log_text().count("its final state was already stored") == 2, w.tail()
    assert w.alive()


@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_a_handler_panic_while_its_job_runs_stops_the_job(worker_factory, redis_server, app,
                                                          redis_client):
    """The handler panics while its job runs in a pool process (injected:
    the job reports progress, the handler panics once it stored it). Nobody
    is left to hear that job's outcome, so its process is stopped, as
    ``revoke(terminate=True)`` stops one, and replaced: with one process, a
    task sent next runs at once instead of behind the job's minute-long
    sleep."""
    w = worker_factory(redis_server.url(), "--concurrency", "1", CHAOS)
    inspector = app.control.inspect(destination=[w.hostname], timeout=2.0)
    stats = wait_for(lambda: (inspector.stats() or {}).get(w.hostname), 15,
                     message="the worker never answered stats")
    [before] = stats["pool"]["processes"]

    def processes():
        return ((inspector.stats() or {}).get(w.hostname) or {}).get("pool", {}).get("processes")

    r = app.send_task(HANDLER_PANIC, args=["running"])
    r.get(timeout=20, propagate=False)
    t, m, msg = failure_info(redis_client, r.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions"), (t, m, msg)
    assert "panicked" in msg and '"running"' in msg, msg
    # Far sooner than the job's own sleep would end.
    assert app.send_task("tori.echo", args=[1]).get(timeout=15) == echo_result(1)
    wait_for(lambda: processes() not in (None, [], [before]), 10,
             message=lambda: f"pool processes {processes()}, before {before}")
    wait_unacked_empty(redis_client)
    assert active_task_ids(app, w.hostname) == []
    assert "handling this task's message panicked" in w.log_text(), w.tail()
    assert w.alive()


@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_a_second_panic_while_settling_still_strands_nothing(worker_factory, redis_server, app,
                                                             redis_client):
    """The handler panics before the message is acked, and settling that
    panic panics too (injected). The message is still not stranded: its
    in-flight entry goes, so its lease is no longer renewed, and it comes
    back after the visibility timeout. A bug that hits every round would
    loop for ever: after --max-redeliveries rounds the message goes to the
    dead-letter list with a FAILURE saying why, as a task that keeps
    killing its pool process does."""
    w = worker_factory(redis_server.url(), "--concurrency", "1", CHAOS,
                       "--visibility-timeout", "2", "--restore-interval", "1",
                       "--max-redeliveries", "0")
    r = app.send_task(HANDLER_PANIC, args=["settle"])
    second = "settling a message whose handling panicked panicked too"
    wait_for(lambda: w.log_text().count(second) >= 1, 15, message=w.tail)
    # Back after the visibility timeout: the second round gives up on it.
    wait_for(lambda: any(r.id in entry_raw_text(e) for e in dead_letter_entries(redis_client)),
             20, message=lambda: f"dead letters {dead_letter_entries(redis_client)!r:.300}\n{w.tail()}")
    [dl] = [e for e in dead_letter_entries(redis_client) if r.id in entry_raw_text(e)]
    assert "--max-redeliveries=0" in dl["reason"], dl["reason"]
    assert w.log_text().count(second) == 1, w.tail()
    r.get(timeout=10, propagate=False)
    t, m, msg = failure_info(redis_client, r.id)
    assert (t, m) == ("WorkerInternalError", "tori.exceptions") and "dead-letter" in msg, msg
    wait_unacked_empty(redis_client)
    assert app.send_task("tori.echo", args=[1]).get(timeout=15) == echo_result(1)
    assert w.alive()


@pytest.mark.chaos
@pytest.mark.timeout(60)
def test_a_control_command_that_panics_replies_with_an_error(worker_factory, redis_server, app):
    """As kombu turns a command's exception into ``{"error": repr(exc)}``, a
    panic in tori's handling of a command (injected) is an error reply, not
    a requester waiting out its timeout; remote control keeps working."""
    w = worker_factory(redis_server.url(), "--concurrency", "1", CHAOS)
    wait_for(lambda: app.control.ping(destination=[w.hostname], timeout=1.0), 15,
             message="the worker never answered ping")
    replies = app.control.broadcast("tori_chaos_panic", reply=True, timeout=2.0,
                                    destination=[w.hostname])
    assert len(replies) == 1 and w.hostname in replies[0], replies
    error = replies[0][w.hostname]["error"]
    assert error.startswith("WorkerInternalError(") and "panicked" in error, error
    assert app.control.ping(destination=[w.hostname], timeout=2.0) == [{w.hostname: {"ok": "pong"}}]
    assert w.alive()


# --------------------------------------------------------------------------
# 3. hard and soft time limits
# --------------------------------------------------------------------------

@pytest.mark.chaos
@pytest.mark.parametrize("source", ["header", "cli"])
def test_time_limits(worker_factory, redis_server, app, redis_client, source):
    args = ["--concurrency", "1", CHAOS]
    if source == "cli":
        args += ["--time-limit", "2", "--soft-time-limit", "1"]
    w = worker_factory(redis_server.url(), *args)
    hard_opts = {"time_limit": 2} if source == "header" else {}
    soft_opts = {"soft_time_limit": 1} if source == "header" else {}

    # hard limit kills a tight loop (under the CLI the soft limit fires first
    # and is ignored by the loop: the hard one must still end it)
    pid0 = whoami_pids(app, 1)[0]["pid"]
    t0 = time.monotonic()
    r = app.send_task("tori.chaos.spin", args=[60], **hard_opts)
    with pytest.raises(TimeLimitExceeded):
        r.get(timeout=20)
    took = time.monotonic() - t0
    assert 1.9 <= took <= 4.0, f"spin(60) with hard limit 2 s ended after {took:.2f}s"
    t, m, msg = failure_info(redis_client, r.id)
    assert (t, m) == ("TimeLimitExceeded", "celery.exceptions"), (t, m, msg)
    wait_for(lambda: pid_dead(pid0), 5, message=f"child {pid0} survived its hard time limit")
    pid1 = whoami_pids(app, 1)[0]["pid"]
    assert pid1 != pid0 and proc_stat(pid1)[1] == w.pid

    # soft limit: the cooperative task stops, its process is kept
    t0 = time.monotonic()
    r = app.send_task("tori.sleep", args=[10], **soft_opts)
    with pytest.raises(SoftTimeLimitExceeded):
        r.get(timeout=20)
    took = time.monotonic() - t0
    assert 0.9 <= took <= 2.5, f"sleep(10) with soft limit 1 s ended after {took:.2f}s"
    t, m, msg = failure_info(redis_client, r.id)
    assert t == "SoftTimeLimitExceeded", (t, m, msg)
    assert whoami_pids(app, 1)[0]["pid"] == pid1, "a soft time limit replaced the child"

    # tasks inside their limits are untouched
    r = app.send_task("tori.sleep", args=[0.5], **soft_opts)
    assert r.get(timeout=10) == 0.5
    if source == "cli":
        # the message header wins over the CLI defaults
        r = app.send_task("tori.sleep", args=[1.5], soft_time_limit=5, time_limit=6)
        assert r.get(timeout=15) == 1.5
    assert w.alive()
    assert n_lines(w, DIED_LINE) == 0


# --------------------------------------------------------------------------
# 4. memory cap
# --------------------------------------------------------------------------

@pytest.mark.chaos
def test_memory_cap(worker_factory, redis_server, app, redis_client):
    cap = 512000
    w = worker_factory(redis_server.url(), "--concurrency", "1", CHAOS,
                       "--max-memory-per-child", str(cap))
    pid0 = whoami_pids(app, 1)[0]["pid"]
    assert app.send_task("tori.chaos.alloc", args=[64]).get(timeout=30) == 64
    assert whoami_pids(app, 1)[0]["pid"] == pid0, "a task under the memory cap replaced the child"

    peak = {"parent": 0, "child": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak["parent"] = max(peak["parent"], status_kib(w.pid, "VmRSS"))
                peak["child"] = max(peak["child"], status_kib(pid0, "VmRSS"))
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.monotonic()
        r = app.send_task("tori.chaos.alloc", args=[2000])
        with pytest.raises(MemoryError) as ei:
            r.get(timeout=60)
        took = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join(5)
    text = str(ei.value)
    assert str(cap) in text and "--max-memory-per-child" in text, text
    t, m, _ = failure_info(redis_client, r.id)
    assert (t, m) == ("MemoryError", "builtins")
    assert took < 30, f"memory cap enforced only after {took:.1f}s"
    # killed near the cap, not after allocating all 2000 MiB
    assert peak["child"] < 1_200_000, f"child reached {peak['child']} KiB before being killed"

    assert w.alive(), "the worker parent died"
    hwm = status_kib(w.pid, "VmHWM")
    assert hwm < 200 * 1024, f"worker parent peak RSS {hwm} KiB"
    assert peak["parent"] < 200 * 1024, f"worker parent RSS reached {peak['parent']} KiB"
    wait_for(lambda: pid_dead(pid0), 5, message=f"child {pid0} over the cap still alive")
    pid1 = whoami_pids(app, 1)[0]["pid"]
    assert pid1 != pid0
    assert app.send_task("tori.echo", args=["after"]).get(timeout=15) == echo_result("after")


# --------------------------------------------------------------------------
# 5. shutdown: warm, cold, kill -9 of the parent
# --------------------------------------------------------------------------

@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["warm", "cold", "kill9"])
def test_shutdown_loses_nothing(worker_factory, redis_server, app, redis_client, mode):
    url = redis_server.url()
    w1 = worker_factory(url, "--concurrency", "2", "--acks-late")
    kids = wait_children(w1, 2)
    rs = [app.send_task("tori.sleep", args=[1]) for _ in range(50)]
    ids = [r.id for r in rs]

    def n_succeeded():
        return sum(1 for i in ids if count_task_events([w1.log_text()], i, "succeeded"))

    wait_for(lambda: n_succeeded() >= 4, 30, message=lambda: f"{n_succeeded()} succeeded")
    # stop while two tasks have just started: both still have > 0.5 s to run
    running = wait_for(lambda: fresh_running(w1, ids, 2), 10, interval=0.02,
                       message="never saw two freshly started tasks")

    t0 = time.monotonic()
    if mode == "warm":
        w1.proc.send_signal(signal.SIGTERM)
    elif mode == "cold":
        w1.proc.send_signal(signal.SIGQUIT)
    else:
        os.kill(w1.pid, signal.SIGKILL)  # the parent only: children must follow
    try:
        rc = w1.proc.wait(20)
    except Exception:
        pytest.fail(f"worker did not exit within 20 s of {mode} stop\n{w1.describe()}")
    stop_took = time.monotonic() - t0
    for pid in kids:
        wait_for(lambda pid=pid: pid_dead(pid), 5,
                 message=f"pool process {pid} outlived the worker ({mode})")

    log1 = w1.log_text()
    st = statuses(redis_client, ids)
    done1 = {i for i in ids if st[i] == "SUCCESS"}
    assert len(done1) < len(ids), "everything finished before the stop; test proves nothing"

    if mode == "warm":
        assert rc == 0, f"exit code after SIGTERM: {rc}"
        # generous: must not sit out --soft-shutdown-timeout (60 s) for 1 s tasks
        assert stop_took < 10, f"warm shutdown with 1 s tasks took {stop_took:.1f}s"
        for i in running:
            assert st[i] == "SUCCESS" and count_task_events([log1], i, "succeeded") == 1, \
                f"task {i} was running at SIGTERM and did not finish: {st[i]}"
    elif mode == "kill9":
        assert rc == -signal.SIGKILL
        # running (and reserved) late-ack messages stay in 'unacked' for the restore sweep
        assert redis_client.hlen("unacked") >= 1, "nothing in 'unacked' after kill -9"

    if mode in ("warm", "cold"):
        # put back at once, not left for a visibility-timeout restore
        queued = set(queued_task_ids(redis_client))
        missing = {i for i in ids if i not in done1 and i not in queued}
        assert not missing, (f"{len(missing)} unfinished tasks are not back in the queue after "
                             f"{mode} shutdown (unacked={redis_client.hlen('unacked')}): "
                             f"{sorted(missing)[:5]}")
        assert redis_client.hlen("unacked") == 0, \
            f"'unacked' holds {redis_client.hlen('unacked')} after a {mode} shutdown"

    extra = ["--visibility-timeout", "5", "--restore-interval", "1"] if mode == "kill9" else []
    w2 = worker_factory(url, "--concurrency", "8", "--acks-late", *extra)
    for r in rs:
        assert r.get(timeout=90) == 1
    logs = [w1.log_text(), w2.log_text()]
    counts = {i: count_task_events(logs, i, "succeeded") for i in ids}
    wrong = {i: n for i, n in counts.items() if n != 1}
    assert not wrong, f"each task must succeed exactly once ({mode}); counts != 1: {wrong}"
    wait_unacked_empty(redis_client)
    assert redis_client.llen("celery") == 0


@pytest.mark.chaos
@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_stop_hands_back_prefetched(worker_factory, redis_server, app, redis_client, mode):
    """With prefetch the worker holds reserved-but-unstarted messages; warm
    and cold stops must put them back on the queue at once (not leave them
    in 'unacked' for a visibility-timeout restore an hour later)."""
    w = worker_factory(redis_server.url(), "--concurrency", "2", "--acks-late",
                       "--prefetch-multiplier", "4")
    rs = [app.send_task("tori.sleep", args=[1]) for _ in range(20)]
    ids = [r.id for r in rs]
    wait_for(lambda: fresh_running(w, ids, 2), 15, interval=0.02,
             message="never saw two freshly started tasks")
    held = redis_client.hlen("unacked")
    assert held > 2, f"worker holds {held} messages: nothing prefetched, test proves nothing"
    w.proc.send_signal(signal.SIGTERM if mode == "warm" else signal.SIGQUIT)
    try:
        rc = w.proc.wait(20)
    except Exception:
        pytest.fail(f"worker did not exit within 20 s of {mode} stop\n{w.describe()}")
    if mode == "warm":
        assert rc == 0, f"exit code after SIGTERM: {rc}"
    st = statuses(redis_client, ids)
    queued = set(queued_task_ids(redis_client))
    missing = [i for i in ids if st[i] != "SUCCESS" and i not in queued]
    assert not missing, (
        f"{len(missing)} unfinished messages not put back on the queue after a {mode} stop "
        f"(held {held} before; 'unacked' now {redis_client.hlen('unacked')}); log lines:\n"
        + "\n".join(ln for i in missing for ln in task_lines(w.log_text(), i)))
    assert redis_client.hlen("unacked") == 0


@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_cold_shutdown_running_task_not_run_twice(worker_factory, redis_server, app,
                                                  redis_client):
    """Cold shutdown puts a running late-ack task back on the queue; a peer
    worker runs it right away, so the stopping worker must have killed its
    copy (issue 3: "cold (kill children, restore their messages)")."""
    url = redis_server.url()
    # prefetch 1: a busy w1 must not hold the peer's readiness probe
    w1 = worker_factory(url, "--concurrency", "1", "--acks-late", "--prefetch-multiplier", "1")
    kids1 = wait_children(w1, 1)
    r = app.send_task("tori.sleep", args=[3])
    wait_for(lambda: count_task_events([w1.log_text()], r.id, "started"), 15,
             message="tori.sleep(3) did not start on the first worker")
    # a peer on the same queue (w1 is busy, so the readiness probe runs here)
    w2 = worker_factory(url, "--concurrency", "1", "--acks-late", "--prefetch-multiplier", "1")
    assert not count_task_events([w2.log_text()], r.id, "started")

    w1.proc.send_signal(signal.SIGQUIT)
    deadline = time.monotonic() + 2.0
    while not all(pid_dead(p) for p in kids1) and time.monotonic() < deadline:
        time.sleep(0.02)
    survivors = {p for p in kids1 if not pid_dead(p)}
    assert r.get(timeout=30) == 3
    try:
        w1.proc.wait(15)
    except Exception:
        pytest.fail(f"worker did not exit within 15 s of SIGQUIT\n{w1.describe()}")
    time.sleep(0.5)
    logs = [w1.log_text(), w2.log_text()]
    n = count_task_events(logs, r.id, "succeeded")
    assert n == 1, f"the interrupted task has {n} 'succeeded' log lines across the two workers:\n" + \
        "\n".join(f"w{k + 1}: {ln}" for k, t in enumerate(logs) for ln in task_lines(t, r.id))
    assert count_task_events([w2.log_text()], r.id, "succeeded") == 1, \
        "the peer worker should have run the restored message"
    assert not survivors, f"pool process(es) {survivors} still running 2 s after SIGQUIT"
    wait_unacked_empty(redis_client)


# --------------------------------------------------------------------------
# 6. poison messages
# --------------------------------------------------------------------------

@pytest.mark.chaos
@pytest.mark.parametrize("reject", [True, False], ids=["reject-on-worker-lost", "no-reject"])
def test_poison_task(worker_factory, redis_server, app, redis_client, reject):
    args = ["--concurrency", "2", "--acks-late", "--max-redeliveries", "2", CHAOS, "-E"]
    if reject:
        args.append("--reject-on-worker-lost")
    w = worker_factory(redis_server.url(), *args)
    events = EventLog(app)
    t0 = time.monotonic()
    poison = app.send_task("tori.chaos.segfault")
    echoes = [app.send_task("tori.echo", args=[i]) for i in range(20)]

    with pytest.raises(WorkerLostError):
        poison.get(timeout=60)
    took = time.monotonic() - t0
    for i, r in enumerate(echoes):
        assert r.get(timeout=30) == echo_result(i)
    t, m, msg = failure_info(redis_client, poison.id)
    assert (t, m) == ("WorkerLostError", "billiard.exceptions"), (t, m, msg)

    deaths = 3 if reject else 1
    time.sleep(1.5)  # room for a wrong extra redelivery to show up
    assert n_lines(w, DIED_LINE) == deaths, (
        f"expected {deaths} child deaths, log has {n_lines(w, DIED_LINE)} '{DIED_LINE}' lines")
    started = count_task_events([w.log_text()], poison.id, "started")
    assert started == deaths, f"poison task started {started} times, expected {deaths}"

    dl = [e for e in dead_letter_entries(redis_client) if poison.id in entry_raw_text(e)]
    if reject:
        assert "max-redeliveries" in msg, f"final failure does not name the limit: {msg}"
        assert len(dl) == 1, f"poison message dead-lettered {len(dl)} times: {dl}"
        assert isinstance(dl[0].get("reason"), str) and dl[0]["reason"].strip(), dl[0]
    else:
        assert "Worker exited prematurely" in msg and "SIGSEGV" in msg, msg
        assert took < 10, f"without --reject-on-worker-lost the failure took {took:.1f}s"
    assert poison.id not in queued_task_ids(redis_client)
    wait_unacked_empty(redis_client)
    # As Celery: each requeue is a task-rejected (requeue=True) and the
    # final give-up a task-failed, so Flower never shows it running.
    expected = ["task-received", "task-started", "task-rejected"] * (deaths - 1) + \
        ["task-received", "task-started", "task-failed"]
    try:
        wait_for(lambda: events.types(poison.id) == expected, 10,
                 message=lambda: f"events {events.types(poison.id)}, expected {expected}")
    finally:
        events.close()
    assert w.alive()
    kids = wait_children(w, 2)
    assert all(g["pid"] in kids for g in whoami_pids(app, 2))
