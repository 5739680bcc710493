"""The worker against a secured broker (issue 11): a real Kafka with a SASL_SSL listener (SCRAM-SHA-512 over TLS,
`scripts/kafka start --secure`, its own directory and ports, started once for this module and stopped after).

- the worker (`notellm worker run`, a process) consumes notes and produces tags over SASL_SSL only, and the rows
  reach Milvus (milvus-lite);
- a wrong password and a broker certificate from a CA the worker does not trust are configuration errors: one
  JSON error line naming the cause, exit 2 within seconds (librdkafka alone would retry forever);
- the secrets (the SASL password, a wrong one, the Milvus token, a secret in `kafka.extra`) appear nowhere: not
  in the processes' logs, not on /metrics or /readyz, not in the failing runs' output, not in the settings'
  repr/str/dumps, not in what `scripts/kafka start` and `scripts/kafka client` print.
milvus-lite takes a token and ignores it (as a Milvus server without authentication does), so the token
travels the whole client path here without a server to check it.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.conftest import _free_port_block, run_kafka_script
from tests.worker_support import REPO, free_port, note_doc, tiny_model_dir

pytestmark = pytest.mark.timeout(300)

N_NOTES = 24
MILVUS_TOKEN = f"milvus-token-{uuid.uuid4().hex}"
EXTRA_SECRET = f"extra-secret-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-password-{uuid.uuid4().hex}"
EXTRA = json.dumps({"sasl.oauthbearer.client.secret": EXTRA_SECRET, "socket.keepalive.enable": "true"})


class _Quiet:
    """A `logger` for the test's own Kafka clients (their librdkafka lines stay off stderr)."""

    def log(self, *_a) -> None:
        pass


@dataclass(frozen=True)
class SecureKafka:
    dir: Path
    plain: str        # the PLAINTEXT listener (only to show it is not what the worker uses)
    bootstrap: str    # the SASL_SSL listener
    ca: str
    user: str
    password: str
    start_output: str
    client_output: str

    def conf(self, **over) -> dict:
        """librdkafka settings of a SASL_SSL client of this broker (the test's own clients)."""
        return {"bootstrap.servers": self.bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": self.user, "sasl.password": self.password, "ssl.ca.location": self.ca,
                "logger": _Quiet(), **over}


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory):
    d = tmp_path_factory.mktemp("kafka-secure")
    port = _free_port_block(3)  # client, controller, SASL_SSL (N, N+1, N+2)
    started = run_kafka_script("start", "--secure", "--dir", str(d), "--port", str(port))
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start a secure broker:\n{started.stderr[-4000:]}")
        client = run_kafka_script("client", "--dir", str(d))
        assert client.returncode == 0, client.stderr
        info = dict(line.split("=", 1) for line in client.stdout.splitlines())
        yield SecureKafka(dir=d, plain=started.stdout.strip().splitlines()[-1], bootstrap=info["bootstrap_servers"],
                          ca=info["ssl_ca_location"], user=info["sasl_username"],
                          password=Path(info["sasl_password_file"]).read_text().strip(),
                          start_output=started.stdout + started.stderr, client_output=client.stdout + client.stderr)
    finally:
        stopped = run_kafka_script("stop", "--dir", str(d))
        assert stopped.returncode == 0, stopped.stderr
        assert run_kafka_script("status", "--dir", str(d)).returncode == 3  # nothing of it left running


def _topics(sk: SecureKafka) -> dict[str, str]:
    admin = AdminClient(sk.conf())
    names = {"notes": f"sec-notes-{uuid.uuid4().hex[:8]}", "tags": f"sec-tags-{uuid.uuid4().hex[:8]}",
             "dlq": f"sec-dlq-{uuid.uuid4().hex[:8]}"}
    futures = admin.create_topics([NewTopic(n, num_partitions=3 if k != "dlq" else 1, replication_factor=1)
                                   for k, n in names.items()])
    for f in futures.values():
        f.result(timeout=30)
    return names


