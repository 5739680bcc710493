"""Versioned JSON Schemas (draft 2020-12) of every event, and compiled validators for them.

The hot path (one validation per consumed note) uses fastjsonschema's compiled validators
(~2.5 µs per note measured here, against ~67 µs for jsonschema's Draft202012Validator).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import fastjsonschema

# dead_letter.v2 is what the worker writes; dead_letter.v1 stays for reading events of older workers.
NAMES = ("note.v1", "note_tags.v1", "dead_letter.v1", "dead_letter.v2")


class SchemaError(ValueError):
    """A document does not match its schema. `path` names the offending field."""

    def __init__(self, schema: str, message: str, path: str = "") -> None:
        super().__init__(f"{schema}: {message}")
        self.schema = schema
        self.path = path


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    """The schema document `name` (e.g. "note.v1") as a dict."""
    if name not in NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(NAMES)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8"))


@lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[[Any], Any]:
    return fastjsonschema.compile(load(name), formats={})


def validator(name: str) -> Callable[[Any], None]:
    """A compiled validator: call it with a decoded document; raises SchemaError on a mismatch."""
    fn = _compiled(name)

    def validate(doc: Any) -> None:
        try:
            fn(doc)
        except fastjsonschema.JsonSchemaValueException as e:
            raise SchemaError(name, e.message, ".".join(str(p) for p in (e.path or [])[1:])) from None

    return validate


def validate(name: str, doc: Any) -> None:
    """Validate `doc` against schema `name`; raises SchemaError."""
    validator(name)(doc)
