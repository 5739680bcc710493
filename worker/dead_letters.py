"""Dead-letter events (`dead_letter.v2` on notes.dlq): build them from a `DeadLetter`, read them back.

An event always fits the DLQ topic: whatever the record, `build()` returns a message of at most
`max_event_bytes(max_value_bytes)` bytes (key + value + headers), so producing it never fails for its
size as long as that bound is below the producer's `message.max.bytes` (1,000,000 by default):

- the original value is carried whole (base64) up to `max_value_bytes`, else its first `max_value_bytes`
  bytes with `truncated: true`; `size` and `sha256` always describe the whole original. Same for the key,
  bounded to `MAX_KEY_BYTES`;
- the original Kafka headers are carried in order up to `MAX_HEADERS_BYTES` of their JSON encoding; the
  rest are dropped and counted in `headers_dropped`;
- `error_message` is cut to `MAX_MESSAGE_CHARS` and is always valid UTF-8 (unencodable characters such as
  lone surrogates are backslash-escaped);
- the Kafka key of the event is the original key when it is at most `MAX_MESSAGE_KEY_BYTES`, else the hex
  sha256 of it.

Reading back (`parse`, `original`) is what re-drive uses: `original(event)` gives the record's exact
bytes, or None when the event does not hold them whole.
"""
from __future__ import annotations

import base64
import hashlib
import json

import schemas
from worker.records import DeadLetter, Raw

SCHEMA = "dead_letter.v2"
MAX_KEY_BYTES = 4096
MAX_MESSAGE_KEY_BYTES = 1024
MAX_HEADERS_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 2000
MAX_HEADER_MESSAGE_CHARS = 500
MAX_TOPIC_CHARS = 255
MAX_VERSION_CHARS = 128
# Worst case of everything but the payloads: JSON escapes take at most 6 bytes per character; the rest
# (field names, numbers, two sha256 digests, the Kafka headers' names and record overhead) is far below 8 KiB.
_JSON_CHAR = 6
_FIXED = 8 * 1024

_validators = {name: schemas.validator(name) for name in ("dead_letter.v1", SCHEMA)}


def _b64len(n: int) -> int:
    return 4 * ((n + 2) // 3)


def max_event_bytes(max_value_bytes: int) -> int:
    """The largest message (key + value + headers) `build()` returns for this `max_value_bytes`."""
    return (_b64len(max_value_bytes) + _b64len(MAX_KEY_BYTES) + MAX_HEADERS_BYTES
            + _JSON_CHAR * (MAX_MESSAGE_CHARS + MAX_TOPIC_CHARS + MAX_VERSION_CHARS)
            + MAX_MESSAGE_KEY_BYTES + 4 * (MAX_HEADER_MESSAGE_CHARS + MAX_TOPIC_CHARS) + _FIXED)


def _text(s: str, limit: int) -> str:
    """`s` cut to `limit` characters, as valid Unicode (lone surrogates backslash-escaped)."""
    s = s[:limit]
    if not s.isascii():
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]
    return s


def _payload(b: bytes | None, limit: int) -> dict | None:
    if b is None:
        return None
    return {"b64": base64.b64encode(b[:limit]).decode("ascii"), "size": len(b),
            "sha256": hashlib.sha256(b).hexdigest(), "truncated": len(b) > limit}


def _headers(headers, budget: int) -> tuple[list[dict], int]:
    out: list[dict] = []
    used = 0
    for i, (name, value) in enumerate(headers):
        entry = {"name": _text(name, budget), "value_b64": None if value is None else base64.b64encode(value).decode("ascii")}
        cost = len(json.dumps(entry, ensure_ascii=False).encode("utf-8")) + 1
        if used + cost > budget:
            return out, len(headers) - i
        out.append(entry)
        used += cost
    return out, 0


