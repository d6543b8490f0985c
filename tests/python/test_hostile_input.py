"""Hostile and malformed input (issue #25): nothing wedges, bloats or
silences the worker, and every message whose task id can be read ends in
a stored state that the real Celery client reads with ``AsyncResult``.

Messages are pushed straight onto the queue, as a hostile or broken
producer would, in the exact envelope layout kombu writes.
"""
from __future__ import annotations

import base64
import json
import os
import uuid

import pytest
from celery.result import AsyncResult

from tori_harness import (
    dead_letter_entries,
    entry_raw_text,
    good_envelope_dict,
    meta_key,
    wait_for,
)

DEAD_LETTER = "tori.dead_letter"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def envelope_with_body(task: str, task_id: str, body: bytes,
                       content_type: str = "application/json", **headers) -> dict:
    env = good_envelope_dict(task, task_id)
    env["body"] = base64.b64encode(body).decode()
    env["content-type"] = content_type
    env["headers"].update(headers)
    return env


def nested(depth: int) -> str:
    """A JSON list nested ``depth`` containers deep, as text (Python's json
    cannot build or print one this deep)."""
    return "[" * depth + "]" * depth


def push(client, env, queue: str = "celery"):
    client.lpush(queue, env if isinstance(env, (str, bytes)) else json.dumps(env))


def stored(client, task_id: str):
    raw = client.get(meta_key(task_id))
    return json.loads(raw) if raw else None


def failure_of(app, task_id: str, timeout: float = 20.0):
    """The exception the real client rebuilds from the stored FAILURE."""
    r = AsyncResult(task_id, app=app)
    r.get(timeout=timeout, propagate=False)
    assert r.state == "FAILURE", f"{task_id}: state {r.state}, result {r.result!r}"
    return r.result


def dead_lettered_ids(client) -> dict:
    """Task id (from the raw message's headers or correlation id) → record."""
    out = {}
    for e in dead_letter_entries(client):
        text = entry_raw_text(e)
        try:
            env = json.loads(text)
            tid = (env.get("headers") or {}).get("id") or env["properties"]["correlation_id"]
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        out[tid] = e
    return out


