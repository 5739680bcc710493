"""An engine that misbehaves on `encode`, for the supervision tests of the encoder child:
``ProcessEncoder(model_dir, factory="tests.faulty_engine:FaultyEngine", fault=..., once=path, ...)``.

It wraps the real `OnnxNoteEncoder`; `fault` = "raise" (RuntimeError), "hang" (never answers), "nan"
(NaN vectors) or "note" (NoteError for the last prompt of the call). With `once` (a file path) only the
first faulty call anywhere faults: it creates the file, and every engine built later (a restarted child)
sees it and behaves."""
from __future__ import annotations

import time
from pathlib import Path

from worker.encoder import OnnxNoteEncoder
from worker.encoding import NoteError


class FaultyEngine:
    def __init__(self, model_dir, *, fault: str, once: str | None = None, **kwargs) -> None:
        if fault not in ("raise", "hang", "nan", "note"):
            raise ValueError(f"unknown fault {fault!r}")
        self.fault = fault
        self.once = Path(once) if once else None
        self.inner = OnnxNoteEncoder(model_dir, **kwargs)
        self.manifest, self.model_version = self.inner.manifest, self.inner.model_version
        self.dim, self.providers = self.inner.dim, self.inner.providers

    def warmup(self, generate="both") -> None:
        self.inner.warmup(generate)

    def _armed(self) -> bool:
        if self.once is None:
            return True
        try:
            self.once.touch(exist_ok=False)
        except FileExistsError:
            return False
        return True

    def encode(self, prompts, generate, *, timeout_s=None):
        if self._armed():
            if self.fault == "raise":
                raise RuntimeError("injected engine fault")
            if self.fault == "hang":
                while True:
                    time.sleep(3600)
            if self.fault == "note":
                raise NoteError("injected note fault", index=len(prompts) - 1)
            emb, cats, tags = self.inner.encode(prompts, generate)
            emb[:] = float("nan")
            return emb, cats, tags
        return self.inner.encode(prompts, generate)
