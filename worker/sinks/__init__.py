"""The sink contract (what Checkpoint relies on), shared by Milvus, the tags producer and the DLQ producer.

    add(encoded)   stage the batch's work (no I/O)
    flush()        make everything staged durable; returns the records the store refused *for their data*
                   (each is dead-lettered as `sink_rejected` by the checkpoint, and the rest of the batch
                   proceeds); raises RetryLater for a transient fault (the same flush is retried with
                   backoff) or GiveUp when retrying cannot help and it is not one record's fault
    discard()      drop everything staged (ownership lost: another worker will write these records)

A staged record stays staged until a flush made it durable or rejected it, so a retried flush never
loses work and never writes a record twice in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from worker.records import Encoded, Note


class SinkError(Exception):
    """Base of sink failures. `retryable` tells the checkpoint whether another flush may succeed."""

    retryable = False

    def __init__(self, sink: str, message: str) -> None:
        super().__init__(f"{sink}: {message}")
        self.sink = sink


class RetryLater(SinkError):
    retryable = True


class GiveUp(SinkError):
    retryable = False


@dataclass(frozen=True)
class Rejected:
    """One note the store refused for its data (never a transient fault)."""

    note: Note
    reason: str


@runtime_checkable
class Sink(Protocol):
    name: str

    def add(self, enc: Encoded) -> None: ...
    def flush(self) -> list[Rejected]: ...
    def discard(self) -> None: ...


__all__ = ["SinkError", "RetryLater", "GiveUp", "Rejected", "Sink"]
