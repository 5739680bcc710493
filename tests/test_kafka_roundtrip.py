"""Round trip against the real broker: keyed JSON notes, manual commits, resume at committed offsets."""
from __future__ import annotations

import json
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

N = 1000


def _consume(consumer: Consumer, want: int, timeout_s: float = 60.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=min(200, want - len(got)), timeout=1.0):
            assert msg.error() is None, msg.error()
            got.append(msg)
    return got


def test_roundtrip_resumes_at_committed_offsets(kafka_bootstrap, new_topic):
    topic = new_topic(partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    ids = [f"note-{i:04d}" for i in range(N)]
    for i, note_id in enumerate(ids):
        doc = {"note_id": note_id, "title": f"t{i}", "content": "c", "author_id": "a", "published_at": i}
        producer.produce(topic, key=note_id.encode(), value=json.dumps(doc).encode())
    assert producer.flush(30) == 0

    group = f"g-{uuid.uuid4().hex[:8]}"
    conf = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }

    # First consumer: read 600, commit exactly what it read, leave.
    c1 = Consumer(conf)
    c1.subscribe([topic])
    first = _consume(c1, 600)
    assert len(first) == 600
    next_offsets: dict[int, int] = {}
    for m in first:
        next_offsets[m.partition()] = max(next_offsets.get(m.partition(), 0), m.offset() + 1)
    c1.commit(offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()], asynchronous=False)
    committed = {tp.partition: tp.offset for tp in c1.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)}
    for p, o in next_offsets.items():
        assert committed[p] == o
    c1.close()

    # Second consumer in the same group: starts exactly at the committed offsets.
    c2 = Consumer(conf)
    c2.subscribe([topic])
    rest = _consume(c2, N - 600)
    first_seen: dict[int, int] = {}
    for m in rest:
        first_seen.setdefault(m.partition(), m.offset())
    for p, o in first_seen.items():
        # No commit for a partition (OFFSET_INVALID, < 0) means auto.offset.reset=earliest: offset 0.
        expected = committed[p] if committed[p] >= 0 else 0
        assert o == expected, f"partition {p}: resumed at {o}, committed {committed[p]}"
    # Nothing more to read, nothing lost, nothing read twice.
    assert _consume(c2, 1, timeout_s=3.0) == []
    c2.close()

    keys = [m.key().decode() for m in first + rest]
    assert sorted(keys) == ids
    # Keys partition deterministically: each key lives in exactly one partition.
    part_of = {}
    for m in first + rest:
        assert part_of.setdefault(m.key(), m.partition()) == m.partition()
        assert json.loads(m.value())["note_id"] == m.key().decode()
    assert len({m.partition() for m in first + rest}) == 3
