#!/usr/bin/env python3
"""tori-worker vs the Python Celery 5.7 worker, side by side, in one run.

One command (from the repository root, after `cargo build --release`):

    .venv/bin/python benches/compare.py            # full: 20000 tasks, 3 repeats, 40 PDFs (~40 min)
    .venv/bin/python benches/compare.py --quick    # ~2.5 min check: 2000 tasks, 1 repeat, 10 PDFs

Other entry points:

    .venv/bin/python benches/compare.py --scale 100000 --scale-workers 3   # scale run (tori only)
    .venv/bin/python benches/compare.py --render-only    # re-render RESULTS.md from results.json
    .venv/bin/python benches/compare.py --quick --only a --sides tori --tori-pool solo   # experiments
    cargo bench --bench hot_paths [-- --quick]   # criterion: decode, result encode
    cargo bench --bench ingest [-- --quick]      # criterion: extract, clean, chunk, embed 1/8/32

Use a quiet machine for figures that matter (nothing else building or
testing); on a shared one, trust worker CPU per task and Redis commands per
task more than rates, and pass --provisional to say so in RESULTS.md.
RESULTS.md keeps a hand-written `<!-- notes -->` section and the last
`<!-- scale -->` section across re-runs.

It starts its own redis-server on a free port (no persistence), and for
each case runs the two workers one after the other, alternating which side
goes first on each repeat, always at equal concurrency (`-P prefork -c 2`
on both sides, each side otherwise at its defaults). Cases:

  (a) drain of N pre-loaded `tori.noop` tasks: {results stored, ignored} x
      {events off, -E}. Messages are byte-identical to Celery 5.7's
      (`tests/vectors/broker/task_delay_add_2_3.raw` with fresh ids, tags,
      task name and `ignore_result`), pushed with a Redis pipeline into a
      staging list while the worker idles, then RENAMEd onto the queue in
      one step, so the clock measures only the worker. Reported: tasks/s,
      worker CPU us per task (utime+stime summed over the worker's process
      tree from /proc, before/after), Redis commands per task (INFO
      commandstats delta / N, minus the runner's own polling commands).
  (b) idle latency: `send_task("tori.noop")` -> `.get()` with the real
      Celery client, sequentially; p50/p95/p99.
  (c) RSS and PSS (/proc/<pid>/smaps_rollup, summed over the worker tree):
      idle (warm), after the drain, after one pdf_ingestion (model loaded
      in one pool process) and after the PDF run (loaded in both); the
      last two SETTLE_S after the last result, on both sides, so they show
      what a worker holds between jobs (tori gives its inference arena
      back once idle; Python's stays at its peak either way).
  (d) PDF ingestion of --pdfs small born-digital files of the shared corpus
      (MANIFEST.tsv): tori-worker's `pdf_ingestion` vs the same pipeline in
      Python (benches/pypipeline.py: pypdfium2 with the same libpdfium,
      HF tokenizers with the same tokenizer.json, onnxruntime 1.31.1 with
      the same model.onnx, chunks 254/32): pages/s, docs/s, stage times.
  (e) the embedding stage of each worker (padded tokens/s, from the
      results' embed_stats and embed_ms) vs raw onnxruntime running only
      `session.run` on the same documents' batches (physical limit).

Every figure is the median with min-max over --repeat runs, plus the ratio
tori/Python. The table is printed and written to benches/RESULTS.md
(--out) with the command, machine, versions and date; raw numbers go to
benches/results.json.

--scale N runs the scale check instead: N ingestion messages (small PDFs,
embedding off unless --scale-embed) consumed by --scale-workers tori-worker
processes on one Redis; throughput per time window, Redis memory per
pending and per finished job, count in = count out.

Python side: .venv (celery 5.7, redis-py) plus pypdfium2 from the wheel
`scripts/setup-native` cached (installed into .tori/bench-pylib on first
use) and onnxruntime/tokenizers/numpy from .tori/native-venv.
"""
from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
TORI_BIN = Path(os.environ.get("TORI_WORKER_BIN", ROOT / "target" / "release" / "tori-worker"))
CELERY_BIN = ROOT / ".venv" / "bin" / "celery"
PYTHON = ROOT / ".venv" / "bin" / "python"
NATIVE_VENV_SITE = ROOT / ".tori" / "native-venv" / "lib" / "python3.11" / "site-packages"
BENCH_PYLIB = ROOT / ".tori" / "bench-pylib"
WHEELS = ROOT / ".tori" / "native-cache" / "wheels"
CORPUS = Path(os.environ.get("TORI_CORPUS", "/work/shared/corpus"))
VECTOR = ROOT / "tests" / "vectors" / "broker" / "task_delay_add_2_3.raw"
REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", shutil.which("redis-server") or "/usr/bin/redis-server")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STAGING = "bench.staging"
SIDES = ("tori", "python")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_cpu_us(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total * 1e6 / CLK_TCK


def tree_mem_kib(pid: int) -> dict:
    """RSS, PSS and USS (private clean + dirty) summed over the tree. PSS
    divides pages shared with ANY process, so other processes mapping the
    same files (another tori-worker, another Python) lower it; USS does not
    depend on them."""
    rss = pss = uss = 0
    n = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Rss":
                        rss += int(rest.split()[0])
                    elif key == "Pss":
                        pss += int(rest.split()[0])
                    elif key in ("Private_Clean", "Private_Dirty"):
                        uss += int(rest.split()[0])
            n += 1
        except OSError:
            continue
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "uss_mib": uss / 1024, "processes": n}


