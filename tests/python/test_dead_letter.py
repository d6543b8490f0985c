"""The dead-letter list an operator can work with (issue 25, item 4):
``--dead-letter-max`` caps it (the oldest records go, counted in /metrics),
and ``tori-worker dead-letter list | show | requeue | purge`` reads it and
acts on it, against a real worker, a real redis-server and the real Celery
client."""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

from celery.result import AsyncResult

from tori_harness import (
    clean_env,
    free_port,
    garbage_message,
    good_envelope_dict,
    http_get,
    tori_bin,
    wait_for,
)

DEAD_LETTER = "tori.dead_letter"


def dead_letter_cli(broker: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tori_bin(), "dead-letter", "--broker", broker, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, env=clean_env())


def cli_json(broker: str, *args: str):
    done = dead_letter_cli(broker, *args, "--json")
    assert done.returncode == 0, f"dead-letter {args} failed: {done.stderr}"
    return json.loads(done.stdout)


def metric(port: int, name: str, worker: str) -> float | None:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    m = re.search(rf'^{name}{{worker="{re.escape(worker)}"}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else None


def test_dead_letter_cli_round_trip(app, tori_worker, redis_server, redis_client):
    """A message the worker cannot read is listed with an id and shown in
    full; a record holding a good message (as an operator would write one)
    is requeued and the task runs; unknown ids fail clearly; purge empties
    the list."""
    url = redis_server.url()
    marker = f"dlq-{uuid.uuid4().hex[:8]}"
    redis_client.lpush("celery", garbage_message("not_json_text", marker))
    wait_for(lambda: redis_client.llen(DEAD_LETTER) == 1, 15,
             message=lambda: f"{DEAD_LETTER} has {redis_client.llen(DEAD_LETTER)} records")

    listed = cli_json(url, "list")
    assert len(listed) == 1, listed
    bad = listed[0]
    assert re.fullmatch(r"[0-9a-f]{32}", bad["id"]), bad
    assert bad["queue"] and bad["reason"] and bad["received_at"] > 0, bad
    assert bad["raw_size"] == len(garbage_message("not_json_text", marker))
    shown = cli_json(url, "show", bad["id"])
    assert shown["id"] == bad["id"] and marker in shown["raw"], shown
    # The worker wrote the id into the record itself: every reader sees it.
    assert json.loads(redis_client.lindex(DEAD_LETTER, 0))["id"] == bad["id"]
    human = dead_letter_cli(url, "list")
    assert human.returncode == 0 and bad["id"] in human.stdout, human
    human = dead_letter_cli(url, "show", bad["id"])
    assert human.returncode == 0 and marker in human.stdout, human

    # An operator's record in the old format (no id) holding a good message.
    task_id = str(uuid.uuid4())
    record = json.dumps({"reason": "fixed by hand", "queue": "celery", "received_at": time.time(),
                         "worker": "operator", "raw": json.dumps(
                             good_envelope_dict("tori.echo", task_id, args=["requeued"]))})
    redis_client.lpush(DEAD_LETTER, record)
    listed = cli_json(url, "list")
    assert [r["id"] for r in listed][1:] == [bad["id"]], "newest first"
    mine = listed[0]
    assert re.fullmatch(r"[0-9a-f]{16}", mine["id"]), mine
    assert (mine["task_id"], mine["task_name"]) == (task_id, "tori.echo")
    assert cli_json(url, "list")[0]["id"] == mine["id"], "a derived id is stable"

    done = cli_json(url, "requeue", mine["id"])
    assert [(r["id"], r["task_id"], r["queue"]) for r in done["requeued"]] == \
        [(mine["id"], task_id, "celery")], done
    assert AsyncResult(task_id, app=app).get(timeout=15) == {"args": ["requeued"], "kwargs": {}}
    assert [r["id"] for r in cli_json(url, "list")] == [bad["id"]]

    for args in (["requeue", mine["id"]], ["show", "no-such-id"], ["purge", "no-such-id"]):
        failed = dead_letter_cli(url, *args)
        assert failed.returncode != 0, (args, failed.stdout)
        assert "no dead letter with id" in failed.stderr, (args, failed.stderr)

    assert cli_json(url, "purge") == {"purged": 1}
    assert redis_client.llen(DEAD_LETTER) == 0
    assert tori_worker.alive()


def test_dead_letter_max_keeps_the_newest(worker_factory, redis_server, redis_client):
    """--dead-letter-max 3: after five dead letters the list holds the
    newest three, and /metrics says two were trimmed. Both kinds of push
    are used: the reserve script's (not an envelope at all) and the
    worker's own (an envelope whose body it cannot decode)."""
    port = free_port()
    node = "dlqmax@tests"
    worker_factory(redis_server.url(), "--concurrency", "2", "--dead-letter-max", "3",
                   "--metrics-addr", f"127.0.0.1:{port}", hostname=node)
    kinds = ["bad_base64_body", "not_json_text"] * 3
    markers = []
    for i, kind in enumerate(kinds[:5]):
        markers.append(f"cap-{i}-{uuid.uuid4().hex[:8]}")
        redis_client.lpush("celery", garbage_message(kind, markers[-1]))
        # one at a time, so which records are the newest is known, and each
        # kind of push is seen to trim
        wait_for(lambda: metric(port, "tori_dead_letters_total", node) == i + 1, 15,
                 message=lambda: f"dead letters written: "
                                 f"{metric(port, 'tori_dead_letters_total', node)}")
        assert redis_client.llen(DEAD_LETTER) == min(i + 1, 3), (i, kind)
        assert metric(port, "tori_dead_letters_trimmed_total", node) == max(0, i - 2), (i, kind)
    held = [json.loads(r)["raw"] for r in redis_client.lrange(DEAD_LETTER, 0, -1)]
    assert len(held) == 3, held
    for raw, marker in zip(held, reversed(markers[2:])):
        assert marker in raw, (marker, raw)
    assert metric(port, "tori_dead_letters_trimmed_total", node) == 2


def test_dead_letter_cli_never_prints_the_broker_password():
    """The broker URL's password appears neither in output nor in errors."""
    secret = f"pw-{uuid.uuid4().hex}"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens there
    for args in (["list"], ["list", "--json"], ["purge"]):
        failed = dead_letter_cli(url, *args)
        assert failed.returncode != 0, failed.stdout
        assert failed.stderr.strip(), "an error must say what went wrong"
        assert secret not in failed.stdout + failed.stderr, failed.stderr
