"""Groups, chords and chains that follow a task, built with the real Celery
client: ``a | group(b, c)``, ``a | group(b, c) | d`` (which the client
turns into ``a | chord(group(b, c), d)``), ``a | chord(...)``, a group as
a ``link`` callback, several callbacks. The worker that ran ``a`` has to
start them itself, as a Python worker does in ``celery.app.trace``.

The first test runs every shape on a real Python Celery worker and on
tori-worker side by side and compares the messages each published for
the step (members routed to a queue nobody consumes, then read raw) and
the ``children`` each stored for ``a``. The others run the shapes end to
end on tori-worker alone.
"""
from __future__ import annotations

import base64
import gc
import json
import re
import time
import uuid

import pytest
import redis.exceptions
from celery import chain, chord, group

from test_foundation import echo_result, queued_task_ids, wait_unacked_empty
from tori_harness import result_when_ready, wait_for, wait_worker_ready


@pytest.fixture(autouse=True)
def _forget_subscriptions(app):
    """As in test_chords.py: results of finished workflows must not
    UNSUBSCRIBE later on a Redis that is gone."""
    yield
    app.backend.result_consumer.subscribed_to.clear()
    gc.collect()


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def shapes(app, first_queue: str, step_queue: str) -> dict:
    """Each shape with its first task on ``first_queue`` and every later
    signature on ``step_queue``."""
    def a():
        return app.signature("tori.echo", args=[1], queue=first_queue)

    def s(*args):
        return app.signature("tori.echo", args=list(args), queue=step_queue)

    def a_fails():
        return app.signature("tori.fail", args=["broke"], queue=first_queue)

    def errback():
        # One argument, so the Python worker publishes it (old style)
        # instead of calling it in place with (request, exc, traceback).
        return app.signature("tori.errback_probe", queue=step_queue)

    return {
        "a | group": chain(a(), group(s(10), s(20))),
        "a | group of a nested group": chain(a(), group(s(10), group(s(20), s(30)))),
        "a | group | b | c": chain(a(), group(s(10), s(20)), s(), s(5)),
        "a | chord": chain(a(), chord([s(10), s(20)], s())),
        "a | group(b | c | d, e)": chain(a(), group(chain(s(10), s(11), s(12)), s(20))),
        "a | chord([b | c, d], e)": chain(a(), chord([chain(s(10), s(11)), s(20)], s())),
        "a | group | group": chain(a(), group(s(10), s(20)), group(s(30), s(40))),
        "a | group | chord": chain(a(), group(s(10), s(20)), chord([s(30), s(40)], s())),
        "link=group": a().set(link=group(s(10), s(20))),
        "two links": a().set(link=[s(10), s(20)]),
        "link=chain": a().set(link=chain(s(10), s(20))),
        "fails, link_error": a_fails().set(link_error=errback()),
        "fails, two link_errors": a_fails().set(link_error=[errback(), errback()]),
        "chord fails, body errback": chord([a_fails()], s().on_error(errback())),
        # Nested shapes: a chord as a member, a group or chord inside a
        # chain that is a member.
        "a | group(chord, e)": chain(a(), group(chord([s(10), s(11)], s()), s(20))),
        "a | chord([chord, d], e)": chain(a(), chord([chord([s(10), s(11)], s()), s(20)], s())),
        "a | group(empty chord, e)": chain(a(), group(chord([], s()), s(20))),
        "a | group(b | group(c, d), e)": chain(a(), group(chain(s(10), group(s(11), s(12))), s(20))),
        "a | chord([b | group(c, d), e], f)":
            chain(a(), chord([chain(s(10), group(s(11), s(12))), s(20)], s())),
        "a | group(b | chord([c, d], f), e)":
            chain(a(), group(chain(s(10), chord([s(11), s(12)], s())), s(20))),
        "a | chord([b | chord([c], d), e], f)":
            chain(a(), chord([chain(s(10), chord([s(11)], s())), s(20)], s())),
        "link=group(chord, e)": a().set(link=group(chord([s(10)], s()), s(20))),
        "a | group(chord([b], group(c, d)), e)":
            chain(a(), group(chord([s(10)], group(s(11), s(12))), s(20))),
        "a | chord([chord([b], group(c, d)), e], f)":
            chain(a(), chord([chord([s(10)], group(s(11), s(12))), s(20)], s())),
        # Three levels: a chain inside a group that ends a member chain.
        "a | group(b | group(c | d, e), f)":
            chain(a(), group(chain(s(10), group(chain(s(11), s(12)), s(13))), s(20))),
        "a | chord([b | group(c | d, e), f], g)":
            chain(a(), chord([chain(s(10), group(chain(s(11), s(12)), s(13))), s(20)], s())),
        "a | group(b | chord([c | d, e], f), g)":
            chain(a(), group(chain(s(10), chord([chain(s(11), s(12)), s(13)], s())), s(20))),
        "a | chord([b | chord([c | d, e], f), g], h)":
            chain(a(), chord([chain(s(10), chord([chain(s(11), s(12)), s(13)], s())), s(20)], s())),
        "a | group(b | chord([group(c, d), e], f), g)":
            chain(a(), group(chain(s(10), chord([group(s(11), s(12)), s(13)], s())), s(20))),
        "a | group(b | group(chord([c], d), e), f)":
            chain(a(), group(chain(s(10), group(chord([s(11)], s()), s(13))), s(20))),
        "a | group(b | group(c, d) | e | f, g)":
            chain(a(), group(chain(s(10), group(s(11), s(12)), s(13), s(14)), s(20))),
        "a | group(b | chord([c], group(d, e)), f)":
            chain(a(), group(chain(s(10), chord([s(11)], group(s(12), s(13)))), s(20))),
        "a | chord([b | chord([c], group(d, e)), f], g)":
            chain(a(), chord([chain(s(10), chord([s(11)], group(s(12), s(13)))), s(20)], s())),
        "a | chord([b | group(c, d) | e | f, g], h)":
            chain(a(), chord([chain(s(10), group(s(11), s(12)), s(13), s(14)), s(20)], s())),
    }


