"""scripts/kafka itself: start is idempotent, status tells the truth, stop ends only its own broker."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _kafka(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "kafka"), *args], capture_output=True, text=True, env=env, timeout=240)


def test_second_broker_lifecycle(tmp_path, kafka_bootstrap):
    port = _free_port_pair()
    env = {**os.environ, "NOTELLM_KAFKA_DIR": str(tmp_path / "k"), "NOTELLM_KAFKA_PORT": str(port)}
    assert _kafka("status", env=env).returncode == 3  # stopped
    first = _kafka("start", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"127.0.0.1:{port}"
    try:
        pid = int((tmp_path / "k" / "kafka.pid").read_text())
        again = _kafka("start", env=env)  # idempotent
        assert again.returncode == 0 and "already running" in again.stderr
        assert int((tmp_path / "k" / "kafka.pid").read_text()) == pid
        st = _kafka("status", env=env)
        assert st.returncode == 0 and f"pid={pid}" in st.stdout
        # A real client sees the broker.
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=20)
        assert list(md.brokers.values())[0].port == port
        # Starting on a port someone else holds is refused with a clear message.
        clash = _kafka("start", env={**env, "NOTELLM_KAFKA_DIR": str(tmp_path / "other")})
        assert clash.returncode != 0 and "already in use" in clash.stderr
    finally:
        stop = _kafka("stop", env=env)
    assert stop.returncode == 0, stop.stderr
    assert _kafka("status", env=env).returncode == 3
    # The session's main broker is untouched.
    from confluent_kafka.admin import AdminClient

    assert AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=20).brokers


def test_cluster_layout_commands_without_a_broker(tmp_path):
    """The layout rules of `--brokers N` (no JVM starts here: every case is refused or answered from DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTELLM_KAFKA_")}
    single, cluster, empty = tmp_path / "single", tmp_path / "cluster", tmp_path / "empty"
    single.mkdir()
    (single / "server.properties").write_text("node.id=1\n")
    cluster.mkdir()
    (cluster / "cluster.env").write_text("brokers=3\nport=19092\n")

    three = "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    got = _kafka("bootstrap", "--brokers", "3", "--port", "19092", "--dir", str(empty), env=env).stdout.strip()
    assert got == three
    assert _kafka("bootstrap", "--dir", str(cluster), env=env).stdout.strip() == three  # recorded layout
    assert _kafka("bootstrap", "--dir", str(empty), "--port", "29092", env=env).stdout.strip() == "127.0.0.1:29092"
    st = _kafka("status", "--dir", str(cluster), env=env)
    assert st.returncode == 3 and st.stdout.startswith("stopped brokers=0/3")
    stop = _kafka("stop", "--dir", str(cluster), env=env)
    assert stop.returncode == 0 and "not running" in stop.stderr

    refused = [
        (("start", "--brokers", "3", "--dir", str(single)), "holds a single-node broker"),
        (("start", "--brokers", "1", "--dir", str(cluster)), "holds a 3-broker cluster"),
        (("start", "--dir", str(cluster), "--port", "29092"), "use --port 19092"),
        (("stop-broker", "2", "--dir", str(single)), "holds no cluster"),
        (("stop-broker", "--dir", str(cluster)), "give a node id from 1 to 3"),
        (("start-broker", "4", "--dir", str(cluster)), "give a node id from 1 to 3"),
        (("start-broker", "2", "--dir", str(cluster)), "was never started"),
        (("stop", "--kill", "--dir", str(cluster)), "--kill is for stop-broker"),
    ]
    for args, msg in refused:
        r = _kafka(*args, env=env)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
    for args in (("start", "--brokers", "0"), ("start", "--bogus"), ("start", "--port", "x"), ("frobnicate",)):
        assert _kafka(*args, "--dir", str(empty), env=env).returncode == 2, args
    assert not (empty / "cluster.env").exists() and not (single / "cluster.env").exists()
