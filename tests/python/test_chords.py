"""Chords (SPEC §3.7) built with the real Celery client: tori-worker counts
each header result in Celery 5.7's Redis keys and calls the body once, so
``AsyncResult(body).get()`` returns the joined results, a failed header
fails the body with ChordError, and Python and tori workers can share one
chord.
"""
from __future__ import annotations

import gc
import json
import time

import pytest
from celery import chord, group
from celery.exceptions import ChordError

from test_foundation import echo_result
from tori_harness import count_task_events, wait_for, wait_worker_ready


@pytest.fixture(autouse=True)
def _forget_subscriptions(app):
    """Chord results form reference cycles (a body's parent group, whose
    members point back), so they are freed by the garbage collector at
    some later moment, often in a later test; their ``__del__`` then
    UNSUBSCRIBEs on this test's Redis, long gone, and redis-py's reconnect
    loop blocks that test for 20-40 s. The client is done with them once
    the test ends, so its subscription list is emptied (Celery 5.7's
    ResultConsumer skips keys it is not subscribed to)."""
    yield
    app.backend.result_consumer.subscribed_to.clear()
    gc.collect()


def chord_keys(client, group_id: str) -> dict:
    base = f"celery-taskset-meta-{group_id}"
    return {suffix: client.exists(base + suffix) for suffix in (".j", ".s", ".d", ".t")} | {
        ".c": client.get(base + ".c")}


def test_chord_body_gets_header_results_in_order(worker_factory, redis_server, app, redis_client):
    worker = worker_factory(redis_server.url(), "--concurrency", "4")
    echo = app.signature("tori.echo")
    n = 12
    # Header tasks finish out of order (later ones sleep less), so the
    # body's list is in group order only if the join set orders it.
    header = [app.signature("tori.sleep", args=[0.02 * (n - i)]) for i in range(n)]
    res = chord(header)(echo)
    got = res.get(timeout=60)
    assert got == echo_result([0.02 * (n - i) for i in range(n)])

    group_id = res.parent.id
    keys = chord_keys(redis_client, group_id)
    assert keys[".c"] == "done", keys
    assert not any(keys[s] for s in (".j", ".s", ".d", ".t")), f"counting keys left behind: {keys}"
    assert count_task_events([worker.log_text()], res.id, "succeeded") == 1
    assert "chord complete; body called" in worker.log_text()


def test_chord_with_failed_header_fails_body_with_chord_error(worker_factory, redis_server, app):
    worker_factory(redis_server.url(), "--concurrency", "2")
    header = [app.signature("tori.echo", args=[1]),
              app.signature("tori.fail", kwargs={"message": "header two broke"}),
              app.signature("tori.echo", args=[3])]
    res = chord(header)(app.signature("tori.echo"))
    # The client re-raises the failed header's own error first (Celery's
    # get() checks parents), as it does with Python workers...
    with pytest.raises(RuntimeError, match="header two broke"):
        res.get(timeout=60)
    # ...and the body itself is FAILURE with Celery's ChordError. Wait for
    # it to be stored first: `res` stays registered as the pending result
    # for this id in the client, so if the body's state arrived by pub/sub
    # while a second AsyncResult for the same id waited, Celery would hand
    # it to `res` and the second would time out (a client quirk; the worker
    # may store the body a moment after the header's failure is visible).
    wait_for(lambda: app.AsyncResult(res.id).state == "FAILURE", 30,
             message="the chord body never reached FAILURE")
    body = app.AsyncResult(res.id)
    with pytest.raises(ChordError) as info:
        body.get(timeout=30)
    failed_id = res.parent.results[1].id
    assert f"Dependency {failed_id} raised RuntimeError('header two broke')" in str(info.value)
    assert body.state == "FAILURE"


def test_chord_with_expired_header_fails_body(worker_factory, redis_server, app):
    # The header expires before any worker is up: it is REVOKED
    # ["expired"] without running, and that still counts in the chord.
    header = [app.signature("tori.echo", args=[1]),
              app.signature("tori.echo", args=[2]).set(expires=1)]
    res = chord(header)(app.signature("tori.echo"))
    time.sleep(1.5)
    worker_factory(redis_server.url())
    body = app.AsyncResult(res.id)
    with pytest.raises(ChordError) as info:
        body.get(timeout=30)
    expired_id = res.parent.results[1].id
    assert f"Dependency {expired_id} raised TaskRevokedError('expired')" in str(info.value)


