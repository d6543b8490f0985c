"""Production Redis (issue #26): TLS with a private CA, client certificates,
Sentinel failover, Unix sockets, and secrets kept out of every place a URL
is shown. Real servers only: redis-server with TLS and certificates made
here with ``openssl``, a real Sentinel set-up (master, replica, three
``redis-server --sentinel``), and the real Celery client on the other side.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tori_harness import (
    REDIS_SERVER_BIN,
    WorkerProcess,
    clean_env,
    free_port,
    make_client_app,
    http_get,
    tail_file,
    tori_bin,
    wait_for,
    wait_worker_ready,
)

# The worker's exit code for a configuration or TLS problem (sysexits'
# EX_CONFIG), documented in the README.
EX_CONFIG = 78


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _make_cert(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA with a server and a client certificate, and a second,
    unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return d


class Proc:
    """A server process started here, stopped at teardown."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def _tls_redis(procs, tmp: Path, pki: Path, auth_clients: str) -> int:
    port = free_port()
    data = tmp / f"redis-tls-{port}"
    data.mkdir()
    # 127.0.0.2 too: a loopback address the server certificate does not name.
    p = Proc([REDIS_SERVER_BIN, "--port", "0", "--tls-port", str(port),
              "--bind", "127.0.0.1", "127.0.0.2",
              "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
              "--tls-ca-cert-file", str(pki / "ca.pem"), "--tls-auth-clients", auth_clients,
              "--save", "", "--appendonly", "no", "--dir", str(data),
              "--logfile", str(data / "redis.log")], data / "redis.log")
    procs.append(p)
    ssl = dict(ssl_cert_reqs="required", ssl_ca_certs=str(pki / "ca.pem"),
               ssl_certfile=str(pki / "client.pem"), ssl_keyfile=str(pki / "client.key"))

    def ping():
        try:
            return redis.Redis(host="127.0.0.1", port=port, ssl=True, socket_timeout=1,
                               **ssl).ping()
        except redis.RedisError:
            return False
    wait_for(ping, 10, message=lambda: tail_file(data / "redis.log", 20))
    return port


def _start_worker(tmp: Path, name: str, *args: str, env: dict | None = None) -> WorkerProcess:
    log = tmp / f"{name}.log"
    return WorkerProcess([tori_bin(), "--hostname", f"{name}@tests", "--concurrency", "2",
                          *args], log, name, env=clean_env(env))


def _client_app(broker: str, **conf):
    return make_client_app(broker, broker, name="tori_prod_redis", **conf)


def _round_trip(app, n: int = 5, timeout: float = 30) -> None:
    results = [app.send_task("tori.echo", args=[i]) for i in range(n)]
    assert [r.get(timeout=timeout) for r in results] == [{"args": [i], "kwargs": {}} for i in range(n)]


def _worker_output(worker: WorkerProcess) -> str:
    """What the worker wrote (the harness's own first line, the command it
    ran, holds the URL as given)."""
    return "\n".join(line for line in worker.log_text().splitlines()
                     if not line.startswith("$ "))


def _check_no_secret(texts: list[str], *secrets: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} shown in:\n{text[-3000:]}"


