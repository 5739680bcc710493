"""Source stage, part 1: one Kafka message -> `Note` | `Tombstone` | `DeadLetter`.

Contract: `decode()` is total. Any failure while decoding or validating one record makes that record a
`DeadLetter` with a reason (the specific kind below, or `decode_failed` for an unexpected exception,
`RecursionError` and `OverflowError` included); nothing escapes to the polling loop. The only exception
let through is `MemoryError`: a record is at most `max_bytes`, so running out of memory is the
process's fault, not the record's (dead-lettering it would lose a good note). Every result keeps the
record's original bytes (`Note.raw`, `Tombstone.raw`, `DeadLetter.key/value/headers`).

The verdict depends on the record's bytes alone (a replay reaches the same one). Checks, cheapest first:

| check | kind |
|---|---|
| key: 1..256 UTF-8 bytes, valid UTF-8, an id (below) | `bad_key` |
| null value (tombstone) without a valid key | `bad_key` |
| value larger than `max_bytes` | `too_large` |
| value not UTF-8 (one leading BOM is accepted and stripped) | `not_utf8` |
| not one JSON document; NaN/Infinity literals; an integer of more than 4300 digits; nesting deeper than `MAX_DEPTH` | `not_json` |
| `note.v1` violation; a duplicate object key anywhere; `published_at` not a JSON integer in [0, 253402300799999]; a stored string with a lone surrogate (a JSON escape like `"\\ud800"`); an id rule broken | `schema_violation` |
| key differs from `note_id` | `bad_key` |

Ids (`note_id`, `author_id`, the Kafka key): 1..256 UTF-8 *bytes* (Milvus VARCHAR limits are bytes),
no control characters (Unicode category Cc: U+0000-U+001F, U+007F-U+009F), no surrogates. Everything
else is allowed — quotes, backslashes, `%`, `_`, bidi marks, zero-width characters — so code downstream
must treat ids as data (id-based store calls or escaped values, never string-built expressions).
Stored strings (title, content, topic, category, hashtags): valid Unicode scalar values, so they encode
as UTF-8. A keyless note is keyed by its `note_id`.
"""
from __future__ import annotations

import json
import re

import schemas
from worker.records import DeadLetter, Note, Raw, Record, Tombstone

MAX_ID_BYTES = 256
MAX_DEPTH = 64  # JSON nesting; deeper documents are rejected (deterministically, whatever the stack depth)

_validate_note = schemas.validator("note.v1")
_BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BOM = "\ufeff"


class _Reject(Exception):
    """One record is not acceptable: `kind` is its dead-letter reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _DuplicateKey(ValueError):
    pass


class _Constant(ValueError):
    pass


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def _constant(name: str):
    raise _Constant(name)


_json = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def _depth(doc) -> int:
    """Nesting depth of a parsed document (iterative)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        todo.extend((c, d + 1) for c in v if isinstance(c, (dict, list)))
    return deepest


def id_problem(text: str) -> str | None:
    """Why `text` cannot be an id (note_id, author_id, key), or None when it can."""
    if not text:
        return "is empty"
    if _BAD_ID_CHAR.search(text):
        return "contains a control character or a lone surrogate"
    n = len(text) if text.isascii() else len(text.encode("utf-8"))
    if n > MAX_ID_BYTES:
        return f"is {n} UTF-8 bytes, over {MAX_ID_BYTES}"
    return None


