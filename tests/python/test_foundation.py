"""Foundation integration tests: tori-worker driven by a real Celery 5.7 client.

Contract (see the brief / README of tests/python): the worker binary is
``$TORI_WORKER_BIN`` (default ``/work/main/target/release/tori-worker``),
built-in tasks ``tori.echo``, ``tori.noop``, ``tori.sleep``, ``tori.fail``,
``tori.flaky``; log lines about a task carry ``task_id=<id>`` and
``task_name=<name>`` plus the words ``started`` / ``succeeded`` / ``failed``.
"""
from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import re
import threading
import time
import uuid

import pytest
import redis
from celery.exceptions import NotRegistered, TaskRevokedError
from celery.result import AsyncResult
from kombu.exceptions import ContentDisallowed

from tori_harness import (
    GARBAGE_KINDS,
    count_task_events,
    dead_letter_entries,
    entry_raw_text,
    event_order,
    garbage_message,
    good_envelope_dict,
    meta_key,
    observe_states,
    read_meta,
    task_lines,
    wait_for,
    wait_worker_ready,
)

SEP = "\x06\x16"
DEAD_LETTER = "tori.dead_letter"
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def echo_result(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def assert_task_logged(worker, task_id: str, task_name: str, word: str, timeout: float = 5.0):
    """Some log line of ``worker`` has task_id=<id>, task_name=<name> and ``word``."""
    name_pat = re.compile(r'task_name="?' + re.escape(task_name) + r'(?![\w.-])')
    word_pat = re.compile(r"\b" + re.escape(word) + r"\b")

    def found():
        return [ln for ln in task_lines(worker.log_text(), task_id)
                if name_pat.search(ln) and word_pat.search(ln)]

    wait_for(found, timeout, message=lambda: (
        f"no log line with task_id={task_id}, task_name={task_name} and {word!r}; "
        f"lines for this id: {task_lines(worker.log_text(), task_id)}"))


def statuses(client: redis.Redis, ids) -> dict:
    ids = list(ids)
    raws = client.mget([meta_key(i) for i in ids]) if ids else []
    return {i: (json.loads(r)["status"] if r else "PENDING") for i, r in zip(ids, raws)}


def queued_task_ids(client: redis.Redis, queue: str = "celery") -> list[str]:
    """Task ids of the messages currently waiting in ``queue`` (all priority lists)."""
    out = []
    for key in (queue, f"{queue}{SEP}3", f"{queue}{SEP}6", f"{queue}{SEP}9"):
        for raw in client.lrange(key, 0, -1):
            env = json.loads(raw)
            out.append(env["headers"].get("id") or env["properties"].get("correlation_id"))
    return out


def wait_unacked_empty(client: redis.Redis, timeout: float = 15.0):
    wait_for(lambda: client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0,
             timeout, message=lambda: (
                 f"'unacked' still holds {client.hlen('unacked')} entries and "
                 f"'unacked_index' {client.zcard('unacked_index')} after all tasks finished "
                 f"(messages were never acked)"))


def as_utc_timestamp(value) -> float:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def priority_step(p: int) -> int:
    return max(s for s in (0, 3, 6, 9) if s <= p)


# --------------------------------------------------------------------------
# built-in tasks
# --------------------------------------------------------------------------

def test_echo_send_task(app, tori_worker, redis_client):
    r = app.send_task("tori.echo", args=[1, "a"], kwargs={"k": [1, 2]})
    assert r.get(timeout=15) == {"args": [1, "a"], "kwargs": {"k": [1, 2]}}
    assert r.state == "SUCCESS"

    meta = read_meta(redis_client, r.id)
    assert meta["status"] == "SUCCESS"
    assert meta["task_id"] == r.id
    assert meta["result"] == {"args": [1, "a"], "kwargs": {"k": [1, 2]}}
    assert meta["traceback"] is None
    assert meta["date_done"], "date_done must be set for a ready state"

    assert_task_logged(tori_worker, r.id, "tori.echo", "started")
    assert_task_logged(tori_worker, r.id, "tori.echo", "succeeded")


def test_echo_delay_through_client_stub(app, tori_worker):
    @app.task(name="tori.echo", shared=False)
    def echo(*args, **kwargs):  # pragma: no cover - must never run in the client
        raise AssertionError("the client-side stub must not be executed")

    r = echo.delay(3, "b", flag=True, nested={"x": [None, 1.5, "ü✓"]})
    assert r.get(timeout=15) == echo_result(3, "b", flag=True, nested={"x": [None, 1.5, "ü✓"]})

    r2 = echo.apply_async(args=("only-args",))
    assert r2.get(timeout=15) == echo_result("only-args")


def test_echo_preserves_json_values(app, tori_worker):
    values = [
        0, -1, 2**53 + 1, -(2**62), 1.5, -0.25, 1e-9, True, False, None,
        "", "plain", "unicode é ✓ 漢字 🚀", "quote \" backslash \\ newline \n tab \t",
        [], {}, [1, [2, [3, [4]]]], {"a": {"b": {"c": [None, True, 1.0]}}},
        "x" * 100_000,
    ]
    kwargs = {"empty": {}, "list": [1, "2", 3.0], "ünïcödé": "ok"}
    r = app.send_task("tori.echo", args=values, kwargs=kwargs)
    got = r.get(timeout=15)
    assert got["kwargs"] == kwargs
    assert len(got["args"]) == len(values)
    for i, (want, have) in enumerate(zip(values, got["args"])):
        assert have == want and type(have) is type(want), f"arg #{i}: sent {want!r:.80}, got {have!r:.80}"


def test_noop(app, tori_worker):
    r = app.send_task("tori.noop")
    assert r.get(timeout=15) is None
    assert r.state == "SUCCESS"


def test_sleep(app, tori_worker):
    t0 = time.monotonic()
    r = app.send_task("tori.sleep", args=[1])
    assert r.get(timeout=15) == 1
    assert time.monotonic() - t0 >= 1.0, "tori.sleep(1) returned before one second had passed"


def test_fail_reraises_runtime_error(app, tori_worker, redis_client):
    r = app.send_task("tori.fail", args=["boom 42"])
    with pytest.raises(RuntimeError) as ei:
        r.get(timeout=15)
    assert type(ei.value) is RuntimeError
    assert str(ei.value) == "boom 42"
    assert r.state == "FAILURE"

    meta = read_meta(redis_client, r.id)
    assert meta["result"]["exc_type"] == "RuntimeError"
    assert meta["result"]["exc_module"] == "builtins"
    assert meta["result"]["exc_message"] == ["boom 42"]
    assert_task_logged(tori_worker, r.id, "tori.fail", "failed")


def test_unknown_task_not_registered(app, tori_worker, redis_client):
    r = app.send_task("tori.no_such_task", args=[1])
    with pytest.raises(NotRegistered) as ei:
        r.get(timeout=15)
    assert "tori.no_such_task" in str(ei.value)
    assert r.state == "FAILURE"
    meta = read_meta(redis_client, r.id)
    assert meta["result"]["exc_type"] == "NotRegistered"
    assert meta["result"]["exc_module"] == "celery.exceptions"
    assert tori_worker.alive()
    # and the worker keeps working afterwards
    assert app.send_task("tori.echo", args=["after"]).get(timeout=15) == echo_result("after")


def test_flaky_retry_state_visible(app, tori_worker):
    t0 = time.monotonic()
    r = app.send_task("tori.flaky", args=[2], kwargs={"countdown": 1})
    seen = observe_states(r, timeout=30)
    assert "RETRY" in seen, f"RETRY state never visible; states seen: {seen}"
    assert seen[-1] == "SUCCESS", f"states seen: {seen}"
    assert seen.index("RETRY") < seen.index("SUCCESS")
    assert r.get(timeout=5) == 2
    assert time.monotonic() - t0 >= 2.0, "two retries with countdown=1 finished in under 2 s"
    wait_for(lambda: count_task_events([tori_worker.log_text()], r.id, "started") == 3, 5,
             message=lambda: f"expected 3 executions (retries 0, 1, 2), log lines: "
                             f"{task_lines(tori_worker.log_text(), r.id)}")


def test_flaky_up_to_max_retries_succeeds(app, tori_worker):
    r = app.send_task("tori.flaky", args=[3])
    assert r.get(timeout=30) == 3
    assert r.state == "SUCCESS"


def test_flaky_beyond_max_retries_fails(app, tori_worker):
    r = app.send_task("tori.flaky", args=[5])
    with pytest.raises(Exception):
        r.get(timeout=30)
    assert r.state == "FAILURE"
    # max_retries=3: executions with retries 0, 1, 2, 3, then FAILURE
    wait_for(lambda: count_task_events([tori_worker.log_text()], r.id, "started") == 4, 5,
             message=lambda: f"expected exactly 4 executions, log lines: "
                             f"{task_lines(tori_worker.log_text(), r.id)}")


# --------------------------------------------------------------------------
# message handling
# --------------------------------------------------------------------------

def test_pickle_message_rejected(celery_app_factory, redis_server, tori_worker, redis_client):
    producer = celery_app_factory(redis_server.url(), task_serializer="pickle",
                                  accept_content=["pickle", "json"],
                                  result_accept_content=["json"])
    r = producer.send_task("tori.echo", args=[1, "pickled"])
    with pytest.raises(ContentDisallowed) as ei:
        r.get(timeout=15)
    assert "task_serializer='json'" in str(ei.value)
    assert r.state == "FAILURE"
    meta = read_meta(redis_client, r.id)
    assert meta["result"]["exc_type"] == "ContentDisallowed"
    assert meta["result"]["exc_module"] == "kombu.exceptions"
    assert count_task_events([tori_worker.log_text()], r.id, "succeeded") == 0
    assert tori_worker.alive()


def test_malformed_envelopes_dead_lettered(app, tori_worker, redis_client):
    pushed = {}
    for kind in GARBAGE_KINDS:
        marker = f"malformed-{kind}-{uuid.uuid4().hex[:8]}"
        pushed[marker] = kind
        redis_client.lpush("celery", garbage_message(kind, marker))
        # a good task right behind each bad one must still be served
        good = app.send_task("tori.echo", args=[kind])
        assert good.get(timeout=15) == echo_result(kind), f"good task after {kind} garbage"
        assert tori_worker.alive(), f"worker died on {kind} garbage"

    wait_for(lambda: redis_client.llen(DEAD_LETTER) >= len(pushed), 10,
             message=lambda: f"{DEAD_LETTER} has {redis_client.llen(DEAD_LETTER)} entries, "
                             f"expected {len(pushed)}")
    entries = dead_letter_entries(redis_client)
    assert len(entries) == len(pushed)
    found = {}
    for e in entries:
        assert isinstance(e, dict) and "__unparseable__" not in e, f"entry is not a JSON object: {e!r}"
        assert isinstance(e.get("reason"), str) and e["reason"].strip(), f"no reason: {e!r}"
        assert "raw" in e, f"no raw: {e!r}"
        text = entry_raw_text(e)
        hits = [m for m in pushed if m in text]
        assert len(hits) == 1, f"dead-letter raw does not identify one pushed message: {e!r:.300}"
        found[hits[0]] = e
    missing = {pushed[m] for m in pushed if m not in found}
    assert not missing, f"kinds not dead-lettered: {missing}"
    assert redis_client.llen("celery") == 0
    assert tori_worker.alive()


def test_unacked_entries_are_kombus_whatever_the_envelope_layout(worker_factory, redis_server, app,
                                                                 redis_client):
    """The reserve script reads the delivery tag and delivery_info from the end of kombu's layout
    by text search instead of decoding the JSON. Every other layout must still be recorded as
    kombu would: key = properties.delivery_tag, value = [message, exchange, routing_key]. One
    layout below fools the text search on purpose (an extra object ends the envelope with its own
    delivery_tag key), which the worker must notice and repair."""
    w = worker_factory(redis_server.url(), "--concurrency", "4", "--acks-late")
    cases = {}

    def add(name, env: dict, text: str | None = None):
        cases[name] = (env, text if text is not None else json.dumps(env))

    add("kombu", good_envelope_dict("tori.sleep", str(uuid.uuid4()), args=[3]))
    fooled = good_envelope_dict("tori.sleep", str(uuid.uuid4()), args=[3])
    # padded so that the real delivery_tag is out of the script's 300-byte window at the end
    # while the real delivery_info is still within its 600-byte window before the fake tag
    fooled["x-extra"] = {"pad": "p" * 300, "delivery_tag": "not-the-tag-" + uuid.uuid4().hex}
    add("fooled", fooled)
    escaped = good_envelope_dict("tori.sleep", str(uuid.uuid4()), args=[3])
    add("escaped", escaped, json.dumps(escaped).replace('"routing_key": "celery"',
                                                       '"routing_key": "\\u0063elery"'))
    compact = good_envelope_dict("tori.sleep", str(uuid.uuid4()), args=[3])
    add("compact", compact, json.dumps(compact, separators=(",", ":")))
    assert "\\u0063elery" in cases["escaped"][1]

    for _, text in cases.values():
        redis_client.lpush("celery", text)
    tags = {env["properties"]["delivery_tag"]: name for name, (env, _) in cases.items()}
    wait_for(lambda: redis_client.hlen("unacked") >= len(cases), 10,
             message=lambda: f"unacked holds {redis_client.hlen('unacked')} of {len(cases)}")
    time.sleep(0.3)  # the repair follows the reservation in the same call

    held = dict(redis_client.hgetall("unacked"))
    assert set(held) == set(tags), f"unacked keys {sorted(held)} != delivery tags {sorted(tags)}"
    assert set(redis_client.zrange("unacked_index", 0, -1)) == set(tags)
    for tag, value in held.items():
        env, text = cases[tags[tag]]
        assert value.startswith("[" + text + ", "), f"{tags[tag]}: entry does not hold the message"
        info = env["properties"]["delivery_info"]
        assert json.loads(value)[1:] == [info["exchange"], info["routing_key"]], tags[tag]
    assert w.log_text().count("unusual envelope layout") == 1, \
        "the fooled layout was not noticed (or others were wrongly flagged)"

    for env, _ in cases.values():
        assert AsyncResult(env["headers"]["id"], app=app).get(timeout=20) == 3
    wait_for(lambda: redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0,
             10, message="acked messages left in unacked")


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "late-ack"])
def test_prefetch_counts_unacked_messages_like_kombu(worker_factory, redis_server, app,
                                                     redis_client, acks_late):
    """kombu's QoS counts delivered messages that are not acked yet. With one
    process and a prefetch of one, a running task acked early leaves room to
    reserve the next message while it runs; acked late, it does not."""
    flags = ["--concurrency", "1", "--prefetch-multiplier", "1"] + (["--acks-late"] if acks_late else [])
    w = worker_factory(redis_server.url(), *flags)
    first = app.send_task("tori.sleep", args=[3])
    wait_for(lambda: any("task started" in ln for ln in task_lines(w.log_text(), first.id)), 10,
             message="the first task never started")
    second = app.send_task("tori.echo", args=["next"])
    if acks_late:
        time.sleep(1.0)
        assert redis_client.llen("celery") == 1, "reserved beyond the prefetch window"
        assert redis_client.hlen("unacked") == 1
    else:
        wait_for(lambda: redis_client.llen("celery") == 0 and redis_client.hlen("unacked") == 1, 2,
                 message=lambda: f"queue {redis_client.llen('celery')}, unacked "
                                 f"{redis_client.hlen('unacked')}: the next message was not reserved")
    assert not first.ready(), "the first task finished before the check; the check proves nothing"
    assert second.get(timeout=15) == echo_result("next")
    assert first.get(timeout=15) == 3


