"""Faults between hosts (issue #26 item 5).

Redis and tori-worker run in two network namespaces joined by a veth pair;
the test process reaches Redis over a second veth from the root namespace,
so cutting the worker's link never cuts the test's own view of Redis::

    root ns (test, Celery client) --veth-- ns R (redis-server) --veth-- ns W (tori-worker)

The cut is a silent drop both ways: each end of the R<->W veth gets a
permanent neighbour entry with a MAC address nobody owns, so frames still
leave but the peer discards them as addressed to another host. Packets
vanish, nobody sees an RST or a local error: a cable cut, not a refused
connection. (This kernel has no netem/gact/iptables; the neighbour trick
needs nothing beyond `ip`.)

Each scenario runs a prefork c2 worker with ``--acks-late`` and tasks in
flight plus more queued, injects the fault for longer than the worker's
Redis timeouts (5 s connect, 10 s response), heals it, and then checks that
every task Redis kept is SUCCESS (read with AsyncResult from the test's
side), each ran exactly once, nothing is left queued or unacked, and a
fresh task still succeeds. Needs root and ``ip netns``; skips otherwise.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest
import redis
from celery.result import AsyncResult

from tori_harness import (
    REDIS_SERVER_BIN,
    WorkerProcess,
    clean_env,
    make_client_app,
    read_meta,
    task_lines,
    tori_bin,
    wait_for,
    wait_worker_ready,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# Longer than the worker's connect (5 s) and response (10 s) timeouts, so
# every link has given up on its connection at least once during the fault.
OUTAGE_S = 16
TASK_S = 3
N_TASKS = 6
BOGUS_MAC = "02:00:00:00:00:01"
REDIS_PORT = 6390  # each namespace has its own port space

_lab_seq = itertools.count(1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=20)


def _unavailable_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found"
    probe = f"tori-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetLab:
    """Two namespaces (Redis, worker), the veths between them and to the
    root namespace, and the processes started inside them."""

    def __init__(self, tmp: Path):
        pid, n = os.getpid(), next(_lab_seq)
        self.tmp = tmp
        self.ns_r, self.ns_w = f"tori-r-{pid}-{n}", f"tori-w-{pid}-{n}"
        # Interface names are at most 15 bytes; only the root-side one has
        # to be unique on the host, the others live in private namespaces.
        self.veth_host = f"trh{pid}x{n}"[:15]
        self.veth_rh, self.veth_rw, self.veth_wr = "to-host", "to-worker", "to-redis"
        octet = (pid * 7 + n) % 250 + 1
        self.r_for_w, self.w_addr = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.r_for_host, self.host_addr = f"10.231.{octet}.5", f"10.231.{octet}.6"
        self.procs: list[subprocess.Popen] = []
        self.redis: Optional[subprocess.Popen] = None
        self.redis_starts = 0
        self.workers: list[WorkerProcess] = []
        self._clients: list[redis.Redis] = []

    # -- network ------------------------------------------------------------
    def setup(self) -> "NetLab":
        _ip("netns", "add", self.ns_r)
        _ip("netns", "add", self.ns_w)
        _ip("link", "add", self.veth_rw, "netns", self.ns_r, "type", "veth",
            "peer", "name", self.veth_wr, "netns", self.ns_w)
        _ip("link", "add", self.veth_host, "type", "veth",
            "peer", "name", self.veth_rh, "netns", self.ns_r)
        _ip("-n", self.ns_r, "addr", "add", f"{self.r_for_w}/30", "dev", self.veth_rw)
        _ip("-n", self.ns_w, "addr", "add", f"{self.w_addr}/30", "dev", self.veth_wr)
        _ip("-n", self.ns_r, "addr", "add", f"{self.r_for_host}/30", "dev", self.veth_rh)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.veth_host)
        for ns, dev in ((self.ns_r, self.veth_rw), (self.ns_w, self.veth_wr),
                        (self.ns_r, self.veth_rh), (self.ns_r, "lo"), (self.ns_w, "lo")):
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("link", "set", self.veth_host, "up")
        return self

    def cut(self) -> None:
        """Drop every packet between worker and Redis, both directions."""
        _ip("-n", self.ns_r, "neigh", "replace", self.w_addr, "lladdr", BOGUS_MAC,
            "nud", "permanent", "dev", self.veth_rw)
        _ip("-n", self.ns_w, "neigh", "replace", self.r_for_w, "lladdr", BOGUS_MAC,
            "nud", "permanent", "dev", self.veth_wr)

    def heal(self) -> None:
        # Without the bogus entries ARP finds the real peers again.
        _ip("-n", self.ns_r, "neigh", "del", self.w_addr, "dev", self.veth_rw, check=False)
        _ip("-n", self.ns_w, "neigh", "del", self.r_for_w, "dev", self.veth_wr, check=False)

    # -- redis ----------------------------------------------------------------
    @property
    def url_for_test(self) -> str:
        return f"redis://{self.r_for_host}:{REDIS_PORT}/0"

    @property
    def url_for_worker(self) -> str:
        return f"redis://{self.r_for_w}:{REDIS_PORT}/0"

    @property
    def redis_log(self) -> Path:
        return self.tmp / "redis.log"

    def start_redis(self) -> None:
        """A fresh, empty redis-server (no persistence) in the Redis namespace."""
        assert self.redis is None or self.redis.poll() is not None
        data = self.tmp / f"redis-data-{self.redis_starts}"
        data.mkdir()
        self.redis = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_r, REDIS_SERVER_BIN, "--port", str(REDIS_PORT),
             "--bind", "0.0.0.0", "--protected-mode", "no", "--daemonize", "no",
             "--save", "", "--appendonly", "no", "--dir", str(data),
             "--logfile", str(self.redis_log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.procs.append(self.redis)
        self.redis_starts += 1
        wait_for(self._pings, 15, interval=0.05, message="redis-server in the namespace never answered")

    def _pings(self) -> bool:
        if self.redis.poll() is not None:
            raise AssertionError(f"redis-server exited rc={self.redis.returncode}")
        c = redis.Redis.from_url(self.url_for_test, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(c.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            c.close()

    def signal_redis(self, sig: int) -> None:
        self.redis.send_signal(sig)

    def kill_redis(self) -> None:
        self.redis.kill()
        self.redis.wait(10)

    def forget_worker_connections(self) -> None:
        """Make the Redis namespace forget every TCP connection to the
        worker, as a rebooted host would: the kernel otherwise keeps a
        killed server's sockets (FIN-WAIT) and retransmits their FIN after
        the heal, which tells the worker what a real reboot never does."""
        _ip("netns", "exec", self.ns_r, "ss", "-K", "dst", self.w_addr, check=False)
        left = _ip("netns", "exec", self.ns_r, "ss", "-tanH", "dst", self.w_addr).stdout.strip()
        if left:
            pytest.skip(f"`ss -K` cannot destroy sockets here (no INET_DIAG_DESTROY?): {left}")

    def client(self) -> redis.Redis:
        c = redis.Redis.from_url(self.url_for_test, decode_responses=True, socket_timeout=10,
                                 socket_connect_timeout=5)
        self._clients.append(c)
        return c

    # -- worker ---------------------------------------------------------------
    def start_worker(self, *args: str) -> WorkerProcess:
        binary = tori_bin()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"tori-worker binary not found: {binary} (build it or set "
                        "TORI_WORKER_BIN)", pytrace=False)
        n = len(self.workers) + 1
        hostname = f"netns{n}@tests"
        cmd = ["ip", "netns", "exec", self.ns_w, binary, "--broker", self.url_for_worker,
               "--hostname", hostname, "--loglevel", "info", *args]
        w = WorkerProcess(cmd, self.tmp / f"tori-worker-{n}.log", f"tori-worker #{n}",
                          env=clean_env(), hostname=hostname)
        self.workers.append(w)
        probe = make_client_app(self.url_for_test, name="tori_netns_probe")
        try:
            wait_worker_ready(w, probe, timeout=60)
        finally:
            probe.close()
        return w

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        for w in self.workers:
            w.terminate(timeout=15)
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)  # a frozen redis cannot die of SIGKILL
                except ProcessLookupError:  # pragma: no cover
                    pass
                p.kill()
                p.wait(10)
        # Deleting a namespace deletes its veths and with them their peers
        # (the root-side one included); neighbour entries go with them.
        for ns in (self.ns_w, self.ns_r):
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.veth_host, check=False)


@pytest.fixture
def lab(request, tmp_path):
    reason = _unavailable_reason()
    if reason:
        print(f"SKIP network fault tests: {reason}")
        pytest.skip(reason)
    lab = NetLab(tmp_path)
    # Attach the logs to a failure report (conftest's hook reads this).
    request.node._tori_logs = [("redis-server (netns)", lambda: lab.redis_log)] + [
        (f"tori-worker #{i} (netns)", lambda i=i: tmp_path / f"tori-worker-{i}.log")
        for i in (1, 2)]
    try:
        lab.setup()
        lab.start_redis()
        yield lab
    finally:
        lab.close()


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

WORKER_ARGS = ("--concurrency", "2", "--acks-late", "--prefetch-multiplier", "1")


def send_sleeps(app, n: int, seconds: float = TASK_S) -> list[str]:
    return [app.send_task("tori.sleep", args=[seconds]).id for _ in range(n)]


def n_lines(log: str, task_id: str, phrase: str) -> int:
    return sum(1 for ln in task_lines(log, task_id) if phrase in ln)


def n_started(worker: WorkerProcess, ids) -> int:
    log = worker.log_text()
    return sum(1 for tid in ids if n_lines(log, tid, "task started"))


def states(client: redis.Redis, ids) -> dict:
    out = {}
    for tid in ids:
        meta = read_meta(client, tid)
        out[tid] = meta["status"] if meta else "PENDING"
    return out


def queued(client: redis.Redis) -> set:
    import json
    return {json.loads(raw)["headers"]["id"] for raw in client.lrange("celery", 0, -1)}


def wait_all_success(client: redis.Redis, ids, timeout: float, worker: WorkerProcess) -> None:
    def describe():
        st = states(client, ids)
        bad = {t: s for t, s in st.items() if s != "SUCCESS"}
        return (f"{len(ids) - len(bad)}/{len(ids)} SUCCESS; not: {bad}; "
                f"queued={len(queued(client))} unacked={client.hlen('unacked')}\n"
                f"{worker.describe()}")
    wait_for(lambda: all(s == "SUCCESS" for s in states(client, ids).values()),
             timeout, interval=0.2, message=describe)


def assert_count_in_equals_out(app, client: redis.Redis, worker: WorkerProcess, ids,
                               seconds: float = TASK_S) -> None:
    """Every task SUCCESS as AsyncResult reads it, each started and
    succeeded exactly once in the worker's log, and nothing left behind."""
    for tid in ids:
        r = AsyncResult(tid, app=app)
        assert r.state == "SUCCESS" and r.result == seconds, f"{tid}: {r.state} {r.result!r}"
    log = worker.log_text()
    for tid in ids:
        # "task started"/"task succeeded", not the bare words: a result
        # write retried after its first attempt landed logs "result not
        # written: task already succeeded", which is the point, not a rerun.
        assert n_lines(log, tid, "task started") == 1, f"{tid} did not start exactly once"
        assert n_lines(log, tid, "task succeeded") == 1, f"{tid} did not succeed exactly once"
    assert client.llen("celery") == 0
    wait_for(lambda: client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0, 15,
             message=lambda: f"unacked still holds {client.hlen('unacked')} entries")


