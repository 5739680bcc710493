"""No record can stop the worker or touch another note's data (issue 9), against the real broker, real
Milvus (a milvus-lite db, and a Milvus 2.3 server: the two parse filters and count field limits
differently) and the real exported tiny model.

One corpus mixes every known trigger — filter injection through a tombstone key, ids with quotes,
backslashes, %, _, RTL and zero-width characters, a dead letter larger than the producer allows, JSON
nested 20,000 deep, lone surrogates in every string field, out-of-range and non-integer timestamps,
duplicate JSON keys, BOMs, control characters, over-long ids, mismatched and undecodable keys, keyless
notes — between good notes on three partitions. The worker must stay up without a restart, commit every
partition to its end, and account for every produced record exactly: indexed, dead-lettered (with its
source partition/offset and original bytes) or deleted; every good note's row intact."""
from __future__ import annotations

import base64
import hashlib
import json
import time

import numpy as np
import pytest
from confluent_kafka import Producer

import schemas
from tests.test_worker_e2e import settings_on, topics  # noqa: F401 - fixture
from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.worker_support import AppThread, committed, dlq_events, high_watermarks, note_doc, wait_committed_to_end
from worker.app import WorkerApp

pytestmark = pytest.mark.timeout(420)

INJECTION = "zz'] or note_id not in ['g00000"
HOSTILE_IDS = [
    "q'uote", 'd"quote', "back\\slash", "trail\\", "\\'", "'\\\"", "50%_off*", "a_b%c", "rtl\u202eevil\u200f",
    "zw\u200bsp\u200d", "mid\ufeffbom", "emoji🙂", "中文标识", INJECTION, '" or 1==1 or "', "x" * 256, "é" * 128,
]
DELETED_HOSTILE = {"q'uote", "back\\slash", "trail\\", '" or 1==1 or "'}


def _doc(note_id: str, i: int, **over) -> dict:
    return {**note_doc(i), "note_id": note_id, "published_at": int(time.time() * 1000), **over}


def _j(doc) -> bytes:
    return json.dumps(doc).encode()


