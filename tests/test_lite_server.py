"""milvus-lite served from a child process (`MilvusStore(..., lite_process=True)`, worker/lite_server.py):
the same store behaviour, the db's LOCK held by the child and released on close, a dead child fatal (not
retried as a transient fault), a predecessor's LOCK waited for. The worker's SIGKILL/restart test with it
is in test_worker_faults.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.test_milvus_sink import DIM, HOSTILE, MV, _enc, _note
from worker.lite_server import LiteServer, LiteServerError, LiteServerGone
from worker.sinks import GiveUp
from worker.sinks.milvus import MilvusSink, MilvusStore

pytestmark = pytest.mark.timeout(180)


def test_a_store_served_by_a_child_behaves_like_the_embedded_one(tmp_path):
    path = str(tmp_path / "m.db")
    store = MilvusStore(path, alias="notes", lite_process=True)
    try:
        ls = store.lite_server
        assert ls.alive() and ls.pid != os.getpid() and store.client_uri == ls.uri != path
        coll = store.ensure(DIM, MV)
        sink = MilvusSink(store, coll)
        notes = [_note(f"n{i}") for i in range(20)] + [_note(h) for h in HOSTILE]
        sink.add(_enc(notes))
        assert sink.flush() == []
        ids = [n.note_id for n in notes]
        assert sorted(store.all_ids()) == sorted(ids) and store.count() == len(ids)
        got = store.get(HOSTILE + ["absent"], ["title"])  # hostile ids read back as exactly themselves
        assert sorted(r["note_id"] for r in got) == sorted(HOSTILE)
        assert store.similar(HOSTILE[0], 3)["note"]["note_id"] == HOSTILE[0]
        # the child holds the db: this process cannot open it as well
        with pytest.raises(Exception):
            MilvusStore(path, alias="notes")
    finally:
        store.close()
    assert not store.lite_server.alive() and store.lite_server.exit_status() == "exit code 0"
    again = MilvusStore(path, alias="notes")  # the LOCK is free again; every acknowledged row is there
    try:
        assert again.count() == len(ids)
    finally:
        again.close()


def test_a_dead_child_is_fatal_not_transient(tmp_path):
    store = MilvusStore(str(tmp_path / "m.db"), alias="notes", lite_process=True, timeout_s=5)
    try:
        coll = store.ensure(DIM, MV)
        sink = MilvusSink(store, coll)
        os.kill(store.lite_server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while store.lite_server.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        sink.add(_enc([_note("n1")]))
        with pytest.raises(GiveUp, match="killed by signal SIGKILL"):  # the worker stops without committing
            sink.flush()
        assert not store.reachable()
        with pytest.raises(LiteServerGone):
            store.count()
    finally:
        store.close()


def test_a_new_child_waits_for_its_predecessors_lock(tmp_path):
    path = str(tmp_path / "m.db")
    holder = LiteServer(path)  # a predecessor holds the LOCK
    with pytest.raises(LiteServerError, match="holds the lock"):
        LiteServer(path, lock_wait_s=0.5)
    threading.Timer(1.5, holder.close).start()  # a predecessor that goes away
    t0 = time.monotonic()
    server = LiteServer(path, lock_wait_s=20)
    try:
        assert server.alive() and time.monotonic() - t0 >= 1.0
    finally:
        server.close()
    assert not server.alive()