def test_tls_with_a_private_ca_round_trips(pki, procs, tmp_path):
    port = _tls_redis(procs, tmp_path, pki, auth_clients="no")
    ca = pki / "ca.pem"
    # The URL form Celery's result backend documents.
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    worker = _start_worker(tmp_path, "tls", "--broker", url)
    try:
        app = _client_app(f"rediss://127.0.0.1:{port}/0",
                          broker_use_ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)},
                          redis_backend_use_ssl={"ssl_cert_reqs": "required",
                                                 "ssl_ca_certs": str(ca)})
        wait_worker_ready(worker, app, timeout=30)
        _round_trip(app)
        # The hostname is checked: 127.0.0.1 is in the certificate.
        assert "TLS with Redis failed" not in worker.log_text()
    finally:
        assert worker.terminate() == 0, worker.describe()

    # The same server through other settings a Celery user has: the CA in
    # SSL_CERT_FILE; an address the certificate does not name, refused
    # unless ssl_check_hostname=false; ssl_cert_reqs=none.
    other_name = f"rediss://127.0.0.2:{port}/0?ssl_ca_certs={ca}"
    for name, worker_url, env in [
        ("cert-file", f"rediss://127.0.0.1:{port}/0", {"SSL_CERT_FILE": str(ca)}),
        ("no-hostname-check", other_name + "&ssl_check_hostname=false", None),
        ("cert-none", f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", None),
    ]:
        worker = _start_worker(tmp_path, name, "--broker", worker_url, env=env)
        try:
            wait_worker_ready(worker, app, timeout=30, require_own_log=True)
        finally:
            assert worker.terminate() == 0, worker.describe()
    w = _start_worker(tmp_path, "wrong-name", "--broker", other_name)
    assert w.proc.wait(15) == EX_CONFIG, w.describe()
    assert "ssl_check_hostname" in w.log_text(), w.describe()


def test_tls_client_certificates_and_wrong_ca_fail_fast(pki, procs, tmp_path):
    port = _tls_redis(procs, tmp_path, pki, auth_clients="yes")
    ca, cert, key = (str(pki / f) for f in ("ca.pem", "client.pem", "client.key"))
    use_ssl = {"ssl_cert_reqs": "required", "ssl_ca_certs": ca, "ssl_certfile": cert,
               "ssl_keyfile": key}
    url = f"rediss://127.0.0.1:{port}/0"

    # Celery's broker_use_ssl as a flag, client certificate included.
    worker = _start_worker(tmp_path, "mtls", "--broker", url,
                           "--broker-use-ssl", json.dumps(use_ssl))
    try:
        app = _client_app(url, broker_use_ssl=use_ssl, redis_backend_use_ssl=use_ssl)
        wait_worker_ready(worker, app, timeout=30)
        _round_trip(app)
    finally:
        assert worker.terminate() == 0, worker.describe()

    # Each misconfiguration ends start-up at once, naming what to change.
    cases = {
        "wrong-ca": (f"ssl_ca_certs={pki / 'other-ca.pem'}&ssl_certfile={cert}&ssl_keyfile={key}",
                     "ssl_ca_certs"),
        "no-client-cert": (f"ssl_ca_certs={ca}", "ssl_certfile"),
        "missing-ca-file": (f"ssl_ca_certs={tmp_path / 'nope.pem'}", "ssl_ca_certs"),
    }
    for name, (query, hint) in cases.items():
        started = time.monotonic()
        w = _start_worker(tmp_path, name, "--broker", f"{url}?{query}")
        try:
            rc = w.proc.wait(15)
        except subprocess.TimeoutExpired:
            w.kill()
            pytest.fail(f"{name}: still running after 15 s\n{w.describe()}")
        took = time.monotonic() - started
        text = w.log_text()
        print(f"{name}: exit {rc} after {took:.2f}s")
        assert rc == EX_CONFIG, f"{name}: exit {rc}\n{text}"
        assert hint in text, f"{name}: the error does not name {hint}:\n{text}"
        assert "Redis unavailable" not in text, f"{name}: retried as an outage:\n{text}"


def _sentinel_conf(path: Path, port: int, master_port: int, data: Path) -> None:
    path.write_text("\n".join([
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {data}",
        f"logfile {data / f'sentinel-{port}.log'}",
        "requirepass spw-secret",
        "sentinel sentinel-pass spw-secret",
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 2",
        "sentinel auth-pass mymaster mpw-secret",
        "sentinel down-after-milliseconds mymaster 1000",
        "sentinel failover-timeout mymaster 5000",
        "sentinel parallel-syncs mymaster 1",
        "",
    ]))


def _plain_redis(procs, tmp: Path, *extra: str) -> int:
    port = free_port()
    data = tmp / f"redis-{port}"
    data.mkdir()
    procs.append(Proc([REDIS_SERVER_BIN, "--port", str(port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--dir", str(data),
                       "--logfile", str(data / "redis.log"), *extra], data / "redis.log"))
    return port


def test_sentinel_failover_is_followed(procs, tmp_path):
    auth = ("--requirepass", "mpw-secret", "--masterauth", "mpw-secret")
    m_port = _plain_redis(procs, tmp_path, *auth)
    master_proc = procs[-1]
    r_port = _plain_redis(procs, tmp_path, *auth, "--replicaof", "127.0.0.1", str(m_port))
    master = redis.Redis(port=m_port, password="mpw-secret", socket_timeout=2)
    wait_for(lambda: _ping(master), 10)
    wait_for(lambda: master.info("replication").get("connected_slaves") == 1, 20,
             message="replica never connected")
    s_ports = [free_port() for _ in range(3)]
    for sp in s_ports:
        conf = tmp_path / f"sentinel-{sp}.conf"
        _sentinel_conf(conf, sp, m_port, tmp_path)
        procs.append(Proc([REDIS_SERVER_BIN, str(conf), "--sentinel"],
                          tmp_path / f"sentinel-{sp}.log"))
    sentinel0 = redis.Redis(port=s_ports[0], password="spw-secret", socket_timeout=2,
                            decode_responses=True)
    # Failover needs the sentinels to know each other and the replica.
    wait_for(lambda: _sentinel_ready(sentinel0), 30, message="sentinels never formed")

    url = ";".join(f"sentinel://:mpw-secret@127.0.0.1:{p}/0" for p in s_ports)
    options = {"master_name": "mymaster", "sentinel_kwargs": {"password": "spw-secret"}}
    worker = _start_worker(tmp_path, "sentinel", "--broker", url, "--acks-late",
                           "--broker-transport-options", json.dumps(options))
    app = make_client_app(url, url, name="tori_sentinel",
                          broker_transport_options=options,
                          result_backend_transport_options=options)
    try:
        wait_worker_ready(worker, app, timeout=30)
        _round_trip(app)

        # Tasks in flight at the failover (late ack): Redis kept them, so
        # they must all succeed.
        in_flight = [app.send_task("tori.sleep", args=[1.5]) for _ in range(4)]
        wait_for(lambda: master.hlen("unacked") >= 2, 15, message="no task started")
        master.execute_command("WAIT", 1, 2000)
        killed_at = time.monotonic()
        master_proc.kill()
        print(f"killed master :{m_port}; replica :{r_port} should take over")

        wait_for(lambda: _master_port(sentinel0) == r_port, 30,
                 message="sentinels never promoted the replica")
        promoted = time.monotonic() - killed_at
        # The Python producer (redis-py) takes a master only once a sentinel
        # no longer flags it down: wait for that, or send_task fails with
        # "No master found" (the client's behaviour, not the worker's).
        sentinels = [redis.Redis(port=p, password="spw-secret", socket_timeout=2,
                                 decode_responses=True) for p in s_ports]
        wait_for(lambda: all(_settled(s, r_port) for s in sentinels), 30,
                 message="sentinels never agreed on the new master")
        after = [app.send_task("tori.echo", args=[f"after-{i}"]) for i in range(10)]
        got = [r.get(timeout=60) for r in after]
        resumed = time.monotonic() - killed_at
        assert got == [{"args": [f"after-{i}"], "kwargs": {}} for i in range(10)]
        assert [r.get(timeout=60) for r in in_flight] == [1.5] * 4
        print(f"failover: promoted after {promoted:.1f}s; worker resumed (10 tasks sent "
              f"after the failover done) {resumed:.1f}s after the master was killed")
        assert worker.alive(), worker.describe()

        # Secrets are shown nowhere: logs, inspect conf/stats/report.
        outputs = [_worker_output(worker)]
        inspect = make_client_app(url, url, name="tori_sentinel_inspect",
                                  broker_transport_options=options,
                                  result_backend_transport_options=options).control.inspect(
            destination=["sentinel@tests"], timeout=5)
        # Remote control follows too (its subscription reconnects with
        # backoff, so give it a few seconds).
        wait_for(lambda: inspect.ping(), 20, interval=0.5,
                 message="remote control never came back after the failover")
        print(f"remote control answering {time.monotonic() - killed_at:.1f}s after the kill")
        for reply in (inspect.conf(), inspect.stats(), inspect.report()):
            assert reply, "no inspect reply"
            outputs.append(json.dumps(reply))
        conf = inspect.conf()["sentinel@tests"]
        assert conf["broker_transport_options"]["master_name"] == "mymaster"
        _check_no_secret(outputs, "mpw-secret", "spw-secret")
    finally:
        worker.terminate()


def _ping(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


def _sentinel_ready(s) -> bool:
    try:
        return (len(s.execute_command("SENTINEL", "sentinels", "mymaster")) >= 2
                and len(s.execute_command("SENTINEL", "replicas", "mymaster")) >= 1)
    except redis.RedisError:
        return False


def _settled(s, port: int) -> bool:
    try:
        state = s.execute_command("SENTINEL", "master", "mymaster")
    except redis.RedisError:
        return False
    if isinstance(state, list):
        state = dict(zip(state[::2], state[1::2]))
    return str(state.get("port")) == str(port) and state.get("flags") == "master"


def _master_port(s) -> int:
    try:
        return int(s.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")[1])
    except (redis.RedisError, TypeError, IndexError):
        return -1


def test_unix_socket_forms_and_redaction(procs, tmp_path):
    sock = tmp_path / "r.sock"
    data = tmp_path / "redis-sock"
    data.mkdir()
    procs.append(Proc([REDIS_SERVER_BIN, "--port", "0", "--unixsocket", str(sock),
                       "--unixsocketperm", "700", "--requirepass", "pw-secret",
                       "--save", "", "--appendonly", "no", "--dir", str(data),
                       "--logfile", str(data / "redis.log")], data / "redis.log"))
    direct = redis.Redis(unix_socket_path=str(sock), password="pw-secret", socket_timeout=2)
    wait_for(lambda: _ping(direct), 10)
    # The client side: kombu's socket form, database 2.
    client_url = f"redis+socket://:pw-secret@{sock}?virtual_host=2"
    backend_url = f"redis+socket://:pw-secret@{sock}?virtual_host=2"
    app = make_client_app(client_url, backend_url, name="tori_socket")
    for n, url in enumerate([
        f"unix://{sock}?db=2&pass=pw-secret",
        f"redis+socket://:pw-secret@{sock}?virtual_host=2",
        f"socket://:pw-secret@{sock}?virtual_host=/2",
    ]):
        metrics = f"127.0.0.1:{free_port()}"
        worker = _start_worker(tmp_path, f"sock{n}", "--broker", url, "--metrics-addr", metrics)
        try:
            wait_worker_ready(worker, app, timeout=30)
            _round_trip(app, n=2)
            inspect = app.control.inspect(destination=[f"sock{n}@tests"], timeout=5)
            status, body = http_get(f"http://{metrics}/metrics")
            assert status == 200, body
            outputs = [_worker_output(worker), body]
            for reply in (inspect.conf(), inspect.stats(), inspect.report()):
                assert reply, f"{url}: no inspect reply"
                outputs.append(json.dumps(reply))
            conf = inspect.conf()[f"sock{n}@tests"]
            assert str(sock) in conf["broker_url"], conf["broker_url"]
            _check_no_secret(outputs, "pw-secret")
        finally:
            assert worker.terminate() == 0, worker.describe()
