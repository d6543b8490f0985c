"""A stop that always works (issue #26, item 4).

* SIGTERM while the worker is still starting and Redis is unreachable ends
  it at once, exit code 0, its pool processes gone (nothing was fetched).
* SIGTERM while Redis hangs (SIGSTOP) ends the worker within
  ``--shutdown-timeout`` with exit code 3; the messages it could not put
  back are still in ``unacked`` and a new worker's visibility restore runs
  each of them exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import time

from test_foundation import statuses, wait_unacked_empty
from test_prefork import pid_dead, wait_children
from tori_harness import count_task_events, free_port, task_lines, wait_for

EXIT_LEFT_FOR_VISIBILITY_RESTORE = 3


def test_sigterm_during_startup_without_redis_exits_at_once(worker_factory):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    w = worker_factory(url, "--concurrency", "2", ready=False)
    kids = wait_children(w, 2, timeout=20)
    wait_for(lambda: "Redis unavailable" in w.log_text(), 20,
             message=lambda: f"the worker never said it was retrying\n{w.describe()}")
    assert w.alive(), f"the worker gave up by itself\n{w.describe()}"

    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    try:
        rc = w.proc.wait(10)
    except Exception:
        w.kill()
        raise AssertionError(f"SIGTERM during start-up was ignored for 10 s\n{w.describe()}")
    took = time.monotonic() - t0
    print(f"SIGTERM during start-up without Redis: exited in {took * 1000:.0f} ms, rc={rc}")
    assert rc == 0, f"exit code {rc} (nothing was fetched, so nothing is held)\n{w.describe()}"
    assert took < 2.0, f"took {took:.2f}s to honour SIGTERM during start-up"
    assert "stop requested during start-up" in w.log_text()
    for pid in kids:
        wait_for(lambda pid=pid: pid_dead(pid), 5,
                 message=f"pool process {pid} outlived the worker")


def test_shutdown_with_redis_hung_ends_by_the_deadline_and_loses_nothing(
        worker_factory, redis_server, app):
    url = redis_server.url()
    client = redis_server.client()
    timeout = 3.0
    # 2 running + 2 prefetched (reserved, unstarted), all late ack
    w1 = worker_factory(url, "--concurrency", "2", "--acks-late", "--prefetch-multiplier", "2",
                        "--shutdown-timeout", str(timeout))
    kids = wait_children(w1, 2)
    rs = [app.send_task("tori.sleep", args=[6]) for _ in range(4)]
    ids = [r.id for r in rs]
    wait_for(lambda: sum(1 for i in ids if count_task_events([w1.log_text()], i, "started")) == 2
             and client.hlen("unacked") == 4, 20,
             message=lambda: f"never saw 2 running + 2 held (unacked={client.hlen('unacked')})")

    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # Redis hangs: no reply, no refusal
    try:
        t0 = time.monotonic()
        w1.proc.send_signal(signal.SIGTERM)
        try:
            rc = w1.proc.wait(timeout + 15)
        except Exception:
            w1.kill()
            raise AssertionError(f"no exit within {timeout + 15}s of SIGTERM\n{w1.describe()}")
        took = time.monotonic() - t0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    print(f"shutdown with Redis hung, --shutdown-timeout {timeout}: exited in {took:.2f}s, rc={rc}")
    assert rc == EXIT_LEFT_FOR_VISIBILITY_RESTORE, f"exit code {rc}\n{w1.describe()}"
    assert took < timeout + 2.0, f"shutdown took {took:.2f}s with --shutdown-timeout {timeout}"
    for pid in kids:
        wait_for(lambda pid=pid: pid_dead(pid), 5,
                 message=f"pool process {pid} outlived the worker")
    log1 = w1.log_text()
    for i in ids:
        assert any("left in 'unacked'" in ln for ln in task_lines(log1, i)), \
            f"task {i} is not named among the messages left in 'unacked'\n{w1.tail(40)}"

    # nothing lost: every message is still in 'unacked', none ran to the end
    held = {json.loads(v)[0]["headers"]["id"] for v in client.hvals("unacked")}
    assert held == set(ids), f"'unacked' holds {held}, expected {set(ids)}"
    assert set(statuses(client, ids).values()) == {"PENDING"}

    # the visibility restore brings every one back: count in = count out
    w2 = worker_factory(url, "--concurrency", "4", "--acks-late",
                        "--visibility-timeout", "2", "--restore-interval", "1")
    assert [r.get(timeout=60) for r in rs] == [6] * 4
    logs = [log1, w2.log_text()]
    counts = {i: count_task_events(logs, i, "succeeded") for i in ids}
    assert all(n == 1 for n in counts.values()), f"each task must succeed once: {counts}"
    wait_unacked_empty(client)
