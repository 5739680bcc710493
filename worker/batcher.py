"""Micro-batcher. Pure: feed records and a clock, get closed batches. No Kafka, no threads.

A batch closes when the next note would exceed `max_notes` records or the padded token budget
(`encoding.padded_tokens`, the same function the encoder cuts its sub-batches with, > `max_tokens`;
a note's prompt was tokenised once, before it reached the batcher: `Note.tokens`), or when `linger_s` has passed since its first record —
whichever comes first. Linger only closes a batch the encoder can take now (`ready`): while the
encoder stage is backed up, an early close would only split the backlog into smaller, slower batches,
so the open batch keeps filling up to its count/token budget instead. A note_id seen twice in one batch keeps the later record (a later tombstone
deletes, a later note replaces). Offsets are tracked per partition for every record, including the
ones replaced or dead-lettered, so committing a batch covers everything it consumed.
"""
from __future__ import annotations

from typing import Iterable

from worker.encoding import padded_size, padded_tokens
from worker.records import Batch, DeadLetter, Note, Record, Tombstone


class Batcher:
    def __init__(self, *, max_notes: int, max_tokens: int, linger_s: float) -> None:
        if max_notes < 1 or max_tokens < 1 or linger_s < 0:
            raise ValueError("max_notes and max_tokens must be >= 1, linger_s >= 0")
        self.max_notes = max_notes
        self.max_tokens = max_tokens
        self.linger_s = linger_s
        self._seq = 0
        self._reset()

    def _reset(self) -> None:
        self._latest: dict[str, Note | Tombstone] = {}  # note_id -> latest record (insertion-ordered)
        self._dead: list[DeadLetter] = []
        self._offsets: dict[int, int] = {}
        self._records = 0
        self._opened_at: float | None = None
        self._tokens: dict[str, int] = {}  # note_id -> prompt tokens of the notes kept
        self._longest = 0  # max(self._tokens.values()), kept as notes come (recomputed only on a replace)

    # -- state ---------------------------------------------------------------------------------
    def deadline(self) -> float | None:
        """Clock time at which the open batch lingers out (None when empty)."""
        return None if self._opened_at is None else self._opened_at + self.linger_s

    # -- feeding -------------------------------------------------------------------------------
    def add(self, record: Record, now: float, ready: bool = True) -> list[Batch]:
        """Add one record; return the batches this closed (usually none, at most two).
        `ready=False`: the encoder stage cannot take a batch now, so linger does not close one."""
        closed: list[Batch] = []
        if ready and self._opened_at is not None and now >= self._opened_at + self.linger_s:
            closed.append(self._close(now, "linger"))
        if isinstance(record, Note):
            if self._records and self._would_overflow(record):
                closed.append(self._close(now, "tokens" if self._records < self.max_notes else "notes"))
        elif self._records >= self.max_notes:
            closed.append(self._close(now, "notes"))
        self._put(record, now)
        if self._records >= self.max_notes:
            closed.append(self._close(now, "notes"))
        elif isinstance(record, Note) and self._budget_reached():
            closed.append(self._close(now, "tokens"))
        return closed

    def _budget_reached(self) -> bool:
        return padded_size(len(self._tokens), self._longest) >= self.max_tokens

    def _would_overflow(self, note: Note) -> bool:
        if self._records + 1 > self.max_notes:
            return True
        if note.note_id in self._tokens:  # replaces a note of this batch (rare): recount without it
            others = [t for k, t in self._tokens.items() if k != note.note_id]
            return padded_tokens([*others, note.tokens]) > self.max_tokens
        return padded_size(len(self._tokens) + 1, max(self._longest, note.tokens)) > self.max_tokens

    def _put(self, record: Record, now: float) -> None:
        if self._opened_at is None:
            self._opened_at = now
        self._records += 1
        p, o = record.partition, record.offset
        if o + 1 > self._offsets.get(p, -1):
            self._offsets[p] = o + 1
        if isinstance(record, DeadLetter):
            self._dead.append(record)
            return
        self._latest.pop(record.note_id, None)
        if self._tokens.pop(record.note_id, None) == self._longest:
            self._longest = max(self._tokens.values(), default=0)
        self._latest[record.note_id] = record
        if isinstance(record, Note):
            self._tokens[record.note_id] = record.tokens
            self._longest = max(self._longest, record.tokens)

    def poll(self, now: float, ready: bool = True) -> Batch | None:
        """Close the open batch if it has lingered long enough (and the encoder stage is `ready`)."""
        if ready and self._opened_at is not None and now >= self._opened_at + self.linger_s:
            return self._close(now, "linger")
        return None

    def flush(self, now: float) -> Batch | None:
        """Close the open batch now, whatever its size (shutdown, rebalance)."""
        return self._close(now, "flush") if self._records else None

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Abandon the open batch's records of `partitions` (revoked: the next owner re-reads them).
        Returns how many records were dropped."""
        drop = set(partitions)
        if not drop or not self._records:
            return 0
        keep = [r for r in self._latest.values() if r.partition not in drop]
        dead = [d for d in self._dead if d.partition not in drop]
        offsets = {p: o for p, o in self._offsets.items() if p not in drop}
        opened, before = self._opened_at, self._records
        self._reset()
        for r in [*keep, *dead]:
            self._put(r, opened)  # type: ignore[arg-type]
        if self._records:
            self._offsets = offsets  # also covers records replaced inside the batch
        else:
            self._reset()
        return before - self._records

    # -- closing -------------------------------------------------------------------------------
    def _close(self, now: float, reason: str) -> Batch:
        notes = [r for r in self._latest.values() if isinstance(r, Note)]
        tombs = [r for r in self._latest.values() if isinstance(r, Tombstone)]
        self._seq += 1
        b = Batch(seq=self._seq, notes=notes, tombstones=tombs, dead=self._dead, offsets=self._offsets,
                  records=self._records, padded_tokens=padded_tokens([n.tokens for n in notes]),
                  opened_at=self._opened_at if self._opened_at is not None else now, closed_at=now, reason=reason)
        self._reset()
        return b
