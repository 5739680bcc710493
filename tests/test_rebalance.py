"""Ownership under real rebalances (issue 9): another process joins and leaves the worker's consumer
group while the worker is paused under backpressure and a batch is still in flight.

- pause -> revoke -> re-assign resumes: every partition is committed to its end afterwards;
- no writes after revoke: no Milvus write touches a partition between its revoke and its next
  assignment, even when the revoke's drain timed out with a batch of that partition still in flight."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from confluent_kafka import Producer

from tests.fakes import FakeEncoder
from tests.worker_support import REPO, AppThread, note_doc, wait_committed_to_end
from tests.test_worker_e2e import settings_for
from worker.app import WorkerApp
from worker.sinks.milvus import MilvusStore

pytestmark = pytest.mark.timeout(300)

MEMBER = textwrap.dedent("""
    import sys, time
    from confluent_kafka import Consumer
    bootstrap, group, topic, hold_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    got, since = set(), []
    def on_assign(c, ps):
        got.update(p.partition for p in ps)
        if ps and not since:
            since.append(time.monotonic())
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 6000,
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic], on_assign=on_assign)
    end = time.monotonic() + 60
    while time.monotonic() < end and not (since and time.monotonic() > since[0] + hold_s):
        c.poll(0.2)   # a real member: it reads, never commits; leaves `hold_s` after its first partitions
    print(sorted(got), flush=True)
    c.close()
""")


class RecordingSink:
    """Wraps the Milvus sink: a write is stuck (up to 8 s) while `slow` is set; records which partitions
    each write touches and when it started."""

    def __init__(self, sink, slow: threading.Event, writes: list) -> None:
        self.sink, self.name, self.slow, self.writes = sink, sink.name, slow, writes
        self._parts: set[int] = set()

    def add(self, enc):
        self._parts |= {n.partition for n in enc.batch.notes}
        self.sink.add(enc)

    def flush(self):
        t = time.monotonic()
        if self._parts:
            self.writes.append((t, frozenset(self._parts)))
        end = t + 8.0  # a stuck write, bounded like the store's own timeout
        while self.slow.is_set() and time.monotonic() < end:
            time.sleep(0.05)
        out = self.sink.flush()
        self._parts = set()
        return out

    def discard(self):
        self._parts = set()
        self.sink.discard()


def test_pause_revoke_reassign_resumes_and_nothing_is_written_after_revoke(kafka_bootstrap, new_topic, milvus_uri):
    topic = new_topic(4, prefix="notes")
    topics = {"notes": topic, "tags": new_topic(1, prefix="tags"), "dlq": new_topic(1, prefix="dlq")}
    # Small fetches interleave the partitions, so every batch spans all four: a batch in flight at the
    # revoke holds records of the revoked partitions. A drain of 0.5 s times out behind the stuck write.
    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "none"},
                     kafka={"extra": {"max.partition.fetch.bytes": "1500"}},
                     batch={"max_batch_notes": 24, "linger_ms": 5}, lifecycle={"drain_s": 0.5})
    # One record batch per message, round robin: fetches interleave the partitions.
    prod = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0, "acks": "all"})
    ids = []
    for i in range(400):
        d = {**note_doc(i), "published_at": int(time.time() * 1000)}
        prod.produce(topic, key=d["note_id"].encode(), value=json.dumps(d).encode(), partition=i % 4)
        ids.append(d["note_id"])
        if i % 4 == 3:
            prod.flush(10)
    assert prod.flush(30) == 0
    store = MilvusStore(milvus_uri, alias="notes")
    slow, writes = threading.Event(), []
    slow.set()
    app = WorkerApp(s, encoder=FakeEncoder(dim=16), store=store,
                    wrap_sink=lambda sk: RecordingSink(sk, slow, writes) if sk.name == "milvus" else sk)
    events: list[tuple[float, str, frozenset]] = []
    app.start()
    orig_assign, orig_revoke = app.ownership.assign, app.ownership.revoke

    def assign(parts):
        parts = list(parts)
        orig_assign(parts)
        events.append((time.monotonic(), "assign", frozenset(parts)))

    def revoke(parts):
        parts = list(parts)
        orig_revoke(parts)  # returns once no write for them is in progress
        events.append((time.monotonic(), "revoke", frozenset(parts)))

    app.ownership.assign, app.ownership.revoke = assign, revoke
    t = AppThread(app)
    # Wait until the worker owns all four partitions and is paused behind the slow sink.
    deadline = time.monotonic() + 60
    while not (len(app.ownership.owned()) == 4 and app.source.paused) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(app.ownership.owned()) == 4 and app.source.paused, "worker never paused under backpressure"
    member = subprocess.run([sys.executable, "-c", MEMBER, kafka_bootstrap, s.kafka.group_id, topic, "4"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert member.returncode == 0, member.stderr[-2000:]
    taken = eval(member.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess's print of a list
    assert taken, "the second member was never assigned a partition"
    slow.clear()
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topic, timeout=120, alive=t.alive)
    assert t.stop() == 0
    assert set(store.all_ids()) == set(ids)

    revoked = [(ts, ps) for ts, kind, ps in events if kind == "revoke"]
    assert any(set(taken) & ps for _ts, ps in revoked), events
    for ts, ps in revoked:
        for p in ps:
            back = min((t2 for t2, kind, ps2 in events if kind == "assign" and p in ps2 and t2 > ts), default=float("inf"))
            late = [w for w in writes if p in w[1] and ts < w[0] < back]
            assert not late, f"partition {p} written at {late} after its revoke at {ts} (re-assigned at {back})"
    store.close()
