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


@pytest.fixture(params=["lite", "server"])
def milvus_backend(request, tmp_path) -> Iterator[MilvusBackend]:
    """The same test on both Milvus backends: a fresh milvus-lite db, or the real server with a collection
    alias unique to this test (`notes_<hex>`); on the server what the test created is dropped afterwards."""
    if request.param == "lite":
        yield MilvusBackend("lite", str(tmp_path / "milvus" / "notes.db"), "notes")
        return
    uri = request.getfixturevalue("milvus_server")
    alias = f"notes_{uuid.uuid4().hex[:12]}"
    yield MilvusBackend("server", uri, alias)
    _drop_server_collections(uri, alias)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (the repo expects ../shared/data beside it)")
    return SHARED_DATA