def test_dead_letter_key_option(worker_factory, redis_server, app, redis_client):
    w = worker_factory(redis_server.url(), "--dead-letter-key", "custom.dlq")
    redis_client.lpush("celery", garbage_message("not_json_text", "custom-dlq-marker"))
    assert app.send_task("tori.echo", args=[1]).get(timeout=15) == echo_result(1)
    wait_for(lambda: redis_client.llen("custom.dlq") == 1, 10,
             message=lambda: f"custom.dlq has {redis_client.llen('custom.dlq')} entries")
    assert "custom-dlq-marker" in entry_raw_text(dead_letter_entries(redis_client, "custom.dlq")[0])
    assert redis_client.llen(DEAD_LETTER) == 0
    assert w.alive()


def test_expired_task_revoked(app, tori_worker, redis_client):
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    r = app.send_task("tori.echo", args=["expired"], expires=past)
    with pytest.raises(TaskRevokedError) as ei:
        r.get(timeout=15)
    assert r.state == "REVOKED"
    assert "expired" in str(ei.value)
    meta = read_meta(redis_client, r.id)
    assert meta["result"]["exc_type"] == "TaskRevokedError"
    assert count_task_events([tori_worker.log_text()], r.id, "succeeded") == 0, \
        "an expired task was executed"

    # a task whose expiry lies in the future runs normally
    ok = app.send_task("tori.echo", args=["fresh"], expires=60)
    assert ok.get(timeout=15) == echo_result("fresh")