def published(redis_client, queue: str) -> list[dict]:
    """The raw messages in ``queue``, oldest first, without what differs by
    nature between two runs (delivery tag, origin host)."""
    out = []
    for raw in reversed(redis_client.lrange(queue, 0, -1)):
        env = json.loads(raw)
        headers = {k: v for k, v in env["headers"].items() if k != "origin"}
        props = {k: v for k, v in env["properties"].items() if k != "delivery_tag"}
        body = json.loads(base64.b64decode(env["body"]))
        out.append({"headers": headers, "properties": props, "body": body})
    return out


def relabel(value) -> str:
    """JSON text with every UUID replaced by the order it first appears in,
    so two runs of one shape (each with ids of its own) compare equal when
    they have the same structure."""
    text = json.dumps(value)
    seen: dict[str, str] = {}
    return UUID.sub(lambda m: seen.setdefault(m.group(0), f"<id{len(seen)}>"), text)


def first_task(res) -> str:
    """The id of the task a shape starts with: the root of the result's
    parents, or the first member of a chord's header."""
    node = res
    while getattr(node, "parent", None) is not None:
        node = node.parent
    if hasattr(node, "results"):
        node = node.results[0]
    return node.id


def settled(redis_client, queue: str, quiet: float = 0.5, timeout: float = 15.0) -> None:
    """Waits until ``queue`` holds messages and has not grown for ``quiet``
    seconds (errbacks are published just after the failure is stored)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = redis_client.llen(queue)
        if n != last:
            last, since = n, time.monotonic()
        elif n and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    raise AssertionError(f"{queue} holds {last} messages and never settled")


def run_shape(app, redis_client, sig, step_queue: str) -> tuple[str, str, str]:
    """Runs ``sig``'s first task and returns (the relabelled messages of the
    step, the first task's children, the group keys the step wrote: chord
    sizes and saved header results) once they are all published."""
    before = set(redis_client.keys("celery-taskset-meta-*"))
    res = sig.apply_async()
    first_id = first_task(res)
    wait_for(lambda: app.AsyncResult(first_id).state in ("SUCCESS", "FAILURE"), 30,
             message=lambda: f"{first_id} is {app.AsyncResult(first_id).state}")
    settled(redis_client, step_queue)
    children = json.loads(redis_client.get(f"celery-task-meta-{first_id}"))["children"]
    messages = published(redis_client, step_queue)
    redis_client.delete(step_queue)
    # Chord sizes (.s) and saved headers (no suffix); a chord that already
    # ran has counting keys too, written by whoever ran its header.
    groups = {key: redis_client.get(key)
              for key in set(redis_client.keys("celery-taskset-meta-*")) - before
              if key.endswith(".s") or UUID.fullmatch(key.removeprefix("celery-taskset-meta-"))}
    # One relabelling over all three, so ids shared between them line up
    # (every group id a key names is named first by a message or a child).
    both = json.loads(relabel({"messages": messages, "children": children, "first": first_id,
                               "groups": sorted(groups.items())}))
    return (json.dumps(both["messages"], indent=1), json.dumps(both["children"]),
            json.dumps(sorted(both["groups"])))


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_steps_after_a_task_publish_what_a_python_worker_publishes(
        python_worker_factory, worker_factory, redis_server, app, redis_client):
    url = redis_server.url()
    py = python_worker_factory(url, 1, "-Q", "py")
    worker_factory(url, "--concurrency", "1", queues=["tori"])
    wait_worker_ready(py, app, queue="py", timeout=60)

    py_shapes = shapes(app, "py", "py.steps")
    tori_shapes = shapes(app, "tori", "tori.steps")
    for name in py_shapes:
        py_msgs, py_children, py_groups = run_shape(app, redis_client, py_shapes[name], "py.steps")
        tori_msgs, tori_children, tori_groups = run_shape(app, redis_client, tori_shapes[name],
                                                          "tori.steps")
        # The step queues differ by name only.
        tori_msgs = tori_msgs.replace('"tori.steps"', '"py.steps"')
        assert json.loads(py_msgs), f"{name}: the Python worker published nothing"
        assert tori_msgs == py_msgs, f"{name}: messages differ\n--- python\n{py_msgs}\n--- tori\n{tori_msgs}"
        assert tori_children == py_children, f"{name}: children differ: {py_children} vs {tori_children}"
        assert tori_groups == py_groups, f"{name}: group keys differ: {py_groups} vs {tori_groups}"


def test_group_after_a_task_gets_its_result(tori_worker, app):
    echo = app.signature("tori.echo")
    res = chain(echo.clone(args=[1]), group(echo.clone(args=[10]), echo.clone(args=[20]))).apply_async()
    first = echo_result(1)
    assert res.get(timeout=30) == [echo_result(first, 10), echo_result(first, 20)]
    # The parent lists the group among its children, as Celery stores it.
    parent = app.AsyncResult(res.parent.id)
    assert [c.id for c in parent.children] == [res.id]


def test_group_then_task_is_a_chord_and_the_chain_goes_on(tori_worker, app, redis_client):
    echo = app.signature("tori.echo")
    res = chain(echo.clone(args=[1]), group(echo.clone(args=[10]), echo.clone(args=[20])),
                echo.clone(), echo.clone(args=[5])).apply_async()
    first = echo_result(1)
    header = [echo_result(first, 10), echo_result(first, 20)]
    assert res.get(timeout=30) == echo_result(echo_result(header), 5)
    body_id = res.parent.id
    group_id = app.AsyncResult(body_id)._get_task_meta().get("group_id") or res.parent.parent.id
    wait_for(lambda: redis_client.get(f"celery-taskset-meta-{group_id}.c") == "done", 10,
             message="the chord was not marked done")
    assert not redis_client.exists(f"celery-taskset-meta-{group_id}.s")


def test_chord_after_a_task(tori_worker, app):
    echo = app.signature("tori.echo")
    res = chain(echo.clone(args=[1]), chord([echo.clone(args=[10]), echo.clone(args=[20])],
                                            echo.clone())).apply_async()
    first = echo_result(1)
    assert res.get(timeout=30) == echo_result([echo_result(first, 10), echo_result(first, 20)])


def test_empty_chord_after_a_task_calls_its_body_with_nothing(tori_worker, app):
    echo = app.signature("tori.echo")
    res = chain(echo.clone(args=[1]), chord([], echo.clone())).apply_async()
    # The body is stored within a millisecond or two of the first task,
    # just when get() would subscribe: see result_when_ready.
    assert result_when_ready(res, timeout=30) == echo_result([])


def test_chord_header_chain_ending_in_a_group_nests_its_results(tori_worker, app):
    """The client saves the header's shape (a member's result is a group);
    the body gets nested lists, as Celery's ``GroupResult.join`` gives."""
    echo = app.signature("tori.echo")
    head = chain(echo.clone(args=[1]), group(echo.clone(args=[10]), echo.clone(args=[20])))
    res = chord([head, echo.clone(args=[3])])(echo.clone())
    first = echo_result(1)
    assert res.get(timeout=30) == echo_result(
        [[echo_result(first, 10), echo_result(first, 20)], echo_result(3)])


