"""Unit tests of the stages around the encoder (no broker, no Milvus): the checkpoint's order of steps,
its handling of rejected rows and of ownership, the ownership fence, the pipeline's error handling and
bounded waits. Decoding: tests/test_decode.py; the encode stage: tests/test_encoder_stage.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from worker.checkpoint import Checkpoint, CheckpointFailed, RetryPolicy
from worker.ownership import Ownership
from worker.pipeline import Pipeline
from worker.records import Batch, DeadLetter, Encoded, Note, Raw
from worker.sinks import GiveUp, Rejected, RetryLater
from worker.source import parse_offsets


def test_parse_offsets():
    assert parse_offsets("0:10, 2:5") == {0: 10, 2: 5}


def _note(i, p=0):
    return Note(note_id=f"n{i}", title=f"title {i}", content="c", author_id="a", published_at=0, topic=None,
                category=None, hashtags=None, partition=p, offset=i, raw=Raw(f"n{i}".encode(), b"{...}", (("h", b"v"),)))


def _batch(notes, offsets, dead=(), owner=None):
    return Batch(seq=1, notes=list(notes), tombstones=[], dead=list(dead), offsets=offsets, records=len(notes),
                 padded_tokens=0, opened_at=0, closed_at=0, reason="notes",
                 owner=owner if owner is not None else {p: 1 for p in offsets})


def _enc(batch):
    n = len(batch.notes)
    return Encoded(batch, np.ones((n, 4), np.float32), ["c"] * n, [["t"]] * n, "v")


class RecSink:
    """Records what the checkpoint asks of a sink; `fail` raises in turn on flush; `reject` note ids."""

    def __init__(self, name, log, fail=(), reject=()):
        self.name, self.log, self.fail, self.reject = name, log, list(fail), set(reject)
        self.staged: list = []
        self.letters_in: list = []

    def add(self, enc):
        self.staged = [n.note_id for n in enc.batch.notes]
        self.log.append(("add", self.name, tuple(self.staged)))

    def add_letters(self, letters):
        self.letters_in = list(letters)

    def letters(self, enc):
        return [*enc.batch.dead, *enc.failed]

    def flush(self):
        if self.fail:
            raise self.fail.pop(0)
        self.log.append(("flush", self.name))
        notes = {n: None for n in self.staged}
        return [Rejected(_note(int(n[1:])), "bad row") for n in notes if n in self.reject]

    def discard(self):
        self.staged = []


def _cp(log, own, **kw):
    kw.setdefault("milvus", RecSink("milvus", log))
    return Checkpoint(commit=lambda offs, wait: log.append(("commit", dict(offs))), ownership=own,
                      policy=RetryPolicy(0.001, 0.01, 5), topic="notes", **kw)


def _owned(*parts):
    o = Ownership()
    o.assign(parts)
    return o


def test_checkpoint_order_flush_milvus_then_tags_then_dlq_then_commit():
    log = []
    own = _owned(0, 1)
    cp = _cp(log, own, milvus=RecSink("milvus", log, [RetryLater("milvus", "x")]), tags=RecSink("tags", log),
             dlq=RecSink("dlq", log))
    b = _batch([_note(1)], {0: 2, 1: 7})
    b.owner = own.stamp([0, 1])
    cp.complete(_enc(b))
    flushes = [e[1] for e in log if e[0] == "flush"]
    assert flushes == ["milvus", "tags", "dlq"]
    assert not any(e[0] == "commit" for e in log)  # step 3 happens on the polling thread
    cp.commit_ready()
    assert log[-1] == ("commit", {0: 2, 1: 7})
    n = len(log)
    cp.commit_ready()
    assert len(log) == n  # nothing new to commit


def test_rejected_rows_become_sink_rejected_dead_letters_without_tags():
    log = []
    own = _owned(0)
    tags, dlq = RecSink("tags", log), RecSink("dlq", log)
    cp = _cp(log, own, milvus=RecSink("milvus", log, reject={"n2"}), tags=tags, dlq=dlq)
    b = _batch([_note(i) for i in range(4)], {0: 4})
    b.owner = own.stamp([0])
    cp.complete(_enc(b))
    assert tags.staged == ["n0", "n1", "n3"]
    [d] = dlq.letters_in
    assert (d.error_kind, d.note_id, d.offset, d.value, d.headers) == ("sink_rejected", "n2", 2, b"{...}", (("h", b"v"),))


def test_checkpoint_gives_up_without_commit():
    log = []
    own = _owned(0)
    cp = _cp(log, own, tags=RecSink("tags", log, [GiveUp("tags", "fenced")]))
    b = _batch([_note(1)], {0: 2})
    b.owner = own.stamp([0])
    with pytest.raises(CheckpointFailed):
        cp.complete(_enc(b))
    cp.commit_ready()
    assert not any(e[0] == "commit" for e in log)


def test_checkpoint_retry_budget_is_bounded():
    own = _owned(0)
    cp = Checkpoint(commit=lambda offs, wait: None, ownership=own,
                    milvus=RecSink("milvus", [], [RetryLater("milvus", "down")] * 100000),
                    policy=RetryPolicy(0.001, 0.01, 0.2))
    b = _batch([_note(1)], {0: 2})
    b.owner = own.stamp([0])
    t0 = time.monotonic()
    with pytest.raises(CheckpointFailed, match="retry budget"):
        cp.complete(_enc(b))
    assert time.monotonic() - t0 < 3


def test_lost_partition_is_neither_written_nor_committed():
    log = []
    own = _owned(0, 1)
    milvus = RecSink("milvus", log)
    cp = _cp(log, own, milvus=milvus)
    b = _batch([_note(1, p=0), _note(2, p=1)], {0: 2, 1: 3})
    b.owner = own.stamp([0, 1])
    own.revoke([1])
    cp.complete(_enc(b))
    assert ("add", "milvus", ("n1",)) in log and not any("n2" in e[2] for e in log if e[0] == "add")
    cp.commit_ready()
    assert log[-1] == ("commit", {0: 2})


def test_a_partition_revoked_and_assigned_again_does_not_take_an_old_batch():
    own = _owned(0)
    old = own.stamp([0])
    own.revoke([0])
    own.assign([0])  # back to this worker: a new generation
    with own.hold(old) as owned:
        assert owned == set()
    with own.hold(own.stamp([0])) as owned:
        assert owned == {0}


def test_revoke_waits_for_a_write_in_progress():
    own = _owned(0)
    events = []
    entered = threading.Event()

    def write():
        with own.hold(own.stamp([0])) as owned:
            entered.set()
            time.sleep(0.3)
            events.append(("write_done", owned))

    t = threading.Thread(target=write)
    t.start()
    entered.wait(5)
    own.revoke([0])
    events.append(("revoked",))
    t.join()
    assert events == [("write_done", {0}), ("revoked",)]


def test_pipeline_keeps_order_and_stops_on_error():
    done = []

    def sink(e):
        if e.seq == 3:
            raise RuntimeError("x")
        done.append(e.seq)

    p = Pipeline(lambda b, idle, early: Encoded(b, None, [], [], "v"), lambda e: sink(e.batch))
    for i in range(1, 6):
        b = _batch([], {})
        b.seq = i
        assert p.submit(b, timeout=5) or p.error is not None
    p.drain(5)
    assert done == [1, 2] and isinstance(p.error, RuntimeError)
    p.close()


def test_pipeline_waits_are_bounded_and_do_not_spin_after_a_failure():
    p = Pipeline(lambda b, idle, early: (_ for _ in ()).throw(RuntimeError("engine")), lambda e: None)
    assert p.submit(_batch([], {}), timeout=1)
    assert p.drain(5) is False and p.error is not None
    t0, c0 = time.monotonic(), time.process_time()
    assert p.submit(_batch([], {}), timeout=2) is False  # returns at once: the pipeline failed
    assert time.monotonic() - t0 < 0.1 and time.process_time() - c0 < 0.1
    p.close(timeout=2)


def test_pipeline_drain_times_out_on_a_stuck_stage():
    release = threading.Event()
    p = Pipeline(lambda b, idle, early: release.wait(10) and Encoded(b, None, [], [], "v"), lambda e: None)
    assert p.submit(_batch([], {}), timeout=1)
    t0 = time.monotonic()
    assert p.drain(0.3) is False and 0.25 < time.monotonic() - t0 < 2
    release.set()
    assert p.drain(5) is True
    p.close()


def test_dead_letter_of_keeps_the_original_bytes():
    n = _note(7, p=2)
    d = DeadLetter.of(n, "encode_failed", "why", "notes")
    assert (d.key, d.value, d.headers, d.partition, d.offset, d.topic) == (b"n7", b"{...}", (("h", b"v"),), 2, 7, "notes")


def test_lag_series_of_revoked_partitions_are_dropped_and_process_metrics_exported():
    from prometheus_client import generate_latest

    from worker.metrics import Metrics

    m = Metrics()
    handle = m.on_stats("notes")
    handle({"topics": {"notes": {"partitions": {"0": {"consumer_lag": 5}, "1": {"consumer_lag": 7},
                                                 "-1": {"consumer_lag": 9}}}}})
    text = generate_latest(m.registry).decode()
    assert 'notellm_consumer_lag{partition="0"} 5.0' in text and 'partition="-1"' not in text
    m.forget_partitions([0, 3])  # 3 was never reported: no error
    text = generate_latest(m.registry).decode()
    assert 'partition="0"' not in text and 'notellm_consumer_lag{partition="1"} 7.0' in text
    assert "process_resident_memory_bytes" in text and "notellm_engine_restarts_total 0.0" in text