def _scalar(text: str) -> bool:
    """True when `text` holds only Unicode scalar values (encodes as UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse(value: bytes, max_bytes: int):
    if len(value) > max_bytes:
        raise _Reject("too_large", f"value is {len(value)} bytes, over max_note_bytes={max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject("not_utf8", f"value is not valid UTF-8: {e}") from None
    if text.startswith(_BOM):
        text = text[1:]
    try:
        doc = _json.decode(text)
    except _DuplicateKey as e:
        raise _Reject("schema_violation", f"duplicate key {e.args[0]!r}") from None
    except _Constant as e:
        raise _Reject("not_json", f"value is not JSON: {e.args[0]} is not a JSON number") from None
    except RecursionError:
        raise _Reject("not_json", f"value is not JSON this worker reads: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer over Python's 4300-digit conversion limit
        raise _Reject("not_json", f"value is not JSON: {e}") from None
    if value.count(b"[") + value.count(b"{") > MAX_DEPTH and _depth(doc) > MAX_DEPTH:
        raise _Reject("not_json", f"value is not JSON this worker reads: nested deeper than {MAX_DEPTH} levels")
    return doc


def _note_fields(doc) -> None:
    """The rules of note.v1 a JSON Schema cannot state (or that fastjsonschema does not check)."""
    try:
        _validate_note(doc)
    except schemas.SchemaError as e:
        raise _Reject("schema_violation", f"{e}" + (f" (at {e.path})" if e.path else "")) from None
    p = doc["published_at"]
    if type(p) is not int:  # JSON Schema's "integer" accepts 1.0; bools are not JSON integers either
        raise _Reject("schema_violation", f"published_at must be a JSON integer, not {p!r}")
    for name in ("note_id", "author_id"):
        why = id_problem(doc[name])
        if why:
            raise _Reject("schema_violation", f"{name} {why}")
    for name in ("title", "content", "topic", "category"):
        s = doc.get(name)
        if s is not None and not _scalar(s):
            raise _Reject("schema_violation", f"{name} contains a lone surrogate (not a Unicode scalar value)")
    for i, s in enumerate(doc.get("hashtags") or ()):
        if not _scalar(s):
            raise _Reject("schema_violation", f"hashtags[{i}] contains a lone surrogate (not a Unicode scalar value)")


def _key_text(key: bytes | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_ID_BYTES:
        raise _Reject("bad_key", f"message key is {len(key)} bytes (an id is 1..{MAX_ID_BYTES} UTF-8 bytes)")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject("bad_key", "message key is not valid UTF-8") from None
    why = id_problem(text)
    if why:
        raise _Reject("bad_key", f"message key {why}")
    return text


def decode(msg, max_bytes: int) -> Record:
    """One Kafka message (confluent_kafka.Message) -> Note | Tombstone | DeadLetter. Never raises
    (except MemoryError, see the module docstring)."""
    key, value = msg.key(), msg.value()
    topic, part, off = msg.topic(), msg.partition(), msg.offset()
    ts_type, ts = msg.timestamp()
    ts_ms = ts if ts_type != 0 and ts >= 0 else None
    headers = tuple(msg.headers() or ())
    try:
        key_text = _key_text(key)
        raw = Raw(key, value, headers)
        if value is None:
            if key_text is None:
                raise _Reject("bad_key", "tombstone without a note_id key")
            return Tombstone(note_id=key_text, partition=part, offset=off, timestamp_ms=ts_ms, raw=raw)
        doc = _parse(value, max_bytes)
        _note_fields(doc)
        note_id = doc["note_id"]
        if key_text is not None and key_text != note_id:
            raise _Reject("bad_key", f"key {key_text!r} differs from note_id {note_id!r}")
        tags = doc.get("hashtags")
        return Note(note_id=note_id, title=doc["title"], content=doc["content"], author_id=doc["author_id"],
                    published_at=doc["published_at"], topic=doc.get("topic"), category=doc.get("category"),
                    hashtags=tuple(tags) if tags is not None else None, partition=part, offset=off,
                    timestamp_ms=ts_ms, raw=raw)
    except MemoryError:
        raise
    except _Reject as e:
        kind, why = e.kind, str(e)
    except Exception as e:  # noqa: BLE001 - the contract: one record's failure never escapes
        kind, why = "decode_failed", _describe(e)
    return DeadLetter(key=key, value=value, headers=headers, error_kind=kind, error_message=why, topic=topic,
                      partition=part, offset=off, timestamp_ms=ts_ms)


def _describe(e: BaseException) -> str:
    try:
        return f"unexpected {type(e).__name__} while decoding: {e}"
    except Exception:  # noqa: BLE001 - an exception whose str() fails
        return f"unexpected {type(e).__name__} while decoding"


__all__ = ["decode", "id_problem", "MAX_ID_BYTES", "MAX_DEPTH"]