def assert_healthy(app, worker):
    assert worker.alive(), "the worker died"
    r = app.send_task("tori.echo", args=["still here"])
    assert r.get(timeout=20) == {"args": ["still here"], "kwargs": {}}
    active = app.control.inspect(timeout=2).active() or {}
    assert active.get(worker.hostname) == [], f"inspect active: {active}"


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants, in KiB."""
    def children(p):
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children(p))
    return total


# --------------------------------------------------------------------------
# nesting
# --------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_nesting_at_every_depth_from_1_to_10000(worker_factory, redis_server, app, redis_client):
    """One ``tori.echo`` per depth, its argument nested that deep, two at a
    time on a c2 prefork worker: each ends SUCCESS (the echoed result fits
    the depth limit), FAILURE EncodeError (the argument fit but the result
    that wraps it does not) or FAILURE DecodeError (the argument itself is
    too deep); none occupies a pool slot afterwards."""
    w = worker_factory(redis_server.url(), "--pool", "prefork", "--concurrency", "2")
    ids = {}
    pipe = redis_client.pipeline(transaction=False)
    for depth in range(1, 10_001):
        tid = f"nest-{depth}-{uuid.uuid4().hex[:8]}"
        ids[depth] = tid
        body = f"[[{nested(depth)}], {{}}, {json.dumps(EMBED)}]".encode()
        pipe.lpush("celery", json.dumps(envelope_with_body("tori.echo", tid, body)))
        if depth % 500 == 0:
            pipe.execute()
    pipe.execute()

    def unfinished():
        keys = [meta_key(t) for t in ids.values()]
        got = []
        for i in range(0, len(keys), 1000):
            got += redis_client.mget(keys[i:i + 1000])
        return [d for d, raw in zip(ids, got)
                if raw is None or json.loads(raw)["status"] not in ("SUCCESS", "FAILURE")]

    wait_for(lambda: not unfinished(), 480, interval=1,
             message=lambda: f"depths without a final state: {unfinished()[:20]}…")
    kinds = {}
    for depth, tid in ids.items():
        meta = stored(redis_client, tid)
        if meta["status"] == "SUCCESS":
            kind = "SUCCESS"
            assert meta["result"]["kwargs"] == {}
        else:
            kind = meta["result"]["exc_type"]
        kinds.setdefault(kind, []).append(depth)
    # The limit is 100 containers per argument and 98 per result (a result
    # travels on inside the next step's arguments): echo wraps the argument
    # two levels deeper ({"args": [arg]}), so its result reaches its limit
    # first.
    assert kinds.get("SUCCESS") == list(range(1, 97)), kinds.keys()
    assert kinds.get("EncodeError") == [97, 98, 99, 100]
    assert kinds.get("DecodeError") == list(range(101, 10_001))
    assert set(kinds) == {"SUCCESS", "EncodeError", "DecodeError"}

    # What the client sees, at the edges and far past them.
    ok = AsyncResult(ids[96], app=app).get(timeout=10)
    assert json.dumps(ok["args"][0]).replace(" ", "") == nested(96)
    enc = failure_of(app, ids[97])
    assert type(enc).__name__ == "EncodeError" and "nested more than 98" in str(enc)
    for depth in (101, 126, 127, 128, 129, 10_000):
        exc = failure_of(app, ids[depth])
        assert type(exc).__name__ == "DecodeError", (depth, exc)
    # Every one of those is also in the dead-letter list, raw.
    too_deep = {ids[d] for d in range(101, 10_001)}
    wait_for(lambda: too_deep <= set(dead_lettered_ids(redis_client)), 60, interval=1,
             message=lambda: "not all too-deep messages were dead-lettered")
    assert redis_client.hlen("unacked") == 0
    assert_healthy(app, w)


# --------------------------------------------------------------------------
# message size
# --------------------------------------------------------------------------

def sized_envelope(task_id: str, size: int) -> str:
    """A ``tori.noop`` envelope of exactly ``size`` bytes (padded in a header)."""
    env = good_envelope_dict("tori.noop", task_id)
    env["headers"]["x_pad"] = ""
    base = len(json.dumps(env))
    env["headers"]["x_pad"] = "p" * (size - base)
    text = json.dumps(env)
    assert len(text) == size
    return text


def test_message_just_under_and_just_over_max_message_size(worker_factory, redis_server, app,
                                                           redis_client):
    limit = 200_000
    w = worker_factory(redis_server.url(), "--max-message-size", str(limit))
    under, at, over = (f"size-{n}-{uuid.uuid4().hex[:8]}" for n in ("under", "at", "over"))
    push(redis_client, sized_envelope(under, limit - 1))
    push(redis_client, sized_envelope(at, limit))
    push(redis_client, sized_envelope(over, limit + 1))
    assert AsyncResult(under, app=app).get(timeout=20) is None
    assert AsyncResult(at, app=app).get(timeout=20) is None
    exc = failure_of(app, over)
    assert type(exc).__name__ == "MessageSizeExceeded"
    assert f"{limit + 1} bytes" in str(exc) and str(limit) in str(exc)
    # FAILURE is stored first, then the message is dead-lettered.
    dl = wait_for(lambda: dead_lettered_ids(redis_client), 10)
    assert set(dl) == {over}
    assert len(dl[over]["raw"]) == limit + 1, "the raw message is kept whole"
    assert redis_client.hlen("unacked") == 0
    assert_healthy(app, w)


@pytest.mark.timeout(300)
def test_large_accepted_message_does_not_keep_the_worker_large(worker_factory, redis_server,
                                                                app, redis_client):
    """A 48 MiB message (a 36 MiB argument, base64-encoded) within the
    limit runs, and afterwards the worker tree (parent and pool processes)
    is back within 80 MiB of its idle RSS (measured here: 31–64 MiB over
    idle after one or two such messages, against ~160 MiB before the worker
    renewed its connections and returned freed memory)."""
    w = worker_factory(redis_server.url(), "--pool", "prefork", "--concurrency", "2",
                       "--max-message-size", str(64 << 20))
    for _ in range(4):  # warm both processes and the parent's buffers
        app.send_task("tori.echo", args=["warm"]).get(timeout=20)
    idle = tree_rss_kib(w.proc.pid)
    big = "x" * (36 << 20)
    tid = f"big-{uuid.uuid4().hex[:8]}"
    body = json.dumps([[big], {}, EMBED]).encode()
    env = json.dumps(envelope_with_body("tori.echo", tid, body))
    assert 48 << 20 <= len(env) < 49 << 20
    push(redis_client, env)
    del body, env
    r = AsyncResult(tid, app=app)
    r.get(timeout=120, propagate=False)
    assert r.state == "SUCCESS"
    assert len(r.result["args"][0]) == len(big)
    del big
    r.forget()
    # Settling and giving memory back happen right after the result is
    # stored: allow the worker a moment, without asserting on the time.
    after = None

    def settled():
        nonlocal after
        after = tree_rss_kib(w.proc.pid)
        return after - idle < 80 * 1024
    wait_for(settled, 30, interval=0.5,
             message=lambda: f"worker tree RSS {after} KiB, idle was {idle} KiB")
    print(f"worker tree RSS: idle {idle} KiB, after a 48 MiB message {after} KiB")
    assert_healthy(app, w)


# --------------------------------------------------------------------------
# malformed messages with a readable task id
# --------------------------------------------------------------------------

def _good_body(args=("x",)) -> bytes:
    return json.dumps([list(args), {}, EMBED]).encode()


def _with_number(header: str, number: str, tid: str) -> str:
    """An envelope whose ``header`` is ``number`` written as is (Python's
    json would write inf as the non-JSON ``Infinity``)."""
    env = envelope_with_body("tori.echo", tid, _good_body())
    env["headers"][header] = "@NUMBER@"
    return json.dumps(env).replace('"@NUMBER@"', number)


MALFORMED = {
    # name: (envelope builder, expected exception type, text in its message)
    "body_not_base64": (
        lambda tid: {**envelope_with_body("tori.echo", tid, _good_body()), "body": "%%not base64%%"},
        "DecodeError", "base64"),
    "body_not_utf8": (
        lambda tid: envelope_with_body("tori.echo", tid, b"\xff\xfe[1, 2]"),
        "DecodeError", "JSON"),
    "body_not_json": (
        lambda tid: envelope_with_body("tori.echo", tid, b"[[1], {}, {"),
        "DecodeError", "JSON"),
    "body_nested_10000": (
        lambda tid: envelope_with_body("tori.echo", tid, nested(10_000).encode()),
        "DecodeError", "JSON"),
    "msgpack_corrupt": (
        lambda tid: envelope_with_body("tori.echo", tid, b"\x93\xc1\xc1",
                                       content_type="application/x-msgpack"),
        "DecodeError", "msgpack"),
    "args_not_a_list": (
        lambda tid: envelope_with_body("tori.echo", tid, json.dumps([5, {}, EMBED]).encode()),
        "TypeError", "args must be a list"),
    "kwargs_not_a_dict": (
        lambda tid: envelope_with_body("tori.echo", tid, json.dumps([[], [1], EMBED]).encode()),
        "TypeError", "kwargs must be a dict"),
    "eta_not_a_date": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), eta="next tuesday"),
        "ValueError", "eta"),
    "eta_wrong_type": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), eta=[2026]),
        "TypeError", "eta"),
    "expires_not_a_date": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), expires="2026-13-45T99:00"),
        "ValueError", "expires"),
    "timelimit_huge": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), timelimit=[1e300, None]),
        "ValueError", "timelimit hard"),
    "timelimit_negative_soft": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), timelimit=[None, -5]),
        "ValueError", "timelimit soft"),
    "timelimit_not_numbers": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), timelimit=["10", None]),
        "TypeError", "timelimit hard"),
    "timelimit_not_a_pair": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), timelimit=30),
        "TypeError", "timelimit"),
    "retries_not_int": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), retries="3"),
        "TypeError", "retries"),
    "retries_negative": (
        lambda tid: envelope_with_body("tori.echo", tid, _good_body(), retries=-1),
        "ValueError", "retries"),
    # Python's json reads 1e400 as inf; no JSON value can carry that back,
    # so the worker refuses the message (the id is still read).
    "header_number_beyond_f64": (
        lambda tid: _with_number("x_big", "1e400", tid),
        "DecodeError", "1e400 (line 1"),
    "task_header_number_beyond_f64": (
        lambda tid: _with_number("task", "-1E+999", tid),
        "DecodeError", "beyond the range of a 64-bit float"),
    "arg_nested_too_deep": (
        lambda tid: envelope_with_body(
            "tori.echo", tid, f"[[{nested(120)}], {{}}, {{}}]".encode()),
        "DecodeError", "args[0] is nested more than 100"),
}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_malformed_messages_end_in_a_stored_failure(worker_factory, redis_server, app,
                                                     redis_client, pool):
    w = worker_factory(redis_server.url(), "--pool", pool, "--concurrency", "2")
    ids = {}
    for name, (build, _, _) in MALFORMED.items():
        tid = f"{name}-{uuid.uuid4().hex[:8]}"
        ids[name] = tid
        push(redis_client, build(tid))
    # The envelope itself not UTF-8, with the id readable in its headers.
    raw_tid = f"envelope_not_utf8-{uuid.uuid4().hex[:8]}"
    env = json.dumps(good_envelope_dict("tori.echo", raw_tid)).encode()
    push(redis_client, env.replace(b'"origin": "', b'"origin": "\xff\xfe', 1))
    for name, tid in ids.items():
        exc = failure_of(app, tid)
        _, want_type, want_text = MALFORMED[name]
        assert type(exc).__name__ == want_type, (name, repr(exc))
        assert want_text in str(exc), (name, str(exc))
    exc = failure_of(app, raw_tid)
    assert type(exc).__name__ == "DecodeError" and "UTF-8" in str(exc)
    wait_for(lambda: set(ids.values()) <= set(dead_lettered_ids(redis_client)), 10,
             message=lambda: "not every malformed message reached the dead-letter list")
    dl = dead_lettered_ids(redis_client)
    missing = [n for n, t in ids.items() if t not in dl]
    assert not missing, f"not dead-lettered: {missing}"
    wait_for(lambda: any(raw_tid in entry_raw_text(e)
                         for e in dead_letter_entries(redis_client)), 10)
    for e in dl.values():
        assert e["reason"], e
    assert redis_client.hlen("unacked") == 0
    assert_healthy(app, w)


def test_producer_numbers_are_validated_not_panicked_on(worker_factory, redis_server, app):
    """``tori.sleep(1e300)`` is a ValueError from the task, not a panic in
    the worker's handling."""
    w = worker_factory(redis_server.url(), "--pool", "prefork", "--concurrency", "2")
    r = app.send_task("tori.sleep", args=[1e300])
    r.get(timeout=20, propagate=False)
    assert r.state == "FAILURE" and type(r.result).__name__ == "ValueError", repr(r.result)
    assert "too large" in str(r.result)
    # A retry countdown from the producer, far past any usable delay.
    r = app.send_task("tori.flaky", args=[5], kwargs={"countdown": 1e300})
    r.get(timeout=20, propagate=False)
    assert r.state == "FAILURE" and type(r.result).__name__ == "ValueError", repr(r.result)
    assert "retry countdown" in str(r.result)
    assert "panic" not in w.log_text().lower()
    assert_healthy(app, w)


# --------------------------------------------------------------------------
# the job watchdog
# --------------------------------------------------------------------------

def test_job_watchdog_recovers_a_task_without_a_time_limit(worker_factory, redis_server, app,
                                                           redis_client):
    """With no hard time limit, ``--job-watchdog`` bounds how long a job can
    hold its pool process; the task is reported lost and the slot serves
    the next task."""
    w = worker_factory(redis_server.url(), "--pool", "prefork", "--concurrency", "1",
                       "--job-watchdog", "2", "--enable-chaos-tasks")
    r = app.send_task("tori.chaos.spin", args=[600])
    r.get(timeout=60, propagate=False)
    assert r.state == "FAILURE", r.state
    assert type(r.result).__name__ == "WorkerLostError", repr(r.result)
    assert "--job-watchdog" in str(r.result)
    assert_healthy(app, w)
