"""Shared fixtures. Kafka is always the real broker (Apache Kafka 4.x, KRaft, on 127.0.0.1), started
by scripts/kafka if it is not running; Milvus is always a real milvus-lite database."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

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
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (the repo expects ../shared/data beside it)")
    return SHARED_DATA
