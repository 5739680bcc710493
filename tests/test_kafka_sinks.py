"""The Kafka sinks and re-drive against the real broker: dead-letter events always fit the topic, keep the
original bytes and headers, and re-drive restores them on the notes topic."""
from __future__ import annotations

import base64
import hashlib
import json
import os

import numpy as np
import pytest

import schemas
from tests.worker_support import read_topic
from worker import dead_letters
from worker.config import load_settings
from worker.records import Batch, DeadLetter, Encoded, Note
from worker.redrive import redrive
from worker.sinks.kafka import DeadLetterSink, TagsSink

HEADERS = (("trace-id", b"t-1"), ("empty", None), ("bin", b"\x00\xff\xfe"), ("trace-id", b"t-2"))
PRODUCER = {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}


def _letter(kind: str, key: bytes | None, value: bytes | None, *, partition: int = 0, offset: int = 0,
            headers=HEADERS, topic: str = "notes") -> DeadLetter:
    return DeadLetter(key=key, value=value, headers=headers, error_kind=kind, error_message=f"{kind} \ud800 here",
                      topic=topic, partition=partition, offset=offset, timestamp_ms=1234)


def _enc(notes=(), dead=(), failed=(), categories=None, hashtags=None) -> Encoded:
    b = Batch(seq=1, notes=list(notes), tombstones=[], dead=list(dead), offsets={0: 1}, records=1, padded_tokens=0,
              opened_at=0.0, closed_at=0.0, reason="notes")
    return Encoded(batch=b, embeddings=np.zeros((len(notes), 2), np.float32), categories=categories or [],
                   hashtags=hashtags or [], model_version="m1", failed=list(failed))


def _dlq_sink(bootstrap, topic, **kw) -> DeadLetterSink:
    kw.setdefault("max_value_bytes", 256 * 1024)
    return DeadLetterSink({"bootstrap.servers": bootstrap, **PRODUCER}, topic, worker_version="0.1.0-test",
                          flush_timeout_s=30, **kw)


def _events(bootstrap, topic):
    return [(m, dead_letters.parse(m.value())) for m in read_topic(bootstrap, topic)]


def test_a_1mb_value_is_dead_lettered_truncated_with_size_and_sha256(kafka_bootstrap, new_topic):
    dlq = new_topic(1, "dlq")
    big = os.urandom(1_000_000)
    sink = _dlq_sink(kafka_bootstrap, dlq, max_value_bytes=256 * 1024)
    sink.add(_enc(dead=[_letter("too_large", b"n-big", big)]))
    assert sink.flush() == []
    [(msg, ev)] = _events(kafka_bootstrap, dlq)
    schemas.validate("dead_letter.v2", ev)
    assert msg.key() == b"n-big"
    assert len(msg.value()) <= dead_letters.max_event_bytes(256 * 1024) < 1_000_000
    v = ev["value"]
    assert v["truncated"] is True and v["size"] == 1_000_000 and v["sha256"] == hashlib.sha256(big).hexdigest()
    assert base64.b64decode(v["b64"]) == big[:256 * 1024]
    assert ev["key"]["truncated"] is False and ev["headers_dropped"] == 0
    assert ev["error_kind"] == "too_large" and "\\ud800" in ev["error_message"]  # escaped, valid UTF-8
    assert dead_letters.original(ev) is None  # cannot be re-driven
    hdrs = dict(msg.headers())
    assert hdrs["error_kind"] == b"too_large" and hdrs["source_offset"] == b"0"


def test_a_topic_refusing_the_event_gets_the_minimal_one(kafka_bootstrap, new_topic):
    """A DLQ topic whose max.message.bytes is below the bound: the event is re-sent without its payload
    instead of failing the flush for ever."""
    dlq = new_topic(1, "dlq", config={"max.message.bytes": "20000"})
    value = os.urandom(60_000)  # incompressible: the ~80 KB event is over the topic's limit even with lz4
    sink = _dlq_sink(kafka_bootstrap, dlq, max_value_bytes=64 * 1024)
    sink.add_letters([_letter("encode_failed", b"n-60k", value)])
    assert sink.flush() == [] and sink.shrunk == 1
    [(msg, ev)] = _events(kafka_bootstrap, dlq)
    assert msg.key() == b"n-60k" and len(msg.value()) < 20000
    assert ev["value"] == {"b64": "", "size": 60_000, "sha256": hashlib.sha256(value).hexdigest(), "truncated": True}
    assert ev["headers_dropped"] == len(HEADERS) and ev["error_kind"] == "encode_failed"


