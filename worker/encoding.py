"""The encoder stage: the `Encoder` protocol, its two error classes, and the code that runs one batch
through an encoder (`EncodeStage`). Imports only the standard library, numpy and worker.records.

Contract, for one bad record:
- `prepare` / `prepare_many` (polling thread) tokenise a note once; any failure — `NoteError` or an
  unexpected exception — makes that note a dead letter (`encode_failed`) and nothing else.
- `EncodeStage` (encode thread): a `NoteError` with an index dead-letters that note alone and the
  rest of the batch is encoded again; anything else (an `EngineError`, any other exception, output that
  is not (n, dim), not finite or has a zero-norm row, generated lists of the wrong length) is the engine's
  fault: the encoder is restarted and the whole batch retried; after `restarts` restarts for the same
  batch `EngineFailed` is raised, and no note is dead-lettered for it.

Implementations: worker/encoder.py (`OnnxNoteEncoder`, in process), worker/encoder_process.py
(`ProcessEncoder`, the same engine in a supervised child), tests/fakes.py (`FakeEncoder`); built by
worker/encoders.py (`load_encoder`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from worker.records import Batch, DeadLetter, Encoded, Note, Prompt

GenerateTask = Literal["none", "category", "hashtags", "both"]
GENERATE_TASKS: tuple[str, ...] = ("none", "category", "hashtags", "both")
MIN_NORM = 1e-6  # a vector row shorter than this is an engine fault (cannot be normalised, never similar)


class NoteError(ValueError):
    """This input cannot be encoded: the note's fault. `index`: its position in the `encode()` call
    (None when raised by `tokenize`, which sees one note)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):  # picklable with its index
        return (type(self), (str(self), self.index))


class EngineError(RuntimeError):
    """The engine failed, not tied to one note: a crash, a dead or hung child, a timeout, an ORT/CUDA
    fault, MemoryError, invalid output, a bug. The batch is retried after a restart."""


class EngineFailed(RuntimeError):
    """Raised by `EncodeStage` when the engine still fails after its restarts: fatal for the worker
    (exit non-zero without committing the batch)."""


@dataclass(frozen=True)
class EncoderHealth:
    ok: bool
    detail: str = ""


@runtime_checkable
class Encoder(Protocol):
    manifest: dict
    model_version: str
    dim: int
    providers: list[str]

    def warmup(self, generate: GenerateTask = "both") -> None:
        """Run the largest batch shape once (before the first real batch), on the paths that calls with
        `generate` take: an embed-only worker never warms generation up."""

    def tokenize(self, note: Any, generate: GenerateTask) -> Prompt:
        """The note's prompt ids (hashtag segment only when `generate` is "hashtags" or "both"). Fast;
        runs on the polling thread. Raises NoteError when this note cannot be encoded."""

    def tokenize_many(self, notes: Sequence[Any], generate: GenerateTask) -> list[Prompt | NoteError]:
        """`tokenize` for the notes of one poll, in order, batched where the tokenizer can batch: each item
        is the note's Prompt or the NoteError `tokenize` would raise for it (never raises for a note)."""

    def encode(self, prompts: Sequence[Prompt], generate: GenerateTask, *, timeout_s: float | None = None
               ) -> tuple[np.ndarray, list[str | None], list[list[str]]]:
        """(float32 [n, dim] L2-normalised vectors, categories, hashtags), in input order; categories are
        None and hashtags empty where `generate` does not ask for them. Raises NoteError(index=i) when
        prompt i cannot be encoded, EngineError for anything else. `timeout_s` bounds the call where the
        implementation can (a child process is killed; an in-process engine cannot be interrupted)."""

    def health(self) -> EncoderHealth:
        """Cheap; callable from any thread while `encode` runs."""

    def restart(self) -> None:
        """Bring the engine back to a working state (a new session or child); raises EngineError."""

    def close(self) -> None:
        """Release the engine; idempotent."""


def padded_tokens(lengths: Sequence[int]) -> int:
    """THE token budget of a batch: notes x longest prompt (prompts are padded to the longest). The
    batcher closes batches with it and the encoder cuts its sub-batches with it."""
    return padded_size(len(lengths), max(lengths, default=0))


def padded_size(count: int, longest: int) -> int:
    """`padded_tokens` of `count` prompts whose longest has `longest` tokens: for callers that keep a
    running count and maximum (recomputing over the whole batch at every note is O(n^2): 21 ms per call
    at 1,024 notes, on the encoder's critical path)."""
    return count * longest


def full_batches(lengths: Sequence[int], max_notes: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length, each sub-batch closed only when the next prompt would
    break a budget (at most ``max_notes`` prompts and ``max_tokens`` padded tokens; a longer prompt goes
    alone): each sub-batch as full as the budgets allow, so a stream of calls repeats few sizes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) >= max_notes or padded_size(len(cur) + 1, max(longest, n)) > max_tokens):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def batches_cost(batches: Sequence[Sequence[int]], lengths: Sequence[int], call_tokens: float) -> float:
    """Padded tokens of ``batches`` plus ``call_tokens`` per batch: what `length_batches` minimises."""
    return sum(call_tokens + padded_size(len(b), max(lengths[i] for i in b)) for b in batches if b)