def test_group_callback_and_several_callbacks_run(tori_worker, app):
    echo = app.signature("tori.echo")
    one, two = echo.clone(args=[10]), echo.clone(args=[20])
    ids = [one.freeze().id, two.freeze().id]
    echo.clone(args=[1]).apply_async(link=group(one, two)).get(timeout=30)
    first = echo_result(1)
    for task_id, arg in zip(ids, (10, 20)):
        assert app.AsyncResult(task_id).get(timeout=30) == echo_result(first, arg)

    three, four = echo.clone(args=[30]), echo.clone(args=[40])
    ids = [three.freeze().id, four.freeze().id]
    echo.clone(args=[2]).apply_async(link=[three, four]).get(timeout=30)
    for task_id, arg in zip(ids, (30, 40)):
        assert app.AsyncResult(task_id).get(timeout=30) == echo_result(echo_result(2), arg)


def test_failed_task_before_a_group_fails_its_members(tori_worker, app):
    """Celery stores the failure under the group's id only, so a client of
    ``a | group(...)`` would wait on the members for ever; here they fail
    too."""
    echo = app.signature("tori.echo")
    res = chain(app.signature("tori.fail", args=["first broke"]),
                group(echo.clone(args=[10]), echo.clone(args=[20]))).apply_async()
    for member in res.results:
        with pytest.raises(RuntimeError, match="first broke"):
            app.AsyncResult(member.id).get(timeout=30)