def test_task_that_expires_while_waiting_for_a_process_is_not_run(worker_factory, redis_server,
                                                                   app, redis_client):
    # One process, busy for 2 s: the second task is prefetched and waits
    # for it, and its 1 s expiry passes meanwhile. Celery checks expiry
    # again when it hands a task to the pool; so must we.
    worker = worker_factory(redis_server.url(), "--concurrency", "1")
    busy = app.send_task("tori.sleep", args=[2])
    late = app.send_task("tori.echo", args=["too late"], expires=1)
    with pytest.raises(TaskRevokedError, match="expired"):
        late.get(timeout=15)
    assert busy.get(timeout=15) == 2
    assert count_task_events([worker.log_text()], late.id, "succeeded") == 0, \
        "a task that expired while waiting was executed"


def test_countdown_respected(worker_factory, redis_server, app):
    worker_factory(redis_server.url(), "--concurrency", "1")
    t_before = time.time()
    later = app.send_task("tori.echo", args=["later"], countdown=2)
    now = app.send_task("tori.echo", args=["now"])
    # a waiting ETA task must not occupy the single execution slot
    assert now.get(timeout=10) == echo_result("now")
    if time.time() - t_before < 1.8:
        assert later.state not in READY_STATES, "countdown=2 task finished early"
    assert later.get(timeout=20) == echo_result("later")
    assert as_utc_timestamp(now.date_done) < as_utc_timestamp(later.date_done), \
        "a task waiting for its countdown blocked the only execution slot"
    done = as_utc_timestamp(later.date_done)
    assert done >= t_before + 2.0 - 0.001, \
        f"countdown=2 task completed {done - t_before:.3f}s after publish"
    assert time.time() - t_before < 10, "countdown=2 task ran far too late"