def length_batches(lengths: Sequence[int], max_notes: int, max_tokens: int, call_tokens: float
                   ) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into sub-batches within the budgets of
    `full_batches`, at the cuts that make the fewest padded tokens plus ``call_tokens`` per sub-batch
    (`batches_cost`; the fixed cost of one engine call, counted in tokens). One sorted batch of 2,048
    MIND prompts padded to its longest computes 1.46x its real tokens; cut at 8,192 tokens a call, 1.12x
    in 3 sub-batches; at 0, nothing is padded.

    A dynamic programme over the L distinct lengths (L is at most the longest prompt; ~1 ms for 2,048
    prompts): a group of n prompts up to length v costs ceil(n / cap) calls (cap: the budgets at v) and
    n * v tokens, and is split into that many near-equal sorted sub-batches. Exact when the budgets do
    not cut a group; where they do, a cut inside a run of equal lengths can be cheaper, so the result is
    compared with `full_batches` and the cheaper is returned: never worse than it."""
    if max_notes < 1 or max_tokens < 1 or call_tokens < 0:
        raise ValueError("max_notes and max_tokens must be >= 1 and call_tokens >= 0")
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return []
    order = np.argsort(lens, kind="stable")
    vals, counts = np.unique(lens[order], return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)])  # prompts shorter than each distinct length, then all
    caps = np.maximum(1, np.minimum(max_notes, max_tokens // np.maximum(vals, 1)))
    cost = np.zeros(len(vals) + 1)
    prev = np.zeros(len(vals) + 1, dtype=np.int64)
    for b in range(1, len(vals) + 1):  # the cheapest cut of the prompts up to vals[b-1], its last group (a, b]
        n = starts[b] - starts[:b]
        c = cost[:b] + np.ceil(n / caps[b - 1]) * call_tokens + n * vals[b - 1]
        prev[b] = a = int(np.argmin(c))
        cost[b] = c[a]
    groups: list[list[int]] = []
    b = len(vals)
    while b > 0:
        a = int(prev[b])
        members = order[starts[a]:starts[b]]
        k = -(-len(members) // int(caps[b - 1]))
        groups[:0] = [part.tolist() for part in np.array_split(members, k)]
        b = a
    full = full_batches(lengths, max_notes, max_tokens)
    if batches_cost(full, lengths, call_tokens) < batches_cost(groups, lengths, call_tokens):
        return full
    return groups


def call_batches(lengths: Sequence[int], max_notes: int, max_tokens: int, call_tokens: float, *,
                 by_padding: bool) -> list[list[int]]:
    """How one call's prompts are cut into engine runs: by padding (`length_batches`, at ``call_tokens``
    per run) or each sub-batch as full as the budgets allow (`full_batches`). The encoder's rule, and the
    benchmarks' torch side, which must cut the same way."""
    if by_padding:
        return length_batches(lengths, max_notes, max_tokens, call_tokens)
    return full_batches(lengths, max_notes, max_tokens)


def _reason(e: BaseException) -> str:
    """An error message fit for a dead letter: always valid UTF-8 (a lone surrogate in the text is escaped)."""
    msg = str(e) if isinstance(e, NoteError) else f"{type(e).__name__}: {e}"
    return msg.encode("utf-8", "backslashreplace").decode("utf-8")


def prepare(encoder: Encoder, note: Note, generate: GenerateTask, topic: str) -> Note | DeadLetter:
    """Total: the note with its prompt (tokenised once, here), or a dead letter (`encode_failed`) when
    tokenisation fails for any reason."""
    try:
        return note.with_prompt(encoder.tokenize(note, generate))
    except Exception as e:  # noqa: BLE001 - whatever tokenisation raises, it concerns this note only
        return DeadLetter.of(note, "encode_failed", _reason(e), topic)


def prepare_many(encoder: Encoder, notes: Sequence[Note], generate: GenerateTask, topic: str
                 ) -> list[Note | DeadLetter]:
    """`prepare` for the notes of one poll, in order, through one batched `tokenize_many` (the tokenizer
    runs a batch on all cores, ~2x fewer seconds per note on 2 cores). Total like `prepare`: if the batched
    call itself raises, every note is prepared alone."""
    if not notes:
        return []
    try:
        prompts = encoder.tokenize_many(notes, generate)
        if len(prompts) != len(notes):
            raise RuntimeError(f"tokenize_many returned {len(prompts)} prompts for {len(notes)} notes")
    except Exception:  # noqa: BLE001 - an encoder bug must not cost the notes: fall back to one at a time
        return [prepare(encoder, n, generate, topic) for n in notes]
    return [DeadLetter.of(n, "encode_failed", _reason(p), topic) if isinstance(p, BaseException)
            else n.with_prompt(p) for n, p in zip(notes, prompts)]


