"""Shared fixtures. Kafka is always the real broker (Apache Kafka 4.x, KRaft, on 127.0.0.1), started
by scripts/kafka if it is not running; Milvus is a real milvus-lite database, and for the tests that take
`milvus_backend` also a real Milvus 2.3 standalone server (started by scripts/milvus if it is not running)."""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap address of a live broker. Uses NOTELLM_TEST_KAFKA if set, else `scripts/kafka start`
    (idempotent: reuses a broker the script already started). Fails loudly if no broker can start."""
    explicit = os.environ.get("NOTELLM_TEST_KAFKA")
    if explicit:
        bootstrap = explicit
    else:
        proc = subprocess.run([str(REPO / "scripts" / "kafka"), "start"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"could not start Kafka with scripts/kafka start:\n{proc.stderr[-4000:]}")
        bootstrap = proc.stdout.strip().splitlines()[-1]
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    assert md.brokers, f"broker at {bootstrap} returned no brokers in its metadata"
    return bootstrap


@pytest.fixture
def new_topic(kafka_bootstrap):
    """Factory: new_topic(partitions=3, prefix="t", config=None) -> a created, uniquely named topic.
    Topics are deleted after the test."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    made: list[str] = []

    def make(partitions: int = 3, prefix: str = "t", config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})])
        futures[name].result(timeout=30)
        # Wait until the metadata shows every partition with a leader.
        for _ in range(100):
            t = admin.list_topics(topic=name, timeout=10).topics.get(name)
            if t is not None and t.error is None and len(t.partitions) == partitions and all(p.leader >= 0 for p in t.partitions.values()):
                break
        made.append(name)
        return name

    yield make
    if made:
        for f in admin.delete_topics(made, operation_timeout=30).values():
            try:
                f.result(timeout=30)
            except Exception:  # deletion is best effort; the broker data dir is per-run anyway
                pass


CLUSTER_BROKERS = 3


def _free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1 (a cluster's client and controller ports)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 40000, 2)
        socks = []
        try:
            for i in range(n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError(f"no block of {n} free ports")


def run_kafka_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """scripts/kafka with the caller's NOTELLM_KAFKA_* settings removed (each call says what it means)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTELLM_KAFKA_")}
    return subprocess.run([str(REPO / "scripts" / "kafka"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory) -> Iterator[dict]:
    """A real three-node KRaft cluster (`scripts/kafka start --brokers 3`: one cluster id, a quorum of three
    controllers, topics with RF 3 and min.insync.replicas 2 by default) on free loopback ports, for the
    failover drill and the replica test; stopped at the end of the session. Yields dir, port, bootstrap."""
    d = tmp_path_factory.mktemp("kafka3")
    port = _free_port_block(2 * CLUSTER_BROKERS)
    started = run_kafka_script("start", "--brokers", str(CLUSTER_BROKERS), "--dir", str(d), "--port", str(port))
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start a 3-node cluster:\n{started.stderr[-4000:]}")
        yield {"dir": str(d), "port": port, "bootstrap": started.stdout.strip().splitlines()[-1]}
    finally:
        stopped = run_kafka_script("stop", "--dir", str(d))
        assert stopped.returncode == 0, stopped.stderr
        assert run_kafka_script("status", "--dir", str(d)).returncode == 3  # nothing of it left running


@pytest.fixture
def cluster_topic(kafka_cluster):
    """Factory on the 3-node cluster: cluster_topic(partitions=3, prefix="t") -> a new topic with the
    brokers' default replication (3) and every partition led; deleted after the test."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_cluster["bootstrap"], "logger": _QuietLog()})
    made: list[str] = []

    def make(partitions: int = 3, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1)])[name].result(timeout=60)
        for _ in range(100):
            t = admin.list_topics(topic=name, timeout=10).topics.get(name)
            if t is not None and t.error is None and len(t.partitions) == partitions and \
                    all(pm.leader >= 0 and len(pm.isrs) == CLUSTER_BROKERS for pm in t.partitions.values()):
                break
        made.append(name)
        return name

    yield make
    for f in admin.delete_topics(made, operation_timeout=30).values() if made else ():
        try:
            f.result(timeout=30)
        except Exception:  # best effort, as for new_topic
            pass


class _QuietLog:
    """A `logger` for test-side Kafka clients, so their librdkafka lines stay off stderr."""

    def log(self, *_a) -> None:
        pass


@pytest.fixture
def milvus_uri(tmp_path) -> str:
    """A fresh milvus-lite database path (one process per db)."""
    return str(tmp_path / "milvus" / "notes.db")


@pytest.fixture(scope="session")
def milvus_server() -> str:
    """URI of a live Milvus 2.3 standalone server. Uses NOTELLM_TEST_MILVUS if set, else `scripts/milvus start`
    (idempotent: reuses a server the script already started; it is left running, like the broker). Fails
    loudly if no server can start or answer."""
    uri = os.environ.get("NOTELLM_TEST_MILVUS")
    if not uri:
        proc = subprocess.run([str(REPO / "scripts" / "milvus"), "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"could not start a Milvus server with scripts/milvus start:\n{proc.stderr[-4000:]}")
        uri = proc.stdout.strip().splitlines()[-1]
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=30)
    try:
        client.list_collections()
    finally:
        client.close()
    return uri


@dataclass(frozen=True)
class MilvusBackend:
    """Where one test's Milvus data lives: `kind` "lite" (a fresh milvus-lite db file) or "server" (the shared
    Milvus server; `alias` is unique to the test, and every collection the test creates is named after it)."""
    kind: str
    uri: str
    alias: str

    @property
    def is_server(self) -> bool:
        return self.kind == "server"

    def store(self, **kw):
        from worker.sinks.milvus import MilvusStore

        kw.setdefault("alias", self.alias)
        return MilvusStore(self.uri, **kw)


def _drop_server_collections(uri: str, prefix: str) -> None:
    """Drop the collections whose names start with `prefix` (what one test created: the store names its
    physical collections `<alias>__<model>`), their aliases first. Other sessions' collections are not read."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=30)
    try:
        for name in client.list_collections():
            if name.startswith(prefix):
                for a in client.describe_collection(name).get("aliases") or []:
                    client.drop_alias(a)
                client.drop_collection(name)
    finally:
        client.close()


@pytest.fixture
def milvus_server_backend(milvus_server) -> Iterator[MilvusBackend]:
    """The real server with a collection alias unique to this test (`notes_<hex>`); what the test created
    is dropped afterwards."""
    alias = f"notes_{uuid.uuid4().hex[:12]}"
    yield MilvusBackend("server", milvus_server, alias)
    _drop_server_collections(milvus_server, alias)


@pytest.fixture(params=["lite", "server"])
def milvus_backend(request, tmp_path) -> Iterator[MilvusBackend]:
    """The same test on both Milvus backends: a fresh milvus-lite db, or `milvus_server_backend`."""
    if request.param == "lite":
        yield MilvusBackend("lite", str(tmp_path / "milvus" / "notes.db"), "notes")
        return
    yield request.getfixturevalue("milvus_server_backend")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (the repo expects ../shared/data beside it)")
    return SHARED_DATA
