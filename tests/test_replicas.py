"""Replicas as processes on the production path (issue 10): N `notellm worker run` processes in one
consumer group, on the three-node Kafka cluster (RF 3, min.insync.replicas 2), write to a real Milvus server. The group scales 1 -> 3 -> 1 while notes flow; one replica
is SIGKILLed mid-batch, another stopped with SIGTERM. Every id ends up exactly once in Milvus, every note
has its tags, and the group's offsets reach the end of every partition."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.worker_support import REPO, committed, high_watermarks, note_doc, produce_notes, tag_ids
from tests.worker_support import tiny_dir  # noqa: F401 - fixture
from worker.sinks.milvus import MilvusStore

pytestmark = pytest.mark.timeout(420)


def _replica(kafka_bootstrap, topics, server, alias, group, tiny_dir, name, log_dir):
    env = {**os.environ, "NOTELLM_LOG__FORMAT": "json", "NOTELLM_KAFKA__SESSION_TIMEOUT_MS": "6000",
           "NOTELLM_KAFKA__CLIENT_ID": name}
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", kafka_bootstrap,
           "--topic", topics["notes"], "--tags-topic", topics["tags"], "--dlq-topic", topics["dlq"], "--group", group,
           "--model", str(tiny_dir), "--milvus-uri", server, "--collection", alias, "--http-port", "0",
           "--threads", "1", "--generate", "category", "--max-batch-notes", "16", "--linger-ms", "20"]
    log = open(log_dir / f"replica-{name}.log", "wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log.name


def _assigned(log_path) -> bool:
    """Whether a replica's log shows it owning at least one partition."""
    with open(log_path) as f:
        lines = [ln for ln in f if '"partitions_assigned"' in ln and ln.endswith("\n")]  # whole lines only
    return any(json.loads(ln).get("partitions") for ln in lines)


def _wait(pred, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_scale_1_3_1_with_a_sigkill_loses_and_duplicates_nothing(kafka_cluster, cluster_topic, milvus_server, tiny_dir,
                                                                 tmp_path):
    kafka_bootstrap = kafka_cluster["bootstrap"]
    topics = {"notes": cluster_topic(6, prefix="notes"), "tags": cluster_topic(3, prefix="tags"),
              "dlq": cluster_topic(1, prefix="dlq")}
    alias, group = f"notes_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    produced: list[str] = []
    done = threading.Event()

    def publish():  # ~60 notes/s for ~25 s: notes keep flowing through every scale change
        for k in range(25):
            produced.extend(produce_notes(kafka_bootstrap, topics["notes"],
                                          [note_doc(k * 60 + i, prefix="r") for i in range(60)]))
            time.sleep(0.8)
        done.set()

    procs, logs = {}, {}
    procs["a"], logs["a"] = _replica(kafka_bootstrap, topics, milvus_server, alias, group, tiny_dir, "a", tmp_path)
    store = MilvusStore(milvus_server, alias=alias)
    try:
        pub = threading.Thread(target=publish, daemon=True)
        pub.start()
        _wait(lambda: any(o >= 0 for o in committed(kafka_bootstrap, group, topics["notes"], range(6)).values()),
              "replica a to commit its first batch")
        for n in ("b", "c"):  # scale to 3
            procs[n], logs[n] = _replica(kafka_bootstrap, topics, milvus_server, alias, group, tiny_dir, n, tmp_path)
        # Both new members own partitions (start-up takes longer on a loaded machine than any fixed sleep),
        # then a moment of work, then the kill.
        _wait(lambda: all(_assigned(logs[n]) for n in ("b", "c")), "replicas b and c to be assigned partitions")
        time.sleep(2)
        procs["b"].send_signal(signal.SIGKILL)   # mid-batch: notes are flowing, batches in flight
        procs["c"].send_signal(signal.SIGTERM)   # and back to 1
        assert procs["c"].wait(60) == 0, open(logs["c"]).read()[-3000:]
        pub.join(120)
        assert done.is_set()
        hw = high_watermarks(kafka_bootstrap, topics["notes"])
        _wait(lambda: committed(kafka_bootstrap, group, topics["notes"], hw) == hw, "offsets at the end", 180)
        assert procs["a"].poll() is None, open(logs["a"]).read()[-3000:]
        procs["a"].send_signal(signal.SIGTERM)
        assert procs["a"].wait(60) == 0, open(logs["a"]).read()[-3000:]
        ids = store.all_ids()
        assert len(ids) == len(set(ids)) == len(set(produced)) == 1500 and set(ids) == set(produced)
        assert set(tag_ids(kafka_bootstrap, topics["tags"])) == set(produced)
        for n in ("a", "b", "c"):  # every replica really took part: it was assigned partitions
            got = [json.loads(ln) for ln in open(logs[n]) if '"partitions_assigned"' in ln]
            assert any(e["partitions"] for e in got), (n, got)
        for n in ("a", "c"):
            assert "Traceback" not in open(logs[n]).read()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        try:
            phys = store.resolve()
            with store.locked() as c:
                c.drop_alias(alias)
                if phys:
                    c.drop_collection(phys)
        finally:
            store.close()
