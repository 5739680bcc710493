"""Build the worker's encoder from settings: the ONNX engine in a supervised child process (default) or
in this process. Kept apart from worker/encoding.py so that the stage code never imports an engine."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from worker.encoding import Encoder


def load_encoder(model_dir: str | Path, *, device: str = "auto", intra_op_threads: int = 0, max_batch_notes: int = 32,
                 max_batch_tokens: int = 4096, max_new_tokens: int = 16,
                 isolation: Literal["process", "thread"] = "thread", log: tuple[str, str] | None = None,
                 factory: str | None = None) -> Encoder:
    """An `Encoder` for the package in `model_dir`. `isolation="process"`: a `ProcessEncoder` (its child
    logs with `log` = (format, level)); "thread": the engine itself, in this process. `factory`
    ("module:callable", default OnnxNoteEncoder) builds the engine from (model_dir, **options)."""
    kw = dict(device=device, intra_op_threads=intra_op_threads, max_batch_notes=max_batch_notes,
              max_batch_tokens=max_batch_tokens, max_new_tokens=max_new_tokens)
    if isolation == "process":
        from worker.encoder_process import DEFAULT_FACTORY, ProcessEncoder

        fmt, level = log or (None, None)
        return ProcessEncoder(model_dir, factory=factory or DEFAULT_FACTORY, log_format=fmt, log_level=level, **kw)
    if isolation != "thread":
        raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
    if factory is not None:
        from worker.encoder_process import load_factory

        return load_factory(factory)(model_dir, **kw)
    from worker.encoder import OnnxNoteEncoder

    return OnnxNoteEncoder(model_dir, **kw)
