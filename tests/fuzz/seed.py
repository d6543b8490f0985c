#!/usr/bin/env python3
"""Builds the fuzzing corpora from the captured wire vectors.

    python3 tests/fuzz/seed.py [OUT_DIR]      # default tests/fuzz/corpus

For every target a directory of starting inputs, derived from
tests/vectors (see its README): the raw envelopes (broker/, pidbox/,
events/) as popped from Redis, the pool frames the worker would send and
receive for them (ToChild::Run for each task, FromChild::Done/Progress for
each stored result in backend/), and the workflow signatures embedded in
the task bodies. The structured targets (task_message, canvas) read
`arbitrary` input, not wire bytes; they start from the committed seeds.
Standard library only; file names are content hashes, so reruns add
nothing new.
"""

import base64
import hashlib
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"


def write(out, target, data):
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def envelope_body(env):
    body = env.get("body", "")
    if env.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    else:
        body = body.encode()
    return json.loads(body)


def task_parts(env, payload):
    """(id, name, args, kwargs, embed) of a protocol 2 or 1 message."""
    headers = env.get("headers") or {}
    if "task" in headers:
        args, kwargs, embed = (payload + [None, None, None])[:3]
        return headers.get("id"), headers["task"], args or [], kwargs or {}, embed or {}
    return payload.get("id"), payload.get("task"), payload.get("args") or [], \
        payload.get("kwargs") or {}, payload


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fuzz" / "corpus"
    counts = {}

    def add(target, data):
        write(out, target, data)
        counts[target] = counts.get(target, 0) + 1

    for sub in ("broker", "pidbox", "events"):
        for raw in sorted((VECTORS / sub).glob("*.raw")):
            data = raw.read_bytes()
            add("envelope", data)
            add("task_message_raw", data)
            try:
                env = json.loads(data)
                payload = envelope_body(env)
            except (ValueError, TypeError, AttributeError):
                continue
            if sub != "broker" or not isinstance(env, dict):
                continue
            tid, name, args, kwargs, embed = task_parts(env, payload)
            retries = (env.get("headers") or {}).get("retries") or 0
            job = {"Run": {"id": tid, "name": name, "args": args, "kwargs": kwargs,
                           "retries": retries}}
            add("ipc_frame", frame(job))
            add("ipc_frame", json.dumps(job).encode())
            # The workflow signatures a finished task would start.
            chain = embed.get("chain") or []
            for key in ("callbacks", "errbacks"):
                for sig in embed.get(key) or []:
                    add("canvas_raw", json.dumps(sig).encode())
            if embed.get("chord"):
                add("canvas_raw", json.dumps(embed["chord"]).encode())
            if chain:
                add("canvas_raw", json.dumps(chain[-1]).encode())
                add("canvas_raw", json.dumps([chain[-1]] + chain[:-1]).encode())

    for raw in sorted((VECTORS / "backend").glob("*.raw")):
        try:
            doc = json.loads(raw.read_bytes())
        except ValueError:
            continue
        result = doc.get("result") if isinstance(doc, dict) else doc
        for msg in ({"Done": {"Ok": result}}, {"Progress": doc}):
            add("ipc_frame", frame(msg))
            add("ipc_frame", json.dumps(msg).encode())
        if isinstance(result, dict) and "exc_type" in result:
            err = {"Done": {"Err": {"Failed": {
                "exception": {"module": result.get("exc_module", "builtins"),
                              "name": result["exc_type"],
                              "args": result.get("exc_message") or []},
                "traceback": doc.get("traceback")}}}}
            add("ipc_frame", frame(err))
    for msg in ({"Ready": {"pid": 1}}, {"Panicked": "boom"},
                {"Done": {"Err": {"Retry": {"countdown": 1.5, "reason": None,
                                            "max_retries": 3}}}},
                {"Done": {"Err": {"Reject": {"requeue": True, "reason": "r"}}}},
                {"Done": {"Err": "SoftTimeLimitExceeded"}}):
        add("ipc_frame", frame(msg))
        add("ipc_frame", frame(msg) + frame(msg))

    for target, n in sorted(counts.items()):
        print(f"{target}: {n} inputs from tests/vectors -> {out / target}")


if __name__ == "__main__":
    main()
