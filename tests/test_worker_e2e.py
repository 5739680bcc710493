"""The worker end to end on the real broker, a real exported tiny model and real Milvus: milvus-lite, and for
the tests where the backend matters (upserts replacing rows, tombstone deletes, re-upserts of one id) also a
Milvus 2.3 server (`milvus_backend`: a collection alias of the test's own, dropped afterwards)."""
from __future__ import annotations

import json
import time
import uuid

import pytest

import schemas
from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.worker_support import (AppThread, committed, dlq_events, high_watermarks, note_doc, produce_notes,
                                  produce_raw, read_topic, tag_ids, wait_committed_to_end)
from worker.app import WorkerApp

pytestmark = pytest.mark.timeout(300)
from worker.config import load_settings
from worker.sinks.milvus import MilvusStore


@pytest.fixture
def topics(new_topic):
    return {"notes": new_topic(3, prefix="notes"), "tags": new_topic(3, prefix="tags"), "dlq": new_topic(1, prefix="dlq")}


def settings_for(kafka_bootstrap, topics, milvus_uri, **over):
    base = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_notes": topics["notes"], "topic_tags": topics["tags"],
                  "topic_dlq": topics["dlq"], "group_id": f"g-{uuid.uuid4().hex[:8]}", "session_timeout_ms": 6000,
                  "max_poll_interval_ms": 30000},
        "milvus": {"uri": milvus_uri},
        "batch": {"max_batch_notes": 32, "linger_ms": 20},
        "model": {"generate": "both"},
        "retry": {"initial_s": 0.05, "max_wait_s": 0.5, "budget_s": 30},
        "http": {"port": 0},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_settings(base)


def settings_on(kafka_bootstrap, topics, backend, **over):
    """settings_for on a `milvus_backend`: its URI and its collection alias (unique per test on the server)."""
    over["milvus"] = {"collection": backend.alias, **over.get("milvus", {})}
    return settings_for(kafka_bootstrap, topics, backend.uri, **over)


def test_2000_notes_three_partitions(kafka_bootstrap, topics, milvus_uri, encoder):
    s = settings_for(kafka_bootstrap, topics, milvus_uri)
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(2000)])
    store = MilvusStore(milvus_uri, alias="notes")
    app = WorkerApp(s, encoder=encoder, store=store)
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=240, alive=t.alive)
    assert t.stop() == 0
    got = store.all_ids()
    assert len(got) == len(set(got)) == 2000 and set(got) == set(ids)
    assert set(tag_ids(kafka_bootstrap, topics["tags"])) == set(ids)
    hw = high_watermarks(kafka_bootstrap, topics["notes"])
    assert committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], hw) == hw
    # Tags are valid note_tags.v1 events.
    msgs = read_topic(kafka_bootstrap, topics["tags"])
    for m in msgs[:50]:
        schemas.validate("note_tags.v1", json.loads(m.value()))
    store.close()


def test_malformed_inputs_go_to_dlq_and_good_notes_around_them_pass(kafka_bootstrap, topics, milvus_uri, encoder):
    s = settings_for(kafka_bootstrap, topics, milvus_uri, batch={"max_note_bytes": 2048})
    good = [note_doc(i) for i in range(60)]
    bad_schema = {**note_doc(900), "published_at": "yesterday"}
    missing = {k: v for k, v in note_doc(901).items() if k != "title"}
    big = note_doc(902, content="x" * 5000)
    raw = []
    for i, d in enumerate(good):
        raw.append((d["note_id"].encode(), json.dumps(d).encode()))
        if i == 10:
            raw.append((b"bad-utf8", b"\xff\xfe{\"note_id\": \"x\"}"))
        if i == 20:
            raw.append((b"bad-json", b"{not json"))
        if i == 30:
            raw.append((bad_schema["note_id"].encode(), json.dumps(bad_schema).encode()))
            raw.append((missing["note_id"].encode(), json.dumps(missing).encode()))
        if i == 40:
            raw.append((big["note_id"].encode(), json.dumps(big).encode()))
    produce_raw(kafka_bootstrap, topics["notes"], raw)
    store = MilvusStore(milvus_uri, alias="notes")
    app = WorkerApp(s, encoder=encoder, store=store)
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=120, alive=t.alive)
    assert t.stop() == 0
    assert set(store.all_ids()) == {d["note_id"] for d in good}
    events = dlq_events(kafka_bootstrap, topics["dlq"])
    for ev, headers in events:
        schemas.validate("dead_letter.v2", ev)
        assert headers["error_kind"] == ev["error_kind"] and headers["error_message"]
    import base64
    kinds = {base64.b64decode(ev["key"]["b64"]).decode(): ev["error_kind"] for ev, _ in events}
    assert kinds == {"bad-utf8": "not_utf8", "bad-json": "not_json", bad_schema["note_id"]: "schema_violation",
                     missing["note_id"]: "schema_violation", big["note_id"]: "too_large"}
    # Invariant: produced ids = ids in Milvus + ids in the DLQ.
    produced = {k.decode() for k, _ in raw}
    assert produced == set(store.all_ids()) | set(kinds)
    store.close()


