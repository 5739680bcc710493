"""The worker process's lifecycle (issue 9): SIGTERM at any moment ends it cleanly and quickly, start-up
included; the exit code says whether the last commit succeeded; a clean run prints no traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import KafkaException

from tests.test_worker_e2e import topics  # noqa: F401 - fixture
from tests.worker_support import REPO, committed, free_port, high_watermarks, note_doc, produce_notes
from tests.worker_support import tiny_dir  # noqa: F401 - fixture
from worker.checkpoint import Checkpoint
from worker.ownership import Ownership

pytestmark = pytest.mark.timeout(300)


def _worker(kafka_bootstrap, topics, milvus_uri, tiny_dir, port, group):
    env = {**os.environ, "NOTELLM_LOG__FORMAT": "json", "NOTELLM_MODEL__ISOLATION": "process"}
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", kafka_bootstrap, "--topic", topics["notes"],
           "--tags-topic", topics["tags"], "--dlq-topic", topics["dlq"], "--group", group, "--model", str(tiny_dir),
           "--milvus-uri", milvus_uri, "--http-port", str(port), "--threads", "1"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def test_sigterm_during_startup_and_at_steady_state_exits_0_without_traceback(kafka_bootstrap, topics, milvus_uri,
                                                                              tiny_dir):
    group = f"g-{uuid.uuid4().hex[:8]}"
    # 1. SIGTERM while the model is still loading: a clean exit 0, not the default handler's 143.
    port = free_port()
    w = _worker(kafka_bootstrap, topics, milvus_uri, tiny_dir, port, group)
    first = w.stderr.readline()  # the command's first log line: its handlers are installed by then
    assert '"command_starting"' in first, first
    time.sleep(0.3)  # loading the model
    assert not _ready(port)
    t0 = time.monotonic()
    w.send_signal(signal.SIGTERM)
    out, err = w.communicate(timeout=60)
    err = first + err
    assert w.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in err + out
    stopped = [json.loads(line) for line in err.splitlines() if '"worker_stopped"' in line]
    assert stopped and stopped[-1]["rc"] == 0

    # 2. At steady state: consumes, then SIGTERM drains, commits to the end, exits 0; no traceback anywhere.
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(30)])
    w = _worker(kafka_bootstrap, topics, milvus_uri, tiny_dir, port, group)
    deadline = time.monotonic() + 120
    hw = high_watermarks(kafka_bootstrap, topics["notes"])
    while time.monotonic() < deadline and committed(kafka_bootstrap, group, topics["notes"], hw) != hw:
        assert w.poll() is None, w.communicate()[1][-3000:]
        time.sleep(0.5)
    assert _ready(port)
    t0 = time.monotonic()
    w.send_signal(signal.SIGTERM)
    out, err = w.communicate(timeout=90)
    assert w.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in err + out, err[-3000:]
    for line in err.splitlines():
        json.loads(line)  # every line a JSON log line: nothing else on stderr
    assert committed(kafka_bootstrap, group, topics["notes"], hw) == hw and len(ids) == 30


def test_seal_reports_a_failed_final_commit():
    own = Ownership()
    own.assign([0])

    def commit(offsets, *, wait):
        raise KafkaException("broker gone")

    class Sink:
        name = "milvus"

    cp = Checkpoint(commit=commit, ownership=own, milvus=Sink())
    cp.committed = {0: 10}
    assert cp.seal() is False
    cp2 = Checkpoint(commit=lambda offsets, wait: None, ownership=own, milvus=Sink())
    cp2.committed = {0: 10}
    assert cp2.seal() is True
