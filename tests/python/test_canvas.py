"""Canvas built with the real Celery client and run by tori-worker: chains
pass each result on, callbacks (``link``) and errbacks (``link_error``)
are called, and a failed link fails the rest of its chain the way Celery's
backend does (``mark_as_failure``), so nothing waits on a PENDING result
that can never come. Chords have their own module (test_chords.py).
"""
from __future__ import annotations

import gc
import time
import uuid

import pytest
import redis.exceptions
from celery import chain, chord
from celery.canvas import chunks, xmap, xstarmap
from celery.exceptions import ChordError

from test_foundation import echo_result, queued_task_ids, wait_unacked_empty
from tori_harness import EventLog, wait_for


@pytest.fixture(autouse=True)
def _forget_subscriptions(app):
    """As in test_chords.py: workflow results form reference cycles whose
    late ``__del__`` would UNSUBSCRIBE on this test's Redis once it is gone
    and stall a later test in redis-py's reconnect loop."""
    yield
    app.backend.result_consumer.subscribed_to.clear()
    gc.collect()


def test_chain_passes_each_result_to_the_next(tori_worker, app):
    echo = app.signature("tori.echo")
    res = chain(echo.clone(args=[1]), echo.clone(args=[2]), echo.clone(args=[3])).apply_async()
    first = echo_result(1)
    second = echo_result(first, 2)
    assert res.get(timeout=30) == echo_result(second, 3)
    assert res.parent.get(timeout=5) == second
    # Each link names the one before it as its parent, as with Python workers.
    assert app.AsyncResult(res.id)._get_task_meta()["parent_id"] == res.parent.id


def test_failed_link_fails_the_rest_of_the_chain(tori_worker, app, redis_client):
    echo = app.signature("tori.echo")
    res = chain(app.signature("tori.fail", args=["first link broke"]),
                echo.clone(args=[2]), echo.clone(args=[3])).apply_async()
    middle_id, first_id = res.parent.id, res.parent.parent.id
    # A result known only by its id (a status page, another process) has no
    # parents to look at: it must reach FAILURE itself.
    last = app.AsyncResult(res.id)
    with pytest.raises(RuntimeError, match="first link broke"):
        last.get(timeout=30)
    for task_id in (first_id, middle_id, res.id):
        meta = app.AsyncResult(task_id)._get_task_meta()
        assert meta["status"] == "FAILURE", (task_id, meta)
        assert "first link broke" in (meta["traceback"] or ""), meta
    # The later links never ran: only the first one was ever a message.
    assert redis_client.llen("celery") == 0


def test_link_and_link_error_are_called(tori_worker, app):
    cb_id, eb_id = str(uuid.uuid4()), str(uuid.uuid4())
    ok = app.send_task("tori.echo", args=[5],
                       link=app.signature("tori.echo", args=["cb"]).set(task_id=cb_id))
    assert app.AsyncResult(cb_id).get(timeout=30) == echo_result(echo_result(5), "cb")
    assert ok.get(timeout=5) == echo_result(5)

    failed = app.send_task("tori.fail", args=["errback me"],
                           link_error=app.signature("tori.echo", args=["eb"]).set(task_id=eb_id))
    # Old-style errbacks get the failed task's id first, as Celery calls them.
    assert app.AsyncResult(eb_id).get(timeout=30) == echo_result(failed.id, "eb")
    with pytest.raises(RuntimeError, match="errback me"):
        failed.get(timeout=5)


def test_failed_chain_in_a_chord_header_fails_the_body(tori_worker, app):
    echo = app.signature("tori.echo")
    header = [chain(app.signature("tori.fail", args=["chained header broke"]), echo.clone(args=[2])),
              echo.clone(args=[3])]
    res = chord(header)(echo.clone())
    body = app.AsyncResult(res.id)
    # The chain's second link never runs; it is counted in the chord as
    # failed, so the body fails instead of waiting for it forever.
    with pytest.raises(ChordError, match="chained header broke"):
        body.get(timeout=30)
    assert body.state == "FAILURE"



@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "late-ack"])
def test_next_link_redis_refuses_fails_the_task_like_celery(worker_factory, redis_server, app,
                                                           redis_client, acks_late):
    # A transient Redis error is retried; one that will not fix itself (here
    # WRONGTYPE: the next link's queue key holds a string) must not leave the
    # finished task PENDING with its message already acked. Celery publishes
    # the next link inside the task's trace, so the error becomes the task's
    # FAILURE (report_internal_error, then on_error); tori-worker does the same.
    worker_factory(redis_server.url(), *(["--acks-late"] if acks_late else []))
    redis_client.set("broken", "not a list")
    res = chain(app.signature("tori.echo", args=[1]),
                app.signature("tori.echo", args=[2]).set(queue="broken")).apply_async()
    first = app.AsyncResult(res.parent.id)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        first.get(timeout=30)
    meta = first._get_task_meta()
    assert meta["status"] == "FAILURE" and "next task of the workflow" in str(meta["result"]), meta
    # The rest of the chain fails with it, as Celery's mark_as_failure does.
    assert app.AsyncResult(res.id).state == "FAILURE"
    wait_unacked_empty(redis_client)
    assert queued_task_ids(redis_client) == []
    assert redis_client.get("broken") == "not a list"