def assert_consuming(app, worker: WorkerProcess, t_heal: float) -> None:
    """A fresh task succeeds and the worker answers remote control again
    (its pub/sub subscription is live on the Redis that is there now)."""
    r = app.send_task("tori.echo", args=["after the fault"])
    assert r.get(timeout=30) is not None
    # A dead subscription is found by its periodic PING (every 15 s, 10 s
    # to answer), so give it well over one round.
    wait_for(lambda: app.control.ping(destination=[worker.hostname], timeout=1), 60,
             interval=0.5, message=lambda: f"no pong from {worker.hostname}\n{worker.describe()}")
    print(f"  remote control answers {time.monotonic() - t_heal:.1f}s after the heal")
    assert worker.alive(), worker.describe()


def start_load(lab: NetLab, app):
    """A ready worker, N_TASKS sleeps sent, two of them running."""
    worker = lab.start_worker(*WORKER_ARGS)
    ids = send_sleeps(app, N_TASKS)
    wait_for(lambda: n_started(worker, ids) >= 2, 30,
             message=lambda: f"the first tasks never started\n{worker.describe()}")
    return worker, ids


def report(name: str, t_heal: float, client: redis.Redis, ids) -> None:
    print(f"{name}: all {len(ids)} tasks SUCCESS {time.monotonic() - t_heal:.1f}s after the heal")