def test_far_eta_is_parked_in_redis_then_runs_on_time(worker_factory, redis_server, app,
                                                      redis_client):
    """An ETA beyond --eta-horizon leaves memory and `unacked` for the
    `tori.eta` sorted set (no visibility-timeout duplicate can happen), then
    runs when due, not before."""
    worker_factory(redis_server.url(), "--concurrency", "1", "--eta-horizon", "1")
    t_before = time.time()
    later = app.send_task("tori.echo", args=["parked"], countdown=4)
    parked = wait_for(lambda: redis_client.zcard("tori.eta") == 1 or None, 3.5,
                      message="the far ETA message never reached tori.eta")
    assert parked
    assert redis_client.hlen("unacked") == 0, "a parked message must not stay in unacked"
    member = redis_client.zrange("tori.eta", 0, -1, withscores=True)[0]
    assert abs(member[1] - (t_before + 4)) < 1.5, member
    assert later.get(timeout=20) == echo_result("parked")
    done = as_utc_timestamp(later.date_done)
    assert done >= t_before + 4.0 - 0.001, f"ran {done - t_before:.3f}s after publish"
    assert redis_client.zcard("tori.eta") == 0


def test_priority_and_two_queues(worker_factory, redis_server, app, redis_client):
    # Publish everything before the worker starts so the order in which it is
    # served depends only on queues/priorities.
    plan = [("a", 9), ("b", 9), ("a", 6), ("b", 6), ("a", 3), ("b", 3), ("a", 0), ("b", 0),
            ("a", 7), ("b", 1)]
    sent = {}
    for q, p in plan:
        r = app.send_task("tori.echo", args=[q, p], queue=q, priority=p)
        sent[r.id] = (q, p, r)
    stray = app.send_task("tori.echo", args=["default-queue"])  # queue 'celery'

    # sanity of the producer side (kombu's priority sub-lists)
    assert redis_client.llen("a") == 1 and redis_client.llen("b") == 2
    assert redis_client.llen(f"a{SEP}6") == 2 and redis_client.llen(f"b{SEP}9") == 1

    w = worker_factory(redis_server.url(), "--concurrency", "1", "--prefetch-multiplier", "1",
                       queues=["a", "b"])
    for tid, (q, p, r) in sent.items():
        assert r.get(timeout=20) == echo_result(q, p)

    wait_for(lambda: len(event_order(w.log_text(), sent, "started")) == len(sent), 5,
             message="not every task has a 'started' log line")
    order = event_order(w.log_text(), sent, "started")
    served = [(sent[t][0], sent[t][1]) for t in order]
    steps = [priority_step(p) for _, p in served]
    assert steps == sorted(steps), f"numerically lower priority must be served first; order: {served}"
    assert {q for q, _ in served} == {"a", "b"}

    # -Q a,b consumes only those queues
    time.sleep(1)
    assert stray.state == "PENDING"
    assert redis_client.llen("celery") == 1


