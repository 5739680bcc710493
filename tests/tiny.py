"""Shared tiny-model helpers for the model / export / encoder tests.

A tiny random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer, wrapped as a NoteLLM, and its
exported, validated ONNX package — each built once per test process (the export takes ~15 s).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from notellm.prompts import NoteText  # noqa: E402

NOTES: tuple[NoteText, ...] = (
    NoteText("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", "Adventure"),
    NoteText("Heat (1995)", "Action|Crime|Thriller", None),
    NoteText("Silver Spring Man Nabs Title At Soggy Marine Corps Marathon",
             "The rain didn't stop Silver Spring's Jordan Tropf from winning the 44th Marine Corps "
             "Marathon on Sunday.", "sports"),
    NoteText("Quick tip", "", None),
    NoteText("Amélie (2001)", "Comedy|Romance — \"quoted\" {json} back\\slash", "Comedy"),
    NoteText("A very long title that keeps going " * 6, "and a very long body of text. " * 40, "misc"),
)


def tokenizer_json() -> Path:
    """Path of SmolLM2's tokenizer.json (built into the cache once, with transformers, if missing)."""
    from notellm.base_models import cache_root

    for d in ("smollm2", "smollm2-tokenizer"):
        p = cache_root() / "base" / d / "tokenizer.json"
        if p.exists() and (p.parent / ".complete").exists():
            return p
    from notellm.base_models import smollm2_tokenizer

    smollm2_tokenizer()
    return tokenizer_json()


@functools.lru_cache(maxsize=None)
def tiny_notellm(seed: int = 0):
    """A NoteLLM on a tiny random Llama (fresh per seed; do not mutate it in tests)."""
    from notellm.base_models import tiny_llama
    from notellm.model import NoteLLM

    lm, tok = tiny_llama(seed=seed)
    return NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id=f"tiny-llama-seed{seed}", seed=seed).eval()


_TMP = Path(tempfile.mkdtemp(prefix="notellm-tests-"))
atexit.register(shutil.rmtree, _TMP, True)


@functools.lru_cache(maxsize=None)
def tiny_package(kind: str = "fp32") -> tuple[Path, dict]:
    """(package dir, manifest) of the tiny NoteLLM exported as ``kind`` ("fp32", "fp16" or "int8")."""
    from export.onnx_export import export_package

    out = _TMP / f"pkg-{kind}"
    manifest = export_package(tiny_notellm(), out, dtype="fp16" if kind == "fp16" else "fp32",
                              quantize="int8" if kind == "int8" else None)
    return out, manifest