# --------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------

def first_progress(client: redis.Redis, ids, before: dict, t0: float, timeout: float) -> float:
    """Seconds from ``t0`` until a task's state changes from ``before``
    (the worker wrote to Redis again)."""
    wait_for(lambda: states(client, ids) != before, timeout, interval=0.05,
             message="no task state changed after the heal")
    return time.monotonic() - t0


@pytest.mark.timeout(120)
def test_partition_both_ways_then_heal(lab):
    app = make_client_app(lab.url_for_test)
    client = lab.client()
    worker, ids = start_load(lab, app)

    lab.cut()
    time.sleep(OUTAGE_S)
    before = states(client, ids)
    lab.heal()
    t_heal = time.monotonic()
    resumed = first_progress(client, ids, before, t_heal, 60)

    wait_all_success(client, ids, 60, worker)
    print(f"partition {OUTAGE_S}s: first write {resumed:.1f}s after the heal")
    report("partition", t_heal, client, ids)
    assert_count_in_equals_out(app, client, worker, ids)
    assert_consuming(app, worker, t_heal)
    app.close()


@pytest.mark.timeout(120)
def test_redis_frozen_then_continued(lab):
    app = make_client_app(lab.url_for_test)
    client = lab.client()
    worker, ids = start_load(lab, app)

    lab.signal_redis(signal.SIGSTOP)
    try:
        time.sleep(OUTAGE_S)
    finally:
        lab.signal_redis(signal.SIGCONT)
    t_heal = time.monotonic()
    # The test's own connections saw nothing but a slow reply.
    wait_all_success(client, ids, 60, worker)
    report("SIGSTOP", t_heal, client, ids)
    assert_count_in_equals_out(app, client, worker, ids)
    assert_consuming(app, worker, t_heal)
    app.close()


