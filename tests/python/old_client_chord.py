"""Sends one chord with whatever Celery client the running Python has and
prints what happened as one JSON line on stdout.

Run by test_old_clients.py with the interpreter of an old client's venv
(``.venv-celery50``: Celery 5.0.x, made by scripts/bootstrap), so it uses
only what Celery 4.4 to 5.7 all have and imports nothing from the suite.

    python old_client_chord.py REDIS_URL SHAPE N [TIMEOUT]

SHAPE ``flat``: ``chord([tori.echo(0) .. tori.echo(N-1)], tori.echo())``;
``chain``: the same with header member 1 a chain,
``tori.echo(1) | tori.echo()``. The body's ``AsyncResult.get()`` is printed
with the ids the test needs to look at Redis.
"""
import json
import sys

import celery
from celery import Celery, chain, chord


def main():
    url, shape, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    app = Celery("old_client", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue="celery",
        enable_utc=True,
        timezone="UTC",
    )
    header = [app.signature("tori.echo", args=[i]) for i in range(n)]
    if shape == "chain":
        header[1] = chain(header[1], app.signature("tori.echo"))
    elif shape != "flat":
        raise SystemExit("unknown shape %r" % shape)
    body = app.signature("tori.echo")
    res = chord(header)(body)
    out = {
        "celery": celery.__version__,
        "body_id": res.id,
        "group_id": res.parent.id if res.parent is not None else None,
    }
    try:
        out["result"] = res.get(timeout=timeout)
    except Exception as exc:  # reported, not raised: the test says what failed
        out["error"] = "%s: %s" % (type(exc).__name__, exc)
    print(json.dumps(out), flush=True)
    app.close()


if __name__ == "__main__":
    main()