def test_chains_inside_a_group_after_a_task(tori_worker, app):
    echo = app.signature("tori.echo")
    inner = chain(echo.clone(args=[10]), echo.clone(args=[11]))
    res = chain(echo.clone(args=[1]), group(inner, echo.clone(args=[20]))).apply_async()
    first = echo_result(1)
    assert res.get(timeout=30) == [echo_result(echo_result(first, 10), 11), echo_result(first, 20)]
    chorded = chain(echo.clone(args=[1]),
                    chord([chain(echo.clone(args=[10]), echo.clone(args=[11])), echo.clone(args=[20])],
                          echo.clone())).apply_async()
    assert chorded.get(timeout=30) == echo_result(
        [echo_result(echo_result(first, 10), 11), echo_result(first, 20)])


def test_group_then_group_or_chord_after_a_task(tori_worker, app):
    """The client makes ``group | group`` and ``group | chord`` chords whose
    body is a group or a chord: the body starts with the header's results."""
    echo = app.signature("tori.echo")
    first = echo_result(1)
    header = [echo_result(first, 10), echo_result(first, 20)]
    res = chain(echo.clone(args=[1]), group(echo.clone(args=[10]), echo.clone(args=[20])),
                group(echo.clone(args=[30]), echo.clone(args=[40]))).apply_async()
    assert res.get(timeout=30) == [echo_result(header, 30), echo_result(header, 40)]
    res = chain(echo.clone(args=[1]), group(echo.clone(args=[10]), echo.clone(args=[20])),
                chord([echo.clone(args=[30]), echo.clone(args=[40])], echo.clone())).apply_async()
    assert res.get(timeout=30) == echo_result([echo_result(header, 30), echo_result(header, 40)])