class _StdLog:
    """structlog-style `log.error(event, **fields)` over the standard library (when no logger is given)."""

    _log = logging.getLogger("worker.encoding")

    def error(self, event: str, **kw: Any) -> None:
        self._log.error("%s %s", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log.warning("%s %s", event, kw)


class EncodeStage:
    """Runs a closed batch through the encoder: `Encoded` with one row per note left in `batch.notes`.

    Notes must have been `prepare`d (their prompt computed) for a `generate` that covers the one asked
    here; anything else is a wiring bug (ValueError, not retried). The restart budget is per batch: a
    batch that succeeds after restarts resets it. After `EngineFailed` the stage stays failed."""

    def __init__(self, encoder: Encoder, *, topic: str, restarts: int = 2, timeout_s: float = 120.0,
                 log: Any = None, on_restart: Callable[[], None] | None = None) -> None:
        if restarts < 0 or timeout_s <= 0:
            raise ValueError("restarts must be >= 0 and timeout_s > 0")
        self.encoder = encoder
        self.topic = topic
        self.restarts = restarts
        self.timeout_s = timeout_s
        self._log = log if log is not None else _StdLog()
        self._on_restart = on_restart
        self._failed: str | None = None
        self._call_started: float | None = None  # monotonic start of the encoder call in flight

    def health(self) -> EncoderHealth:
        if self._failed is not None:
            return EncoderHealth(False, f"engine failed: {self._failed}")
        started = self._call_started
        if started is not None and time.monotonic() - started > self.timeout_s:
            return EncoderHealth(False, f"encode call running for more than {self.timeout_s:g} s")
        try:
            return self.encoder.health()
        except Exception as e:  # noqa: BLE001 - a health probe must answer
            return EncoderHealth(False, f"health check failed: {type(e).__name__}: {e}")

    def __call__(self, batch: Batch, generate: GenerateTask) -> Encoded:
        if self._failed is not None:
            raise EngineFailed(f"the encoder failed earlier: {self._failed}")
        t0 = time.perf_counter()
        _check_prompts(batch.notes, generate)
        failed: list[DeadLetter] = []
        restarts = 0
        while batch.notes:
            notes = batch.notes
            try:
                emb, cats, tags = self._encode(notes, generate)
            except NoteError as e:
                if e.index is not None and 0 <= e.index < len(notes):
                    failed.append(DeadLetter.of(notes[e.index], "encode_failed", _reason(e), self.topic))
                    batch.notes = notes[:e.index] + notes[e.index + 1:]
                    continue
                error: BaseException = EngineError(f"NoteError without a valid index ({e.index!r}): {e}")
            except Exception as e:  # noqa: BLE001 - anything not tied to one note is the engine's fault
                error = e
            else:
                return Encoded(batch, emb, cats, tags, self.encoder.model_version, time.perf_counter() - t0, failed)
            self._log.error("encoder_engine_error", batch=batch.seq, partitions=sorted(batch.offsets),
                            offsets=dict(batch.offsets), notes=len(notes), error=f"{type(error).__name__}: {error}",
                            attempt=restarts + 1, restarts_left=self.restarts - restarts)
            if restarts >= self.restarts:
                self._failed = f"{type(error).__name__}: {error}"
                raise EngineFailed(f"encoder still failing after {restarts} restart(s): {self._failed}") from error
            restarts += 1
            if self._on_restart is not None:
                self._on_restart()
            try:
                self.encoder.restart()
            except Exception as e:  # noqa: BLE001 - the next attempt fails and counts against the budget
                self._log.error("encoder_restart_failed", batch=batch.seq, error=f"{type(e).__name__}: {e}")
        return Encoded(batch, np.zeros((0, self.encoder.dim), np.float32), [], [], self.encoder.model_version,
                       time.perf_counter() - t0, failed)

    def _encode(self, notes: list[Note], generate: GenerateTask):
        """One encoder call, its output checked (invalid output raises EngineError)."""
        self._call_started = time.monotonic()
        try:
            emb, cats, tags = self.encoder.encode([n.prompt for n in notes], generate,  # type: ignore[misc]
                                                  timeout_s=self.timeout_s)
        finally:
            self._call_started = None
        n, dim = len(notes), self.encoder.dim
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.shape != (n, dim):
            raise EngineError(f"encoder returned shape {emb.shape}, expected {(n, dim)}")
        if not np.isfinite(emb).all():
            raise EngineError(f"encoder returned non-finite values in {int((~np.isfinite(emb)).any(1).sum())} row(s)")
        if (np.linalg.norm(emb, axis=1) < MIN_NORM).any():
            raise EngineError("encoder returned a zero-norm vector")
        cats, tags = list(cats), [list(t) for t in tags]
        if len(cats) != n or len(tags) != n:
            raise EngineError(f"encoder returned {len(cats)} categories and {len(tags)} hashtag lists for {n} notes")
        return emb, cats, tags


def _check_prompts(notes: Sequence[Note], generate: GenerateTask) -> None:
    if generate not in GENERATE_TASKS:
        raise ValueError(f"generate must be one of {GENERATE_TASKS}, got {generate!r}")
    hashtags = generate in ("hashtags", "both")
    for n in notes:
        if n.prompt is None or (hashtags and n.prompt.hashtags is None):
            raise ValueError(f"note {n.note_id!r} was not prepared for generate={generate!r} "
                             "(worker.encoding.prepare tokenises it on the polling thread)")
