"""Milvus over TLS with a private CA: two real Milvus 2.3.5 servers started by `scripts/milvus --tls-dir`,
one with server TLS (tlsMode 1) and one with mutual TLS (tlsMode 2), certificates from `scripts/milvus certs`.

- the worker runs end to end over TLS: its client, the writer process's and the visibility probe's;
- mutual TLS with a client certificate works, store and writer process;
- each misconfiguration (another CA, the system's roots, another name, no client certificate, a file that
  is missing or not PEM) is a MilvusConfigError naming the cause within seconds, and the worker exits 2
  with one `milvus_config_error` line and no traceback;
- the settings refuse TLS settings without an https:// uri, and half a client pair."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import _free_port_block
from tests.test_worker_e2e import settings_for, topics  # noqa: F401 - fixture
from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.test_milvus_sink import DIM, MV, _enc, _note
from tests.worker_support import AppThread, note_doc, produce_notes, tiny_model_dir, wait_committed_to_end
from worker.config import MilvusSettings
from worker.sinks.milvus import MilvusConfigError, MilvusSink, MilvusStore, MilvusTLS, MilvusUnreachable

REPO = Path(__file__).resolve().parent.parent
MILVUS = str(REPO / "scripts" / "milvus")

pytestmark = pytest.mark.timeout(300)


class TLSServers:
    def __init__(self, root: Path) -> None:
        self.certs = root / "certs"
        r = subprocess.run([MILVUS, "certs", str(self.certs)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.dirs: dict[int, list[str]] = {}
        self.uris: dict[int, str] = {}
        # One after the other: two wrappers starting at once race for the coordinators' default ports.
        for mode in (1, 2):
            args = ["--dir", str(root / f"mode{mode}"), "--port", str(_free_port_block(2)),
                    "--etcd-port", str(_free_port_block(2)), "--tls-dir", str(self.certs), "--tls-mode", str(mode)]
            r = subprocess.run([MILVUS, "start", *args], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                self.stop()
                pytest.fail(f"scripts/milvus start {' '.join(args)} failed:\n{r.stderr[-4000:]}")
            self.dirs[mode] = args
            self.uris[mode] = r.stdout.strip().splitlines()[-1]

    def cert(self, name: str) -> str:
        return str(self.certs / name)

    def tls(self, **kw) -> MilvusTLS:
        return MilvusTLS(**{"ca_path": self.cert("ca.pem"), **kw})

    def mutual(self) -> MilvusTLS:
        return self.tls(client_cert_path=self.cert("client.pem"), client_key_path=self.cert("client.key"))

    def stop(self) -> None:
        for args in self.dirs.values():
            subprocess.run([MILVUS, "stop", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory, kafka_bootstrap):
    # The broker first (scripts/milvus now starts each server's health-port search at its gRPC port + 100,
    # away from the broker's 9092, where the wrapper's own 9091 walked up to; kept as a second guard).
    servers = TLSServers(tmp_path_factory.mktemp("milvus-tls"))
    yield servers
    servers.stop()


def _drop(store: MilvusStore, alias: str) -> None:
    phys = store.resolve(alias)
    with store.locked() as c:
        if alias in c.list_aliases().get("aliases", []):
            c.drop_alias(alias)
        if phys:
            c.drop_collection(phys)


def test_the_script_serves_tls_only(tls_servers):
    """What the servers are: https URIs; a plaintext client is not answered."""
    assert all(u.startswith("https://127.0.0.1:") for u in tls_servers.uris.values())
    with pytest.raises(MilvusUnreachable, match="no Milvus answered at http://"):
        MilvusStore(tls_servers.uris[1].replace("https://", "http://"), alias="plain")
    for args, says in ((["--tls-dir", "/nonexistent"], "no TLS directory /nonexistent"),
                       (["--tls-mode", "2"], "--tls-mode needs --tls-dir"),
                       (["--tls-dir", str(tls_servers.certs), "--tls-mode", "3"], "--tls-mode is 1 or 2")):
        r = subprocess.run([MILVUS, "status", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)


def test_worker_over_tls_with_a_private_ca(kafka_bootstrap, topics, tls_servers, encoder):
    """The worker's settings (NOTELLM_MILVUS__TLS_CA_PATH and _SERVER_NAME) reach every client it makes, the
    writer process's included: notes land once each, `similar` answers, the visibility probe reads them.
    (The in-process client over TLS: the reader here, `notellm similar` below.)"""
    write_process = True
    alias = f"notes_{uuid.uuid4().hex[:8]}"
    s = settings_for(kafka_bootstrap, topics, tls_servers.uris[1], model={"generate": "none"},
                     milvus={"collection": alias, "read_consistency": "Bounded", "write_process": write_process,
                             "tls_ca_path": tls_servers.cert("ca.pem"), "tls_server_name": "milvus.test"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(30)])
    from worker.app import WorkerApp

    app = WorkerApp(s, encoder=encoder)
    t = AppThread(app)
    reader = MilvusStore(tls_servers.uris[1], alias=alias, tls=tls_servers.tls())
    try:
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=120, alive=t.alive)
        assert app.store.tls == MilvusTLS(tls_servers.cert("ca.pem"), "milvus.test")
        assert (app.store.writer is not None) == write_process
        assert app.probe is not None and app.probe.store.tls == app.store.tls
        got = reader.all_ids()
        assert len(got) == len(set(got)) and set(got) == set(ids)
        assert len(reader.similar(ids[0], 3)["neighbours"]) == 3
        deadline = time.monotonic() + 30
        while app.metrics.visible._sum.get() <= 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert app.metrics.visible._sum.get() > 0  # the probe read a note over its own TLS client
        assert t.stop() == 0
    finally:
        if t.alive():
            t.stop()
        _drop(reader, alias)
        reader.close()


def test_mutual_tls_store_and_writer(tls_servers):
    """tlsMode 2: with this client's certificate the store writes through its writer process and reads."""
    alias = f"mtls_{uuid.uuid4().hex[:8]}"
    store = MilvusStore(tls_servers.uris[2], alias=alias, tls=tls_servers.mutual(), write_process=True)
    try:
        sink = MilvusSink(store, store.ensure(DIM, MV))
        sink.add(_enc([_note(f"n{i}") for i in range(4)]))
        assert sink.flush() == []
        assert sorted(store.all_ids()) == ["n0", "n1", "n2", "n3"]
        assert store.similar("n0", 2)["note"]["note_id"] == "n0"
        # `notellm similar` reads the same settings from the environment
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTELLM_MILVUS__")}
        env.update({"NOTELLM_MILVUS__TLS_CA_PATH": tls_servers.cert("ca.pem"),
                    "NOTELLM_MILVUS__TLS_CLIENT_CERT_PATH": tls_servers.cert("client.pem"),
                    "NOTELLM_MILVUS__TLS_CLIENT_KEY_PATH": tls_servers.cert("client.key")})
        p = subprocess.run([sys.executable, "-m", "notellm.cli", "similar", "n1", "-k", "2", "--json", "--milvus-uri",
                            tls_servers.uris[2], "--collection", alias], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        ans = json.loads(p.stdout)
        assert ans["note"]["note_id"] == "n1" and len(ans["neighbours"]) == 2
    finally:
        _drop(store, alias)
        store.close()


CASES = {
    # name: (server mode, TLS settings (from the test certificates), what the error says)
    "another CA": (1, {"ca_path": "client.pem"}, "the server's certificate was not accepted: unable to get local issuer"),
    "the system's roots": (1, None, "checked against the system's CAs"),
    "another name": (1, {"ca_path": "ca.pem", "server_name": "other.test"}, "not valid for 'other.test'"),
    "no client certificate": (2, {"ca_path": "ca.pem"}, "the server asks for a client certificate"),
    "a server certificate as the client's": (2, {"ca_path": "ca.pem", "client_cert_path": "server.pem",
                                                 "client_key_path": "server.key"},
                                             "the server refused this client's certificate"),
    "a missing CA file": (1, {"ca_path": "nope.pem"}, "milvus.tls_ca_path: cannot read"),
    "a key as the CA": (1, {"ca_path": "ca.key"}, "holds no PEM certificate"),
    "a certificate as the key": (2, {"ca_path": "ca.pem", "client_cert_path": "client.pem",
                                     "client_key_path": "client.pem"}, "milvus.tls_client_key_path"),
    "another certificate's key": (2, {"ca_path": "ca.pem", "client_cert_path": "client.pem",
                                      "client_key_path": "server.key"}, "do not load together"),
}


# pymilvus 3.0 shares one channel per process for every client of one address and token, whatever their TLS
# settings (ConnectionConfig.key): after a client of a server has connected, another with other TLS settings
# gets its channel. So the cases run in a process of their own, where none of them connects.
_CASES_RUNNER = """
import json, sys, time
from worker.sinks.milvus import MilvusConfigError, MilvusStore, MilvusTLS
out = {}
for name, (uri, tls) in json.loads(sys.argv[1]).items():
    t0 = time.monotonic()
    try:
        MilvusStore(uri, alias="never", tls=None if tls is None else MilvusTLS(**tls)).close()
        out[name] = ["connected", "", 0.0]
    except MilvusConfigError as e:
        out[name] = ["MilvusConfigError", str(e), time.monotonic() - t0]
    except Exception as e:
        out[name] = [type(e).__name__, str(e), time.monotonic() - t0]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def misconfigured(tls_servers) -> dict:
    cases = {name: (tls_servers.uris[mode], None if files is None else
                    {k: v if k == "server_name" else tls_servers.cert(v) for k, v in files.items()})
             for name, (mode, files, _says) in CASES.items()}
    r = subprocess.run([sys.executable, "-c", _CASES_RUNNER, json.dumps(cases)], cwd=REPO, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_a_tls_misconfiguration_is_named_within_seconds(misconfigured, case):
    kind, message, seconds = misconfigured[case]
    assert kind == "MilvusConfigError", (kind, message)
    assert CASES[case][2] in message, message
    assert seconds < 15


def test_an_unreachable_tls_server_is_not_a_config_error(tls_servers):
    """Nothing listens: MilvusUnreachable (the worker waits for it), not a TLS diagnosis."""
    port = _free_port_block(1)
    with pytest.raises(MilvusUnreachable):
        MilvusStore(f"https://127.0.0.1:{port}", alias="never", tls=tls_servers.tls())


def test_the_worker_exits_2_with_one_line_naming_the_cause(kafka_bootstrap, tls_servers):
    """`notellm worker run` with a CA that did not sign the server's certificate: exit 2, one
    milvus_config_error line with the reason, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTELLM_KAFKA__", "NOTELLM_MILVUS__"))}
    env.update({"NOTELLM_LOG__FORMAT": "json", "NOTELLM_MILVUS__TLS_CA_PATH": tls_servers.cert("client.pem")})
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", kafka_bootstrap,
           "--topic", f"tls-{uuid.uuid4().hex[:8]}", "--model", str(tiny_model_dir()),
           "--milvus-uri", tls_servers.uris[1], "--http-port", "0", "--threads", "1", "--max-batch-notes", "8"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [json.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
    errors = [e for e in lines if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["milvus_config_error"], errors
    assert "not accepted" in errors[0]["error"] and "client.pem" in errors[0]["error"]
    assert "Traceback" not in p.stderr + p.stdout
    assert all(x.startswith("{") for x in p.stderr.splitlines()), p.stderr  # gRPC's own lines kept out of the logs


@pytest.mark.parametrize("given, says", [
    ({"uri": "http://m:19530", "tls_ca_path": "/ca.pem"}, "tls_ca_path is set but milvus.uri is not https://"),
    ({"uri": "notes.db", "tls_server_name": "m"}, "tls_server_name is set but milvus.uri is not https://"),
    ({"uri": "https://m:19530", "tls_ca_path": "/ca.pem", "tls_client_cert_path": "/c.pem"}, "come together"),
    ({"uri": "https://m:19530", "tls_client_cert_path": "/c.pem", "tls_client_key_path": "/c.key"},
     "needs milvus.tls_ca_path"),
])
def test_settings_refuse_tls_that_cannot_work(given, says):
    with pytest.raises(ValidationError, match=says.replace(".", r"\.")):
        MilvusSettings(**given)


def test_settings_map_to_pymilvus_names():
    """One-way: the CA is pymilvus's server_pem_path; mutual: its ca_pem_path beside the client pair
    (pymilvus ignores the pair when server_pem_path is given)."""
    one = MilvusTLS.from_settings(MilvusSettings(uri="https://m:19530", tls_ca_path="/ca.pem", tls_server_name="n"))
    assert one.client_kwargs() == {"server_pem_path": "/ca.pem", "server_name": "n"}
    two = MilvusTLS.from_settings(MilvusSettings(uri="https://m:19530", tls_ca_path="/ca.pem",
                                                 tls_client_cert_path="/c.pem", tls_client_key_path="/c.key"))
    assert two.client_kwargs() == {"ca_pem_path": "/ca.pem", "client_pem_path": "/c.pem", "client_key_path": "/c.key"}
    assert MilvusTLS.from_settings(MilvusSettings(uri="https://m:19530")) is None


def test_uris_are_shown_without_credentials():
    from worker.sinks.milvus import shown

    assert shown("https://root:Milvus@milvus.example:19530") == "https://***@milvus.example:19530"
    assert shown("http://milvus.example:19530") == "http://milvus.example:19530"
    assert shown(".local/milvus/notes.db") == ".local/milvus/notes.db"
