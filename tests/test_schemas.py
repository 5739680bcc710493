"""Event contracts: schemas are valid draft 2020-12, good documents pass, bad ones fail with a path."""
from __future__ import annotations

import copy

import pytest
from jsonschema import Draft202012Validator

import schemas
from schemas import SchemaError

GOOD = {
    "note.v1": [
        {"note_id": "n1", "title": "Sourdough at home", "content": "Day 3 of my starter...", "author_id": "u9",
         "published_at": 1732500000000},
        {"note_id": "n2", "title": "", "content": "x", "topic": "baking", "hashtags": ["bread", "diy"],
         "category": "food", "author_id": "u1", "published_at": 0, "lang": "en", "extra": {"any": [1, 2]}},
        {"note_id": "n3", "title": "t", "content": "c", "topic": None, "hashtags": None, "category": None,
         "author_id": "u", "published_at": 5, "schema_version": "note.v1"},
    ],
    "note_tags.v1": [
        {"schema_version": "note_tags.v1", "note_id": "n1", "category": "food", "hashtags": ["bread", "baking"],
         "model_version": "sha256:abc", "source": {"topic": "notes.published", "partition": 2, "offset": 41},
         "produced_at": 1732500000123},
        {"schema_version": "note_tags.v1", "note_id": "n1", "category": None, "hashtags": [],
         "model_version": "m", "source": {"topic": "t", "partition": 0, "offset": 0}, "produced_at": 1},
    ],
    "dead_letter.v1": [
        {"schema_version": "dead_letter.v1", "key_b64": "bjE=", "value_b64": "/w==", "error_kind": "not_utf8",
         "error_message": "value is not UTF-8 at byte 0",
         "source": {"topic": "notes.published", "partition": 1, "offset": 7, "timestamp_ms": 1732500000000},
         "worker_version": "0.1.0", "failed_at": 1732500000999},
        {"schema_version": "dead_letter.v1", "key_b64": None, "value_b64": None, "error_kind": "bad_key",
         "error_message": "missing key", "source": {"topic": "t", "partition": 0, "offset": 0},
         "worker_version": "0.1.0", "failed_at": 0},
    ],
    "dead_letter.v2": [
        {"schema_version": "dead_letter.v2", "error_kind": "not_utf8", "error_message": "value is not UTF-8",
         "source": {"topic": "notes.published", "partition": 1, "offset": 7, "timestamp_ms": 1732500000000},
         "key": {"b64": "bjE=", "size": 2, "sha256": "9" * 64, "truncated": False},
         "value": {"b64": "/w==", "size": 1, "sha256": "a" * 64, "truncated": False},
         "headers": [{"name": "trace", "value_b64": "eA=="}, {"name": "empty", "value_b64": None}],
         "headers_dropped": 0, "worker_version": "0.1.0", "failed_at": 1732500000999},
        {"schema_version": "dead_letter.v2", "error_kind": "sink_rejected", "error_message": "",
         "source": {"topic": "t", "partition": 0, "offset": 0, "timestamp_ms": None},
         "key": None, "value": {"b64": "", "size": 900000, "sha256": "0" * 64, "truncated": True},
         "headers": [], "headers_dropped": 3, "worker_version": "w", "failed_at": 0},
    ],
}


def _bad_notes():
    base = GOOD["note.v1"][0]
    cases = {
        "missing note_id": {k: v for k, v in base.items() if k != "note_id"},
        "missing content": {k: v for k, v in base.items() if k != "content"},
        "empty note_id": {**base, "note_id": ""},
        "published_at as string": {**base, "published_at": "2024-11-25"},
        "negative published_at": {**base, "published_at": -1},
        "float published_at": {**base, "published_at": 1.5},
        "hashtags not a list": {**base, "hashtags": "bread"},
        "hashtag not a string": {**base, "hashtags": ["ok", 3]},
        "title not a string": {**base, "title": 12},
        "author_id null": {**base, "author_id": None},
        "not an object": ["n1"],
        "wrong schema_version": {**base, "schema_version": "note.v2"},
        "published_at past year 9999": {**base, "published_at": 253402300799999 + 1},
        "published_at over int64": {**base, "published_at": 2**63},
        "note_id with NUL": {**base, "note_id": "a\x00b"},
        "author_id with a C1 control": {**base, "author_id": "a\x85"},
        "note_id over 256 characters": {**base, "note_id": "x" * 257},
        "empty author_id": {**base, "author_id": ""},
        "too many hashtags": {**base, "hashtags": ["t"] * 257},
    }
    return list(cases.items())