def _produce(sk: SecureKafka, topic: str, docs: list[dict]) -> list[str]:
    p = Producer(sk.conf(**{"enable.idempotence": True, "acks": "all"}))
    for d in docs:
        p.produce(topic, key=d["note_id"].encode(), value=json.dumps(d).encode())
    assert p.flush(30) == 0
    return [d["note_id"] for d in docs]


_COORDINATOR_MOVING = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                       KafkaError.COORDINATOR_NOT_AVAILABLE)


def _consumer(sk: SecureKafka, group: str) -> Consumer:
    return Consumer(sk.conf(**{"group.id": group, "enable.auto.commit": False}))


def _committed_to_end(sk: SecureKafka, group: str, topic: str) -> bool:
    c = _consumer(sk, f"probe-{uuid.uuid4().hex[:6]}")
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()
    g = _consumer(sk, group)
    try:
        got = {tp.partition: tp.offset for tp in g.committed([TopicPartition(topic, p) for p in parts], timeout=10)}
    except KafkaException as e:  # a fresh broker's group coordinator still loading (NOT_COORDINATOR): not yet
        err = e.args[0] if e.args else None
        if not (isinstance(err, KafkaError) and (err.retriable() or err.code() in _COORDINATOR_MOVING)):
            raise
        return False
    finally:
        g.close()
    return sum(ends.values()) > 0 and all(e == 0 or got.get(p, -1) >= e for p, e in ends.items())


def _read_all(sk: SecureKafka, topic: str, want: int, timeout: float = 30.0) -> list:
    c = _consumer(sk, f"read-{uuid.uuid4().hex[:6]}")
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            out += [m for m in c.consume(100, timeout=0.5) if m.error() is None]
    finally:
        c.close()
    return out


