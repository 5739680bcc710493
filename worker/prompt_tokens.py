"""A note's prompt token ids, computed once (tokenizers + notellm.prompts; no ONNX Runtime).

Both encoders tokenise with this class: `OnnxNoteEncoder` in its own process, `ProcessEncoder` in the
parent (the child receives ids, never text). The ids are the note segments of the prompts
(see notellm.prompts: ``instruction + note + continuation``); the instruction and continuation are the
same for every note of a task, so the engine adds them itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

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
        tasks = self._tasks(generate)
        try:
            ids = {t: self.prompts.note_ids(note, t) for t in tasks}
        except Exception as e:  # noqa: BLE001 - whatever this note's text makes the tokenizer raise
            raise NoteError(f"cannot tokenise the note: {type(e).__name__}: {e}") from e
        return self._prompt(ids["category"], ids.get("hashtags"))

    def tokenize_many(self, notes: Sequence[Any], generate: GenerateTask) -> list[Prompt | NoteError]:
        """`tokenize` for many notes, in order: each item is the note's Prompt or the NoteError that
        `tokenize` would raise for it. One batched pass of the tokenizer for all notes (it runs on all
        cores); when that pass raises, each note is tokenised alone, so one bad note costs only itself."""
        tasks = self._tasks(generate)
        if not notes:
            return []
        try:
            ids = self.prompts.note_ids_many(notes, tasks)
        except Exception:  # noqa: BLE001 - some note's text broke the batch: find which, note by note
            return [self._try(n, generate) for n in notes]
        out: list[Prompt | NoteError] = []
        for i in range(len(notes)):
            try:
                out.append(self._prompt(ids["category"][i], ids["hashtags"][i] if "hashtags" in ids else None))
            except NoteError as e:
                out.append(e)
        return out

    def _try(self, note: Any, generate: GenerateTask) -> Prompt | NoteError:
        try:
            return self.tokenize(note, generate)
        except NoteError as e:
            return e

    @staticmethod
    def _tasks(generate: GenerateTask) -> tuple[str, ...]:
        if generate not in GENERATE_TASKS:
            raise ValueError(f"generate must be one of {GENERATE_TASKS}, got {generate!r}")
        return ("category", "hashtags") if generate in ("hashtags", "both") else ("category",)

    def _prompt(self, category_ids: Sequence[int], hashtag_ids: Sequence[int] | None) -> Prompt:
        category = tuple(category_ids)
        hashtags = None if hashtag_ids is None else tuple(hashtag_ids)
        tokens = self._fixed["category"] + len(category)
        longest = max(tokens, 0 if hashtags is None else self._fixed["hashtags"] + len(hashtags))
        if longest > self.max_tokens:
            raise NoteError(f"prompt of {longest} tokens exceeds the model's {self.max_tokens}")
        return Prompt(category=category, hashtags=hashtags, tokens=tokens)