def build_corpus():
    """[(partition, key, value, expect)], expect = ("index", id) | ("dead", None) | ("tomb", id) |
    ("noop_tomb", id). Related records share a partition (order matters for them only)."""
    recs: list[tuple[int, bytes | None, bytes | None, tuple]] = []
    good = [_doc(f"g{i:05d}", i) for i in range(60)]
    for i, d in enumerate(good):
        recs.append((i % 3, d["note_id"].encode(), _j(d), ("index", d["note_id"])))
    for i, nid in enumerate(HOSTILE_IDS):
        recs.append((i % 3, nid.encode(), _j(_doc(nid, 100 + i)), ("index", nid)))
    for i, nid in enumerate(HOSTILE_IDS):  # tombstones after their notes, same partition
        if nid in DELETED_HOSTILE:
            recs.append((i % 3, nid.encode(), None, ("tomb", nid)))
    # a tombstone whose key would delete every row but g00000 if it became part of a filter
    recs.append((1, INJECTION.encode() + b"x", None, ("noop_tomb", INJECTION + "x")))
    recs.append((2, b"never-existed'\\", None, ("noop_tomb", "never-existed'\\")))
    # accepted oddities: BOM before the JSON, keyless note
    bom = _doc("bom-note", 300)
    recs.append((0, b"bom-note", b"\xef\xbb\xbf" + _j(bom), ("index", "bom-note")))
    keyless = _doc("keyless-note", 301)
    recs.append((1, None, _j(keyless), ("index", "keyless-note")))
    dead: list[tuple[bytes | None, bytes | None]] = [
        (b"huge", b'{"note_id": "huge", "content": "' + b"y" * 900_000 + b'"}'),    # > max_note_bytes, ~0.9 MB
        (b"deep", b'{"note_id": "deep", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"),  # nested 20,000 deep, 40 KB
        (b"deep2", b'{"note_id": "deep2", "x": ' + b'{"a":' * 9000 + b"1" + b"}" * 9000 + b"}"),
        (b"sur-title", _j(_doc("sur-title", 400)).replace(b'"title": "', b'"title": "\\ud800', 1)),
        (b"sur-content", _j(_doc("sur-content", 401)).replace(b'"content": "', b'"content": "x\\udfff', 1)),
        (b"sur-topic", _j({**_doc("sur-topic", 402), "topic": "\\ud83d"}).replace(b"\\\\ud83d", b"\\ud83d")),
        (b"sur-author", _j(_doc("sur-author", 403)).replace(b'"author_id": "', b'"author_id": "\\udc00', 1)),
        (None, b'{"note_id": "\\ud800", "title": "t", "content": "c", "author_id": "a", "published_at": 1}'),
        (b"ts-big", _j(_doc("ts-big", 404, published_at=2 ** 63))),
        (b"ts-float", _j(_doc("ts-float", 405)).replace(b'"published_at": ', b'"published_at": 1.0, "x": ', 1)),
        (b"ts-bool", _j(_doc("ts-bool", 406, published_at=True))),
        (b"ts-neg", _j(_doc("ts-neg", 407, published_at=-5))),
        (b"dup", b'{"note_id": "dup", "note_id": "g00001", "title": "t", "content": "c", "author_id": "a", "published_at": 1}'),
        (b"nan", b'{"note_id": "nan", "title": "t", "content": "c", "author_id": "a", "published_at": NaN}'),
        (b"ctl\x00id", _j(_doc("ctl\x00id", 408))),
        (b"ctl\x07id", _j(_doc("ctl\x07id", 409))),
        (("l" * 257).encode(), _j(_doc("l" * 257, 410))),
        ("é".encode() * 129, _j(_doc("é" * 129, 411))),  # 129 characters, 258 bytes
        (b"other-key", _j(_doc("g00002", 412))),         # key differs from note_id: must not touch g00002
        (b"\xff\xfekey", _j(_doc("badkey", 413))),
        (b"\xef\xbb\xbfg00003", _j(_doc("g00003", 414))),  # BOM in the key: not the note's id
        (b"not-utf8", b"\xff\xfe{}"),
        (b"not-json", b"{nope"),
        (b"array", b"[1, 2, 3]"),
        (b"big-int", b'{"note_id": "big-int", "published_at": 1' + b"0" * 5000 + b"}"),
        (None, None),                                    # tombstone without a key
        (b"", None),                                     # tombstone with an empty key
        (b"ctl\x01tomb", None),                          # tombstone key with a control character
        (b"\xc3\x28", None),                             # tombstone key that is not UTF-8
    ]
    for i, (k, v) in enumerate(dead):
        recs.append((i % 3, k, v, ("dead", None)))
    # interleave: good notes first on each partition, then everything else mixed
    return recs


def test_hostile_corpus_cannot_stop_the_worker_or_touch_other_notes(kafka_bootstrap, topics, milvus_backend, encoder):
    s = settings_on(kafka_bootstrap, topics, milvus_backend, model={"generate": "both"})
    recs = build_corpus()
    p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all",
                  "message.max.bytes": 2_000_000})
    where: dict[tuple[int, int], tuple] = {}
    raw_of: dict[tuple[int, int], tuple] = {}

    def delivered(rec):
        def cb(err, msg):
            assert err is None, err
            where[(msg.partition(), msg.offset())] = rec[3]
            raw_of[(msg.partition(), msg.offset())] = (rec[1], rec[2])
        return cb

    for rec in recs:
        p.produce(topics["notes"], key=rec[1], value=rec[2], partition=rec[0], on_delivery=delivered(rec))
        p.poll(0)
    assert p.flush(60) == 0 and len(where) == len(recs)

    store = milvus_backend.store()
    app = WorkerApp(s, encoder=encoder, store=store)
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=300, alive=t.alive)
    assert t.alive(), f"the worker stopped: {app.exit_reason}"
    assert app.healthy()[0]
    assert t.stop() == 0
    hw = high_watermarks(kafka_bootstrap, topics["notes"])
    assert committed(kafka_bootstrap, s.kafka.group_id, topics["notes"], hw) == hw

    # Every record accounted for, exactly.
    indexed = {e[1] for e in where.values() if e[0] == "index"}
    deleted = {e[1] for e in where.values() if e[0] == "tomb"}
    expect_rows = indexed - deleted
    got = store.all_ids()
    assert len(got) == len(set(got)) and set(got) == expect_rows
    events = dlq_events(kafka_bootstrap, topics["dlq"])
    dead_at = {pos for pos, e in where.items() if e[0] == "dead"}
    seen = {(ev["source"]["partition"], ev["source"]["offset"]) for ev, _h in events}
    assert len(events) == len(seen) == len(dead_at) and seen == dead_at
    for ev, headers in events:
        schemas.validate("dead_letter.v2", ev)
        pos = (ev["source"]["partition"], ev["source"]["offset"])
        key, value = raw_of[pos]
        assert headers["error_kind"] == ev["error_kind"]
        if value is None:
            assert ev["value"] is None
        elif not ev["value"]["truncated"]:
            assert base64.b64decode(ev["value"]["b64"]) == value  # the original bytes, not a re-serialisation
        else:
            assert ev["value"]["size"] == len(value) and ev["value"]["sha256"] == hashlib.sha256(value).hexdigest()
    kinds = {raw_of[(ev["source"]["partition"], ev["source"]["offset"])][0]: ev["error_kind"] for ev, _h in events}
    assert kinds[b"huge"] == "too_large" and kinds[b"not-utf8"] == "not_utf8" and kinds[b"other-key"] == "bad_key"
    assert kinds[b"ts-big"] == kinds[b"ts-float"] == kinds[b"dup"] == kinds[b"sur-title"] == "schema_violation"

    # Good notes' rows intact: the title they were published with, the vector the model gives them.
    from notellm.prompts import NoteText

    good = sorted(i for i in expect_rows if i.startswith("g"))
    rows = {r["note_id"]: r for r in store.get(good, ["title", "embedding", "author_id"])}
    assert set(rows) == set(good)
    docs = {d["note_id"]: d for d in (_doc(f"g{i:05d}", i) for i in range(60))}
    ref = encoder.embed([NoteText(docs[i]["title"], docs[i]["content"], None) for i in good])
    for k, i in enumerate(good):
        assert rows[i]["title"] == docs[i]["title"] and rows[i]["author_id"] == docs[i]["author_id"]
        assert np.allclose(np.asarray(rows[i]["embedding"], np.float32), ref[k], atol=1e-4), i
    # Hostile ids are stored verbatim and can be found by id, and as neighbours.
    kept = [nid for nid in HOSTILE_IDS if nid not in DELETED_HOSTILE]
    assert sorted(r["note_id"] for r in store.get(kept, ["note_id"])) == sorted(kept)
    for nid in kept:
        ans = store.similar(nid, 3)
        assert ans["note"]["note_id"] == nid and len(ans["neighbours"]) == 3
        assert all(h["note_id"] in expect_rows for h in ans["neighbours"])
    store.close()
