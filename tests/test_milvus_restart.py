"""A Milvus server restart mid-run (issue 10): the worker retries, pauses, and resumes without loss. The
server is one of the test's own (own directory and ports), so the shared test server keeps running."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.conftest import REPO
from tests.fakes import FakeEncoder
from tests.test_milvus_script import _ports
from tests.test_worker_e2e import settings_for, topics  # noqa: F401 - fixture
from tests.worker_support import AppThread, note_doc, produce_notes, wait_committed_to_end
from worker.app import WorkerApp
from worker.sinks.milvus import MilvusStore

SCRIPT = str(REPO / "scripts" / "milvus")
pytestmark = pytest.mark.timeout(400)


def _milvus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300)


def test_milvus_server_restart_mid_run_loses_nothing(kafka_bootstrap, topics, tmp_path):
    grpc, etcd = _ports()
    where = ["--dir", str(tmp_path / "milvus"), "--port", str(grpc), "--etcd-port", str(etcd)]
    up = _milvus("start", *where)
    assert up.returncode == 0, up.stderr[-3000:]
    uri = up.stdout.strip().splitlines()[-1]
    s = settings_for(kafka_bootstrap, topics, uri, model={"generate": "none"}, batch={"max_batch_notes": 16},
                     retry={"initial_s": 0.2, "max_wait_s": 2.0, "budget_s": 120}, milvus={"timeout_s": 5})
    app = WorkerApp(s, encoder=FakeEncoder(dim=16))
    t = AppThread(app)
    produced: list[str] = []

    def publish():  # notes flow before, during and after the outage
        for k in range(30):
            produced.extend(produce_notes(kafka_bootstrap, topics["notes"], [note_doc(k * 20 + i) for i in range(20)]))
            time.sleep(1.0)

    pub = threading.Thread(target=publish, daemon=True)
    try:
        pub.start()
        time.sleep(5)
        down = _milvus("stop", "--dir", str(tmp_path / "milvus"))
        assert down.returncode == 0, down.stderr[-3000:]
        time.sleep(5)
        paused_during_outage = app.source.paused and t.alive()
        again = _milvus("start", *where)
        assert again.returncode == 0, again.stderr[-3000:]
        pub.join(120)
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=180, alive=t.alive)
        assert paused_during_outage, "the worker did not pause its partitions while Milvus was down"
        assert app.metrics.sink_retries.labels(sink="milvus")._value.get() > 0
        assert t.stop() == 0
        store = MilvusStore(uri, alias="notes")
        try:
            ids = store.all_ids()
        finally:
            store.close()
        assert len(produced) == 600 and len(ids) == len(set(ids)) and set(ids) == set(produced)
    finally:
        if t.alive():
            t.stop()
        _milvus("stop", "--dir", str(tmp_path / "milvus"))


def test_a_worker_started_while_milvus_is_down_waits_and_starts_when_it_answers(kafka_bootstrap, topics,
                                                                                 milvus_server_backend):
    """No Milvus answers at start-up (a relay in front of the shared server, cut): the worker does not exit
    into a crash loop's back-off. It logs `milvus_unreachable` and tries again every few seconds, not
    started; within seconds of Milvus answering it starts and stores the notes waiting in the topic."""
    import structlog

    from bench.relay import Relay

    proxy = Relay(milvus_server_backend.uri)
    resume = proxy.cut()
    s = settings_for(kafka_bootstrap, topics, proxy.uri, model={"generate": "none"},
                     retry={"initial_s": 0.2, "max_wait_s": 1.0, "budget_s": 60},
                     milvus={"collection": milvus_server_backend.alias, "timeout_s": 5})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(20)])
    with structlog.testing.capture_logs() as logs:
        app = WorkerApp(s, encoder=FakeEncoder(dim=16))
        t = AppThread(app)
        try:
            time.sleep(4)
            waiting = [e for e in logs if e["event"] == "milvus_unreachable"]
            assert t.alive() and not app.started and len(waiting) >= 3, [e["event"] for e in logs]
            assert "no Milvus answered at " + proxy.uri in waiting[-1]["error"]
            resume()
            back = time.monotonic()
            while app.store is None:  # it stopped waiting: the store is open
                assert t.alive() and time.monotonic() - back < 15, "the worker did not reach Milvus once it was back"
                time.sleep(0.1)
            # then the rest of start-up: the collection made and loaded, which took 19.8 s on a server that had
            # just started (the store was open 0.5 s after Milvus was back)
            while not app.started:
                assert t.alive() and time.monotonic() - back < 90, "the worker did not start after Milvus was back"
                time.sleep(0.1)
            wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
            assert t.stop() == 0
        finally:
            if t.alive():
                t.stop()
            proxy.close()
    store = milvus_server_backend.store()
    try:
        assert sorted(store.all_ids()) == sorted(ids)
    finally:
        store.close()