def test_an_unbounded_configuration_is_refused_at_start():
    with pytest.raises(ValueError, match="message.max.bytes"):
        DeadLetterSink({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": 100_000}, "dlq", worker_version="v",
                       max_value_bytes=256 * 1024)


def test_replay_does_not_resend_input_errors(kafka_bootstrap, new_topic):
    dlq = new_topic(1, "dlq")
    sink = _dlq_sink(kafka_bootstrap, dlq, input_errors=False)
    enc = _enc(dead=[_letter("not_json", b"a", b"{")], failed=[_letter("encode_failed", b"b", b"{}")])
    assert [d.error_kind for d in sink.letters(enc)] == ["encode_failed"]
    sink.add(enc)
    sink.add_letters([_letter("sink_rejected", b"c", b"{}"), _letter("bad_key", b"d", b"{}")])
    assert sink.flush() == [] and sink.skipped == 2
    assert sorted(ev["error_kind"] for _m, ev in _events(kafka_bootstrap, dlq)) == ["encode_failed", "sink_rejected"]


def test_discard_drops_staged_events(kafka_bootstrap, new_topic):
    dlq = new_topic(1, "dlq")
    sink = _dlq_sink(kafka_bootstrap, dlq)
    sink.add_letters([_letter("encode_failed", b"x", b"{}")])
    sink.discard()
    assert sink.flush() == [] and read_topic(kafka_bootstrap, dlq, timeout=2) == []


def _note(note_id: str, offset: int = 3) -> Note:
    return Note(note_id=note_id, title="t", content="c", author_id="a", published_at=1, topic=None, category=None,
                hashtags=None, partition=1, offset=offset)


def test_tags_are_cut_to_the_schema_and_keyed_by_note_id(kafka_bootstrap, new_topic):
    tags_topic = new_topic(1, "tags")
    sink = TagsSink({"bootstrap.servers": kafka_bootstrap, **PRODUCER}, tags_topic, source_topic="notes", flush_timeout_s=30)
    hostile = "zz'] or note_id not in ['n0\\\u202e\u200b"
    long_tag = "t" * 300
    sink.add(_enc(notes=[_note(hostile), _note("n2", 4)],
                  categories=["c" * 1000, None],
                  hashtags=[[long_tag, long_tag + "x", "a", "a", "", "bad\ud800"], []]))
    assert sink.flush() == []
    by_key = {m.key(): json.loads(m.value()) for m in read_topic(kafka_bootstrap, tags_topic)}
    ev = by_key[hostile.encode()]
    schemas.validate("note_tags.v1", ev)
    assert ev["note_id"] == hostile and ev["category"] == "c" * 256
    assert ev["hashtags"] == ["t" * 256, "a", "bad?"]
    assert ev["source"] == {"topic": "notes", "partition": 1, "offset": 3}
    assert by_key[b"n2"]["category"] is None and by_key[b"n2"]["hashtags"] == []


# -- re-drive -----------------------------------------------------------------------------------------

@pytest.fixture
def redrive_topics(kafka_bootstrap, new_topic):
    """A notes topic and a DLQ holding: an encode_failed letter (headers, binary value), a truncated
    too_large letter, a not_json letter and a tombstone-ish bad_key letter (null key and value)."""
    notes, dlq = new_topic(3, "notes"), new_topic(2, "dlq")
    original = json.dumps({"note_id": "n'1", "title": "T", "content": "é", "author_id": "a", "published_at": 5,
                           "extra": [1.5, None]}).encode() + b"  "
    sink = _dlq_sink(kafka_bootstrap, dlq, max_value_bytes=4096)
    sink.add_letters([
        _letter("encode_failed", b"n'1", original, partition=2, offset=41, topic=notes),
        _letter("too_large", b"big", os.urandom(10_000), partition=0, offset=7, topic=notes),
        _letter("not_json", b"nj", b"{nope", partition=1, offset=9, topic=notes, headers=()),
        _letter("bad_key", None, None, partition=1, offset=10, topic=notes, headers=()),
    ])
    assert sink.flush() == []
    s = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_notes": notes, "topic_dlq": dlq}})
    return s, notes, original


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_redrive_restores_the_original_bytes_and_headers(kafka_bootstrap, redrive_topics, capsys):
    s, notes, original = redrive_topics
    assert redrive(s, kinds={"encode_failed"}, timeout_s=60) == 0
    summary = _summary(capsys)
    assert (summary["read"], summary["selected"], summary["produced"], summary["complete"]) == (4, 1, 1, True)
    [m] = read_topic(kafka_bootstrap, notes)
    assert m.key() == b"n'1" and m.value() == original and m.partition() == 2
    assert m.headers() == list(HEADERS)


def test_redrive_skips_truncated_letters(kafka_bootstrap, redrive_topics, capsys):
    s, notes, original = redrive_topics
    assert redrive(s, kinds=None, timeout_s=60) == 0
    summary = _summary(capsys)
    assert summary["skipped_truncated"] == 1 and summary["produced"] == 3
    assert summary["by_kind"] == {"encode_failed": 1, "too_large": 1, "not_json": 1, "bad_key": 1}
    got = {(m.key(), m.value()) for m in read_topic(kafka_bootstrap, notes)}
    assert got == {(b"n'1", original), (b"nj", b"{nope"), (None, None)}


def test_redrive_dry_run_produces_nothing(kafka_bootstrap, redrive_topics, capsys):
    s, notes, _original = redrive_topics
    assert redrive(s, kinds={"encode_failed", "not_json"}, dry_run=True, timeout_s=60) == 0
    summary = _summary(capsys)
    assert summary["dry_run"] and (summary["selected"], summary["restorable"], summary["produced"]) == (2, 2, 0)
    assert read_topic(kafka_bootstrap, notes, timeout=3) == []


def test_tags_refused_locally_as_too_large_are_sent_minimal(kafka_bootstrap, new_topic):
    """produce() itself refuses a message over the producer's message.max.bytes (synchronously)."""
    tags_topic = new_topic(1, "tags")
    sink = TagsSink({"bootstrap.servers": kafka_bootstrap, **PRODUCER, "message.max.bytes": 1000}, tags_topic,
                    source_topic="notes", flush_timeout_s=30)
    sink.add(_enc(notes=[_note("n1")], categories=["food"], hashtags=[[f"{i:03d}" + "t" * 250 for i in range(20)]]))
    assert sink.flush() == [] and sink.shrunk == 1
    [m] = read_topic(kafka_bootstrap, tags_topic)
    ev = json.loads(m.value())
    assert m.key() == b"n1" and ev["category"] is None and ev["hashtags"] == []


def test_an_unreachable_broker_is_retry_later_and_keeps_the_events():
    from worker.sinks import RetryLater

    sink = DeadLetterSink({"bootstrap.servers": "127.0.0.1:1", "log_level": 0, **PRODUCER}, "dlq", worker_version="v",
                          max_value_bytes=1024, flush_timeout_s=1.0)
    sink.add_letters([_letter("encode_failed", b"k", b"{}"), _letter("sink_rejected", b"k2", b"{}")])
    for _ in range(2):  # a retried flush still has both events
        with pytest.raises(RetryLater):
            sink.flush()
        assert [o.key for o in sink._staged] == [b"k", b"k2"]
    sink.discard()
    assert sink.flush() == []


def test_original_reads_v1_events_and_refuses_corrupt_payloads():
    v1 = {"schema_version": "dead_letter.v1", "key_b64": "bjE=", "value_b64": "e30=", "error_kind": "encode_failed",
          "error_message": "m", "source": {"topic": "t", "partition": 0, "offset": 1}, "worker_version": "0",
          "failed_at": 0}
    ev = dead_letters.parse(json.dumps(v1).encode())
    r = dead_letters.original(ev)
    assert (r.key, r.value, r.headers) == (b"n1", b"{}", ())
    _k, value, _h = dead_letters.build(_letter("encode_failed", b"n1", b"{}"), worker_version="v", max_value_bytes=10)
    ev = dead_letters.parse(value)
    ev["value"]["b64"] = base64.b64encode(b"{x").decode()
    with pytest.raises(ValueError, match="sha256"):
        dead_letters.original(ev)
    with pytest.raises(ValueError):
        dead_letters.parse(b'{"schema_version": "note.v1"}')
