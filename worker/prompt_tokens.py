"""A note's prompt token ids, computed once (tokenizers + notellm.prompts; no ONNX Runtime).

Both encoders tokenise with this class: `OnnxNoteEncoder` in its own process, `ProcessEncoder` in the
parent (the child receives ids, never text). The ids are the note segments of the prompts
(see notellm.prompts: ``instruction + note + continuation``); the instruction and continuation are the
same for every note of a task, so the engine adds them itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from notellm.prompts import PromptConfig, PromptEncoder
from worker.encoding import GENERATE_TASKS, GenerateTask, NoteError
from worker.records import Prompt

TASKS = ("category", "hashtags")


class PromptTokenizer:
    """`tokenize(note, generate) -> Prompt` for the package in `model_dir` (described by `manifest`).

    A prompt longer than the model's context (`max_lengths.model_tokens`) is a NoteError, and so is any
    exception while building the ids (e.g. a lone surrogate in the text). Thread-safe after construction."""

    def __init__(self, model_dir: str | Path, manifest: dict[str, Any]) -> None:
        tok = Tokenizer.from_file(str(Path(model_dir) / manifest.get("tokenizer", "tokenizer.json")))
        tok.no_padding()
        tok.no_truncation()
        self.tokenizer = tok
        self.config = PromptConfig.from_dict(manifest["prompt"])
        self.prompts = PromptEncoder(tok, self.config, eos_token_id=int(manifest["special_tokens"]["eos"]["id"]))
        self.max_tokens = int(manifest["max_lengths"]["model_tokens"])
        # the constant segments, computed here so tokenize() never writes the PromptEncoder's cache
        self._fixed = {t: len(self.prompts.instruction_ids(t)) + len(self.prompts.continuation_ids(t)) for t in TASKS}

    def tokenize(self, note: Any, generate: GenerateTask) -> Prompt:
        if generate not in GENERATE_TASKS:
            raise ValueError(f"generate must be one of {GENERATE_TASKS}, got {generate!r}")
        try:
            category = tuple(self.prompts.note_ids(note, "category"))
            hashtags = tuple(self.prompts.note_ids(note, "hashtags")) if generate in ("hashtags", "both") else None
        except Exception as e:  # noqa: BLE001 - whatever this note's text makes the tokenizer raise
            raise NoteError(f"cannot tokenise the note: {type(e).__name__}: {e}") from e
        tokens = self._fixed["category"] + len(category)
        longest = max(tokens, 0 if hashtags is None else self._fixed["hashtags"] + len(hashtags))
        if longest > self.max_tokens:
            raise NoteError(f"prompt of {longest} tokens exceeds the model's {self.max_tokens}")
        return Prompt(category=category, hashtags=hashtags, tokens=tokens)