def nested_shapes(app) -> dict:
    """Nested shapes a worker has to start itself, each with the result
    ``get()`` gives on a Python Celery 5.7 worker (checked there)."""
    def s(*args):
        return app.signature("tori.echo", args=list(args))

    f = echo_result(1)
    return {
        "a | group(chord, e)": (
            chain(s(1), group(chord([s(10), s(11)], s()), s(20))),
            [echo_result([echo_result(f, 10), echo_result(f, 11)]), echo_result(f, 20)]),
        "a | chord([chord, d], e)": (
            chain(s(1), chord([chord([s(10), s(11)], s()), s(20)], s())),
            echo_result([echo_result([echo_result(f, 10), echo_result(f, 11)]), echo_result(f, 20)])),
        "a | group(chord([b, chord([c], d)], e), f)": (
            chain(s(1), group(chord([s(10), chord([s(11)], s())], s()), s(20))),
            [echo_result([echo_result(f, 10), echo_result([echo_result(f, 11)])]), echo_result(f, 20)]),
        "a | group(empty chord, e)": (
            chain(s(1), group(chord([], s()), s(20))),
            [echo_result([]), echo_result(f, 20)]),
        "a | group(b | group(c, d), e)": (
            chain(s(1), group(chain(s(10), group(s(11), s(12))), s(20))),
            [[echo_result(echo_result(f, 10), 11), echo_result(echo_result(f, 10), 12)],
             echo_result(f, 20)]),
        "a | group(b | group(c, d))": (
            chain(s(1), group(chain(s(10), group(s(11), s(12))))),
            [echo_result(echo_result(f, 10), 11), echo_result(echo_result(f, 10), 12)]),
        "a | chord([b | group(c, d), e], f)": (
            chain(s(1), chord([chain(s(10), group(s(11), s(12))), s(20)], s())),
            echo_result([[echo_result(echo_result(f, 10), 11), echo_result(echo_result(f, 10), 12)],
                         echo_result(f, 20)])),
        "a | group(b | chord([c, d], f), e)": (
            chain(s(1), group(chain(s(10), chord([s(11), s(12)], s())), s(20))),
            [echo_result([echo_result(echo_result(f, 10), 11), echo_result(echo_result(f, 10), 12)]),
             echo_result(f, 20)]),
        "a | chord([b | chord([c], d), e], f)": (
            chain(s(1), chord([chain(s(10), chord([s(11)], s())), s(20)], s())),
            echo_result([echo_result([echo_result(echo_result(f, 10), 11)]), echo_result(f, 20)])),
        "a | group(chord([b], group(c, d)), e)": (
            chain(s(1), group(chord([s(10)], group(s(11), s(12))), s(20))),
            [[echo_result([echo_result(f, 10)], 11), echo_result([echo_result(f, 10)], 12)],
             echo_result(f, 20)]),
        "a | chord([chord([b], group(c, d)), e], f)": (
            chain(s(1), chord([chord([s(10)], group(s(11), s(12))), s(20)], s())),
            echo_result([[echo_result([echo_result(f, 10)], 11), echo_result([echo_result(f, 10)], 12)],
                         echo_result(f, 20)])),
        "a | group(b | group(c | d, e), f)": (
            chain(s(1), group(chain(s(10), group(chain(s(11), s(12)), s(13))), s(20))),
            [[echo_result(echo_result(echo_result(f, 10), 11), 12), echo_result(echo_result(f, 10), 13)],
             echo_result(f, 20)]),
        "a | chord([b | group(c | d, e), f], g)": (
            chain(s(1), chord([chain(s(10), group(chain(s(11), s(12)), s(13))), s(20)], s())),
            echo_result([[echo_result(echo_result(echo_result(f, 10), 11), 12),
                          echo_result(echo_result(f, 10), 13)],
                         echo_result(f, 20)])),
        "a | group(b | chord([c | d, e], f), g)": (
            chain(s(1), group(chain(s(10), chord([chain(s(11), s(12)), s(13)], s())), s(20))),
            [echo_result([echo_result(echo_result(echo_result(f, 10), 11), 12),
                          echo_result(echo_result(f, 10), 13)]),
             echo_result(f, 20)]),
        "a | chord([b | chord([c | d, e], f), g], h)": (
            chain(s(1), chord([chain(s(10), chord([chain(s(11), s(12)), s(13)], s())), s(20)], s())),
            echo_result([echo_result([echo_result(echo_result(echo_result(f, 10), 11), 12),
                                      echo_result(echo_result(f, 10), 13)]),
                         echo_result(f, 20)])),
        "a | group(b | chord([group(c, d), e], f), g)": (
            chain(s(1), group(chain(s(10), chord([group(s(11), s(12)), s(13)], s())), s(20))),
            # Celery's header freeze unrolls the nested group with
            # deque.extendleft, which reverses it: d's result comes first.
            [echo_result([echo_result(echo_result(f, 10), 12), echo_result(echo_result(f, 10), 11),
                          echo_result(echo_result(f, 10), 13)]),
             echo_result(f, 20)]),
        "a | group(b | group(chord([c], d), e), f)": (
            chain(s(1), group(chain(s(10), group(chord([s(11)], s()), s(13))), s(20))),
            [[echo_result([echo_result(echo_result(f, 10), 11)]), echo_result(echo_result(f, 10), 13)],
             echo_result(f, 20)]),
        "a | group(b | group(c, d) | e | f, g)": (
            chain(s(1), group(chain(s(10), group(s(11), s(12)), s(13), s(14)), s(20))),
            [echo_result(echo_result([echo_result(echo_result(f, 10), 11),
                                      echo_result(echo_result(f, 10), 12)], 13), 14),
             echo_result(f, 20)]),
        "a | chord([b | group(c, d) | e | f, g], h)": (
            chain(s(1), chord([chain(s(10), group(s(11), s(12)), s(13), s(14)), s(20)], s())),
            echo_result([echo_result(echo_result([echo_result(echo_result(f, 10), 11),
                                                  echo_result(echo_result(f, 10), 12)], 13), 14),
                         echo_result(f, 20)])),
        "a | group(b | chord([c], group(d, e)), f)": (
            chain(s(1), group(chain(s(10), chord([s(11)], group(s(12), s(13)))), s(20))),
            [[echo_result([echo_result(echo_result(f, 10), 11)], 12),
              echo_result([echo_result(echo_result(f, 10), 11)], 13)],
             echo_result(f, 20)]),
        "a | chord([b | chord([c], group(d, e)), f], g)": (
            chain(s(1), chord([chain(s(10), chord([s(11)], group(s(12), s(13)))), s(20)], s())),
            echo_result([[echo_result([echo_result(echo_result(f, 10), 11)], 12),
                          echo_result([echo_result(echo_result(f, 10), 11)], 13)],
                         echo_result(f, 20)])),
        "chord whose body is group(chord, e)": (
            chord([s(1)], group(chord([s(2)], s()), s(3))),
            [echo_result([echo_result([f], 2)]), echo_result([f], 3)]),
    }