def test_protocol_1_message(celery_app_factory, redis_server, tori_worker):
    p1 = celery_app_factory(redis_server.url(), task_protocol=1)
    r = p1.send_task("tori.echo", args=[1, "p1"], kwargs={"k": "v"})
    assert r.get(timeout=15) == echo_result(1, "p1", k="v")
    assert p1.send_task("tori.noop").get(timeout=15) is None


# --------------------------------------------------------------------------
# worker options
# --------------------------------------------------------------------------

@pytest.mark.parametrize("track,pool", [(True, "prefork"), (False, "prefork"), (True, "threads")],
                         ids=["track-started", "no-track-started", "track-started-threads"])
def test_track_started(worker_factory, redis_server, app, track, pool):
    args = ["--track-started"] if track else []
    worker_factory(redis_server.url(), "--pool", pool, *args)
    r = app.send_task("tori.sleep", args=[2])
    seen = observe_states(r, timeout=20)
    assert seen[-1] == "SUCCESS"
    if track:
        assert "STARTED" in seen, f"--track-started but STARTED never visible: {seen}"
        assert seen.index("STARTED") < seen.index("SUCCESS")
    else:
        assert "STARTED" not in seen, f"STARTED written without --track-started: {seen}"


def test_started_names_the_process_running_the_task(worker_factory, redis_server, app,
                                                    redis_client):
    worker_factory(redis_server.url(), "--track-started", "--concurrency", "2")
    running = [app.send_task("tori.sleep", args=[2]) for _ in range(2)]
    wait_for(lambda: all(r.state == "STARTED" for r in running), 15,
             message=lambda: f"states {[r.state for r in running]}")
    started_pids = {read_meta(redis_client, r.id)["result"]["pid"] for r in running}
    active = app.control.inspect(timeout=2).active()
    active_pids = {t["worker_pid"] for tasks in active.values() for t in tasks}
    # Two tasks at once run in two processes, and STARTED says which.
    assert len(started_pids) == 2 and started_pids == active_pids, (started_pids, active)
    for r in running:
        assert r.get(timeout=15) == 2


