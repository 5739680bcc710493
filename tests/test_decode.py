"""Source decode contract (worker/decode.py): total, keeps the original bytes, and enforces the id,
string, number and JSON rules of note.v1 that the store depends on."""
from __future__ import annotations

import json

import pytest

import worker.decode as decode_module
from worker.decode import MAX_DEPTH, decode
from worker.records import DeadLetter, Note, Raw, Tombstone

HEADERS = [("trace-id", b"abc"), ("empty", None), ("bin", b"\x00\xff")]


class Msg:
    """The part of confluent_kafka.Message that decode() reads."""

    def __init__(self, value, key=b"n1", headers=None, partition=2, offset=7, timestamp=(1, 1234)):
        self._v, self._k, self._h, self._p, self._o, self._ts = value, key, headers, partition, offset, timestamp

    def key(self): return self._k
    def value(self): return self._v
    def headers(self): return self._h
    def topic(self): return "notes"
    def partition(self): return self._p
    def offset(self): return self._o
    def timestamp(self): return self._ts


GOOD = {"note_id": "n1", "title": "T", "content": "C", "author_id": "a", "published_at": 1, "extra": {"x": [1]}}
MAX = 64 * 1024


def enc(doc) -> bytes:
    return json.dumps(doc).encode()


def note(value: bytes, key: bytes | None = b"n1", **kw):
    return decode(Msg(value, key, **kw), MAX)


def dead(value, key=b"n1", kind=None, max_bytes=MAX, **kw) -> DeadLetter:
    r = decode(Msg(value, key, **kw), max_bytes)
    assert isinstance(r, DeadLetter), r
    assert r.error_message
    if kind is not None:
        assert r.error_kind == kind, r.error_message
    # The dead letter keeps the original bytes, whatever went wrong.
    assert (r.key, r.value) == (key, value)
    return r


# -- good records keep their bytes ----------------------------------------------------------------

def test_note_keeps_original_bytes_and_headers():
    v = enc(GOOD)
    n = note(v, headers=HEADERS)
    assert isinstance(n, Note)
    assert (n.note_id, n.title, n.content, n.author_id, n.published_at) == ("n1", "T", "C", "a", 1)
    assert n.raw == Raw(b"n1", v, tuple(HEADERS))
    assert (n.partition, n.offset, n.timestamp_ms) == (2, 7, 1234)


def test_no_headers_and_no_timestamp():
    n = note(enc(GOOD), headers=None, timestamp=(0, -1))
    assert n.raw.headers == () and n.timestamp_ms is None


def test_keyless_note_uses_its_note_id():
    n = note(enc(GOOD), key=None)
    assert isinstance(n, Note) and n.note_id == "n1" and n.raw.key is None


def test_tombstone_keeps_headers():
    t = decode(Msg(None, b"n9", HEADERS), MAX)
    assert isinstance(t, Tombstone) and t.note_id == "n9" and t.raw == Raw(b"n9", None, tuple(HEADERS))


HOSTILE_IDS = [
    "zz'] or note_id not in ['n0",
    'a"b', "back\\slash", "\\", "'", "100%", "a_b%_", "like%_\\%",
    "\u202eRTL-override", "\u200fmark\u200e", "zero\u200bwidth\u2060", "\ufeffbom-inside",
    "emoji \U0001F600", "tab-less space ", "\u00a0nbsp", "e\u0301", "€" * 85,  # 255 UTF-8 bytes
    "x" * 256, "{\"json\": 1}", "note_id in ['a']", "1 || 1 == 1",
]


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_hostile_ids_are_accepted(hostile):
    key = hostile.encode()
    n = note(enc({**GOOD, "note_id": hostile, "author_id": hostile}), key=key)
    assert isinstance(n, Note), getattr(n, "error_message", n)
    assert n.note_id == hostile and n.author_id == hostile and n.raw.key == key
    t = decode(Msg(None, key), MAX)
    assert isinstance(t, Tombstone) and t.note_id == hostile


def test_bom_is_stripped():
    n = note(b"\xef\xbb\xbf" + enc(GOOD))
    assert isinstance(n, Note) and n.note_id == "n1"
    dead(b"\xef\xbb\xbf\xef\xbb\xbf" + enc(GOOD), kind="not_json")  # one BOM only


# -- size, UTF-8, JSON ----------------------------------------------------------------------------

def test_size_is_checked_before_utf8_and_json():
    assert "max_note_bytes=512" in dead(b"\xff" * 600, kind="too_large", max_bytes=512).error_message
    dead(enc({**GOOD, "content": "x" * 600}), kind="too_large", max_bytes=512)


@pytest.mark.parametrize("value", [b"\xff\xfe", b'{"note_id": "\xed\xa0\x80"}', b"\xc3"])
def test_not_utf8(value):
    dead(value, kind="not_utf8")


