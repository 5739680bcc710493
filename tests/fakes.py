"""A small deterministic encoder for unit tests of the stages around the encoder (never for the
integration tests, which run a real exported ONNX model)."""
from __future__ import annotations

import hashlib
import threading
import time

import numpy as np


class FakeEncoder:
    def __init__(self, dim: int = 16, model_version: str = "fake-v1", delay_per_note_s: float = 0.0,
                 fail_titles: tuple[str, ...] = ()) -> None:
        self.dim = dim
        self.model_version = model_version
        self.manifest = {"embedding_dim": dim, "model_version": model_version}
        self.providers = ["FakeProvider"]
        self.delay_per_note_s = delay_per_note_s
        self.fail_titles = fail_titles
        self.calls = 0
        self.warmed = False
        self._lock = threading.Lock()

    def warmup(self) -> None:
        self.warmed = True

    def prompt_tokens(self, note) -> int:
        return 8 + len(note.title.split()) + len((note.content or "").split())

    def _vec(self, note) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(f"{note.title}\x00{note.content}".encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def embed(self, notes) -> np.ndarray:
        with self._lock:
            self.calls += 1
        for n in notes:
            if n.title in self.fail_titles:
                raise ValueError(f"cannot encode {n.title!r}")
        if self.delay_per_note_s:
            time.sleep(self.delay_per_note_s * len(notes))
        return np.stack([self._vec(n) for n in notes]) if notes else np.zeros((0, self.dim), np.float32)

    def embed_and_generate(self, notes, task):
        emb = self.embed(notes)
        cats = [(n.title.split() or ["none"])[0].lower() if task in ("category", "both") else None for n in notes]
        tags = [[f"#{w.lower()}" for w in dict.fromkeys(n.title.split()[:3])] if task in ("hashtags", "both") else []
                for n in notes]
        return emb, cats, tags
