"""Milvus writes from a child process (`MilvusStore(..., write_process=True)`, worker/milvus_writer.py), on the
real Milvus 2.3 server and on milvus-lite served from a child: the sink's contract unchanged through it
(hostile ids delete exactly their own row, refused rows isolated by bisection, a transient outage retried
with nothing lost, a dead writer fatal), and an embedded db refused. The worker end to end through the
writer is in test_server_path.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import tests.test_milvus_sink as sink_tests
from tests.conftest import MilvusBackend
from bench.relay import Relay
from tests.test_milvus_sink import DIM, MV, _enc, _note, _transient_fault
from worker.milvus_writer import WriterGone, pack_rows, unpack_rows
from worker.sinks import GiveUp
from worker.sinks.milvus import SIMILAR_WAIT_S, MilvusSink, MilvusStore, build_row, classify

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(params=["server", "lite-process"])
def writer_backend(request, tmp_path):
    if request.param == "lite-process":
        yield MilvusBackend("lite", str(tmp_path / "milvus" / "notes.db"), "notes")
        return
    yield request.getfixturevalue("milvus_server_backend")


def _writer_store(backend: MilvusBackend, **kw) -> MilvusStore:
    return MilvusStore(backend.uri, alias=backend.alias, lite_process=not backend.is_server, write_process=True, **kw)


@pytest.fixture
def wstore(writer_backend):
    s = _writer_store(writer_backend)
    s.collection = s.ensure(DIM, MV)
    yield s
    s.close()


def test_rows_travel_as_columns_and_come_back_equal():
    notes = [_note(f"n{i}", title=t) for i, t in enumerate(["a", "é" * 3, "'\"\\"])]
    vecs = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    rows = [build_row(n, vecs[i], [None, "news", ""][i], [[], ["x"], ["y", "z"]][i], MV) for i, n in enumerate(notes)]
    cols = pack_rows(rows)
    assert cols["embedding"].shape == (3, DIM) and cols["embedding"].dtype == np.float32
    back = unpack_rows(cols)
    assert [{k: v for k, v in r.items() if k != "embedding"} for r in back] == \
           [{k: v for k, v in r.items() if k != "embedding"} for r in rows]
    assert all(np.array_equal(a["embedding"], b["embedding"]) for a, b in zip(back, rows))
    assert pack_rows([]) == {} and unpack_rows({}) == []
    with pytest.raises(ValueError):  # vectors of different sizes are a bug upstream, not packed
        pack_rows([rows[0], {**rows[1], "embedding": np.ones(DIM + 1, np.float32)}])


def test_writes_run_in_a_child_and_reads_see_them(wstore, writer_backend):
    w = wstore.writer
    assert w is not None and w.alive() and w.pid not in (os.getpid(), getattr(wstore.lite_server, "pid", None))
    sink = MilvusSink(wstore, wstore.collection)
    sink.add(_enc([_note(f"n{i}") for i in range(30)]))
    assert sink.flush() == []
    assert wstore.count() == 30 and wstore.similar("n3", 2)["note"]["note_id"] == "n3"


def test_reads_answer_beside_a_write_in_flight(wstore, monkeypatch):
    """A long upsert holds the writer process only: `similar` (the worker's /similar) and the readiness
    probe answer while it runs. Under the store lock, as an in-process client's writes are, `similar` waits
    SIMILAR_WAIT_S and then raises StoreBusy (GPU-sized batches make writes long)."""
    sink = MilvusSink(wstore, wstore.collection)
    sink.add(_enc([_note(f"n{i}") for i in range(5)]))
    assert sink.flush() == []
    started, release = threading.Event(), threading.Event()
    upsert = wstore.writer.upsert

    def slow_upsert(*a, **kw):
        started.set()
        release.wait(60)
        return upsert(*a, **kw)

    monkeypatch.setattr(wstore.writer, "upsert", slow_upsert)
    sink.add(_enc([_note("late")]))
    flushed: list = []
    writer = threading.Thread(target=lambda: flushed.append(sink.flush()))
    writer.start()
    try:
        assert started.wait(10)
        t0 = time.monotonic()
        assert wstore.similar("n1", 2)["note"]["note_id"] == "n1"
        assert wstore.get(["n2"], ["note_id"]) == [{"note_id": "n2"}]
        assert wstore.reachable()
        assert time.monotonic() - t0 < SIMILAR_WAIT_S
        assert writer.is_alive() and not release.is_set()  # the write was in flight throughout
    finally:
        release.set()
        writer.join(60)
    assert flushed == [[]] and "late" in wstore.all_ids()


def test_hostile_ids_through_the_writer(tmp_path):
    """On milvus-lite served from a child (on the server this takes ~40 s of reads, one per id; the worker's
    test on the server, test_server_path.py, sends hostile ids and tombstones through the writer)."""
    store = _writer_store(MilvusBackend("lite", str(tmp_path / "milvus" / "notes.db"), "notes"))
    try:
        store.collection = store.ensure(DIM, MV)
        sink_tests.test_hostile_ids_get_and_delete_exactly_their_own_row(store)
    finally:
        store.close()


def test_refused_rows_through_the_writer_are_bisected(wstore, writer_backend, monkeypatch):
    sink_tests.test_rows_the_store_refuses_are_isolated_and_keep_their_previous_version(wstore, writer_backend,
                                                                                          monkeypatch)


def test_a_transient_fault_through_the_writer_is_retried(milvus_server_backend):
    base = MilvusStore(milvus_server_backend.uri, alias=milvus_server_backend.alias)
    base.ensure(DIM, MV)
    base.close()
    proxy = Relay(milvus_server_backend.uri)
    store = MilvusStore(proxy.uri, alias=milvus_server_backend.alias, timeout_s=5.0, write_process=True)
    try:
        store.collection = store.resolve()
        _transient_fault(store, proxy.cut)
    finally:
        store.close()


def test_a_dead_writer_is_fatal_and_reads_go_on(wstore):
    sink = MilvusSink(wstore, wstore.collection)
    sink.add(_enc([_note("before")]))
    assert sink.flush() == []
    os.kill(wstore.writer.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while wstore.writer.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    sink.add(_enc([_note("after")]))
    # fatal: the worker stops without committing, and says why
    with pytest.raises(GiveUp, match="writer process .*killed by signal SIGKILL.* is gone"):
        sink.flush()
    assert wstore.all_ids() == ["before"]  # reads are this process's own client
    assert classify(WriterGone("x")) == "fatal"


def test_an_embedded_db_cannot_be_written_from_another_process(tmp_path):
    from pydantic import ValidationError

    from worker.config import Settings

    with pytest.raises(ValueError, match="write_process needs a Milvus server URI or lite_process"):
        MilvusStore(str(tmp_path / "m.db"), write_process=True)
    with pytest.raises(ValidationError, match="write_process needs a Milvus server uri"):
        Settings(milvus={"uri": str(tmp_path / "m.db"), "write_process": True})
    assert Settings(milvus={"uri": str(tmp_path / "m.db"), "write_process": True, "lite_process": True})
    assert Settings(milvus={"uri": "http://127.0.0.1:19530", "write_process": True}).milvus.write_process