def test_started_names_a_process_that_replaced_another(worker_factory, redis_server, app,
                                                      redis_client):
    """With one task per process, each job goes to a process started for
    it, often still starting when the job is handed over: STARTED waits
    for that process and names it, never the worker's own pid."""
    w = worker_factory(redis_server.url(), "--track-started", "--concurrency", "1",
                       "--max-tasks-per-child", "1")
    inspector = app.control.inspect(destination=[w.hostname], timeout=2.0)
    running = [app.send_task("tori.sleep", args=[2]) for _ in range(4)]
    started_pids = []
    for r in running:
        meta = wait_for(lambda: (m := read_meta(redis_client, r.id)) and m["status"] != "PENDING" and m,
                        20, message=lambda: f"state {r.state}")
        assert meta["status"] == "STARTED", f"STARTED not seen before {meta['status']}"
        pid = meta["result"]["pid"]
        started_pids.append(pid)
        # The process that has the job, as the worker reports it.
        active = wait_for(lambda: [t for t in (inspector.active() or {}).get(w.hostname) or []
                                   if t["id"] == r.id], 10,
                          message=lambda: f"{r.id} not in inspect active")
        assert [t["worker_pid"] for t in active] == [pid], (pid, active)
        assert r.get(timeout=15) == 2
    assert w.pid not in started_pids, (w.pid, started_pids)
    # A new process for each task, so four different pids.
    assert len(set(started_pids)) == 4, started_pids


def test_result_extended_and_hostname(worker_factory, redis_server, app, redis_client):
    worker_factory(redis_server.url(), "--result-extended", hostname="ext-node@tests")
    r = app.send_task("tori.echo", args=[1, "x"], kwargs={"k": "v"})
    assert r.get(timeout=15) == echo_result(1, "x", k="v")
    meta = read_meta(redis_client, r.id)
    assert meta["name"] == "tori.echo"
    assert meta["args"] == [1, "x"]
    assert meta["kwargs"] == {"k": "v"}
    assert meta["worker"] == "ext-node@tests"
    assert meta["retries"] == 0
    assert meta["queue"] == "celery"
    assert meta["task_id"] == r.id


def test_result_expires(worker_factory, redis_server, app, redis_client):
    worker_factory(redis_server.url(), "--result-expires", "60")
    r = app.send_task("tori.echo", args=["ttl"])
    r.get(timeout=15)
    ttl = redis_client.ttl(meta_key(r.id))
    assert 0 < ttl <= 60, f"result TTL is {ttl}, expected <= 60 s"


def test_separate_result_backend(worker_factory, redis_server, celery_app_factory):
    broker, backend = redis_server.url(0), redis_server.url(1)
    worker_factory(broker, result_backend=backend)
    client = celery_app_factory(broker, backend=backend)
    r = client.send_task("tori.echo", args=["db1"])
    assert r.get(timeout=15) == echo_result("db1")
    assert redis_server.client(1).exists(meta_key(r.id)) == 1
    assert redis_server.client(0).exists(meta_key(r.id)) == 0


@pytest.mark.parametrize("mode", ["celery_env", "redis_url_env"])
def test_configuration_from_env(worker_factory, redis_server, celery_app_factory, mode):
    url0, url1 = redis_server.url(0), redis_server.url(1)
    if mode == "celery_env":
        env = {"CELERY_BROKER_URL": url0, "CELERY_RESULT_BACKEND": url1}
        backend = url1
    else:
        env = {"REDIS_URL": url0}
        backend = url0
    worker_factory(None, env=env, ready_broker=url0, ready_backend=backend)
    client = celery_app_factory(url0, backend=backend)
    r = client.send_task("tori.echo", args=[mode])
    assert r.get(timeout=15) == echo_result(mode)
    db = 1 if backend == url1 else 0
    assert redis_server.client(db).exists(meta_key(r.id)) == 1


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_pool_concurrency(worker_factory, redis_server, app, pool):
    if pool == "threads":
        worker_factory(redis_server.url(), "--pool", "threads", "--concurrency", "4")
        n, secs = 4, 1.5
    else:
        worker_factory(redis_server.url(), "--pool", "solo")
        n, secs = 3, 1.0
    t0 = time.monotonic()
    rs = [app.send_task("tori.sleep", args=[secs]) for _ in range(n)]
    assert [r.get(timeout=30) for r in rs] == [secs] * n
    elapsed = time.monotonic() - t0
    if pool == "threads":
        assert elapsed < n * secs - 2.0, f"4 x sleep(1.5) with 4 threads took {elapsed:.2f}s"
    else:
        assert elapsed >= n * secs, f"solo pool overlapped tasks: {elapsed:.2f}s"


def test_sigterm_graceful_shutdown(worker_factory, redis_server, app, redis_client):
    url = redis_server.url()
    w1 = worker_factory(url, "--concurrency", "1")
    rs = [app.send_task("tori.sleep", args=[2]) for _ in range(4)]
    ids = [r.id for r in rs]
    wait_for(lambda: any(count_task_events([w1.log_text()], i, "started") for i in ids), 15,
             message="no task started")
    time.sleep(0.3)
    rc = w1.terminate(timeout=15)
    assert not w1.stop_hung, "worker did not exit within 15 s of SIGTERM"
    assert rc == 0, f"exit code after SIGTERM: {rc}"

    started = [i for i in ids if count_task_events([w1.log_text()], i, "started")]
    st = statuses(redis_client, ids)
    for i in started:
        assert st[i] == "SUCCESS", f"task {i} was running at SIGTERM but did not finish: {st[i]}"
    not_done = {i for i in ids if st[i] != "SUCCESS"}
    assert not_done, "all tasks finished before the shutdown; test proves nothing"
    queued = queued_task_ids(redis_client)
    assert not_done == set(queued) & set(ids), \
        f"unstarted tasks must be back in the queue: unfinished {not_done}, queued {queued}"
    assert redis_client.hlen("unacked") == 0, "messages left in 'unacked' after a graceful shutdown"

    w2 = worker_factory(url, "--concurrency", "4")
    assert [r.get(timeout=30) for r in rs] == [2] * 4
    for i in ids:
        n = count_task_events([w1.log_text(), w2.log_text()], i, "succeeded")
        assert n == 1, f"task {i} succeeded {n} times"


