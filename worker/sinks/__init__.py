"""Sinks share one contract: `add(encoded)` stages work, `flush()` makes it durable or raises.

`RetryLater` means "transient, try the same flush again" (backpressure); `GiveUp` means retrying
will not help (bad data, a fenced producer, a schema mismatch). Checkpoint decides what to do.
"""
from __future__ import annotations


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


__all__ = ["SinkError", "RetryLater", "GiveUp"]