def test_tombstone_deletes_and_republish_replaces(kafka_bootstrap, topics, milvus_backend, encoder):
    s = settings_on(kafka_bootstrap, topics, milvus_backend)
    store = milvus_backend.store()
    app = WorkerApp(s, encoder=encoder, store=store)
    t = AppThread(app)
    docs = [note_doc(i) for i in range(30)]
    produce_notes(kafka_bootstrap, topics["notes"], docs)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    before = {r["note_id"]: r for r in store.get(["n00003", "n00004"], ["embedding", "title"])}
    assert set(before) == {"n00003", "n00004"}
    # n00003 deleted; n00004 replaced; n00005 deleted and published again right after (same key, same partition).
    produce_raw(kafka_bootstrap, topics["notes"], [(b"n00003", None), (b"n00005", None)])
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(4, title="Completely different title", content="other words"),
                                                     note_doc(5, title="Back again")])
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    ids = store.all_ids()
    assert "n00003" not in ids and len(ids) == len(set(ids)) == 29   # replaced, not duplicated
    assert store.count() == 29
    after = store.get(["n00004", "n00005"], ["embedding", "title"])
    assert {r["note_id"]: r["title"] for r in after} == {"n00004": "Completely different title", "n00005": "Back again"}
    assert list(next(r for r in after if r["note_id"] == "n00004")["embedding"]) != list(before["n00004"]["embedding"])
    # A deleted note published again comes back.
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(3, title="Revived")])
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    assert t.stop() == 0
    assert [r["title"] for r in store.get(["n00003"], ["title"])] == ["Revived"]
    ids = store.all_ids()
    assert len(ids) == len(set(ids)) == 30 and store.count() == 30
    store.close()


def test_low_load_note_is_searchable_before_its_tags(kafka_bootstrap, topics, milvus_backend, encoder):
    """An idle encoder upserts a small batch's vectors before generating its tags; the full batch
    then re-upserts with category/hashtags and only then commits: one row, the second version."""
    s = settings_on(kafka_bootstrap, topics, milvus_backend)
    store = milvus_backend.store()
    flushed: list[list[tuple]] = []

    class Spy:
        def __init__(self, sink):
            self.sink, self.name = sink, sink.name

        def add(self, enc):
            self.sink.add(enc)

        def flush(self):
            flushed.append([(r["note_id"], r["category"]) for r in self.sink._rows.values()])
            return self.sink.flush()

        def __getattr__(self, k):
            return getattr(self.sink, k)

    app = WorkerApp(s, encoder=encoder, store=store, wrap_sink=lambda sk: Spy(sk) if sk.name == "milvus" else sk)
    t = AppThread(app)
    while not (app.started and app.ownership.owned()):
        time.sleep(0.02)
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(7)])
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    assert t.stop() == 0
    rows = [r for f in flushed for r in f if r[0] == "n00007"]
    assert len(rows) == 2 and rows[0][1] == "" and rows[1][1] != ""
    assert [r["category"] for r in store.get(["n00007"], ["category"])] == [rows[1][1]]
    assert store.all_ids() == ["n00007"]
    store.close()