# --------------------------------------------------------------------------
# chaos / reliability
# --------------------------------------------------------------------------

@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_late_ack_survives_kill9(worker_factory, redis_server, app, redis_client):
    url = redis_server.url()
    w1 = worker_factory(url, "--acks-late", "--concurrency", "4")
    rs = [app.send_task("tori.sleep", args=[3]) for _ in range(20)]
    ids = [r.id for r in rs]
    wait_for(lambda: any(count_task_events([w1.log_text()], i, "started") for i in ids), 20,
             message="no tori.sleep task started on the first worker")
    time.sleep(0.5)
    w1.kill()
    assert not w1.alive()
    before = statuses(redis_client, ids)
    assert list(before.values()).count("SUCCESS") < 20, "everything finished before the kill"
    assert redis_client.hlen("unacked") >= 1, \
        "with --acks-late the running tasks must still be in the 'unacked' hash after kill -9"

    w2 = worker_factory(url, "--acks-late", "--concurrency", "4",
                        "--visibility-timeout", "5", "--restore-interval", "1")
    for r in rs:
        assert r.get(timeout=120) == 3
    logs = [w1.log_text(), w2.log_text()]
    counts = {i: count_task_events(logs, i, "succeeded") for i in ids}
    wrong = {i: n for i, n in counts.items() if n != 1}
    assert not wrong, f"each task must succeed exactly once; counts != 1: {wrong}"
    wait_unacked_empty(redis_client)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.timeout(240)