def test_nested_steps_end_to_end(tori_worker, app):
    """A chord as a member of a group or chord header, and a chain member
    that ends in a group or chord: every shape finishes with the result a
    Python worker gives (each chord counts its nested parts, and a header
    whose member ends in a group keeps its shape)."""
    for name, (sig, expected) in nested_shapes(app).items():
        res = sig.apply_async()
        assert result_when_ready(res, timeout=30) == expected, name


def test_step_tori_cannot_start_fails_with_a_clear_error(tori_worker, app):
    """A chord inside a group that ends a chain that is a chord header
    member (``chord([b | group(chord([c], d), e), f], g)``, three levels
    deep) is not expanded: a Python worker starts it so that the outer
    chord never completes. The task and every id of the step get
    NotImplementedError saying so, instead of a step that silently never
    finishes."""
    echo = app.signature("tori.echo")
    inner = chain(echo.clone(args=[10]),
                  group(chord([echo.clone(args=[11])], echo.clone()), echo.clone(args=[13])))
    res = chain(echo.clone(args=[1]), chord([inner, echo.clone(args=[20])], echo.clone())).apply_async()
    first = res.parent
    while first.parent is not None:
        first = first.parent
    with pytest.raises(NotImplementedError,
                       match="a chord inside a group that ends a chain inside a chord header"):
        app.AsyncResult(first.id).get(timeout=30)
    with pytest.raises(NotImplementedError, match="cannot start this workflow step"):
        app.AsyncResult(res.id).get(timeout=30)


def test_step_with_a_member_that_is_not_a_signature_fails_the_task(tori_worker, app):
    """A hand-made message whose next step is a group with a member that is
    not a signature (a string) fails the task with ValueError naming it; the
    worker goes on (it used to panic while expanding such a step)."""
    bad_group = {"task": "celery.group", "args": [], "kwargs": {"tasks": ["oops"]},
                 "options": {}, "subtask_type": "group", "immutable": False}
    res = app.send_task("tori.echo", args=[1], chain=[bad_group])
    with pytest.raises(ValueError, match="no task name"):
        res.get(timeout=30)
    assert app.send_task("tori.echo", args=[2]).get(timeout=30) == echo_result(2)


