"""The encoder stage's narrow interface and the code that runs one batch through it.

`Encoder` is the protocol worker/encoder.py's OnnxNoteEncoder implements (a fake in tests/fakes.py
serves unit tests of the other stages). `encode_batch` turns a closed Batch into an `Encoded` one; a
batch the encoder rejects as a whole is split so one poisonous note goes to the DLQ
(`encode_failed`) instead of stalling the partition.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from worker.records import Batch, DeadLetter, Encoded, Note

Task = Literal["category", "hashtags", "both"]


@runtime_checkable
class Encoder(Protocol):
    manifest: dict
    model_version: str
    dim: int

    def warmup(self) -> None: ...
    def prompt_tokens(self, note: Any) -> int: ...
    def embed(self, notes: Sequence[Any]) -> np.ndarray: ...
    def embed_and_generate(self, notes: Sequence[Any], task: Task) -> tuple[np.ndarray, list[str | None], list[list[str]]]: ...


def note_text(note: Note) -> Any:
    """The prompt-facing view of a note (notellm.prompts.NoteText when available)."""
    try:
        from notellm.prompts import NoteText
    except ImportError:  # pragma: no cover - prompts.py is part of the package
        return note
    return NoteText(title=note.title, content=note.content, topic=note.topic)


def load_encoder(model_dir, *, device: str = "auto", intra_op_threads: int = 0, max_batch_notes: int = 32,
                 max_batch_tokens: int = 4096, max_new_tokens: int = 16) -> Encoder:
    from worker.encoder import OnnxNoteEncoder

    return OnnxNoteEncoder(model_dir, device=device, intra_op_threads=intra_op_threads,
                           max_batch_notes=max_batch_notes, max_batch_tokens=max_batch_tokens,
                           max_new_tokens=max_new_tokens)


def _run(encoder: Encoder, notes: list[Note], generate: str):
    texts = [note_text(n) for n in notes]
    if generate == "none":
        emb = encoder.embed(texts)
        return emb, [None] * len(notes), [[] for _ in notes]
    emb, cats, tags = encoder.embed_and_generate(texts, generate)  # type: ignore[arg-type]
    return emb, list(cats), [list(t) for t in tags]


def encode_batch(encoder: Encoder, batch: Batch, generate: str, *, worker_version: str = "", topic: str = "") -> Encoded:
    t0 = time.perf_counter()
    notes = batch.notes
    if not notes:
        return Encoded(batch, np.zeros((0, encoder.dim), np.float32), [], [], encoder.model_version, 0.0)
    try:
        emb, cats, tags = _run(encoder, notes, generate)
        failed: list[DeadLetter] = []
    except Exception:
        # Isolate the poisonous note(s): encode one by one, dead-letter the ones that still fail.
        rows, cats, tags, keep, failed = [], [], [], [], []
        for n in notes:
            try:
                e, c, t = _run(encoder, [n], generate)
            except Exception as exc:  # noqa: BLE001 - any encoder failure of one note is that note's
                failed.append(DeadLetter(key=n.note_id.encode(), value=None, error_kind="encode_failed",
                                         error_message=f"{type(exc).__name__}: {exc}", topic=topic,
                                         partition=n.partition, offset=n.offset, timestamp_ms=n.timestamp_ms))
                continue
            rows.append(e[0]); cats.append(c[0]); tags.append(t[0]); keep.append(n)
        batch.notes = keep
        emb = np.stack(rows) if rows else np.zeros((0, encoder.dim), np.float32)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.shape != (len(batch.notes), encoder.dim):
        raise RuntimeError(f"encoder returned shape {emb.shape}, expected ({len(batch.notes)}, {encoder.dim})")
    return Encoded(batch, emb, cats, tags, encoder.model_version, time.perf_counter() - t0, failed)