def test_python_worker_killed_tori_restores(python_worker_factory, worker_factory,
                                            redis_server, app, redis_client):
    url = redis_server.url()
    py = python_worker_factory(url, concurrency=2)
    wait_worker_ready(py, app, timeout=60)
    rs = [app.send_task("tori.sleep", args=[3]) for _ in range(6)]
    ids = [r.id for r in rs]

    wait_for(lambda: sum(f"[{i}] received" in py.log_text() for i in ids) >= 2, 30,
             message=lambda: f"python worker did not receive the tasks:\n{py.tail(30)}")
    wait_for(lambda: redis_client.hlen("unacked") >= 2, 10,
             message="python worker holds no unacked messages")
    time.sleep(1.0)  # the pool children are now inside time.sleep(3)
    py.kill()  # SIGKILL main process and prefork children
    assert not py.alive()

    before = statuses(redis_client, ids)
    pending = [i for i in ids if before[i] != "SUCCESS"]
    assert pending, "the python worker finished everything before it was killed"
    assert redis_client.hlen("unacked") >= 1, "nothing left in 'unacked' after the kill"

    tw = worker_factory(url, "--visibility-timeout", "5", "--restore-interval", "1",
                        "--concurrency", "4")
    for r in rs:
        assert r.get(timeout=120) == 3
    for i in pending:
        n = count_task_events([tw.log_text()], i, "succeeded")
        assert n == 1, f"tori-worker should have run restored task {i} exactly once, ran it {n}x"
    wait_unacked_empty(redis_client)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_long_task_not_redelivered_past_visibility_timeout(worker_factory, redis_server,
                                                           app, redis_client):
    url = redis_server.url()
    opts = ("--visibility-timeout", "2", "--restore-interval", "1", "--concurrency", "1",
            "--acks-late")
    w1 = worker_factory(url, *opts)
    w2 = worker_factory(url, *opts)
    r = app.send_task("tori.sleep", args=[7])
    assert r.get(timeout=60) == 7
    time.sleep(3)  # time for a wrongly restored copy to be picked up by either worker
    logs = [w1.log_text(), w2.log_text()]
    started = count_task_events(logs, r.id, "started")
    assert started == 1, f"tori.sleep(7) started {started} times across both workers"
    assert count_task_events(logs, r.id, "succeeded") == 1
    assert r.state == "SUCCESS"
    assert w1.alive() and w2.alive()
    wait_unacked_empty(redis_client)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_restart_while_tasks_flow(redis_factory, worker_factory, celery_app_factory):
    srv = redis_factory(appendonly=True)  # --appendonly yes --appendfsync always
    url = srv.url()
    client = celery_app_factory(url)  # used for get() before and after the outage
    # Publishing thread: its own app without a result backend, so only the
    # broker connection has to survive the outage there.
    publisher_app = celery_app_factory(url, backend="disabled")
    w = worker_factory(url, "--concurrency", "4")
    raw = srv.client()
    total = 200
    ids = [str(uuid.uuid4()) for _ in range(total)]
    progress = {"published": 0, "errors": [], "retried": set()}

    def publisher():
        for i, tid in enumerate(ids):
            deadline = time.monotonic() + 90
            while True:
                try:
                    publisher_app.send_task("tori.echo", args=[i], task_id=tid)
                    break
                except Exception as e:  # broker down: publish again with the same id
                    progress["retried"].add(i)
                    if time.monotonic() > deadline:
                        progress["errors"].append(f"publish #{i} failed: {e!r}")
                        return
                    time.sleep(0.2)
            progress["published"] = i + 1
            time.sleep(0.01)

    def safe_statuses():
        try:
            return statuses(raw, ids)
        except redis.exceptions.RedisError:
            return {}

    t = threading.Thread(target=publisher, name="publisher", daemon=True)
    t.start()
    wait_for(lambda: progress["published"] >= total // 2, 60,
             message=lambda: f"only {progress['published']} published")
    # tasks are flowing, and the client's result connection is in use
    assert AsyncResult(ids[0], app=client).get(timeout=20) == echo_result(0)

    srv.stop()  # SIGTERM: redis fsyncs the AOF and exits
    assert not srv.running()
    published_at_outage = progress["published"]
    time.sleep(2)
    srv.start()  # same port, same dir: the AOF is reloaded

    t.join(120)
    assert not t.is_alive(), "publisher still blocked after Redis came back"
    assert not progress["errors"], progress["errors"]
    assert published_at_outage < total, "all tasks were published before the outage"

    def n_success():
        return list(safe_statuses().values()).count("SUCCESS")

    def diagnose():
        st = safe_statuses()
        lost = [i for i, tid in enumerate(ids) if st.get(tid) != "SUCCESS"]
        try:
            queued = set(queued_task_ids(raw))
            unacked = set(raw.hkeys("unacked"))
            unacked_ids = {json.loads(v)[0]["headers"].get("id")
                           for v in raw.hvals("unacked")}
        except redis.exceptions.RedisError as e:
            return f"redis error while diagnosing: {e!r}"
        log = w.log_text()
        rows = []
        for i in lost[:20]:
            tid = ids[i]
            rows.append(
                f"  #{i} {tid}: state={st.get(tid)} queued={tid in queued} "
                f"unacked={tid in unacked_ids} publish_retried={i in progress['retried']} "
                f"log_lines={len(task_lines(log, tid))}")
        return (f"{total - len(lost)}/{total} SUCCESS after the Redis restart "
                f"(outage after publish #{published_at_outage}; {len(unacked)} unacked); "
                f"not successful:\n" + "\n".join(rows))

    wait_for(lambda: n_success() == total, 150, interval=0.5, message=diagnose)

    for i, tid in enumerate(ids):
        deadline = time.monotonic() + 30
        while True:
            try:
                value = AsyncResult(tid, app=client).get(timeout=30)
                break
            except (redis.exceptions.ConnectionError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert value == echo_result(i), f"task #{i}"
    assert w.alive(), "worker exited during the Redis outage"


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_garbage_flood(app, tori_worker, redis_client):
    n_garbage, every = 1000, 20
    markers = set()
    good = []
    pipe = redis_client.pipeline(transaction=False)
    for i in range(n_garbage):
        marker = f"garbage-{i:04d}"
        markers.add(marker)
        pipe.lpush("celery", garbage_message(GARBAGE_KINDS[i % len(GARBAGE_KINDS)], marker))
        if (i + 1) % every == 0:
            pipe.execute()
            good.append((i, app.send_task("tori.echo", args=[i])))
    pipe.execute()

    for i, r in good:
        assert r.get(timeout=60) == echo_result(i), f"good task after garbage #{i}"
    assert tori_worker.alive(), "worker died during the garbage flood"

    wait_for(lambda: redis_client.llen(DEAD_LETTER) >= n_garbage, 60, interval=0.2,
             message=lambda: f"{DEAD_LETTER} has {redis_client.llen(DEAD_LETTER)} / {n_garbage}")
    entries = dead_letter_entries(redis_client)
    assert len(entries) == n_garbage
    found = set()
    for e in entries:
        assert isinstance(e, dict) and "__unparseable__" not in e, f"bad entry {e!r:.200}"
        assert isinstance(e.get("reason"), str) and e["reason"].strip(), f"no reason: {e!r:.200}"
        m = re.findall(r"garbage-\d{4}", entry_raw_text(e))
        assert m, f"raw does not contain the pushed message: {e!r:.200}"
        found.add(m[0])
    assert found == markers, f"{len(markers - found)} garbage messages missing from dead letter"
    assert redis_client.llen("celery") == 0
    assert app.send_task("tori.echo", args=["still alive"]).get(timeout=15) == echo_result("still alive")