def build(d: DeadLetter, *, worker_version: str, max_value_bytes: int,
          payload: bool = True) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """The DLQ message (key, value, headers) for `d`, at most `max_event_bytes(max_value_bytes)` bytes.
    `payload=False`: the minimal event (no key/value/header bytes, only their sizes and digests), for a
    topic that refuses even the bounded event."""
    value_limit = max_value_bytes if payload else 0
    key_limit = MAX_KEY_BYTES if payload else 0
    carried, dropped = _headers(d.headers, MAX_HEADERS_BYTES if payload else 0)
    topic = _text(d.topic, MAX_TOPIC_CHARS)
    message = _text(d.error_message, MAX_MESSAGE_CHARS)
    ev = {
        "schema_version": SCHEMA,
        "error_kind": d.error_kind,
        "error_message": message,
        "source": {"topic": topic, "partition": d.partition, "offset": d.offset, "timestamp_ms": d.timestamp_ms},
        "key": _payload(d.key, key_limit),
        "value": _payload(d.value, value_limit),
        "headers": carried,
        "headers_dropped": dropped,
        "worker_version": _text(worker_version, MAX_VERSION_CHARS),
        "failed_at": d.failed_at,
    }
    key = d.key
    if key is not None and len(key) > MAX_MESSAGE_KEY_BYTES:
        key = hashlib.sha256(key).hexdigest().encode("ascii")
    headers = [
        ("error_kind", d.error_kind.encode("utf-8")),
        ("error_message", message[:MAX_HEADER_MESSAGE_CHARS].encode("utf-8")),
        ("source_topic", topic.encode("utf-8")),
        ("source_partition", str(d.partition).encode("ascii")),
        ("source_offset", str(d.offset).encode("ascii")),
    ]
    return key, json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), headers


def parse(value: bytes) -> dict:
    """A DLQ event (dead_letter.v2, or v1 from older workers) as a validated dict.
    Raises ValueError (schemas.SchemaError, json.JSONDecodeError) for anything else."""
    ev = json.loads(value)
    version = ev.get("schema_version") if isinstance(ev, dict) else None
    if version not in _validators:
        raise schemas.SchemaError(SCHEMA, f"not a dead-letter event (schema_version {version!r})")
    _validators[version](ev)
    return ev


def _bytes(p: dict | None) -> bytes | None:
    if p is None:
        return None
    b = base64.b64decode(p["b64"], validate=True)
    if len(b) != p["size"] or hashlib.sha256(b).hexdigest() != p["sha256"]:
        raise ValueError(f"payload does not match its size/sha256 ({len(b)} of {p['size']} bytes)")
    return b


def complete(ev: dict) -> bool:
    """True when the parsed event holds its record's key, value and headers whole."""
    if ev["schema_version"] == "dead_letter.v1":
        return True
    return (ev["headers_dropped"] == 0
            and not any(p is not None and p["truncated"] for p in (ev["key"], ev["value"])))


def original(ev: dict) -> Raw | None:
    """The record's original key, value and headers from a parsed event; None when the event does not
    hold them whole (a truncated key or value, dropped headers). dead_letter.v1 events carry no headers.
    Raises ValueError when a payload does not match its recorded size and sha256."""
    if ev["schema_version"] == "dead_letter.v1":
        b = lambda s: None if s is None else base64.b64decode(s, validate=True)  # noqa: E731
        return Raw(b(ev["key_b64"]), b(ev["value_b64"]), ())
    if not complete(ev):
        return None
    headers = tuple((h["name"], None if h["value_b64"] is None else base64.b64decode(h["value_b64"], validate=True))
                    for h in ev["headers"])
    return Raw(_bytes(ev["key"]), _bytes(ev["value"]), headers)


__all__ = ["SCHEMA", "build", "max_event_bytes", "parse", "complete", "original",
           "MAX_KEY_BYTES", "MAX_MESSAGE_KEY_BYTES", "MAX_HEADERS_BYTES", "MAX_MESSAGE_CHARS"]