def test_failed_chord_calls_its_bodys_errback(tori_worker, app):
    """``chord(header, body.on_error(handler))``, Celery's documented way to
    handle a failed chord: the handler gets the body's id."""
    echo = app.signature("tori.echo")
    handler = echo.clone(args=["handled"])
    handler_id = handler.freeze().id
    header = [app.signature("tori.fail", args=["header broke"]), echo.clone(args=[2])]
    res = chord(header)(echo.clone().on_error(handler))
    assert app.AsyncResult(handler_id).get(timeout=30) == echo_result(res.id, "handled")
    wait_for(lambda: app.AsyncResult(res.id).state == "FAILURE", 15,
             message="the chord body never reached FAILURE")


def _first_of(res):
    first = res.parent
    while first.parent is not None:
        first = first.parent
    return first


def _assert_fails_with(app, task_id: str, exc_type, match: str) -> None:
    result = app.AsyncResult(task_id)
    with pytest.raises(exc_type, match=match):
        result.get(timeout=30)
    assert result.state == "FAILURE"


def test_chord_size_refused_fails_the_task_and_every_id_of_the_chord(worker_factory, redis_server,
                                                                     app, redis_client):
    """Redis refuses the record of a worker-started chord's size for good
    (an ACL allows the worker SETEX on result keys only): the task fails
    with ResponseError, and the chord's members and body get the same
    failure instead of staying PENDING for ever. Nothing of the chord is
    published."""
    redis_client.execute_command("ACL", "SETUSER", "tori", "on", ">pw", "~*", "&*", "+@all",
                                 "-setex", "(+setex ~celery-task-meta-*)")
    worker_factory(redis_server.url().replace("redis://", "redis://tori:pw@", 1))
    echo = app.signature("tori.echo")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    members = [echo.clone(args=[10]).set(task_id=ids[0]), echo.clone(args=[20]).set(task_id=ids[1])]
    res = chain(echo.clone(args=[1]),
                chord(members, echo.clone().set(task_id=ids[2]))).apply_async()
    assert res.id == ids[2]
    _assert_fails_with(app, _first_of(res).id, redis.exceptions.ResponseError,
                       "size of chord .*no permissions")
    for task_id in ids:
        _assert_fails_with(app, task_id, redis.exceptions.ResponseError, "size of chord")
    wait_unacked_empty(redis_client)
    assert queued_task_ids(redis_client) == []


def test_member_refused_midway_fails_the_task_and_leaves_no_id_pending(worker_factory, redis_server,
                                                                       app, redis_client):
    """The second member of a group the worker starts is refused for good
    (WRONGTYPE: its queue key holds a string), once as a ``link`` callback
    and once as a chord header after a task. The task fails with
    ResponseError; the member published before it still runs; the refused
    member, and the chord body that can no longer be called, fail with
    the error instead of staying PENDING."""
    worker_factory(redis_server.url())
    redis_client.set("broken", "not a list")
    echo = app.signature("tori.echo")
    first_value = echo_result(1)
    ok_id, refused_id = str(uuid.uuid4()), str(uuid.uuid4())

    callbacks = group(echo.clone().set(task_id=ok_id),
                      echo.clone().set(task_id=refused_id, queue="broken"))
    first = echo.clone(args=[1]).apply_async(link=callbacks)
    _assert_fails_with(app, first.id, redis.exceptions.ResponseError, "WRONGTYPE")
    assert app.AsyncResult(ok_id).get(timeout=30) == echo_result(first_value)
    _assert_fails_with(app, refused_id, redis.exceptions.ResponseError, "WRONGTYPE")

    ok_id, refused_id, body_id = (str(uuid.uuid4()) for _ in range(3))
    header = [echo.clone(args=[10]).set(task_id=ok_id),
              echo.clone(args=[20]).set(task_id=refused_id, queue="broken")]
    res = chain(echo.clone(args=[1]), chord(header, echo.clone().set(task_id=body_id))).apply_async()
    assert res.id == body_id
    _assert_fails_with(app, _first_of(res).id, redis.exceptions.ResponseError, "WRONGTYPE")
    assert app.AsyncResult(ok_id).get(timeout=30) == echo_result(first_value, 10)
    _assert_fails_with(app, refused_id, redis.exceptions.ResponseError, "WRONGTYPE")
    _assert_fails_with(app, body_id, redis.exceptions.ResponseError, "WRONGTYPE")
    wait_unacked_empty(redis_client)
    assert redis_client.get("broken") == "not a list"
