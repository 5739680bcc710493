"""Fault tests on the real broker + milvus-lite + the tiny exported model. Each checks the invariant:
produced ids = ids in Milvus + ids in the DLQ (+ ids deleted by tombstones), exactly. The SIGKILL/restart
test runs on a Milvus 2.3 server too (a restarted worker finds its collection there and re-upserts what
was not committed)."""
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

from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.worker_support import (REPO, AppThread, committed, high_watermarks, note_doc, produce_notes, tag_ids,
                                  wait_committed_to_end)
from tests.test_worker_e2e import settings_for, settings_on, topics  # noqa: F401 - fixture
from worker.app import WorkerApp

pytestmark = pytest.mark.timeout(300)
from worker.sinks import RetryLater
from worker.sinks.milvus import MilvusStore


class Flaky:
    """Wraps a sink: flush() raises RetryLater until `fail_for_s` has passed since the first flush."""

    def __init__(self, sink, fail_for_s: float) -> None:
        self.sink, self.name = sink, sink.name
        self.fail_for_s = fail_for_s
        self.first: float | None = None
        self.failures = 0
        self.first_ok: float | None = None

    def add(self, enc):
        self.sink.add(enc)

    def flush(self):
        now = time.monotonic()
        self.first = self.first or now
        if now - self.first < self.fail_for_s:
            self.failures += 1
            raise RetryLater(self.name, "injected outage")
        out = self.sink.flush()
        self.first_ok = self.first_ok or time.monotonic()
        return out

    def __getattr__(self, k):
        return getattr(self.sink, k)


def _spy_commits(app) -> list:
    seen = []
    orig = app.checkpoint._commit_fn

    def spy(offsets, *, wait):
        seen.append((time.monotonic(), dict(offsets)))
        return orig(offsets, wait=wait)

    app.checkpoint._commit_fn = spy
    return seen


def test_sink_outage_then_recovery_loses_nothing_and_commits_only_after(kafka_bootstrap, topics, milvus_uri, encoder):
    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "category"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(300)])
    store = MilvusStore(milvus_uri, alias="notes")
    wrapped = []

    def wrap(sink):
        if sink.name in ("milvus", "tags"):
            wrapped.append(Flaky(sink, fail_for_s=3.0 if sink.name == "milvus" else 1.0))
            return wrapped[-1]
        return sink

    app = WorkerApp(s, encoder=encoder, store=store, wrap_sink=wrap)
    app.start()
    commits = _spy_commits(app)
    t = AppThread(app)
    # During the outage the worker stays in the group (keeps polling, paused) and commits nothing.
    time.sleep(2.0)
    assert t.alive() and app.ownership.owned() == {0, 1, 2}
    assert committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], [0, 1, 2]) == {0: -1001, 1: -1001, 2: -1001}
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=120, alive=t.alive)
    assert t.stop() == 0
    milvus, tags = wrapped
    assert milvus.failures > 0 and tags.failures > 0
    assert commits and min(ts for ts, _ in commits) > max(milvus.first_ok, tags.first_ok)
    got = store.all_ids()
    assert len(got) == len(set(got)) and set(got) == set(ids)
    assert set(tag_ids(kafka_bootstrap, topics["tags"])) == set(ids)
    assert app.metrics.sink_retries.labels(sink="milvus")._value.get() > 0
    store.close()


def test_sink_down_past_retry_budget_exits_nonzero_without_commit(kafka_bootstrap, topics, milvus_uri, encoder):
    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "none"},
                     retry={"budget_s": 1.0, "initial_s": 0.05, "max_wait_s": 0.2})
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(50)])
    store = MilvusStore(milvus_uri, alias="notes")
    app = WorkerApp(s, encoder=encoder, store=store,
                    wrap_sink=lambda sk: Flaky(sk, fail_for_s=1e9) if sk.name == "milvus" else sk)
    rc = app.run()
    assert rc != 0 and "milvus" in app.exit_reason
    assert committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], [0, 1, 2]) == {0: -1001, 1: -1001, 2: -1001}
    assert store.count() == 0
    store.close()


def _worker_cmd(s, tiny, port=0):
    return [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", s.kafka.bootstrap_servers,
            "--topic", s.kafka.topic_notes, "--tags-topic", s.kafka.topic_tags, "--dlq-topic", s.kafka.topic_dlq,
            "--group", s.kafka.group_id, "--milvus-uri", s.milvus.uri, "--collection", s.milvus.collection,
            "--model", str(tiny), "--generate", "none",
            "--device", "cpu", "--threads", "1", "--linger-ms", "20", "--http-port", str(port), "--log-format", "json"]


