"""Self-tests of the fixtures and helpers; these need no tori-worker binary.

They check that the private redis-server fixture works (including a restart
with AOF persistence, which the chaos test relies on), that the Celery client
publishes what the other tests expect, that the garbage generators really
produce malformed envelopes, and that the log parser copes with the formats
a Rust logger may print.
"""
from __future__ import annotations

import base64
import binascii
import json
import socket

import pytest
import redis

from tori_harness import (
    GARBAGE_KINDS,
    count_task_events,
    event_order,
    garbage_message,
    wait_worker_ready,
)

pytestmark = pytest.mark.harness

SEP = "\x06\x16"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_redis_fixture_private_server(redis_factory, tmp_path):
    srv = redis_factory()
    assert srv.port != 6379
    assert str(srv.data_dir).startswith(str(tmp_path))
    c = srv.client()
    assert c.ping()
    c.set("k", "v")
    assert c.get("k") == "v"
    other = redis_factory()
    assert other.port != srv.port
    assert other.client().get("k") is None
    srv.stop()
    assert not srv.running()
    assert not _port_open(srv.port)


def test_redis_restart_keeps_data_with_aof(redis_factory):
    srv = redis_factory(appendonly=True)
    port = srv.port
    c = srv.client()
    c.lpush("celery", *[f"m{i}" for i in range(50)])
    srv.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=port, socket_timeout=1).ping()
    srv.start()
    assert srv.port == port
    assert c.llen("celery") == 50  # the same client object reconnects


def test_client_publishes_protocol2_envelope(app, redis_client):
    r = app.send_task("tori.echo", args=[1, "a"], kwargs={"k": [1, 2]})
    raw = redis_client.lrange("celery", 0, -1)
    assert len(raw) == 1
    env = json.loads(raw[0])
    assert env["content-type"] == "application/json"
    assert env["headers"]["task"] == "tori.echo"
    assert env["headers"]["id"] == r.id
    assert env["properties"]["body_encoding"] == "base64"
    body = json.loads(base64.b64decode(env["body"]))
    assert body[0] == [1, "a"] and body[1] == {"k": [1, 2]}
    assert r.state == "PENDING"


def test_client_priority_and_queue_routing(app, redis_client):
    app.send_task("tori.echo", args=[1], queue="a", priority=7)
    app.send_task("tori.echo", args=[2], queue="a", priority=0)
    app.send_task("tori.echo", args=[3], queue="b", priority=3)
    assert redis_client.llen(f"a{SEP}6") == 1
    assert redis_client.llen("a") == 1
    assert redis_client.llen(f"b{SEP}3") == 1


def test_client_protocol1_and_pickle(celery_app_factory, redis_server, redis_client):
    p1 = celery_app_factory(redis_server.url(), task_protocol=1)
    r = p1.send_task("tori.echo", args=[1])
    env = json.loads(redis_client.rpop("celery"))
    assert env["headers"] == {}
    body = json.loads(base64.b64decode(env["body"]))
    assert body["task"] == "tori.echo" and body["id"] == r.id and body["args"] == [1]

    pk = celery_app_factory(redis_server.url(), task_serializer="pickle",
                            accept_content=["pickle", "json"])
    pk.send_task("tori.echo", args=[1])
    env = json.loads(redis_client.rpop("celery"))
    assert env["content-type"] == "application/x-python-serialize"


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
def test_garbage_is_really_malformed(kind):
    marker = f"m-{kind}"
    msg = garbage_message(kind, marker)
    assert marker in msg
    try:
        env = json.loads(msg)
    except ValueError:
        assert kind in ("not_json_text", "truncated_json")
        return
    if not isinstance(env, dict):
        assert kind == "json_not_object"
        return
    if "body" not in env:
        assert kind == "json_without_body"
        return
    try:
        body = json.loads(base64.b64decode(env["body"], validate=True))
    except (binascii.Error, ValueError):
        assert kind == "bad_base64_body"
        return
    assert isinstance(body, list), "must not look like a protocol-1 body"
    h = env["headers"]
    assert ("id" not in h) or ("task" not in h)
    assert kind in ("missing_id_header", "missing_task_header")


def test_log_parsing_formats():
    tid = "0b7e3c1a-1111-2222-3333-444455556666"
    other = "0b7e3c1a-1111-2222-3333-444455556667"
    text = "\n".join([
        f"2024-01-01T00:00:00Z INFO tori: task started task_id={tid} task_name=tori.echo",
        f'2024-01-01T00:00:01Z INFO tori: task succeeded task_id="{tid}" task_name="tori.echo"',
        f"INFO task started task_id={other} task_name=tori.echo",
        f"INFO task restarted-ish task_id={tid}",  # 'restarted' is not 'started'
        f"INFO task_id={tid}0 started",  # a different id with our id as prefix
    ])
    assert count_task_events([text], tid, "started") == 1
    assert count_task_events([text], tid, "succeeded") == 1
    assert count_task_events([text, text], tid, "succeeded") == 2
    assert event_order(text, [other, tid], "started") == [tid, other]


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_python_worker_fixture_runs_tori_tasks(python_worker_factory, redis_server, app):
    py = python_worker_factory(redis_server.url(), concurrency=2)
    wait_worker_ready(py, app, timeout=60)
    assert app.send_task("tori.echo", args=[1], kwargs={"a": 2}).get(timeout=15) == \
        {"args": [1], "kwargs": {"a": 2}}
    assert app.send_task("tori.sleep", args=[0.2]).get(timeout=15) == 0.2
    rc = py.terminate()
    assert rc == 0