def test_reject_with_requeue_puts_a_late_acked_message_back(worker_factory, redis_server, app,
                                                           redis_client, tmp_path):
    # Celery 5.7 (request.py on_failure -> reject(requeue=True)): the message
    # goes back to its queue, task-rejected(requeue=True) is sent, nothing is
    # stored and no task-failed is sent; the next delivery runs it again.
    worker_factory(redis_server.url(), "-E", "--enable-chaos-tasks", "--acks-late")
    events = EventLog(app)
    marker = tmp_path / "rejected-once"
    try:
        res = app.send_task("tori.chaos.reject", args=["not now"],
                            kwargs={"requeue": True, "once_marker": str(marker)})
        assert res.get(timeout=30) == f"not rejected: {marker} exists"
        expected = ["task-received", "task-started", "task-rejected",
                    "task-received", "task-started", "task-succeeded"]
        wait_for(lambda: events.types(res.id) == expected, 10,
                 message=lambda: f"events {events.types(res.id)}, expected {expected}")
        rejected = next(e for e in events.events
                        if e.get("uuid") == res.id and e["type"] == "task-rejected")
        assert rejected["requeue"] is True, rejected
        wait_unacked_empty(redis_client)
        assert queued_task_ids(redis_client) == []
    finally:
        events.close()


def test_reject_with_requeue_after_an_early_ack_requeues_nothing(worker_factory, redis_server, app,
                                                                 redis_client, tmp_path):
    # Celery 5.7: with the early ack the message is gone by the time the task
    # raises Reject(requeue=True); reject() sees it acknowledged and does
    # nothing: no requeue, no task-rejected, no state stored. The worker says
    # so in its log, which is the only trace Celery leaves too.
    w = worker_factory(redis_server.url(), "-E", "--enable-chaos-tasks")
    events = EventLog(app)
    marker = tmp_path / "rejected-once"
    try:
        res = app.send_task("tori.chaos.reject", args=["too late"],
                            kwargs={"requeue": True, "once_marker": str(marker)})
        wait_for(lambda: "Reject(requeue=True) after an early ack" in w.log_text(), 15,
                 message="the worker never logged the lost requeue")
        assert marker.exists()
        time.sleep(1.0)  # room for a wrong redelivery to run and succeed
        assert events.types(res.id) == ["task-received", "task-started"], events.types(res.id)
        assert res.state == "PENDING"
        assert queued_task_ids(redis_client) == [] and redis_client.hlen("unacked") == 0
    finally:
        events.close()


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "late-ack"])
def test_reject_without_requeue_fails_like_celery(worker_factory, redis_server, app,
                                                   redis_client, acks_late):
    # Celery 5.7 (request.py on_failure): Reject(requeue=False) means the
    # task never runs again, so it is a FAILURE like any error (the rest of
    # its chain too), task-failed is sent, and task-rejected follows only
    # when the message was still unacked (late ack).
    flags = ["-E", "--enable-chaos-tasks"] + (["--acks-late"] if acks_late else [])
    worker_factory(redis_server.url(), *flags)
    events = EventLog(app)
    try:
        res = chain(app.signature("tori.chaos.reject", args=["nope"]),
                    app.signature("tori.echo", args=[2])).apply_async()
        rejecter_id = res.parent.id
        with pytest.raises(Exception) as info:
            app.AsyncResult(res.id).get(timeout=30)
        assert type(info.value).__name__ == "Reject", repr(info.value)
        meta = app.AsyncResult(rejecter_id)._get_task_meta()
        assert meta["status"] == "FAILURE" and meta["traceback"] is None, meta
        wait_for(lambda: redis_client.hlen("unacked") == 0, 10,
                 message="the rejected message was never settled")
        expected = ["task-received", "task-started", "task-failed"] + \
            (["task-rejected"] if acks_late else [])
        wait_for(lambda: events.types(rejecter_id) == expected, 10,
                 message=lambda: f"events {events.types(rejecter_id)}, expected {expected}")
        failed = next(e for e in events.events
                      if e.get("uuid") == rejecter_id and e["type"] == "task-failed")
        assert failed["exception"] == "reject requeue=False: nope", failed
    finally:
        events.close()


def test_chunks_map_and_starmap_run_the_task_once_per_item(tori_worker, app):
    """Celery's built-in ``celery.map``/``celery.starmap`` (what ``.map``,
    ``.starmap`` and ``.chunks`` send): the named task runs once per item in
    the worker, and the result is the list of its results."""
    # A client without the task's code uses the canvas classes that
    # `Task.chunks`/`.map`/`.starmap` return.
    echo = app.signature("tori.echo")
    res = chunks(echo, [(1, 2), (3,), (4, 5)], 2, app=app).apply_async()
    assert res.get(timeout=30) == [[echo_result(1, 2), echo_result(3)], [echo_result(4, 5)]]
    assert xmap(echo, [1, [2]], app=app).apply_async().get(timeout=30) == [echo_result(1), echo_result([2])]
    assert xstarmap(echo, [(1, 2)], app=app).apply_async().get(timeout=30) == [echo_result(1, 2)]
    # The first failing item fails the call with its error.
    fail = app.signature("tori.fail")
    with pytest.raises(RuntimeError, match="item one"):
        xstarmap(fail, [["item one"], ["item two"]], app=app).apply_async().get(timeout=30)
