"""Chords sent by an old Celery client (issue #25): Celery <= 5.0 clients
write no ``celery-taskset-meta-<gid>.s`` key; the chord's size travels only
as ``chord_size`` in the body signature each header task's message
carries, and tori-worker counts against it as a Celery 5.0 worker did.

The client is the real Celery 5.0.5 (kombu 5.0.2, redis-py 3.5.3), in its
own venv made by scripts/bootstrap (``.venv-celery50``, or
``$TORI_CELERY50_VENV``), run as a subprocess: old_client_chord.py sends
the chord and prints the body's ``AsyncResult.get()`` as JSON. Celery 4.4
is not tested: it does not import on Python 3.11 (vine 1.x).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from test_foundation import echo_result
from tori_harness import clean_env, read_meta, wait_for

HERE = Path(__file__).resolve().parent
PRODUCER = HERE / "old_client_chord.py"
# How long the old client waits for the body before giving up and saying so.
CLIENT_WAIT = 60


def celery50_python() -> str:
    venv = Path(os.environ.get("TORI_CELERY50_VENV") or HERE.parents[1] / ".venv-celery50")
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        pytest.fail(f"no Celery 5.0 client venv at {venv}: run scripts/bootstrap", pytrace=False)
    return str(python)


def queued_messages(client, queue: str = "celery") -> list[dict]:
    """The protocol-2 messages waiting in ``queue``: headers and the
    decoded ``[args, kwargs, embed]`` body."""
    out = []
    for raw in client.lrange(queue, 0, -1):
        env = json.loads(raw)
        body = json.loads(base64.b64decode(env["body"]))
        out.append({"headers": env["headers"], "body": body})
    return out


def carried_chord_bodies(message: dict) -> list[dict]:
    """Every chord body a message carries: its own (``embed.chord``) and
    those of the chain links still to run."""
    embed = message["body"][2]
    bodies = [embed["chord"]] if embed.get("chord") else []
    for link in embed.get("chain") or []:
        if (link.get("options") or {}).get("chord"):
            bodies.append(link["options"]["chord"])
    return bodies


@pytest.mark.parametrize("shape,n", [("flat", 3), ("flat", 12), ("chain", 3)])
def test_chord_from_a_celery_50_client_completes(shape, n, worker_factory, redis_server,
                                                  redis_client):
    producer = subprocess.Popen(
        [celery50_python(), str(PRODUCER), redis_server.url(), shape, str(n), str(CLIENT_WAIT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        # No worker yet: look at what the old client sent before anything runs.
        wait_for(lambda: redis_client.llen("celery") == n or producer.poll() is not None, 60,
                 message="the Celery 5.0 client did not queue the chord header")
        assert producer.poll() is None, producer.communicate()
        messages = queued_messages(redis_client)
        # (A chain in the header is in the group by its last link only.)
        group_ids = {m["headers"]["group"] for m in messages} - {None}
        assert len(group_ids) == 1, messages
        group_id = group_ids.pop()
        # What makes these chords different: no size key, only the size
        # in the body signature.
        assert not redis_client.exists(f"celery-taskset-meta-{group_id}.s")
        bodies = [b for m in messages for b in carried_chord_bodies(m)]
        assert len(bodies) == n, messages
        assert {b.get("chord_size") for b in bodies} == {n}, bodies

        worker_factory(redis_server.url(), "--concurrency", "4")
        out, err = producer.communicate(timeout=CLIENT_WAIT + 30)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.communicate()
    assert producer.returncode == 0, err
    got = json.loads(out)
    assert got["celery"].startswith("5.0."), got
    assert got["group_id"] == group_id
    assert "error" not in got, f"the chord body never arrived: {got['error']}"

    header = [echo_result(i) for i in range(n)]
    if shape == "chain":
        header[1] = echo_result(echo_result(1))
    assert got["result"] == echo_result(header)
    meta = read_meta(redis_client, got["body_id"])
    assert (meta["status"], meta["result"]) == ("SUCCESS", echo_result(header)), meta
    base = f"celery-taskset-meta-{group_id}"
    assert redis_client.get(base + ".c") == "done"
    assert not any(redis_client.exists(base + s) for s in (".j", ".d", ".t", ".s"))