def test_single_header_chord_and_immutable_body(worker_factory, redis_server, app):
    worker_factory(redis_server.url())
    res = chord([app.signature("tori.echo", args=["only"])])(
        app.signature("tori.echo", args=["fixed"], immutable=True))
    assert res.get(timeout=30) == echo_result("fixed")


def test_header_that_ignores_its_result_still_counts(worker_factory, redis_server, app,
                                                    redis_client):
    # Celery counts a header in its chord whether or not it stores the
    # header's own result; skipping the count would leave the body PENDING.
    worker_factory(redis_server.url())
    header = [app.signature("tori.echo", args=[1]).set(ignore_result=True),
              app.signature("tori.echo", args=[2])]
    res = chord(header)(app.signature("tori.echo"))
    body = app.AsyncResult(res.id)
    assert body.get(timeout=30) == echo_result([echo_result(1), echo_result(2)])
    ignored_id = res.parent.results[0].id
    assert redis_client.get(f"celery-task-meta-{ignored_id}") is None


def test_chord_body_goes_to_the_default_queue(worker_factory, redis_server, app, redis_client):
    # Like a Python worker without task_routes: a body whose signature
    # names no queue goes to task_default_queue, not the header's queue.
    url = redis_server.url()
    worker_factory(url, queues=["headers"])
    header = [app.signature("tori.echo", args=[i], queue="headers") for i in range(3)]
    res = chord(header)(app.signature("tori.echo"))
    wait_for(lambda: redis_client.llen("celery") == 1, 30,
             message="the chord body never reached the default queue 'celery'")
    queued = json.loads(redis_client.lindex("celery", 0))
    assert queued["headers"]["id"] == res.id and queued["headers"]["task"] == "tori.echo"
    assert redis_client.llen("headers") == 0
    worker_factory(url)
    assert res.get(timeout=30) == echo_result([echo_result(i) for i in range(3)])



def test_group_body_gets_the_results_in_every_member(worker_factory, redis_server, app):
    worker_factory(redis_server.url(), "--concurrency", "2")
    echo = app.signature("tori.echo")
    header = [echo.clone(args=[i]) for i in range(3)]
    res = chord(header)(group(echo.clone(args=["a"]), echo.clone(args=["b"])))
    joined = [echo_result(i) for i in range(3)]
    # The client gets a GroupResult; each member ran with the joined
    # results first, as `group.delay(results)` calls them in Celery.
    assert res.get(timeout=30) == [echo_result(joined, "a"), echo_result(joined, "b")]


def test_failed_header_fails_every_member_of_a_group_body(worker_factory, redis_server, app):
    worker_factory(redis_server.url(), "--concurrency", "2")
    echo = app.signature("tori.echo")
    header = [echo.clone(args=[1]), app.signature("tori.fail", args=["header broke"])]
    res = chord(header)(group(echo.clone(args=["a"]), echo.clone(args=["b"])))
    for member in res.results:
        with pytest.raises(ChordError, match="header broke"):
            app.AsyncResult(member.id).get(timeout=30)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_chord_split_between_python_and_tori_workers(python_worker_factory, worker_factory,
                                                     redis_server, app):
    url = redis_server.url()
    py = python_worker_factory(url, concurrency=2)
    wait_worker_ready(py, app, timeout=60)
    tori = worker_factory(url, "--concurrency", "2", "--prefetch-multiplier", "1")
    n = 24
    seconds = [round(0.1 + 0.001 * i, 3) for i in range(n)]
    header = [app.signature("tori.sleep", args=[s]) for s in seconds]
    res = chord(header)(app.signature("tori.echo"))
    assert res.get(timeout=120) == echo_result(seconds)

    ids = [r.id for r in res.parent.results]
    ran_tori = sum(count_task_events([tori.log_text()], i, "succeeded") for i in ids)
    wait_for(lambda: sum(f"[{i}] succeeded" in py.log_text() for i in ids) + ran_tori == n, 15,
             message=lambda: f"not all header tasks logged as succeeded:\n{py.tail(30)}")
    ran_py = n - ran_tori
    assert ran_tori > 0 and ran_py > 0, f"both workers should run header tasks: tori {ran_tori}, python {ran_py}"
    # Whoever finished last called the body, exactly once in all.
    body_runs = count_task_events([tori.log_text()], res.id, "succeeded") + \
        py.log_text().count(f"[{res.id}] succeeded")
    assert body_runs == 1