def _children(pid: int) -> set[int]:
    """The pids whose parent is `pid` (Linux /proc)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.add(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _sigkill_mid_run_then_restart(kafka_bootstrap, topics, backend, tiny_dir, tmp_path, env_extra=None) -> set[int]:
    """Kill -9 a worker once part of the topic is committed, restart it, and check the invariant; returns
    the pids of the killed worker's children (all already gone)."""
    s = settings_on(kafka_bootstrap, topics, backend)
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(3000)])
    env = {**os.environ, "NOTELLM_KAFKA__SESSION_TIMEOUT_MS": "6000", **(env_extra or {})}
    log1 = open(tmp_path / "w1.log", "wb")
    p = subprocess.Popen(_worker_cmd(s, tiny_dir), cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    # Kill once part of the topic is committed (so the restart resumes mid-way, not from zero).
    hw = high_watermarks(kafka_bootstrap, topics["notes"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        c = committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], hw)
        done = sum(max(0, o) for o in c.values())
        if done >= 300 or p.poll() is not None:
            break
        time.sleep(0.1)
    assert p.poll() is None, (tmp_path / "w1.log").read_text()[-3000:]
    children = _children(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    assert done < 3000, "the worker finished before it could be killed"
    deadline = time.monotonic() + 10  # every child dies with the worker (PR_SET_PDEATHSIG)
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children), children
    log2 = open(tmp_path / "w2.log", "wb")
    p2 = subprocess.Popen(_worker_cmd(s, tiny_dir), cwd=REPO, env=env, stdout=log2, stderr=subprocess.STDOUT)
    try:
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=180,
                              alive=lambda: p2.poll() is None)
    finally:
        p2.send_signal(signal.SIGTERM)
        rc = p2.wait(60)
    assert rc == 0, (tmp_path / "w2.log").read_text()[-3000:]
    store = backend.store()
    got = store.all_ids()
    assert len(got) == len(set(got)) and set(got) == set(ids) and store.count() == len(ids)
    store.close()
    return children


def test_sigkill_mid_run_then_restart_loses_nothing(kafka_bootstrap, topics, milvus_backend, tiny_dir, tmp_path):
    _sigkill_mid_run_then_restart(kafka_bootstrap, topics, milvus_backend, tiny_dir, tmp_path)


def test_sigkill_with_the_db_in_its_own_process_loses_nothing(kafka_bootstrap, topics, tiny_dir, tmp_path):
    """The same with milvus-lite served by a child process (NOTELLM_MILVUS__LITE_PROCESS) and the writes made
    by another (NOTELLM_MILVUS__WRITE_PROCESS): the kill takes both with it, and the restarted worker's new
    server opens the db once the LOCK is free."""
    from tests.conftest import MilvusBackend

    backend = MilvusBackend("lite", str(tmp_path / "milvus" / "notes.db"), "notes")
    children = _sigkill_mid_run_then_restart(kafka_bootstrap, topics, backend, tiny_dir, tmp_path,
                                             {"NOTELLM_MILVUS__LITE_PROCESS": "true",
                                              "NOTELLM_MILVUS__WRITE_PROCESS": "true"})

    def started(log: str, event: str) -> list[dict]:
        lines = (tmp_path / log).read_text().splitlines()
        return [json.loads(x) for x in lines if f'"{event}"' in x]

    for event in ("milvus_lite_server_started", "milvus_writer_started"):
        first, second = started("w1.log", event), started("w2.log", event)  # each worker: children of its own
        assert len(first) == len(second) == 1, event
        assert first[0]["pid"] in children and second[0]["pid"] not in children  # the first died with its worker


def test_two_workers_one_group_rebalance_mid_run(kafka_bootstrap, new_topic, milvus_uri, encoder):
    """milvus-lite locks a db to one process, so the two group members run as two WorkerApps inside
    this one process, sharing one MilvusStore (one client, calls serialised); each has its own consumer,
    producers, batcher, pipeline and checkpoint, exactly as two pods would."""
    tps = {"notes": new_topic(6, prefix="notes"), "tags": new_topic(3, prefix="tags"), "dlq": new_topic(1, prefix="dlq")}
    s = settings_for(kafka_bootstrap, tps, milvus_uri, model={"generate": "none"})
    docs = [note_doc(i) for i in range(2400)]
    ids = produce_notes(kafka_bootstrap, tps["notes"], docs[:800])
    store = MilvusStore(milvus_uri, alias="notes")

    def wait_for(cond, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    a = WorkerApp(s, encoder=encoder, store=store, name="a")
    ta = AppThread(a)
    wait_for(lambda: a.metrics.embedded._value.get() >= 300 or not ta.alive(), "a to embed 300")
    b = WorkerApp(s, encoder=encoder, store=store, name="b")   # joins mid-run: partitions move to b
    tb = AppThread(b)
    wait_for(lambda: (b.started and b.ownership.owned()) or not tb.alive(), "b to get partitions")
    # Publish more once the group settled, so both members have work after the rebalance.
    ids += produce_notes(kafka_bootstrap, tps["notes"], docs[800:1600])
    wait_for(lambda: b.metrics.embedded._value.get() >= 100 or not tb.alive(), "b to embed 100")
    assert ta.alive() and tb.alive()
    assert ta.stop() == 0                                        # leaves: b takes every partition
    wait_for(lambda: len(b.ownership.owned()) == 6 or not tb.alive(), "b to get every partition")
    ids += produce_notes(kafka_bootstrap, tps["notes"], docs[1600:])
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, tps["notes"], timeout=180, alive=tb.alive)
    assert tb.stop() == 0
    assert a.metrics.embedded._value.get() > 0 and b.metrics.embedded._value.get() > 0
    got = store.all_ids()
    assert len(got) == len(set(got)) and set(got) == set(ids)
    store.close()