@pytest.mark.parametrize("value", [b"{nope", b"", b"{} {}", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}'])
def test_not_json(value):
    dead(value, kind="not_json")


@pytest.mark.parametrize("value", [b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000,
                                   b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                   b'{"note_id": "n1", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"])
def test_deep_nesting_is_dead_lettered_not_raised(value):
    assert "nested deeper than 64 levels" in dead(value, kind="not_json", max_bytes=10**6).error_message


@pytest.mark.parametrize("field", ["published_at", "extra"])
def test_huge_integers_are_dead_lettered(field):
    dead(with_raw(GOOD, field, b"1" * 5000), kind="not_json")


def _nested(levels: int):
    v: object = 1
    for _ in range(levels):
        v = [v]
    return v


def test_nesting_limit_is_exact():
    # The note object is level 1, so an extra field may hold MAX_DEPTH - 1 levels.
    assert isinstance(note(enc({**GOOD, "extra": _nested(MAX_DEPTH - 1)})), Note)
    dead(enc({**GOOD, "extra": _nested(MAX_DEPTH)}), kind="not_json")


@pytest.mark.parametrize("value", [
    b'{"note_id": "n1", "note_id": "n2", "title": "T", "content": "C", "author_id": "a", "published_at": 1}',
    b'{"note_id": "n1", "title": "T", "content": "C", "author_id": "a", "published_at": 1, "x": {"k": 1, "k": 1}}',
    b'{"note_id": "n1", "title": "T", "content": "C", "author_id": "a", "published_at": 1, "x": [[{"q": 1, "q": 2}]]}',
])
def test_duplicate_keys_anywhere_are_rejected(value):
    assert "duplicate key" in dead(value, kind="schema_violation").error_message


# -- numbers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("published_at", [2**63, 2**64, 253402300799999 + 1, -1, 1.0, 1.5, 1e3, True, False, "1", None])
def test_published_at_must_be_an_integer_in_range(published_at):
    msg = dead(enc({**GOOD, "published_at": published_at}), kind="schema_violation").error_message
    assert "published_at" in msg


@pytest.mark.parametrize("published_at", [0, 1732500000000, 253402300799999])
def test_published_at_bounds_accepted(published_at):
    assert note(enc({**GOOD, "published_at": published_at})).published_at == published_at


# -- strings --------------------------------------------------------------------------------------

def with_raw(doc: dict, field: str, raw_json: bytes) -> bytes:
    """`doc` as JSON with `field`'s value replaced by `raw_json` (e.g. an escape json.dumps would not write)."""
    return enc({**doc, field: "@@RAW@@"}).replace(b'"@@RAW@@"', raw_json)


@pytest.mark.parametrize("field", ["note_id", "author_id", "title", "content", "topic", "category"])
@pytest.mark.parametrize("bad", [b'"\\ud800"', b'"x\\udfffy"', b'"\\udc00\\ud800"'])
def test_lone_surrogates_are_rejected_in_every_stored_string(field, bad):
    key = None if field == "note_id" else b"n1"
    msg = dead(with_raw(GOOD, field, bad), key=key, kind="schema_violation").error_message
    assert field in msg


def test_lone_surrogate_in_a_hashtag():
    assert "hashtags[1]" in dead(with_raw(GOOD, "hashtags", b'["ok", "\\ud83d"]'), kind="schema_violation").error_message


def test_surrogate_pairs_are_fine():
    n = note(with_raw({**GOOD, "hashtags": ["\U0001F600"]}, "title", b'"\\ud83d\\ude00"'))
    assert isinstance(n, Note) and n.title == "\U0001F600" and n.hashtags == ("\U0001F600",)


def test_control_characters_are_fine_in_text():
    n = note(enc({**GOOD, "title": "a\x00b\x1f", "content": "\x7f\x85"}))
    assert isinstance(n, Note) and n.title == "a\x00b\x1f"


# -- ids and keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "a\x00b", "tab\there", "new\nline", "\x7f", "c1\x85", "\x9f", "€" * 86])
@pytest.mark.parametrize("field", ["note_id", "author_id"])
def test_bad_ids_are_schema_violations(field, bad):
    key = None if field == "note_id" else b"n1"  # a keyless note: the note_id itself is checked
    dead(enc({**GOOD, field: bad}), key=key, kind="schema_violation")


@pytest.mark.parametrize("key", [b"", b"x" * 257, "€".encode() * 86, b"\xff", b"\xed\xa0\x80", b"a\x00b", b"a\x1bb",
                                 b"\xc2\x85", b"other"])
def test_bad_keys(key):
    dead(enc(GOOD), key=key, kind="bad_key")


@pytest.mark.parametrize("key", [None, b"", b"x" * 257, b"\xff", b"\xed\xa0\x80", b"a\x00b", b"\x7f"])
def test_tombstones_with_bad_keys(key):
    d = dead(None, key=key, kind="bad_key", headers=HEADERS)
    assert d.headers == tuple(HEADERS)


# -- totality -------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [TypeError("boom"), RecursionError("deep"), OverflowError("big"), KeyError("k"),
                                 UnicodeError("u"), ValueError("v")])
def test_unexpected_exceptions_become_decode_failed(monkeypatch, exc):
    def explode(_doc):
        raise exc

    monkeypatch.setattr(decode_module, "_validate_note", explode)
    d = dead(enc(GOOD), kind="decode_failed", headers=HEADERS)
    assert type(exc).__name__ in d.error_message and d.headers == tuple(HEADERS)


def test_an_exception_whose_str_fails_is_still_described(monkeypatch):
    class Weird(Exception):
        def __str__(self):
            raise RuntimeError("no")

    def explode(_doc):
        raise Weird()

    monkeypatch.setattr(decode_module, "_validate_note", explode)
    assert "Weird" in dead(enc(GOOD), kind="decode_failed").error_message


def test_memory_error_is_the_process_fault_not_the_record(monkeypatch):
    def explode(_doc):
        raise MemoryError()

    monkeypatch.setattr(decode_module, "_validate_note", explode)
    with pytest.raises(MemoryError):
        decode(Msg(enc(GOOD)), MAX)


def test_dead_letters_say_where_they_came_from():
    d = dead(b"{", kind="not_json", headers=HEADERS)
    assert (d.topic, d.partition, d.offset, d.timestamp_ms, d.headers) == ("notes", 2, 7, 1234, tuple(HEADERS))
    assert d.input_error
