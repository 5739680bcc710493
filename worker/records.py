"""What the Source hands downstream: a validated `Note`, a `Tombstone` (null value = delete), or a
`DeadLetter` (a record we could not accept, with the reason). Every record keeps its original Kafka
bytes (`Raw`: key, value, headers), so a dead letter always carries what was consumed — never a
re-serialised note — and re-driving it restores the note exactly."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

# Why a record was dead-lettered (dead_letter.v2's `error_kind` enum). The first six are input errors
# (decided from the bytes alone, so a replay of the same record reaches the same verdict).
INPUT_ERRORS = ("not_utf8", "not_json", "schema_violation", "too_large", "bad_key", "decode_failed")
ERROR_KINDS = (*INPUT_ERRORS,
               "encode_failed",   # the encoder cannot take this note (e.g. its prompt cannot be tokenised)
               "sink_rejected")   # the store refused this note's row for its data


@dataclass(frozen=True, slots=True)
class Raw:
    """A Kafka record's original bytes."""

    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Prompt:
    """A note's prompt token ids, computed once on the polling thread (`Encoder.tokenize`): the batcher's
    token budget and the encoder both use them; the encoder never tokenises again."""

    category: tuple[int, ...]            # note segment of the category prompt (after the shared instruction)
    hashtags: tuple[int, ...] | None     # note segment of the hashtag prompt; None when not generated
    tokens: int                          # the budget unit: the full category prompt (instruction + note + continuation)


@dataclass(frozen=True, slots=True)
class Note:
    note_id: str
    title: str
    content: str
    author_id: str
    published_at: int  # epoch ms
    topic: str | None
    category: str | None
    hashtags: tuple[str, ...] | None
    partition: int
    offset: int
    timestamp_ms: int | None = None
    raw: Raw = Raw()
    prompt: Prompt | None = None

    @property
    def tokens(self) -> int:
        return self.prompt.tokens if self.prompt is not None else 0

    def with_prompt(self, prompt: Prompt) -> Note:
        """This note with `prompt`: ``dataclasses.replace(self, prompt=prompt)`` at half its cost (no field
        introspection per call; the polling thread does it once per note). Every field is listed here, so
        tests/test_records.py fails when a field is added and not passed on."""
        return Note(self.note_id, self.title, self.content, self.author_id, self.published_at, self.topic,
                    self.category, self.hashtags, self.partition, self.offset, self.timestamp_ms, self.raw, prompt)


@dataclass(frozen=True, slots=True)
class Tombstone:
    note_id: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    raw: Raw = Raw()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    error_kind: str  # one of ERROR_KINDS
    error_message: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    failed_at: int = field(default_factory=lambda: int(time.time() * 1000))

    @classmethod
    def of(cls, rec: "Note | Tombstone", kind: str, message: str, topic: str) -> "DeadLetter":
        """A dead letter for a record that passed decoding but failed later (encoder, sink): its original
        bytes, never a re-serialisation."""
        r = rec.raw
        return cls(key=r.key, value=r.value, headers=r.headers, error_kind=kind, error_message=message, topic=topic,
                   partition=rec.partition, offset=rec.offset, timestamp_ms=rec.timestamp_ms)

    @property
    def input_error(self) -> bool:
        return self.error_kind in INPUT_ERRORS

    @property
    def note_id(self) -> str | None:
        """The Kafka key as text when it is valid UTF-8 (the key is the note id by contract)."""
        if self.key is None:
            return None
        try:
            return self.key.decode("utf-8")
        except UnicodeDecodeError:
            return None


Record = Note | Tombstone | DeadLetter


@dataclass
class Batch:
    """A closed micro-batch. `notes` are de-duplicated by note_id (later offset wins, also across
    tombstones); `offsets` is what committing this batch means: partition -> next offset to read.
    `owner` is the assignment generation of each partition when the batch closed (see ownership.py):
    sinks write a partition's records only while that generation still owns it."""

    seq: int
    notes: list[Note]
    tombstones: list[Tombstone]
    dead: list[DeadLetter]
    offsets: dict[int, int]
    records: int
    padded_tokens: int
    opened_at: float
    closed_at: float
    reason: str  # "notes" | "tokens" | "linger" | "flush"
    owner: dict[int, int] = field(default_factory=dict)


@dataclass
class Encoded:
    """A batch after the encoder: one embedding row, category and hashtags per note of `batch.notes`.
    `failed`: notes the encoder rejected as notes (NoteError), already removed from `batch.notes`."""

    batch: Batch
    embeddings: "object"  # np.ndarray float32 [n, d]
    categories: list[str | None]
    hashtags: list[list[str]]
    model_version: str
    encode_s: float = 0.0
    failed: list[DeadLetter] = field(default_factory=list)

    def only(self, partitions: set[int]) -> "Encoded":
        """The part of this batch that belongs to `partitions` (ownership fence)."""
        b = self.batch
        if all(p in partitions for p in b.offsets):
            return self
        part = self._notes([i for i, n in enumerate(b.notes) if n.partition in partitions])
        nb = replace(part.batch, tombstones=[t for t in b.tombstones if t.partition in partitions],
                     dead=[d for d in b.dead if d.partition in partitions],
                     offsets={p: o for p, o in b.offsets.items() if p in partitions})
        return replace(part, batch=nb, failed=[d for d in self.failed if d.partition in partitions])

    def without(self, note_ids: set[str]) -> "Encoded":
        """This batch less the notes `note_ids` (rows a sink rejected: no tags for them)."""
        if not note_ids:
            return self
        return self._notes([i for i, n in enumerate(self.batch.notes) if n.note_id not in note_ids])

    def _notes(self, keep: list[int]) -> "Encoded":
        """This batch with only the notes at `keep` (and their rows)."""
        return replace(self, batch=replace(self.batch, notes=[self.batch.notes[i] for i in keep]),
                       embeddings=self.embeddings[keep] if len(keep) else self.embeddings[:0],
                       categories=[self.categories[i] for i in keep] if self.categories else [],
                       hashtags=[self.hashtags[i] for i in keep] if self.hashtags else [])
