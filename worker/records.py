"""What the Source hands downstream: a validated `Note`, a `Tombstone` (null value = delete), or a
`DeadLetter` (bytes we could not accept). Nothing downstream of the Source ever sees raw Kafka bytes,
except the DeadLetter, which keeps them so nothing is lost."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field


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
    size: int = 0
    tokens: int = 0  # prompt length in tokens, filled in by the batcher's token counter


@dataclass(frozen=True, slots=True)
class Tombstone:
    note_id: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    error_kind: str  # one of dead_letter.v1's enum
    error_message: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    failed_at: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def note_id(self) -> str | None:
        """The Kafka key as text when it is valid UTF-8 (the key is the note id by contract)."""
        if self.key is None:
            return None
        try:
            return self.key.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def to_event(self, worker_version: str) -> dict:
        b64 = lambda b: None if b is None else base64.b64encode(b).decode("ascii")  # noqa: E731
        return {
            "schema_version": "dead_letter.v1",
            "key_b64": b64(self.key),
            "value_b64": b64(self.value),
            "error_kind": self.error_kind,
            "error_message": self.error_message[:2000],
            "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                       "timestamp_ms": self.timestamp_ms},
            "worker_version": worker_version,
            "failed_at": self.failed_at,
        }


Record = Note | Tombstone | DeadLetter


@dataclass
class Batch:
    """A closed micro-batch. `notes` are de-duplicated by note_id (later offset wins, also across
    tombstones); `offsets` is what committing this batch means: partition -> next offset to read."""

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

    @property
    def empty(self) -> bool:
        return self.records == 0


@dataclass
class Encoded:
    """A batch after the encoder: one embedding row, category and hashtags per note."""

    batch: Batch
    embeddings: "object"  # np.ndarray float32 [n, d]
    categories: list[str | None]
    hashtags: list[list[str]]
    model_version: str
    encode_s: float = 0.0
    failed: list[DeadLetter] = field(default_factory=list)  # notes the encoder could not handle