def _env(sk: SecureKafka, *, password: str, ca: str) -> dict:
    """The worker's environment: SASL_SSL settings only (nothing inherited from the caller's NOTELLM_KAFKA__ /
    NOTELLM_MILVUS__), the Milvus token, a secret in kafka.extra, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTELLM_KAFKA__", "NOTELLM_MILVUS__"))}
    env.update({
        "NOTELLM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "NOTELLM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "NOTELLM_KAFKA__SASL_USERNAME": sk.user, "NOTELLM_KAFKA__SASL_PASSWORD": password,
        "NOTELLM_KAFKA__SSL_CA_LOCATION": ca, "NOTELLM_KAFKA__EXTRA": EXTRA,
        "NOTELLM_KAFKA__SESSION_TIMEOUT_MS": "6000", "NOTELLM_MILVUS__TOKEN": MILVUS_TOKEN,
        "NOTELLM_LOG__FORMAT": "json", "NOTELLM_MODEL__ISOLATION": "process",
    })
    return env


def _worker(sk: SecureKafka, topics: dict, milvus_uri: str, *, password: str, ca: str, port: int = 0,
            group: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", sk.bootstrap,
           "--topic", topics["notes"], "--tags-topic", topics["tags"], "--dlq-topic", topics["dlq"],
           "--group", group or f"g-{uuid.uuid4().hex[:8]}", "--model", str(tiny_model_dir()),
           "--milvus-uri", milvus_uri, "--http-port", str(port), "--threads", "1", "--max-batch-notes", "16"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(sk, password=password, ca=ca), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _json_lines(err: str) -> list[dict]:
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line JSON: nothing raw
    return lines


@dataclass
class Run:
    rc: int
    took_s: float
    out: str
    err: str
    pages: dict[str, str]

    @property
    def logs(self) -> list[dict]:
        return _json_lines(self.err)

    def text(self) -> str:
        return "\n".join([self.out, self.err, *self.pages.values()])


@pytest.fixture(scope="module")
def happy_run(secure_kafka, tmp_path_factory):
    """One worker over SASL_SSL: 24 notes in, committed to the end; /readyz and /metrics read; SIGTERM."""
    sk = secure_kafka
    topics = _topics(sk)
    ids = _produce(sk, topics["notes"], [note_doc(i, prefix="sec") for i in range(N_NOTES)])
    milvus_uri = str(tmp_path_factory.mktemp("milvus-secure") / "notes.db")
    port, group = free_port(), f"g-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    w = _worker(sk, topics, milvus_uri, password=sk.password, ca=sk.ca, port=port, group=group)
    try:
        deadline = time.monotonic() + 120
        while not _committed_to_end(sk, group, topics["notes"]):
            assert w.poll() is None, w.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the worker did not commit every note over SASL_SSL in 120 s"
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        pages = {"readyz": _get(f"{base}/readyz"), "metrics": _get(f"{base}/metrics"), "healthz": _get(f"{base}/healthz")}
    finally:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
        out, err = w.communicate(timeout=90)
    return {"run": Run(w.returncode, time.monotonic() - t0, out, err, {k: v[1] for k, v in pages.items()}),
            "codes": {k: v[0] for k, v in pages.items()}, "topics": topics, "ids": ids, "milvus_uri": milvus_uri}


def _failing_run(sk: SecureKafka, tmp_path: Path, *, password: str, ca: str) -> Run:
    topics = {"notes": "sec-never-read", "tags": "sec-never-tags", "dlq": "sec-never-dlq"}
    t0 = time.monotonic()
    w = _worker(sk, topics, str(tmp_path / "notes.db"), password=password, ca=ca)
    try:
        out, err = w.communicate(timeout=60)  # librdkafka alone retries these forever
    except subprocess.TimeoutExpired:
        w.kill()
        out, err = w.communicate()
        pytest.fail(f"the worker was still running after 60 s:\n{err[-3000:]}")
    return Run(w.returncode, time.monotonic() - t0, out, err, {})


@pytest.fixture(scope="module")
def wrong_password_run(secure_kafka, tmp_path_factory) -> Run:
    return _failing_run(secure_kafka, tmp_path_factory.mktemp("wrong-pw"), password=WRONG_PASSWORD,
                        ca=secure_kafka.ca)


@pytest.fixture(scope="module")
def untrusted_ca_run(secure_kafka, tmp_path_factory) -> Run:
    d = tmp_path_factory.mktemp("other-ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=not the broker's CA",
                    "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt")], check=True, capture_output=True)
    return _failing_run(secure_kafka, d, password=secure_kafka.password, ca=str(d / "ca.crt"))


def _assert_config_error(run: Run, cause: str, bootstrap: str) -> dict:
    """Exit 2 within seconds of reaching Kafka, one error line naming the cause, nothing but JSON on stderr."""
    assert run.rc == 2, run.err[-4000:]
    logs = run.logs
    errors = [e for e in logs if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["kafka_security_error"], errors
    line = errors[0]
    assert line["cause"] == cause and line["client"] == "consumer" and line["hint"], line
    assert line["bootstrap"] == bootstrap and line["security_protocol"] == "SASL_SSL"
    started = next(e for e in logs if e["event"] == "worker_started")
    stopped = logs[-1]
    assert stopped["event"] == "worker_stopped" and stopped["rc"] == 2, stopped
    from datetime import datetime

    gap = (datetime.fromisoformat(stopped["timestamp"].replace("Z", "+00:00"))
           - datetime.fromisoformat(started["timestamp"].replace("Z", "+00:00"))).total_seconds()
    assert gap < 10, f"{gap:.1f} s from worker_started to exit: the failure was retried, not fatal"
    assert run.took_s < 45, run.took_s
    assert "Traceback" not in run.err + run.out
    return line


def test_worker_consumes_and_produces_over_sasl_ssl_only(secure_kafka, happy_run):
    sk, r = secure_kafka, happy_run["run"]
    assert r.rc == 0, r.err[-4000:]
    assert happy_run["codes"] == {"readyz": 200, "metrics": 200, "healthz": 200}
    assert json.loads(r.pages["readyz"])["ok"] is True
    assert f"notellm_embedded_total {float(N_NOTES)}" in r.pages["metrics"]
    started = next(e for e in r.logs if e["event"] == "worker_started")
    assert started["batch_source"] == "configured"
    # No error line; no warning about security or configuration (a transient coordinator warning on a new
    # broker would be no fault of this path).
    bad = [e for e in r.logs if e["level"] == "error" or e.get("code") in ("_AUTHENTICATION", "_SSL", "CONFWARN")]
    assert not bad, bad
    # The tags, read back over SASL_SSL: one note_tags.v1 event per note.
    import schemas

    tags = _read_all(sk, happy_run["topics"]["tags"], N_NOTES)
    assert sorted(m.key().decode() for m in tags) == sorted(happy_run["ids"])
    for m in tags:
        schemas.validate("note_tags.v1", json.loads(m.value()))
    # The rows in Milvus.
    from worker.sinks.milvus import MilvusStore

    store = MilvusStore(happy_run["milvus_uri"], alias="notes", token=MILVUS_TOKEN)
    try:
        assert sorted(store.all_ids()) == sorted(happy_run["ids"])
    finally:
        store.close()
    # The worker was given the SASL_SSL listener only; the plaintext one is a different port.
    assert sk.bootstrap != sk.plain and sk.bootstrap.rsplit(":", 1)[1] == str(int(sk.plain.rsplit(":", 1)[1]) + 2)


def test_wrong_password_is_a_clear_config_error_exit_2(secure_kafka, wrong_password_run):
    line = _assert_config_error(wrong_password_run, "authentication failed", secure_kafka.bootstrap)
    assert line["code"] == "_AUTHENTICATION" and "SCRAM-SHA-512" in line["error"], line


def test_untrusted_broker_certificate_is_a_clear_config_error_exit_2(secure_kafka, untrusted_ca_run):
    line = _assert_config_error(untrusted_ca_run, "TLS certificate verification failed", secure_kafka.bootstrap)
    assert line["code"] == "_SSL" and "certificate verify failed" in line["error"], line


def test_secrets_never_leak(secure_kafka, happy_run, wrong_password_run, untrusted_ca_run, monkeypatch):
    sk = secure_kafka
    secrets = {"sasl password": sk.password, "wrong sasl password": WRONG_PASSWORD, "milvus token": MILVUS_TOKEN,
               "kafka.extra secret": EXTRA_SECRET}
    # The settings the worker runs with hold every secret (the SASL one and the extra one reach librdkafka) ...
    from worker.config import load_settings

    for k, v in _env(sk, password=sk.password, ca=sk.ca).items():
        if k.startswith("NOTELLM_"):
            monkeypatch.setenv(k, v)
    s = load_settings({"kafka": {"bootstrap_servers": sk.bootstrap}})
    conf = s.kafka.consumer_config()
    assert conf["sasl.password"] == sk.password and conf["sasl.oauthbearer.client.secret"] == EXTRA_SECRET
    assert conf["socket.keepalive.enable"] == "true" and s.milvus.token.get_secret_value() == MILVUS_TOKEN
    # ... and print none of them.
    captured = {
        "repr(settings)": repr(s), "str(settings)": str(s), "model_dump_json": s.model_dump_json(),
        "str(model_dump)": str(s.model_dump()), "repr(kafka)": repr(s.kafka), "kafka.extra": str(s.kafka.extra),
        "happy run (stdout, stderr, /metrics, /readyz, /healthz)": happy_run["run"].text(),
        "wrong password run": wrong_password_run.text(), "untrusted CA run": untrusted_ca_run.text(),
        "scripts/kafka start": sk.start_output, "scripts/kafka client": sk.client_output,
    }
    assert "**********" in captured["model_dump_json"]  # redacted, not dropped
    assert happy_run["run"].pages["metrics"] and happy_run["run"].err.count("\n") > 3  # something was captured
    for where, text in captured.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in {where}"
    # The password is the client's to read, in files only its owner can read, and printed only when asked.
    shown = run_kafka_script("client", "--show-password", "--dir", str(sk.dir))
    assert f"sasl_password={sk.password}" in shown.stdout
    for name in ("password", "client.env", "client.properties", "ca.key", "broker.p12", "keystore.password"):
        assert stat.S_IMODE((sk.dir / "secure" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((sk.dir / "server.properties").stat().st_mode) == 0o600  # the keystore password


def test_secure_refuses_what_it_does_not_support(tmp_path):
    """No JVM: a cluster, and a directory already formatted without --secure, are refused with a clear line."""
    plain = tmp_path / "plain"
    (plain / "data").mkdir(parents=True)
    (plain / "server.properties").write_text("node.id=1\n")
    (plain / "data" / "meta.properties").write_text("node.id=1\n")
    r = run_kafka_script("start", "--secure", "--brokers", "3", "--dir", str(tmp_path / "c"))
    assert r.returncode == 1 and "single node only" in r.stderr, r.stderr
    r = run_kafka_script("start", "--secure", "--dir", str(plain))
    assert r.returncode == 1 and "formatted without --secure" in r.stderr, r.stderr
    r = run_kafka_script("client", "--dir", str(plain))
    assert r.returncode == 1 and "no secure broker" in r.stderr, r.stderr
    r = run_kafka_script("bootstrap", "--secure", "--port", "29092", "--dir", str(tmp_path / "e"))
    assert r.stdout.strip() == "127.0.0.1:29094"
    r = run_kafka_script("bootstrap", "--secure", "--secure-port", "30000", "--dir", str(tmp_path / "e"))
    assert r.stdout.strip() == "127.0.0.1:30000"
    assert run_kafka_script("start", "--secure-port", "x", "--dir", str(tmp_path / "e")).returncode == 2


def test_short_lived_commands_name_the_security_failure(secure_kafka, tmp_path):
    """`notellm worker redrive` and `notellm smoke` with a wrong password: exit 2 within seconds, one line on
    stderr / stdout naming the cause, one kafka_security_error log line, no secret anywhere."""
    sk = secure_kafka
    env = _env(sk, password=WRONG_PASSWORD, ca=sk.ca)
    cmds = {
        "redrive": [sys.executable, "-m", "notellm.cli", "worker", "redrive", "--bootstrap", sk.bootstrap,
                    "--dlq-topic", "sec-no-dlq", "--topic", "sec-no-notes", "--timeout", "3", "--log-format", "json"],
        "smoke": [sys.executable, "-m", "notellm.cli", "smoke", "--bootstrap", sk.bootstrap, "--milvus-uri",
                  str(tmp_path / "smoke.db"), "--topic", "sec-smoke"],
    }
    procs = {k: subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in cmds.items()}
    t0 = time.monotonic()
    done = {k: p.communicate(timeout=60) for k, p in procs.items()}
    took = time.monotonic() - t0
    assert took < 30, took
    for name, (out, err) in done.items():
        assert procs[name].returncode == 2, (name, out, err[-3000:])
        said = (err.splitlines() if name == "redrive" else out.splitlines())[-1]
        assert f"Kafka at {sk.bootstrap}: authentication failed (check kafka.sasl_mechanism" in said, (name, said)
        logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        errors = [e for e in logged if e["level"] == "error"]
        assert [e["event"] for e in errors] == ["kafka_security_error"], (name, errors)
        assert errors[0]["cause"] == "authentication failed", errors
        for secret in (WRONG_PASSWORD, sk.password, MILVUS_TOKEN, EXTRA_SECRET):
            assert secret not in out + err, name


def test_security_failures_are_classified_and_raised_once():
    """worker/kafka_log.py without a broker: which librdkafka errors are configuration errors, raised once."""
    import logging

    from confluent_kafka import KafkaError

    from worker.kafka_log import (AUTHENTICATION_FAILED, CERTIFICATE_UNTRUSTED, KafkaErrorLog, KafkaSecurityError,
                                  security_failure)

    auth = KafkaError(KafkaError._AUTHENTICATION, "sasl_ssl://b:9094/bootstrap: SASL authentication error: ...")
    cert = KafkaError(KafkaError._SSL, "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed")
    cut = KafkaError(KafkaError._SSL, "SSL handshake failed: Disconnected")  # a restarting broker: an outage
    assert security_failure(auth) == AUTHENTICATION_FAILED and security_failure(cert) == CERTIFICATE_UNTRUSTED
    assert security_failure(KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "x")) == AUTHENTICATION_FAILED
    assert security_failure(cut) is None and security_failure(KafkaError(KafkaError._TRANSPORT, "refused")) is None

    lines: list = []

    class Out:
        def __getattr__(self, level):
            return lambda event, **kw: lines.append((level, event, kw))

    el = KafkaErrorLog(Out(), "consumer", fatal_security=True)
    el.error(cut)  # logged, not raised
    with pytest.raises(KafkaSecurityError) as raised:
        el.error(auth)
    assert raised.value.cause == AUTHENTICATION_FAILED and raised.value.code == "_AUTHENTICATION"
    assert raised.value.log_fields()["hint"].startswith("check kafka.sasl_mechanism")
    el.error(auth)  # served again while the command closes its clients: neither raised nor logged
    assert [e for _, e, _ in lines] == ["kafka_error"]
    # Without fatal_security: logged as before, and remembered; a FAIL log line (which arrives even while a
    # metadata request blocks) is remembered too, and error_cb's code replaces its facility.
    plain = KafkaErrorLog(Out(), "redrive:consumer")
    plain.log(logging.ERROR, "%s [%s] %s", "FAIL", "c#consumer-1", "ssl://b:9094/bootstrap: SSL handshake failed: "
              "certificate verify failed: broker certificate could not be verified")
    assert plain.security_failure.cause == CERTIFICATE_UNTRUSTED and plain.security_failure.code == "FAIL"
    plain.error(cert)
    assert plain.security_failure.code == "_SSL" and lines[-1][2]["code"] == "_SSL"


def test_extra_secrets_are_redacted_but_reach_librdkafka():
    from worker.config import KafkaSettings, is_secret_key, load_settings

    secret = {"sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret",
              "sasl.jaas.config", "ssl.key.pem", "ssl_key", "sasl.oauthbearer.assertion.private.key.pem",
              "sasl.oauthbearer.assertion.private.key.passphrase", "sasl.oauthbearer.config", "SSL.KEY.PASSWORD"}
    public = {"fetch.min.bytes", "ssl.key.location", "ssl.certificate.pem", "ssl.ca.pem", "sasl.oauthbearer.client.id",
              "ssl.keystore.location", "client.id", "enable.ssl.certificate.verification"}
    assert {k for k in secret | public if is_secret_key(k)} == secret
    values = {k: f"value-{i}-{uuid.uuid4().hex}" for i, k in enumerate(sorted(secret | public))}
    s = load_settings({"kafka": {"extra": values}})
    shown = "\n".join([repr(s), str(s), s.model_dump_json(), str(s.model_dump()), repr(s.kafka.extra)])
    conf = s.kafka.producer_config()
    for k, v in values.items():
        assert conf[k] == v  # every value reaches librdkafka as it is
        assert (v in shown) == (k in public), k
    # A dump fed back (what load_settings does with the environment) keeps the secrets usable.
    again = KafkaSettings.model_validate(s.kafka.model_dump())
    assert again.common_config()["sasl.jaas.config"] == values["sasl.jaas.config"]


@pytest.mark.parametrize("setting", [{"NOTELLM_KAFKA__SSL_CA_LOCATION": "/nonexistent/ca.crt"},
                                     {"NOTELLM_KAFKA__EXTRA": '{"no.such.property": "1"}'}])
def test_a_configuration_librdkafka_refuses_is_exit_2_without_a_traceback(kafka_bootstrap, tmp_path, setting):
    """A CA file that does not exist, or an unknown librdkafka property: the client cannot even be made.
    One kafka_config_error line with librdkafka's reason, exit 2 (a configuration error), no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTELLM_KAFKA__", "NOTELLM_MILVUS__"))}
    env.update({"NOTELLM_KAFKA__SECURITY_PROTOCOL": "SSL", "NOTELLM_LOG__FORMAT": "json", **setting})
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", kafka_bootstrap,
           "--topic", f"cfg-{uuid.uuid4().hex[:8]}", "--model", str(tiny_model_dir()),
           "--milvus-uri", str(tmp_path / "notes.db"), "--http-port", "0", "--threads", "1", "--max-batch-notes", "8"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [e for e in _json_lines(p.stderr) if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["kafka_config_error"], errors
    assert ("ssl.ca.location" in errors[0]["error"]) if "CA" in next(iter(setting)) else ("no.such.property" in errors[0]["error"])
    assert "Traceback" not in p.stderr