# ------------------------------------------------------------------ redis

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
            stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT)
        self.r = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        self.version = self.r.info("server")["redis_version"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def commandstats(r: redis.Redis, field: str = "calls") -> dict[str, int]:
    """Per command: `calls`, or `usec` (time Redis spent executing it)."""
    out = {}
    for k, v in r.info("commandstats").items():
        out[k.removeprefix("cmdstat_")] = int(v[field])
    return out


class Counted:
    """The runner's own commands, to subtract from commandstats deltas."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def add(self, cmd: str, n: int = 1):
        self.calls[cmd] = self.calls.get(cmd, 0) + n


def commands_delta(before: dict, after: dict, own: Counted) -> tuple[int, dict]:
    delta = {}
    for k in set(before) | set(after):
        d = after.get(k, 0) - before.get(k, 0) - own.calls.get(k, 0)
        if k in ("info",):
            continue
        if d:
            delta[k] = d
    return sum(delta.values()), dict(sorted(delta.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------ messages

class Messages:
    """Celery 5.7 task messages, byte-compatible with the capture."""

    def __init__(self):
        self.template = json.loads(VECTOR.read_text())
        # The embedded options dict of protocol 2, exactly as captured.
        body = json.loads(base64.b64decode(self.template["body"]))
        self.embed_opts = body[2]

    def make(self, task: str, args=(), kwargs=None, ignore_result=False, task_id=None) -> tuple[str, bytes]:
        env = copy.deepcopy(self.template)
        tid = task_id or str(uuid.uuid4())
        h = env["headers"]
        h["task"] = task
        h["id"] = tid
        h["root_id"] = tid
        h["argsrepr"] = repr(tuple(args))
        h["kwargsrepr"] = repr(kwargs or {})
        h["ignore_result"] = ignore_result
        h["origin"] = f"bench{os.getpid()}@{socket.gethostname()}"
        env["properties"]["correlation_id"] = tid
        env["properties"]["delivery_tag"] = str(uuid.uuid4())
        body = json.dumps([list(args), kwargs or {}, self.embed_opts])
        env["body"] = base64.b64encode(body.encode()).decode()
        return tid, json.dumps(env).encode()


def push(r: redis.Redis, key: str, payloads: list[bytes], own: Counted | None = None, batch=2000):
    for i in range(0, len(payloads), batch):
        p = r.pipeline(transaction=False)
        p.lpush(key, *payloads[i:i + batch])
        p.execute()
        if own:
            own.add("lpush")


# ------------------------------------------------------------------ workers

def py_env(url: str) -> dict:
    env = dict(os.environ)
    for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REDIS_URL"):
        env.pop(k, None)
    env["BENCH_BROKER"] = url
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHES), str(BENCH_PYLIB), str(NATIVE_VENV_SITE)])
    env["TORI_STORAGE_ROOT"] = str(CORPUS)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    return env


POOLS = {"tori": "prefork", "python": "prefork"}
# Extra tori-worker flags for experiments (--tori-args).
TORI_EXTRA_ARGS: list[str] = []
# Both sides' prefetch multiplier (--prefetch-multiplier); None keeps each
# side's default (4 on both). Set on both at once so the pair stays equal.
PREFETCH: list[int] = []


class Worker:
    def __init__(self, side: str, url: str, logdir: Path, concurrency=2, events=False, tag=""):
        self.side = side
        logdir.mkdir(parents=True, exist_ok=True)
        self.logf = logdir / f"{side}-{tag or 'w'}-{int(time.time() * 1000)}.log"
        env = py_env(url)
        if side == "tori":
            # A fresh artifact store per worker: otherwise repeats would
            # find the first run's result.json and skip the work (and the
            # default, <storage root>/artifacts, is the shared corpus).
            env["TORI_ARTIFACTS_URL"] = (logdir / f"artifacts-{uuid.uuid4().hex[:8]}").resolve().as_uri()
            cmd = [str(TORI_BIN), "--broker", url, "-c", str(concurrency), "--pool", POOLS["tori"],
                   "--hostname", f"tori-bench-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "warn"]
            if events:
                cmd.append("-E")
            cmd += [a for n in PREFETCH for a in ("--prefetch-multiplier", str(n))]
            cmd += TORI_EXTRA_ARGS
        else:
            cmd = [str(CELERY_BIN), "-A", "pyapp", "worker", "-P", POOLS["python"], "-c", str(concurrency),
                   "-n", f"py-bench-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "WARNING"]
            if events:
                cmd.append("-E")
            cmd += [a for n in PREFETCH for a in ("--prefetch-multiplier", str(n))]
        self.cmd = cmd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(BENCHES), env=env, stdout=open(self.logf, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # stray pool children of this worker's own process group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_results(r: redis.Redis, ids: list[str], timeout: float, own: Counted | None = None,
                 worker: Worker | None = None) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    pending = list(ids)
    out: dict[str, dict] = {}
    while pending:
        p = r.pipeline(transaction=False)
        for tid in pending:
            p.get(f"celery-task-meta-{tid}")
        vals = p.execute()
        if own:
            own.add("get", len(pending))
        still = []
        for tid, v in zip(pending, vals):
            if v is None:
                still.append(tid)
                continue
            doc = json.loads(v)
            if doc.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                out[tid] = doc
            else:
                still.append(tid)
        pending = still
        if not pending:
            break
        if worker and not worker.alive():
            raise RuntimeError(f"{worker.side} worker died; see {worker.logf}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} results missing after {timeout}s")
        time.sleep(0.005)
    return out


def start_warm(side, url, r, msgs, logdir, events=False, warm=4, tag="") -> Worker:
    w = Worker(side, url, logdir, events=events, tag=tag)
    ids, payloads = [], []
    for _ in range(warm):
        tid, pl = msgs.make("tori.noop")
        ids.append(tid)
        payloads.append(pl)
    push(r, "celery", payloads)
    wait_results(r, ids, 120, worker=w)
    w.startup_s = time.monotonic() - w.started
    r.delete(*[f"celery-task-meta-{t}" for t in ids])
    wait_idle(r, 30)
    time.sleep(0.5)
    return w


def wait_idle(r, timeout, own: Counted | None = None):
    deadline = time.monotonic() + timeout
    while True:
        p = r.pipeline(transaction=False)
        p.llen("celery")
        p.hlen("unacked")
        n_q, n_u = p.execute()
        if own:
            own.add("llen")
            own.add("hlen")
        if n_q == 0 and n_u == 0:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue {n_q}, unacked {n_u}")
        time.sleep(0.005)


# ------------------------------------------------------------------ cases

def drain_case(side, srv: RedisServer, msgs: Messages, n: int, store: bool, events: bool, logdir: Path):
    r = srv.r
    r.flushall()
    w = start_warm(side, srv.url, r, msgs, logdir, events=events, tag=f"drain-{int(store)}{int(events)}")
    try:
        mem_idle = tree_mem_kib(w.pid)
        ids, payloads = [], []
        for _ in range(n):
            tid, pl = msgs.make("tori.noop", ignore_result=not store)
            ids.append(tid)
            payloads.append(pl)
        own = Counted()
        push(r, STAGING, payloads)
        time.sleep(0.3)
        cpu0 = tree_cpu_us(w.pid)
        rcpu0 = tree_cpu_us(srv.proc.pid)
        cs0 = commandstats(r)
        us0 = commandstats(r, "usec")
        t0 = time.monotonic()
        r.rename(STAGING, "celery")
        own.add("rename")
        wait_idle(r, 3600, own)
        if store:
            wait_results(r, ids, 600, own, w)
        t1 = time.monotonic()
        cpu1 = tree_cpu_us(w.pid)
        rcpu1 = tree_cpu_us(srv.proc.pid)
        cs1 = commandstats(r)
        us1 = commandstats(r, "usec")
        total, per_cmd = commands_delta(cs0, cs1, own)
        _, usec_by_cmd = commands_delta(us0, us1, Counted())
        mem_after = tree_mem_kib(w.pid)
        results = 0
        if store:
            results = sum(1 for k in r.scan_iter("celery-task-meta-*", count=5000))
        secs = t1 - t0
        return {
            "tasks_per_s": n / secs, "seconds": secs, "cpu_us_per_task": (cpu1 - cpu0) / n,
            "redis_cmds_per_task": total / n,
            # includes the runner's own polling (one LLEN/ZCARD pair per 5 ms)
            "redis_cpu_us_per_task": (rcpu1 - rcpu0) / n,
            "redis_cmds_breakdown_per_task": {k: round(v / n, 3) for k, v in per_cmd.items()},
            "redis_usec_breakdown_per_task": {k: round(v / n, 2) for k, v in usec_by_cmd.items()},
            "results_stored": results, "startup_s": w.startup_s,
            "mem_idle": mem_idle, "mem_after_drain": mem_after,
        }
    finally:
        w.stop()


def latency_case(side, srv: RedisServer, msgs: Messages, n: int, logdir: Path):
    from celery import Celery

    r = srv.r
    r.flushall()
    w = start_warm(side, srv.url, r, msgs, logdir, tag="latency")
    app = Celery("benchclient", broker=srv.url, backend=srv.url)
    app.conf.task_serializer = "json"
    try:
        for _ in range(20):
            app.send_task("tori.noop").get(timeout=30)
        lat, before, after = [], [], []
        for _ in range(n):
            wall = time.time()
            t = time.perf_counter()
            res = app.send_task("tori.noop")
            res.get(timeout=30)
            elapsed = time.perf_counter() - t
            lat.append(elapsed * 1000)
            # Where the time went: the worker's date_done (set as it builds
            # the result to store, same clock) splits the round trip into
            # send + worker, and PUBLISH + the client's get() handling.
            done = stored_at(res)
            if done is not None:
                before.append((done - wall) * 1000)
                after.append((wall + elapsed - done) * 1000)

        def q(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None

        return {"p50_ms": q(lat, 50), "p95_ms": q(lat, 95), "p99_ms": q(lat, 99),
                "mean_ms": statistics.fmean(lat),
                "p50_until_stored_ms": q(before, 50), "p50_after_stored_ms": q(after, 50),
                "p99_until_stored_ms": q(before, 99), "p99_after_stored_ms": q(after, 99)}
    finally:
        app.close()
        w.stop()


def stored_at(res) -> float | None:
    """The result's date_done as epoch seconds (UTC, as both workers write it)."""
    raw = (res._cache or {}).get("date_done")
    if not raw:
        return None
    if isinstance(raw, str):
        raw = dt.datetime.fromisoformat(raw)
    if raw.tzinfo is None:
        raw = raw.replace(tzinfo=dt.timezone.utc)
    return raw.timestamp()


def pick_pdfs(n: int) -> list[dict]:
    rows = []
    with open(CORPUS / "MANIFEST.tsv") as f:
        head = f.readline().rstrip("\n").split("\t")
        for line in f:
            row = dict(zip(head, line.rstrip("\n").split("\t")))
            if row.get("category") == "born-digital" and 1 <= int(row["pages"]) <= 10 \
                    and int(row["bytes"]) <= 2_000_000:
                rows.append(row)
    rows.sort(key=lambda r: r["file"])
    if n >= len(rows):
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


# Seconds between a PDF run's last result and reading the worker's memory.
SETTLE_S = 1.0


def pdf_case(side, srv: RedisServer, msgs: Messages, pdfs: list[dict], logdir: Path):
    r = srv.r
    r.flushall()
    w = start_warm(side, srv.url, r, msgs, logdir, tag="pdf")
    try:
        mem_idle = tree_mem_kib(w.pid)
        smallest = min(pdfs, key=lambda row: int(row["bytes"]))["file"]
        tid, pl = msgs.make("pdf_ingestion", args=[smallest])
        push(r, "celery", [pl])
        first = wait_results(r, [tid], 600, worker=w)[tid]
        if first["status"] != "SUCCESS":
            raise RuntimeError(f"{side} pdf_ingestion failed: {first.get('result')}")
        time.sleep(SETTLE_S)
        mem_one = tree_mem_kib(w.pid)
        # load the model in every pool process before timing
        warm = [msgs.make("pdf_ingestion", args=[smallest]) for _ in range(3)]
        push(r, "celery", [p for _, p in warm])
        wait_results(r, [t for t, _ in warm], 600, worker=w)
        wait_idle(r, 60)
        cpu0 = tree_cpu_us(w.pid)
        jobs = [msgs.make("pdf_ingestion", args=[row["file"]]) for row in pdfs]
        push(r, STAGING, [p for _, p in jobs])
        t0 = time.monotonic()
        r.rename(STAGING, "celery")
        res = wait_results(r, [t for t, _ in jobs], 3600, worker=w)
        secs = time.monotonic() - t0
        cpu1 = tree_cpu_us(w.pid)
        time.sleep(SETTLE_S)
        mem_loaded = tree_mem_kib(w.pid)
        ok = [d["result"] for d in res.values() if d["status"] == "SUCCESS"]
        failed = len(res) - len(ok)
        pages = sum(x["pages"] for x in ok)
        stages = {}
        for k in ("extract_ms", "clean_ms", "chunk_ms", "embed_ms", "summarize_ms", "total_ms"):
            stages[k] = sum(x["timings"][k] for x in ok)
        padded = sum((x.get("embed_stats") or {}).get("padded_tokens", 0) for x in ok)
        chunks = sum(x["chunks"] for x in ok)
        return {
            "docs": len(ok), "failed": failed, "pages": pages, "chunks": chunks, "seconds": secs,
            "pages_per_s": pages / secs, "docs_per_s": len(ok) / secs,
            "cpu_ms_per_page": (cpu1 - cpu0) / 1000 / max(pages, 1),
            "stage_ms": stages, "padded_tokens": padded,
            "embed_padded_tokens_per_s": padded / (stages["embed_ms"] / 1000) if stages["embed_ms"] else 0,
            "mem_idle": mem_idle, "mem_after_one_pdf": mem_one, "mem_model_loaded_all": mem_loaded,
        }
    finally:
        w.stop()


def raw_ort_case(pdfs: list[dict], procs: int = 2):
    """`procs` processes at once (the workers' concurrency), each running
    every batch; the per-process rate is comparable to a pool process's."""
    env = py_env("redis://unused")
    files = [str(CORPUS / row["file"]) for row in pdfs]
    ps = [subprocess.Popen([str(PYTHON), str(BENCHES / "pypipeline.py"), "raw-ort", *files],
                           env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = []
    for p in ps:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError("raw-ort run failed")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    res = dict(outs[0])
    res["processes"] = procs
    res["padded_tokens_per_s"] = statistics.fmean(o["padded_tokens_per_s"] for o in outs)
    return res


# ------------------------------------------------------------------ scale

def scale_run(args, srv: RedisServer, msgs: Messages, logdir: Path) -> dict:
    r = srv.r
    r.flushall()
    rows = sorted(pick_pdfs(10_000), key=lambda row: (int(row["pages"]), int(row["bytes"])))[:8]
    files = [row["file"] for row in rows]
    n = args.scale
    opts = None if args.scale_embed else {"embed": False}
    mem0 = r.info("memory")["used_memory"]
    ids, payloads = [], []
    for i in range(n):
        tid, pl = msgs.make("pdf_ingestion", args=[files[i % len(files)], opts] if opts else [files[i % len(files)]])
        ids.append(tid)
        payloads.append(pl)
    push(r, STAGING, payloads)
    del payloads
    mem_pending = r.info("memory")["used_memory"]
    workers = [Worker("tori", srv.url, logdir, concurrency=args.scale_concurrency, tag=f"scale{i}")
               for i in range(args.scale_workers)]
    time.sleep(1.0)
    t0 = time.monotonic()
    r.rename(STAGING, "celery")
    samples = []  # (t, finished)
    while True:
        time.sleep(1.0)
        p = r.pipeline(transaction=False)
        p.llen("celery")
        p.hlen("unacked")
        q, u = p.execute()
        samples.append((time.monotonic() - t0, n - q - u))
        if q == 0 and u == 0:
            break
        if not all(w.alive() for w in workers):
            raise RuntimeError("a scale worker died")
        if time.monotonic() - t0 > args.scale_timeout:
            raise TimeoutError(f"scale run: {q} queued, {u} unacked after {args.scale_timeout}s")
    res = wait_results(r, ids, 600)
    secs = time.monotonic() - t0
    mem_done = r.info("memory")["used_memory"]
    for w in workers:
        w.stop()
    states: dict[str, int] = {}
    for d in res.values():
        states[d["status"]] = states.get(d["status"], 0) + 1
    window = max(1, int(len(samples) / 10))
    rates = []
    for i in range(window, len(samples), window):
        (ta, fa), (tb, fb) = samples[i - window], samples[i]
        rates.append(round((fb - fa) / (tb - ta), 1))
    return {
        "messages_in": n, "results_out": len(res), "states": states,
        "dead_letter": r.llen("tori.dead_letter"), "seconds": secs, "jobs_per_s": n / secs,
        "rate_per_window": rates, "workers": args.scale_workers, "concurrency_each": args.scale_concurrency,
        "redis_bytes_per_pending": (mem_pending - mem0) / n,
        "redis_bytes_per_finished": (mem_done - mem0) / n,
        "embed": bool(args.scale_embed), "files": files,
    }


# ------------------------------------------------------------------ report

def med(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def fmt(v, digits=None):
    if v is None:
        return "–"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def cell(vals):
    m, lo, hi = med(vals)
    if m is None:
        return "–"
    if len([v for v in vals if v is not None]) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(lo)}–{fmt(hi)})"


def ratio(t, p):
    mt, mp = med(t)[0], med(p)[0]
    if mt is None or mp in (None, 0):
        return "–"
    return f"{mt / mp:.2f}×"


def versions() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"

    def run_env(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                  env=py_env("redis://x")).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"

    import celery
    import kombu

    git = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "tori_worker": f"{TORI_BIN.name} @ git {git}{' (dirty tree)' if dirty else ''}, binary built "
                       f"{dt.datetime.fromtimestamp(TORI_BIN.stat().st_mtime, dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "onnxruntime": run_env([str(PYTHON), "-c", "import onnxruntime as o; print(o.__version__)"]),
        "tokenizers": run_env([str(PYTHON), "-c", "import tokenizers as t; print(t.__version__)"]),
        "pypdfium2": run_env([str(PYTHON), "-c", "import pypdfium2 as p; print(p.version.PYPDFIUM_INFO)"]),
    }


def render(args, meta, data, cmdline) -> str:
    L = []
    prov = args.provisional
    L.append("# Benchmarks: tori-worker vs Python Celery worker\n")
    if prov:
        L.append("> **PROVISIONAL** — taken on a shared, loaded machine (other engineers building and "
                 "testing on the same 2 cores); use them for orders of magnitude, not for the targets. "
                 "Worker CPU per task and Redis commands per task are the steadiest figures.\n")
    L.append(f"Command: `{cmdline}`  ")
    L.append(f"Date: {meta['date']}; machine: {meta['nproc']} CPUs ({meta['cpu']}), kernel {meta['kernel']}, "
             f"load average at start {' '.join(meta['loadavg_at_start'])}  ")
    L.append(f"Versions: {meta['tori_worker']}; Python {meta['python']}, celery {meta['celery']}, kombu "
             f"{meta['kombu']}, redis-py {meta['redis_py']}, redis-server {meta['redis_server']}, "
             f"onnxruntime {meta['onnxruntime']}, tokenizers {meta['tokenizers']}, pypdfium2 {meta['pypdfium2']}  ")
    L.append(f"Pools: tori `{getattr(args, 'tori_pool', 'prefork')} -c 2`, Python "
             f"`{getattr(args, 'py_pool', 'prefork')} -c 2`, each at its own defaults otherwise (Celery: prefetch multiplier 4, "
             f"mingle/gossip/heartbeat on; tori: prefetch multiplier 4, the same default)"
             + (f"; both sides run with `--prefetch-multiplier {args.prefetch_multiplier}`"
                if getattr(args, "prefetch_multiplier", None) else "")
             + f". Repeats: {args.repeat}, sides alternating "
             f"(odd repeats Python first). Cells: median (min–max)."
             + (f" Extra tori flags: `{args.tori_args}`." if getattr(args, "tori_args", "") else "") + "\n")

    d = data.get("drain", {})
    if d:
        L.append(f"## (a) Drain of {args.tasks:,} pre-loaded `tori.noop` tasks\n")
        L.append("| case | metric | tori-worker | Python Celery | tori/Python |")
        L.append("| --- | --- | --- | --- | --- |")
        for case, runs in d.items():
            for key, label in (("tasks_per_s", "tasks/s"), ("cpu_us_per_task", "worker CPU µs/task"),
                               ("redis_cmds_per_task", "Redis commands/task"),
                               ("redis_cpu_us_per_task", "Redis CPU µs/task")):
                t = [x.get(key) for x in runs["tori"]]
                p = [x.get(key) for x in runs["python"]]
                L.append(f"| {case} | {label} | {cell(t)} | {cell(p)} | {ratio(t, p)} |")
        su_t = [x["startup_s"] for runs in d.values() for x in runs["tori"]]
        su_p = [x["startup_s"] for runs in d.values() for x in runs["python"]]
        L.append(f"| all cases | start-up s (spawn → 4 warm-up results) | {cell(su_t)} | {cell(su_p)} | "
                 f"{ratio(su_t, su_p)} |")
        # events drop
        L.append("")
        for store in ("results", "no results"):
            off, on = d.get(f"{store}, events off"), d.get(f"{store}, -E")
            if off and on:
                for side in SIDES:
                    a = med([x["tasks_per_s"] for x in off[side]])[0]
                    b = med([x["tasks_per_s"] for x in on[side]])[0]
                    if a is None or b is None:
                        continue
                    L.append(f"- {side}, {store}: `-E` changes throughput by {100 * (b - a) / a:+.0f} %")
        L.append("")
        L.append("Redis commands per task, by command (first repeat, results stored, events off). "
                 "INFO commandstats also counts the commands a Lua script runs (tori's reserve is one EVALSHA "
                 "whose RPOP/ZADD/HSET are counted too), so this counts Redis work, not round trips:\n")
        first = d.get("results, events off")
        if first:
            for side in SIDES:
                if not first[side]:
                    continue
                br = first[side][0]["redis_cmds_breakdown_per_task"]
                L.append(f"- {side}: " + ", ".join(f"{k} {v}" for k, v in list(br.items())[:12]))
        L.append("")
        if first and any(x and "redis_usec_breakdown_per_task" in x[0] for x in first.values()):
            L.append("Redis execution time per task, by command (µs, INFO commandstats `usec`, same run; "
                     "an EVALSHA's time includes the commands its script runs, which are also listed; "
                     "the worker's CPU µs/task row above is the whole worker tree, the Redis CPU row the "
                     "whole redis-server process, parsing and network included):\n")
            for side in SIDES:
                if not first[side] or "redis_usec_breakdown_per_task" not in first[side][0]:
                    continue
                br = first[side][0]["redis_usec_breakdown_per_task"]
                L.append(f"- {side}: " + ", ".join(f"{k} {v}" for k, v in list(br.items())[:12]))
            L.append("")

    lat = data.get("latency", {})
    if lat:
        L.append(f"## (b) Idle latency `send_task()` → `get()`, {args.latency} sequential tasks (ms)\n")
        L.append("| percentile | tori-worker | Python Celery | tori/Python |")
        L.append("| --- | --- | --- | --- |")
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
            t = [x[key] for x in lat["tori"]]
            p = [x[key] for x in lat["python"]]
            L.append(f"| {key.removesuffix('_ms')} | {cell(t)} | {cell(p)} | {ratio(t, p)} |")
        split = (("p50_until_stored_ms", "p50 from `send_task()` to the worker's `date_done`"),
                 ("p50_after_stored_ms", "p50 from `date_done` to `get()` returning"),
                 ("p99_until_stored_ms", "p99 from `send_task()` to the worker's `date_done`"),
                 ("p99_after_stored_ms", "p99 from `date_done` to `get()` returning"))
        for key, label in split:
            t = [x[key] for x in lat["tori"] if x.get(key) is not None]
            p = [x[key] for x in lat["python"] if x.get(key) is not None]
            if t and p:
                L.append(f"| {label} | {cell(t)} | {cell(p)} | {ratio(t, p)} |")
        L.append("")
        L.append("The last four rows split each round trip at the moment the worker dates the "
                 "result it stores: before it, the client's `send_task()` and the worker's "
                 "fetch and run; after it, what the worker does until the result is "
                 "stored, Redis's PUBLISH and the client's handling of the message inside "
                 "`get()` (the same Celery client code for both sides).\n")

    mem_rows = []
    if d.get("results, events off"):
        runs = d["results, events off"]
        mem_rows.append(("idle (warm, after 4 no-ops)", [x["mem_idle"] for x in runs["tori"]],
                         [x["mem_idle"] for x in runs["python"]]))
        mem_rows.append((f"after draining {args.tasks:,} (results stored)",
                         [x["mem_after_drain"] for x in runs["tori"]],
                         [x["mem_after_drain"] for x in runs["python"]]))
    pdf = data.get("pdf", {})
    if pdf:
        mem_rows.append((f"{SETTLE_S:g} s after one pdf_ingestion (model in 1 process)",
                         [x["mem_after_one_pdf"] for x in pdf["tori"]],
                         [x["mem_after_one_pdf"] for x in pdf["python"]]))
        mem_rows.append((f"{SETTLE_S:g} s after the PDF run (model in both processes)",
                         [x["mem_model_loaded_all"] for x in pdf["tori"]],
                         [x["mem_model_loaded_all"] for x in pdf["python"]]))
    if mem_rows:
        L.append("## (c) Memory of the worker process tree (MiB; parent + 2 pool processes)\n")
        L.append("| state | metric | tori-worker | Python Celery | tori/Python |")
        L.append("| --- | --- | --- | --- | --- |")
        for label, t, p in mem_rows:
            for key in ("rss_mib", "pss_mib", "uss_mib"):
                tv = [x[key] for x in t]
                pv = [x[key] for x in p]
                L.append(f"| {label} | {key.split('_')[0].upper()} | {cell(tv)} | {cell(pv)} | {ratio(tv, pv)} |")
        L.append("\nPSS splits pages shared with any process, including other tori-worker or Python processes "
                 "running on the machine at the time; USS (private pages only) does not depend on them.\n")

    if pdf:
        any_run = (pdf["tori"] or pdf["python"])[0]
        L.append(f"## (d) PDF ingestion: {args.pdfs} born-digital PDFs of the corpus "
                 f"({any_run['pages']} pages, ~{any_run['chunks']} chunks), end to end\n")
        L.append("| metric | tori-worker | Python Celery + pipeline | tori/Python |")
        L.append("| --- | --- | --- | --- |")
        for key, label in (("pages_per_s", "pages/s"), ("docs_per_s", "docs/s"),
                           ("cpu_ms_per_page", "worker CPU ms/page"), ("seconds", "wall s")):
            t = [x[key] for x in pdf["tori"]]
            p = [x[key] for x in pdf["python"]]
            L.append(f"| {label} | {cell(t)} | {cell(p)} | {ratio(t, p)} |")
        for k in ("extract_ms", "clean_ms", "chunk_ms", "embed_ms", "summarize_ms", "total_ms"):
            t = [x["stage_ms"].get(k, 0.0) for x in pdf["tori"]]
            p = [x["stage_ms"].get(k, 0.0) for x in pdf["python"]]
            L.append(f"| stage {k.removesuffix('_ms')} (sum of task ms) | {cell(t)} | {cell(p)} | {ratio(t, p)} |")
        fails = sum(x["failed"] for s in SIDES for x in pdf[s])
        L.append(f"\nFailed documents (all runs, both sides): {fails}.\n")

    raw = data.get("raw_ort")
    if raw and pdf:
        L.append("## (e) Embedding stage vs raw onnxruntime (padded tokens/s, one intra-op thread)\n")
        L.append("| what | padded tokens/s | share of raw ORT |")
        L.append("| --- | --- | --- |")
        rv = [x["padded_tokens_per_s"] for x in raw]
        rm = med(rv)[0]
        L.append(f"| raw ORT `session.run` only, same documents' batches, per process of 2 ({raw[0]['batches']} batches, "
                 f"{raw[0]['padded_tokens']:,} padded tokens) | {cell(rv)} | 100 % |")
        for side in SIDES:
            v = [x["embed_padded_tokens_per_s"] for x in pdf[side]]
            if not v:
                continue
            L.append(f"| {side} worker, embed stage (2 processes running at once) | {cell(v)} | "
                     f"{100 * med(v)[0] / rm:.0f} % |")
        L.append("\nAll figures are per process: raw ORT runs as 2 processes at once (each timing only "
                 "`session.run` over every batch, after one warm-up batch), like the two pool processes; "
                 "the worker figure is the result's padded tokens / embed_ms (that stage's wall time in "
                 "the task, padding, pooling and batching included), while the other pool process may "
                 "be extracting.\n")

    L.extend(targets(data))
    L.append("Raw numbers of every run: `benches/results.json`.")
    return "\n".join(L) + "\n"


def targets(data) -> list[str]:
    """Issue #7's targets against this run's medians."""
    rows = []

    def m(vals):
        return med(vals)[0]

    d = data.get("drain", {})
    if d.get("no results, events off") and all(d["no results, events off"][s] for s in SIDES):
        runs = d["no results, events off"]
        r = m([x["tasks_per_s"] for x in runs["tori"]]) / m([x["tasks_per_s"] for x in runs["python"]])
        rows.append(("no-op drain ≥ 20× Python prefork (no results, events off)", f"{r:.1f}×", r >= 20))
    for store in ("results", "no results"):
        off, on = d.get(f"{store}, events off"), d.get(f"{store}, -E")
        if off and on and off["tori"] and on["tori"]:
            a, b = m([x["tasks_per_s"] for x in off["tori"]]), m([x["tasks_per_s"] for x in on["tori"]])
            drop = 100 * (a - b) / a
            rows.append((f"`-E` drop ≤ 10 % ({store})", f"{drop:.0f} % drop" if drop >= 0 else
                         f"{-drop:.0f} % gain", drop <= 10))
    lat = data.get("latency", {})
    if lat.get("tori"):
        p50 = m([x["p50_ms"] for x in lat["tori"]])
        rows.append(("p50 delay→get ≤ 2 ms", f"{p50:.2f} ms", p50 <= 2))
    pdf = data.get("pdf", {})
    if pdf.get("tori") and pdf.get("python"):
        t = m([x["mem_model_loaded_all"]["pss_mib"] for x in pdf["tori"]])
        p = m([x["mem_model_loaded_all"]["pss_mib"] for x in pdf["python"]])
        rows.append(("PSS with model loaded, c2 ≤ ½ Python", f"{t / p:.2f}×", t / p <= 0.5))
        r = m([x["pages_per_s"] for x in pdf["tori"]]) / m([x["pages_per_s"] for x in pdf["python"]])
        rows.append(("PDF ingestion ≥ 1.5× Python (pages/s)", f"{r:.2f}×", r >= 1.5))
        raw = data.get("raw_ort")
        if raw:
            e = m([x["embed_padded_tokens_per_s"] for x in pdf["tori"]]) / m([x["padded_tokens_per_s"] for x in raw])
            rows.append(("embed stage ≥ 90 % of raw ORT", f"{100 * e:.0f} %", e >= 0.9))
    if not rows:
        return []
    L = ["## Targets of issue #7 (this run's medians)\n", "| target | measured | met |", "| --- | --- | --- |"]
    L += [f"| {a} | {b} | {'yes' if ok else '**no**'} |" for a, b, ok in rows]
    L.append("")
    ceiling = []
    for case in ("results, events off", "no results, events off"):
        runs = d.get(case)
        if not runs or not all(runs[s] for s in SIDES):
            continue
        tot = {}
        for side in SIDES:
            w = m([x["cpu_us_per_task"] for x in runs[side]])
            r = m([x.get("redis_cpu_us_per_task") for x in runs[side]])
            if w is None or r is None:
                break
            tot[side] = w + r
        else:
            ceiling.append(f"{case}: tori {tot['tori']:,.0f} µs, Python {tot['python']:,.0f} µs, "
                           f"{tot['python'] / tot['tori']:.1f}×")
    if ceiling:
        L.append("Worker + Redis CPU per no-op task (what the drain ratio follows on cores the worker and "
                 "Redis share): " + "; ".join(ceiling) + ".\n")
    return L


SCALE_BEGIN, SCALE_END = "<!-- scale -->", "<!-- /scale -->"
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def render_scale(meta, sc, cmdline) -> str:
    L = [SCALE_BEGIN, "## Scale run (tori-worker only)\n",
         f"Command: `{cmdline}` ({meta['date']}, load average at start "
         f"{' '.join(meta['loadavg_at_start'])})\n",
         f"{sc['messages_in']:,} `pdf_ingestion` messages over {len(sc['files'])} small PDFs "
         f"(embedding {'on' if sc['embed'] else 'off'}), {sc['workers']} tori-worker processes x "
         f"`-c {sc['concurrency_each']}` on one Redis.\n",
         "| metric | value |", "| --- | --- |",
         f"| messages in / results out | {sc['messages_in']:,} / {sc['results_out']:,} |",
         f"| states | {', '.join(f'{k} {v:,}' for k, v in sc['states'].items())} |",
         f"| dead-lettered | {sc['dead_letter']} |",
         f"| jobs/s overall | {sc['jobs_per_s']:.1f} |",
         f"| jobs/s per window ({len(sc['rate_per_window'])} equal windows in order) | "
         f"{', '.join(str(x) for x in sc['rate_per_window'])} |",
         f"| Redis bytes per pending job | {sc['redis_bytes_per_pending']:.0f} |",
         f"| Redis bytes per finished job (result kept) | {sc['redis_bytes_per_finished']:.0f} |",
         "", SCALE_END]
    return "\n".join(L) + "\n"


def write_scale_section(path: Path, section: str, begin=SCALE_BEGIN, end=SCALE_END):
    """Puts `section` (delimited by begin/end markers) into the file,
    replacing an earlier one."""
    text = path.read_text() if path.exists() else "# Benchmarks: tori-worker vs Python Celery worker\n\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ------------------------------------------------------------------ main

def ensure_python_side():
    try:
        subprocess.run([str(PYTHON), "-c", "import pypdfium2, onnxruntime, tokenizers, numpy"],
                       env=py_env("redis://x"), check=True, capture_output=True)
        return
    except subprocess.CalledProcessError:
        pass
    wheels = sorted(WHEELS.glob("pypdfium2-*.whl"))
    if wheels:
        spec = [str(wheels[-1])]
    else:
        spec = ["pypdfium2"]
    log("installing pypdfium2 into", BENCH_PYLIB)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "--no-deps", "--target", str(BENCH_PYLIB), *spec],
                   check=True)
    subprocess.run([str(PYTHON), "-c", "import pypdfium2, onnxruntime, tokenizers, numpy"],
                   env=py_env("redis://x"), check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2000 tasks, 1 repeat, 10 PDFs, 300 latency samples")
    ap.add_argument("--tasks", type=int, default=None, help="no-op tasks per drain (default 20000)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per side and case (default 3)")
    ap.add_argument("--pdfs", type=int, default=None, help="PDFs for (d) (default 40)")
    ap.add_argument("--latency", type=int, default=None, help="sequential tasks for (b) (default 1000)")
    ap.add_argument("--only", default="a,b,d,e", help="cases to run, of a,b,d,e (c comes with a and d)")
    ap.add_argument("--out", default=str(BENCHES / "RESULTS.md"))
    ap.add_argument("--json-out", default=str(BENCHES / "results.json"))
    ap.add_argument("--provisional", action="store_true", help="mark RESULTS.md as provisional (loaded machine)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render --out from the raw numbers in --json-out, without running")
    ap.add_argument("--sides", default="tori,python", help="sides to run (for experiments)")
    ap.add_argument("--tori-pool", default="prefork", help="tori-worker pool (prefork|threads|solo)")
    ap.add_argument("--py-pool", default="prefork", help="Celery pool (prefork|solo|threads)")
    ap.add_argument("--prefetch-multiplier", type=int, default=None,
                    help="prefetch multiplier for both sides (default: each side's own, 4)")
    ap.add_argument("--tori-args", default="", help="extra tori-worker flags, space-separated (experiments)")
    ap.add_argument("--scale", type=int, default=0, help="run the scale check with this many messages instead")
    ap.add_argument("--scale-workers", type=int, default=3)
    ap.add_argument("--scale-concurrency", type=int, default=1)
    ap.add_argument("--scale-embed", action="store_true", help="embed in the scale run (slow)")
    ap.add_argument("--scale-timeout", type=float, default=7200)
    args = ap.parse_args()
    q = args.quick
    args.tasks = args.tasks or (2000 if q else 20000)
    args.repeat = args.repeat or (1 if q else 3)
    args.pdfs = args.pdfs or (10 if q else 40)
    args.latency = args.latency or (300 if q else 1000)
    only = set(args.only.split(","))
    POOLS["tori"], POOLS["python"] = args.tori_pool, args.py_pool
    TORI_EXTRA_ARGS[:] = args.tori_args.split()
    PREFETCH[:] = [args.prefetch_multiplier] if args.prefetch_multiplier else []
    cmdline = ".venv/bin/python benches/compare.py " + " ".join(sys.argv[1:])

    if args.render_only:
        saved = json.loads(Path(args.json_out).read_text())
        sargs = argparse.Namespace(**saved["args"])
        finish(sargs, saved["meta"], saved["data"], saved["command"], Path(args.out))
        return
    if not TORI_BIN.exists():
        sys.exit(f"{TORI_BIN} missing: run `cargo build --release` first")
    ensure_python_side()
    workdir = ROOT / "target" / "bench-compare"
    logdir = workdir / "logs"
    srv = RedisServer(workdir)
    meta = versions()
    meta["redis_server"] = srv.version
    msgs = Messages()
    data: dict = {}
    t_start = time.monotonic()
    try:
        if args.scale:
            data["scale"] = scale_run(args, srv, msgs, logdir)
            print(json.dumps(data["scale"], indent=1))
            out = Path(args.json_out).with_name("scale.json")
            out.write_text(json.dumps({"meta": meta, "command": cmdline, **data}, indent=1))
            write_scale_section(Path(args.out), render_scale(meta, data["scale"], cmdline))
            return
        pdfs = pick_pdfs(args.pdfs) if {"d", "e"} & only else []
        for rep in range(args.repeat):
            order = [x for x in (SIDES if rep % 2 == 0 else SIDES[::-1]) if x in args.sides.split(",")]
            if "a" in only:
                for store in (True, False):
                    for events in (False, True):
                        case = f"{'results' if store else 'no results'}, {'-E' if events else 'events off'}"
                        for side in order:
                            log(f"rep {rep + 1}: drain {args.tasks} [{case}] {side}")
                            res = drain_case(side, srv, msgs, args.tasks, store, events, logdir)
                            log(f"   {res['tasks_per_s']:.0f} tasks/s, {res['cpu_us_per_task']:.0f} µs CPU/task, "
                                f"{res['redis_cmds_per_task']:.1f} cmds/task")
                            data.setdefault("drain", {}).setdefault(case, {s: [] for s in SIDES})[side].append(res)
            if "b" in only:
                for side in order:
                    log(f"rep {rep + 1}: latency x{args.latency} {side}")
                    res = latency_case(side, srv, msgs, args.latency, logdir)
                    log(f"   p50 {res['p50_ms']:.2f} p95 {res['p95_ms']:.2f} p99 {res['p99_ms']:.2f} ms")
                    data.setdefault("latency", {s: [] for s in SIDES})[side].append(res)
            if "d" in only:
                for side in order:
                    log(f"rep {rep + 1}: pdf x{len(pdfs)} {side}")
                    res = pdf_case(side, srv, msgs, pdfs, logdir)
                    log(f"   {res['pages_per_s']:.2f} pages/s, {res['docs_per_s']:.2f} docs/s, failed {res['failed']}")
                    data.setdefault("pdf", {s: [] for s in SIDES})[side].append(res)
            if "e" in only:
                log(f"rep {rep + 1}: raw onnxruntime on the same batches")
                res = raw_ort_case(pdfs)
                log(f"   {res['padded_tokens_per_s']:.0f} padded tokens/s")
                data.setdefault("raw_ort", []).append(res)
    finally:
        srv.stop()
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if not args.scale:
            Path(args.json_out).write_text(json.dumps({"meta": meta, "command": cmdline, "args": vars(args),
                                                   "data": data}, indent=1))
    finish(args, meta, data, cmdline, Path(args.out))


def finish(args, meta, data, cmdline, out: Path):
    md = render(args, meta, data, cmdline)
    md += f"\nRun time: {meta['elapsed_s']:.0f} s.\n"
    print(md)
    old = out.read_text() if out.exists() else ""
    out.write_text(md)
    # hand-written notes and the last scale run survive a re-run
    for begin, end in ((NOTES_BEGIN, NOTES_END), (SCALE_BEGIN, SCALE_END)):
        if begin in old and end in old:
            write_scale_section(out, old[old.index(begin):old.index(end) + len(end)], begin, end)


if __name__ == "__main__":
    main()
