"""A small deterministic `Encoder` (worker/encoding.py) for unit tests of the stages around the encoder
(never for the integration tests, which run a real exported ONNX model).

Prompt ids are the UTF-8 bytes of ``title \\0 content`` (so `encode` sees only ids, like a real engine);
`tokens` = 8 + words. Knobs: `fail_titles` (NoteError from `tokenize`), `reject_titles` (NoteError with
its index from `encode`), and engine faults on `encode`: `fault` = "raise" | "memory" | "hang" (answers
EngineError at `timeout_s`, like a killed child) | "slow" (answers late, ignoring `timeout_s`, like an
in-process engine) | "nan" | "zero" | "shape" | "short" (one category too few), for the first `faults`
calls (None: every call). `restarts` counts `restart()` calls."""
from __future__ import annotations

import hashlib
import threading
import time

import numpy as np

from worker.encoding import EncoderHealth, EngineError, NoteError
from worker.records import Prompt

FAULTS = ("raise", "memory", "hang", "slow", "nan", "zero", "shape", "short")


class FakeEncoder:
    def __init__(self, dim: int = 16, model_version: str = "fake-v1", delay_per_note_s: float = 0.0,
                 fail_titles: tuple[str, ...] = (), *, reject_titles: tuple[str, ...] = (), fault: str | None = None,
                 faults: int | None = None, hang_s: float = 5.0) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        self.dim = dim
        self.model_version = model_version
        self.manifest = {"dim": dim, "model_version": model_version}
        self.providers = ["FakeProvider"]
        self.delay_per_note_s = delay_per_note_s
        self.fail_titles = fail_titles
        self.reject_titles = reject_titles
        self.fault = fault
        self.faults = faults
        self.hang_s = hang_s
        self.calls = 0
        self.restarts = 0
        self.warmed = False
        self.closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ protocol
    def warmup(self, generate="both") -> None:
        self.warmed = True

    def tokenize(self, note, generate) -> Prompt:
        if note.title in self.fail_titles:
            raise NoteError(f"cannot tokenise {note.title!r}")
        text = f"{note.title}\x00{note.content or ''}".encode("utf-8")
        tags = tuple(note.title.encode("utf-8")) if generate in ("hashtags", "both") else None
        return Prompt(category=tuple(text), hashtags=tags, tokens=8 + len(note.title.split())
                      + len((note.content or "").split()))

    def tokenize_many(self, notes, generate) -> list:
        out = []
        for n in notes:
            try:
                out.append(self.tokenize(n, generate))
            except NoteError as e:
                out.append(e)
        return out

    def encode(self, prompts, generate, *, timeout_s: float | None = None):
        with self._lock:
            self.calls += 1
            fault = self.fault if self.faults is None or self.faults > 0 else None
            if fault is not None and self.faults is not None:
                self.faults -= 1
        titles = [bytes(p.category).split(b"\x00")[0].decode("utf-8") for p in prompts]
        for i, t in enumerate(titles):
            if t in self.reject_titles:
                raise NoteError(f"cannot encode {t!r}", index=i)
        if fault == "raise":
            raise EngineError("injected engine fault")
        if fault == "memory":
            raise MemoryError("injected")
        if fault == "hang":
            if timeout_s is not None and timeout_s < self.hang_s:
                time.sleep(timeout_s)
                raise EngineError(f"encoder did not answer within {timeout_s:g} s")
            time.sleep(self.hang_s)
        if fault == "slow":
            time.sleep(self.hang_s)
        if self.delay_per_note_s:
            time.sleep(self.delay_per_note_s * len(prompts))
        n = len(prompts)
        emb = np.stack([self._vec(bytes(p.category)) for p in prompts]) if n else np.zeros((0, self.dim), np.float32)
        if fault == "nan" and n:
            emb[-1, 0] = np.nan
        if fault == "zero" and n:
            emb[-1] = 0.0
        if fault == "shape":
            emb = emb[:, :-1]
        cats = [(t.split() or ["none"])[0].lower() if generate in ("category", "both") else None for t in titles]
        tags = [[f"#{w.lower()}" for w in dict.fromkeys(t.split()[:3])] if generate in ("hashtags", "both") else []
                for t in titles]
        if fault == "short":
            cats = cats[:-1]
        return emb, cats, tags

    def health(self) -> EncoderHealth:
        return EncoderHealth(not self.closed, "closed" if self.closed else "")

    def restart(self) -> None:
        self.restarts += 1

    def close(self) -> None:
        self.closed = True

    def _vec(self, key: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)
