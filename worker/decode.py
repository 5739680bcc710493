"""Source stage, part 1: one Kafka message -> `Note` | `Tombstone` | `DeadLetter`. Total: never raises."""
from __future__ import annotations

import json

import schemas
from worker.records import DeadLetter, Note, Raw, Record, Tombstone

_validate_note = schemas.validator("note.v1")


def decode(msg, max_bytes: int) -> Record:
    """One Kafka message -> Note | Tombstone | DeadLetter. Never raises."""
    key, value = msg.key(), msg.value()
    topic, part, off = msg.topic(), msg.partition(), msg.offset()
    ts_type, ts = msg.timestamp()
    ts_ms = ts if ts_type != 0 and ts >= 0 else None

    def dead(kind: str, why: str) -> DeadLetter:
        return DeadLetter(key=key, value=value, error_kind=kind, error_message=why, topic=topic,
                          partition=part, offset=off, timestamp_ms=ts_ms)

    key_text: str | None = None
    if key is not None:
        try:
            key_text = key.decode("utf-8")
        except UnicodeDecodeError:
            return dead("bad_key", "message key is not valid UTF-8")
    if value is None:
        if not key_text:
            return dead("bad_key", "tombstone without a note_id key")
        return Tombstone(note_id=key_text, partition=part, offset=off, timestamp_ms=ts_ms)
    if len(value) > max_bytes:
        return dead("too_large", f"value is {len(value)} bytes, over max_note_bytes={max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return dead("not_utf8", f"value is not valid UTF-8: {e}")
    try:
        doc = json.loads(text)
    except ValueError as e:
        return dead("not_json", f"value is not JSON: {e}")
    try:
        _validate_note(doc)
    except schemas.SchemaError as e:
        return dead("schema_violation", f"{e}" + (f" (at {e.path})" if e.path else ""))
    note_id = doc["note_id"]
    if key_text is not None and key_text != note_id:
        return dead("bad_key", f"key {key_text!r} differs from note_id {note_id!r}")
    tags = doc.get("hashtags")
    return Note(note_id=note_id, title=doc["title"], content=doc["content"], author_id=doc["author_id"],
                published_at=int(doc["published_at"]), topic=doc.get("topic"), category=doc.get("category"),
                hashtags=tuple(tags) if tags is not None else None, partition=part, offset=off,
                timestamp_ms=ts_ms, size=len(value))