@pytest.mark.timeout(120)
def test_redis_restarted_empty(lab):
    app = make_client_app(lab.url_for_test)
    client = lab.client()
    worker, ids = start_load(lab, app)

    # What the new Redis cannot know about: the queue is lost with the old
    # server, the tasks the worker already holds are not. With prefetch 1
    # and two slots busy for seconds the worker is not fetching now.
    waiting = queued(client)
    held = [t for t in ids if t not in waiting]
    assert len(held) >= 2, f"the worker holds {len(held)} tasks"
    lab.kill_redis()
    time.sleep(2)
    lab.start_redis()
    t_heal = time.monotonic()

    client = lab.client()
    app.close()
    app = make_client_app(lab.url_for_test)
    after = send_sleeps(app, 2, 1)
    wait_all_success(client, held, 60, worker)
    wait_all_success(client, after, 60, worker)
    report("restart empty", t_heal, client, held + after)
    for tid in held:
        r = AsyncResult(tid, app=app)
        assert r.state == "SUCCESS" and r.result == TASK_S
    # The queued ones went with the old server: none of them ran.
    st = states(client, waiting)
    log = worker.log_text()
    ran = [t for t in waiting if n_lines(log, t, "task started")]
    assert not ran, f"tasks queued in the killed Redis ran: {ran} {st}"
    assert_count_in_equals_out(app, client, worker, after, seconds=1)
    assert_consuming(app, worker, t_heal)
    app.close()


@pytest.mark.timeout(150)
def test_redis_host_replaced_during_partition(lab):
    """The Redis end restarts empty while the link is cut, as when the Redis
    host reboots: the worker gets no FIN or RST for its old connections, so
    only its own timeouts and PINGs can tell them dead. Idle connections
    (the remote-control subscription) are the ones at risk of waiting
    forever for messages that the new server will never send."""
    app = make_client_app(lab.url_for_test)
    client = lab.client()
    worker = lab.start_worker(*WORKER_ARGS)
    lab.cut()
    lab.kill_redis()
    lab.forget_worker_connections()
    lab.start_redis()
    time.sleep(OUTAGE_S)
    lab.heal()
    t_heal = time.monotonic()
    client = lab.client()
    app.close()
    app = make_client_app(lab.url_for_test)
    ids = send_sleeps(app, 4, 1)
    wait_all_success(client, ids, 60, worker)
    report("host replaced", t_heal, client, ids)
    assert_count_in_equals_out(app, client, worker, ids, seconds=1)
    assert_consuming(app, worker, t_heal)
    app.close()