@pytest.mark.parametrize("name", schemas.NAMES)
def test_schema_documents_are_valid_draft_2020_12(name):
    doc = schemas.load(name)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)


@pytest.mark.parametrize("name,doc", [(n, d) for n, docs in GOOD.items() for d in docs])
def test_good_documents_pass(name, doc):
    schemas.validate(name, doc)
    Draft202012Validator(schemas.load(name)).validate(doc)  # the reference implementation agrees


@pytest.mark.parametrize("label,doc", _bad_notes())
def test_bad_notes_fail_with_a_reason(label, doc):
    with pytest.raises(SchemaError) as err:
        schemas.validate("note.v1", doc)
    assert str(err.value).startswith("note.v1: ")
    # The reference implementation agrees it is invalid.
    assert list(Draft202012Validator(schemas.load("note.v1")).iter_errors(doc)), label


def test_hostile_but_valid_ids_pass():
    for hostile in ["zz'] or note_id not in ['n0", 'q"\\', "%_", "\u202e\u200b", "\u00a0", "x" * 256]:
        doc = {**GOOD["note.v1"][0], "note_id": hostile, "author_id": hostile}
        schemas.validate("note.v1", doc)
        Draft202012Validator(schemas.load("note.v1")).validate(doc)


def test_published_at_bounds_are_in_the_schema():
    p = schemas.load("note.v1")["properties"]["published_at"]
    assert (p["minimum"], p["maximum"]) == (0, 253402300799999) and p["maximum"] < 2**63
    # JSON Schema's "integer" accepts 1.0; worker/decode.py rejects it (tests/test_decode.py).
    schemas.validate("note.v1", {**GOOD["note.v1"][0], "published_at": 1.0})


def test_dead_letter_v2_kinds_are_the_workers():
    from worker.records import ERROR_KINDS

    assert tuple(schemas.load("dead_letter.v2")["properties"]["error_kind"]["enum"]) == ERROR_KINDS


@pytest.mark.parametrize("label,change", [
    ("unknown kind", {"error_kind": "whatever"}),
    ("message over 2000 characters", {"error_message": "x" * 2001}),
    ("sha256 not hex", {"value": {"b64": "", "size": 0, "sha256": "Z" * 64, "truncated": False}}),
    ("payload without size", {"value": {"b64": "", "sha256": "0" * 64, "truncated": False}}),
    ("negative headers_dropped", {"headers_dropped": -1}),
    ("header without value_b64", {"headers": [{"name": "x"}]}),
    ("old v1 field", {"value_b64": "eA=="}),
])
def test_bad_dead_letters_v2(label, change):
    doc = {**GOOD["dead_letter.v2"][0], **change}
    with pytest.raises(SchemaError):
        schemas.validate("dead_letter.v2", doc)
    assert list(Draft202012Validator(schemas.load("dead_letter.v2")).iter_errors(doc)), label


def test_error_names_the_field():
    doc = {**GOOD["note.v1"][0], "published_at": "yesterday"}
    with pytest.raises(SchemaError) as err:
        schemas.validate("note.v1", doc)
    assert "published_at" in str(err.value) or err.value.path == "published_at"


def test_bad_outputs_fail():
    tags = copy.deepcopy(GOOD["note_tags.v1"][0])
    tags["hashtags"] = ["a", "a"]  # must be de-duplicated
    with pytest.raises(SchemaError):
        schemas.validate("note_tags.v1", tags)
    dl = copy.deepcopy(GOOD["dead_letter.v1"][0])
    dl["error_kind"] = "whatever"
    with pytest.raises(SchemaError):
        schemas.validate("dead_letter.v1", dl)
    with pytest.raises(KeyError):
        schemas.load("note.v9")
