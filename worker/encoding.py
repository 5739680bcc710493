"""The encoder stage's narrow interface and the code that runs one batch through it.

`Encoder` is the protocol worker/encoder.py's OnnxNoteEncoder implements (a fake in tests/fakes.py
serves unit tests of the other stages). `encode_batch` turns a closed Batch into an `Encoded` one; a
batch the encoder rejects as a whole is split so one poisonous note goes to the DLQ
(`encode_failed`) instead of stalling the partition.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from worker.records import Batch, DeadLetter, Encoded, Note

Task = Literal["category", "hashtags", "both"]


class EncoderUnavailable(RuntimeError):
    """The encoder cannot run at all (e.g. its process died): fatal for the worker, not for a note."""


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
    """The prompt-facing view of a note: notellm.prompts accepts any object with title/content/topic,
    which a worker Note has."""
    return note


def load_encoder(model_dir, *, device: str = "auto", intra_op_threads: int = 0, max_batch_notes: int = 32,
                 max_batch_tokens: int = 4096, max_new_tokens: int = 16, isolation: str = "thread",
                 log: tuple[str, str] | None = None) -> Encoder:
    kw = dict(device=device, intra_op_threads=intra_op_threads, max_batch_notes=max_batch_notes,
              max_batch_tokens=max_batch_tokens, max_new_tokens=max_new_tokens)
    if isolation == "process":
        from worker.encoder_process import ProcessEncoder

        lf, ll = log or (None, None)
        return ProcessEncoder(model_dir, log_format=lf, log_level=ll, **kw)
    from worker.encoder import OnnxNoteEncoder

    return OnnxNoteEncoder(model_dir, **kw)


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
    except EncoderUnavailable:
        raise  # the encoder itself is gone: not the notes' fault, never dead-letter them for it
    except Exception:
        # Isolate the poisonous note(s): encode one by one, dead-letter the ones that still fail.
        rows, cats, tags, keep, failed = [], [], [], [], []
        for n in notes:
            try:
                e, c, t = _run(encoder, [n], generate)
            except EncoderUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - any encoder failure of one note is that note's
                value = json.dumps({"schema_version": "note.v1", "note_id": n.note_id, "title": n.title,
                                    "content": n.content, "topic": n.topic, "author_id": n.author_id,
                                    "published_at": n.published_at}).encode()
                failed.append(DeadLetter(key=n.note_id.encode(), value=value, error_kind="encode_failed",
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
