"""Engine faults are not the notes' fault (issue 9): an encoder child that raises, or hangs, is restarted
and the batch retried; past the restart budget the worker exits non-zero without committing anything
and without dead-lettering a single good note, and its health check reports the failure. A transient
engine fault (one bad call) costs one restart and nothing else. Real broker, real milvus-lite, the
real tiny model in a real child process, made to misbehave by tests/faulty_engine.py."""
from __future__ import annotations

import pytest

from tests.test_worker_e2e import settings_for, topics  # noqa: F401 - fixture
from tests.worker_support import tiny_dir  # noqa: F401 - fixture
from tests.worker_support import (AppThread, committed, high_watermarks, note_doc, produce_notes, read_topic,
                                  wait_committed_to_end)
from worker.app import WorkerApp
from worker.encoder_process import ProcessEncoder
from worker.sinks.milvus import MilvusStore

pytestmark = pytest.mark.timeout(300)


def _encoder(tiny_dir, **fault):
    return ProcessEncoder(tiny_dir, factory="tests.faulty_engine:FaultyEngine", device="cpu", intra_op_threads=1,
                          max_batch_notes=32, **fault)


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_engine_fault_past_its_budget_exits_nonzero_without_commit_or_dead_letters(kafka_bootstrap, topics, milvus_uri,
                                                                                     tiny_dir, fault):
    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "category", "batch_timeout_s": 3,
                                                                  "engine_restarts": 1})
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(20)])
    enc = _encoder(tiny_dir, fault=fault)
    store = MilvusStore(milvus_uri, alias="notes")
    try:
        app = WorkerApp(s, encoder=enc, store=store)
        t = AppThread(app)
        t.thread.join(120)  # the worker stops by itself
        assert not t.alive() and t.rc == 1
        assert app.exit_reason.startswith("pipeline failed"), app.exit_reason
        ok, checks = app.healthy()
        assert not ok and checks["pipeline_ok"] is False and checks["encoder_ok"] is False
        assert enc.restarts == 1
        assert app.metrics.engine_restarts._value.get() == 1, "the restart is exported (notellm_engine_restarts_total)"
        hw = high_watermarks(kafka_bootstrap, topics["notes"])
        assert all(o < 0 for o in committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], hw).values())
        assert read_topic(kafka_bootstrap, topics["dlq"]) == [] and read_topic(kafka_bootstrap, topics["tags"]) == []
        assert store.count() == 0
    finally:
        enc.close()
        store.close()


def test_one_engine_fault_costs_one_restart_and_nothing_else(kafka_bootstrap, topics, milvus_uri, tiny_dir, tmp_path):
    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "category", "batch_timeout_s": 30})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(40)])
    enc = _encoder(tiny_dir, fault="nan", once=str(tmp_path / "fired"))  # NaN vectors once: an engine fault
    store = MilvusStore(milvus_uri, alias="notes")
    try:
        app = WorkerApp(s, encoder=enc, store=store)
        t = AppThread(app)
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=120, alive=t.alive)
        assert app.healthy()[0]
        assert t.stop() == 0
        assert enc.restarts == 1 and set(store.all_ids()) == set(ids)
        assert read_topic(kafka_bootstrap, topics["dlq"]) == []
    finally:
        enc.close()
        store.close()
