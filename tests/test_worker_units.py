"""Unit tests of the stages around the encoder (no broker, no Milvus): decoding, the checkpoint's
order of steps, the pipeline's error handling, the encode stage's poison-note isolation."""
from __future__ import annotations

import json

import pytest

from tests.fakes import FakeEncoder
from worker.checkpoint import Checkpoint, CheckpointFailed, RetryPolicy
from worker.encoding import encode_batch
from worker.records import Batch, DeadLetter, Encoded, Note, Tombstone
from worker.sinks import GiveUp, RetryLater
from worker.source import decode, parse_offsets


class Msg:
    def __init__(self, value, key=b"n1", partition=0, offset=5):
        self._v, self._k, self._p, self._o = value, key, partition, offset

    def key(self): return self._k
    def value(self): return self._v
    def topic(self): return "notes"
    def partition(self): return self._p
    def offset(self): return self._o
    def timestamp(self): return (1, 1234)


GOOD = {"note_id": "n1", "title": "T", "content": "C", "author_id": "a", "published_at": 1, "extra": {"x": 1}}


@pytest.mark.parametrize("value,key,kind", [
    (b"\xff\xfe", b"n1", "not_utf8"),
    (b"{nope", b"n1", "not_json"),
    (json.dumps({**GOOD, "published_at": -1}).encode(), b"n1", "schema_violation"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "author_id"}).encode(), b"n1", "schema_violation"),
    (json.dumps([1, 2]).encode(), b"n1", "schema_violation"),
    (json.dumps({**GOOD, "content": "x" * 600}).encode(), b"n1", "too_large"),
    (json.dumps(GOOD).encode(), b"other", "bad_key"),
    (json.dumps(GOOD).encode(), b"\xff", "bad_key"),
    (None, None, "bad_key"),
])
def test_decode_dead_letters(value, key, kind):
    r = decode(Msg(value, key), max_bytes=512)
    assert isinstance(r, DeadLetter) and r.error_kind == kind and r.error_message
    ev = r.to_event("0.1.0")
    import schemas
    schemas.validate("dead_letter.v1", ev)
    assert ev["source"] == {"topic": "notes", "partition": 0, "offset": 5, "timestamp_ms": 1234}


def test_decode_note_and_tombstone():
    n = decode(Msg(json.dumps(GOOD).encode()), max_bytes=4096)
    assert isinstance(n, Note) and n.note_id == "n1" and n.offset == 5 and n.size > 0
    t = decode(Msg(None, b"n9"), max_bytes=4096)
    assert isinstance(t, Tombstone) and t.note_id == "n9"


def test_parse_offsets():
    assert parse_offsets("0:10, 2:5") == {0: 10, 2: 5}


def _note(i, p=0):
    return Note(note_id=f"n{i}", title=f"title {i}", content="c", author_id="a", published_at=0, topic=None,
                category=None, hashtags=None, partition=p, offset=i)


def _batch(notes, offsets, dead=()):
    return Batch(seq=1, notes=list(notes), tombstones=[], dead=list(dead), offsets=offsets, records=len(notes),
                 padded_tokens=0, opened_at=0, closed_at=0, reason="notes")


class RecSink:
    def __init__(self, name, log, fail=()):
        self.name, self.log, self.fail = name, log, list(fail)

    def add(self, enc):
        self.log.append(("add", self.name))

    def flush(self):
        if self.fail:
            raise self.fail.pop(0)
        self.log.append(("flush", self.name))


def test_checkpoint_order_flush_milvus_then_tags_then_commit():
    log = []
    cp = Checkpoint(commit=lambda offs, wait: log.append(("commit", dict(offs))), assigned=lambda: {0, 1},
                    milvus=RecSink("milvus", log, [RetryLater("milvus", "x")]), tags=RecSink("tags", log),
                    dlq=RecSink("dlq", log), policy=RetryPolicy(0.001, 0.01, 5))
    enc = Encoded(_batch([_note(1)], {0: 2, 1: 7, 3: 1}), None, [], [], "v")
    cp.complete(enc)
    assert log[-2:] == [("flush", "tags"), ("flush", "dlq")] and ("flush", "milvus") in log
    assert not any(e[0] == "commit" for e in log)  # step 3 happens on the polling thread
    assert cp.commit_ready() == {0: 2, 1: 7}  # partition 3 is not ours: not committed
    assert log[-1] == ("commit", {0: 2, 1: 7})
    assert cp.commit_ready() == {}


def test_checkpoint_gives_up_without_commit():
    log = []
    cp = Checkpoint(commit=lambda offs, wait: log.append("commit"), assigned=lambda: {0},
                    milvus=RecSink("milvus", log), tags=RecSink("tags", log, [GiveUp("tags", "fenced")]),
                    policy=RetryPolicy(0.001, 0.01, 5))
    with pytest.raises(CheckpointFailed):
        cp.complete(Encoded(_batch([_note(1)], {0: 2}), None, [], [], "v"))
    assert cp.commit_ready() == {} and "commit" not in log


def test_checkpoint_retry_budget_is_bounded():
    cp = Checkpoint(commit=lambda offs, wait: None, assigned=lambda: {0},
                    milvus=RecSink("milvus", [], [RetryLater("milvus", "down")] * 1000),
                    policy=RetryPolicy(0.001, 0.01, 0.2))
    with pytest.raises(CheckpointFailed, match="retry budget"):
        cp.complete(Encoded(_batch([_note(1)], {0: 2}), None, [], [], "v"))


def test_encode_isolates_a_poison_note():
    enc = FakeEncoder(dim=8, fail_titles=("title 2",))
    b = _batch([_note(i) for i in range(4)], {0: 4})
    out = encode_batch(enc, b, "both", topic="notes")
    assert [n.note_id for n in out.batch.notes] == ["n0", "n1", "n3"] and out.embeddings.shape == (3, 8)
    assert [(d.note_id, d.error_kind) for d in out.failed] == [("n2", "encode_failed")]
    assert out.categories == ["title"] * 3


def test_pipeline_keeps_order_and_stops_on_error():
    import threading
    import time

    from worker.pipeline import Pipeline

    done = []
    p = Pipeline(lambda b, idle, early: b, lambda e: done.append(e.seq) if e.seq != 3 else (_ for _ in ()).throw(RuntimeError("x")))
    for i in range(1, 6):
        b = _batch([], {})
        b.seq = i
        assert p.submit(b, timeout=5) or p.error is not None
    p.drain(5)
    assert done == [1, 2] and isinstance(p.error, RuntimeError)
    p.close()
