"""Build the worker's encoder from settings: the ONNX engine in a supervised child process (default) or
in this process. Kept apart from worker/encoding.py so that the stage code never imports an engine.

Batch limits: the engine cuts what `encode` gets into sub-batches of at most `max_batch_notes` notes and
`max_batch_tokens` padded tokens. "auto" limits (the settings' default) are chosen at start-up by
worker/calibrate.py, which changes them on the live engine with `set_batch_limits` (nothing is re-created);
until then, and wherever nothing is measured, "auto" means the defaults below."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from worker.encoding import Encoder

DEFAULT_BATCH_NOTES = 32  # "auto" where nothing was measured (the fixed default before calibration)
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_TOKENS_PER_NOTE = DEFAULT_BATCH_TOKENS // DEFAULT_BATCH_NOTES  # tokens "auto" with an explicit notes limit


def resolve_limits(max_batch_notes: int | str, max_batch_tokens: int | str) -> tuple[int, int]:
    """(notes, tokens) from settings values that may be "auto", without measuring: "auto" notes are the
    default; "auto" tokens are notes x DEFAULT_TOKENS_PER_NOTE (32 -> 4096)."""
    notes = DEFAULT_BATCH_NOTES if max_batch_notes == "auto" else int(max_batch_notes)
    tokens = notes * DEFAULT_TOKENS_PER_NOTE if max_batch_tokens == "auto" else int(max_batch_tokens)
    return notes, tokens


def set_batch_limits(encoder: Any, max_batch_notes: int, max_batch_tokens: int) -> bool:
    """Set the engine's sub-batching limits on a live encoder: a `ProcessEncoder` forwards them to its child
    (and keeps them for restarts), an in-process engine (`OnnxNoteEncoder`) takes them as attributes.
    False when the encoder has no such limits (a fake, a custom engine): nothing changed."""
    n, t = int(max_batch_notes), int(max_batch_tokens)
    if n < 1 or t < 1:
        raise ValueError("max_batch_notes and max_batch_tokens must be >= 1")
    setter = getattr(encoder, "set_batch_limits", None)
    if callable(setter):
        setter(n, t)
        return True
    if hasattr(encoder, "max_batch_notes") and hasattr(encoder, "max_batch_tokens"):
        encoder.max_batch_notes, encoder.max_batch_tokens = n, t
        return True
    return False


def cuda_arena_options(gpu_mem_limit_mib: int) -> dict[str, str]:
    """ONNX Runtime CUDA provider options that bound a session's memory arena to `gpu_mem_limit_mib` MiB
    and grow it by what each allocation asks (ONNX Runtime's default doubles it and keeps it all: one
    encoder at batch 2048 left a second process on an H200 unable to allocate 1.3 GB, run 10)."""
    if gpu_mem_limit_mib < 1:
        raise ValueError(f"gpu_mem_limit_mib must be positive, got {gpu_mem_limit_mib}")
    return {"gpu_mem_limit": str(int(gpu_mem_limit_mib) * 2**20), "arena_extend_strategy": "kSameAsRequested"}


def load_encoder(model_dir: str | Path, *, device: str = "auto", intra_op_threads: int = 0,
                 max_batch_notes: int | Literal["auto"] = DEFAULT_BATCH_NOTES,
                 max_batch_tokens: int | Literal["auto"] = DEFAULT_BATCH_TOKENS, max_new_tokens: int = 16,
                 isolation: Literal["process", "thread"] = "thread", log: tuple[str, str] | None = None,
                 factory: str | None = None, categories: Literal["package", "open"] = "package",
                 gpu_mem_limit_mib: int | None = None) -> Encoder:
    """An `Encoder` for the package in `model_dir`. `isolation="process"`: a `ProcessEncoder` (its child
    logs with `log` = (format, level)); "thread": the engine itself, in this process. `factory`
    ("module:callable", default OnnxNoteEncoder) builds the engine from (model_dir, **options).
    "auto" limits start at `resolve_limits` (calibration may change them later, `set_batch_limits`).
    `categories="open"` turns off decoding the category within the package's category set (the engine
    option `constrain_categories`). `gpu_mem_limit_mib` bounds each CUDA session's memory arena (the engine
    option `provider_options`, :func:`cuda_arena_options`); on the CPU it does nothing."""
    max_batch_notes, max_batch_tokens = resolve_limits(max_batch_notes, max_batch_tokens)
    kw = dict(device=device, intra_op_threads=intra_op_threads, max_batch_notes=max_batch_notes,
              max_batch_tokens=max_batch_tokens, max_new_tokens=max_new_tokens,
              constrain_categories=categories == "package")
    if gpu_mem_limit_mib is not None:
        kw["provider_options"] = cuda_arena_options(gpu_mem_limit_mib)
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


def load_configured_encoder(s: Any, *, log: tuple[str, str] | None = None) -> Encoder:
    """:func:`load_encoder` with what the settings `s` (worker.config.Settings) configure: the model section
    and the batch limits. One place for the worker and the backfill, so a model setting reaches both."""
    m = s.model
    return load_encoder(m.dir, device=m.device, intra_op_threads=m.intra_op_threads,
                        max_batch_notes=s.batch.max_batch_notes, max_batch_tokens=s.batch.max_batch_tokens,
                        max_new_tokens=m.max_new_tokens, isolation=m.isolation, categories=m.categories,
                        gpu_mem_limit_mib=m.gpu_mem_limit_mib, log=log)
