"""Checkpoint: the only code that commits offsets, and only after every sink flushed.

`Checkpoint.complete(encoded)` stages the batch in each sink and then, in this order:
  1. flush Milvus   (upserts + tombstone deletes are durable)
  2. flush tags, then dead letters   (every delivery report received)
  3. commit the batch's offsets      (partitions still assigned to us only)
Step 3 runs on the polling thread, which owns the consumer (confluent-kafka serialises calls on one
consumer, so a commit from the sink thread would starve behind consume()): `complete()` marks the
offsets ready, the loop calls `commit_ready()` on every turn (asynchronous commit), and `seal()`
commits synchronously on shutdown and before partitions are revoked.
A transient sink error (`RetryLater`) is retried with exponential backoff and jitter for a bounded
time; meanwhile the pipeline backs up and the polling loop pauses its partitions but keeps polling,
so the worker stays in its group. `GiveUp`, or a spent retry budget, raises `CheckpointFailed`:
the worker exits non-zero without committing and the batch is re-read on restart.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import KafkaError, KafkaException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from worker.records import Encoded
from worker.sinks import SinkError


class CheckpointFailed(RuntimeError):
    """A sink could not be flushed: nothing of the batch was committed."""


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.2
    max_wait_s: float = 5.0
    budget_s: float = 60.0


class Checkpoint:
    def __init__(self, *, commit: Callable[..., object], assigned: Callable[[], set[int]],
                 milvus, tags=None, dlq=None, policy: RetryPolicy = RetryPolicy(), metrics=None, log=None,
                 on_retrying: Callable[[bool], None] | None = None) -> None:
        self._commit_fn = commit
        self._assigned = assigned
        self.milvus, self.tags, self.dlq = milvus, tags, dlq
        self.policy = policy
        self.metrics = metrics
        self.log = log
        self._on_retrying = on_retrying or (lambda _b: None)
        self.committed: dict[int, int] = {}
        self._ready: dict[int, int] = {}
        self._lock = threading.Lock()

    def complete(self, enc: Encoded) -> dict[int, int]:
        """Make `enc` durable in every sink, then commit its offsets. Returns what was committed."""
        b = enc.batch
        for sink in (self.milvus, self.tags, self.dlq):
            if sink is not None:
                sink.add(enc)
        # 1. flush Milvus
        self._flush(self.milvus, b)
        acked_ms = time.time() * 1000
        # 2. flush tags, then dead letters
        if self.tags is not None:
            self._flush(self.tags, b)
        if self.dlq is not None:
            self._flush(self.dlq, b)
        # 3. commit (on the polling thread: mark ready, `commit_ready()` sends it)
        with self._lock:
            for p, o in b.offsets.items():
                if o > self._ready.get(p, -1):
                    self._ready[p] = o
        if self.metrics is not None:
            m = self.metrics
            m.embedded.inc(len(b.notes))
            m.deleted.inc(len(b.tombstones))
            sent = self.dlq.letters(enc) if hasattr(self.dlq, "letters") else [*b.dead, *enc.failed]
            for d in sent:
                m.dead_lettered.labels(reason=d.error_kind).inc()
            for n in b.notes:
                m.freshness.observe(max(0.0, (acked_ms - n.published_at) / 1000.0))
        return dict(b.offsets)

    def early(self, enc: Encoded) -> None:
        """Vectors ahead of generation (low load): upsert now so the notes are searchable sooner.
        Best effort and never a commit: `complete()` of the full batch does steps 1-3 as always."""
        self.milvus.add(enc)
        try:
            self.milvus.flush()
        except Exception:
            getattr(self.milvus, "discard", lambda: None)()
            raise

    def commit_ready(self, wait: bool = False) -> dict[int, int]:
        """Polling thread: commit what the sink stage made durable since the last call."""
        with self._lock:
            todo, self._ready = self._ready, {}
        return self._commit(todo, wait=wait)

    def _flush(self, sink, batch) -> None:
        def on_retry(state) -> None:
            self._on_retrying(True)
            exc = state.outcome.exception()
            if self.metrics is not None:
                self.metrics.sink_retries.labels(sink=sink.name).inc()
            if self.log is not None:
                self.log.warning("sink_retry", sink=sink.name, attempt=state.attempt_number, error=str(exc),
                                 batch=batch.seq, offsets=batch.offsets)

        p = self.policy
        try:
            for attempt in Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, SinkError) and e.retryable),
                wait=wait_random_exponential(multiplier=p.initial_s, max=p.max_wait_s),
                stop=stop_after_delay(p.budget_s),
                before_sleep=on_retry,
                reraise=True,
            ):
                with attempt:
                    sink.flush()
        except SinkError as e:
            raise CheckpointFailed(f"sink {sink.name} failed for batch {batch.seq} "
                                   f"({'retry budget spent' if e.retryable else 'not retryable'}): {e}") from e
        finally:
            self._on_retrying(False)

    def seal(self, partitions=None) -> dict[int, int]:
        """Synchronously re-commit the latest committed offsets (polling thread only, after the
        pipeline drained: shutdown, revoke), so they are on the broker before we let go."""
        self.commit_ready(wait=False)
        todo = {p: o for p, o in self.committed.items() if partitions is None or p in partitions}
        return self._commit(todo, wait=True, force=True)

    def _commit(self, offsets: dict[int, int], *, wait: bool, force: bool = False) -> dict[int, int]:
        """THE offset commit: every commit of the worker goes through here."""
        mine = self._assigned()
        todo = {p: o for p, o in offsets.items() if p in mine and (force or o > self.committed.get(p, -1))}
        if not todo:
            return {}

        def retriable(e: BaseException) -> bool:
            if not isinstance(e, KafkaException):
                return False
            err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            return err is not None and err.retriable()

        try:
            for attempt in Retrying(retry=retry_if_exception(retriable), stop=stop_after_attempt(5),
                                    wait=wait_random_exponential(multiplier=0.1, max=1.0), reraise=True):
                with attempt:
                    self._commit_fn(todo, wait=wait)
        except KafkaException as e:
            # Not fatal: the data is durable in every sink; the new owner of a partition re-reads from its
            # last committed offset and re-upserts (idempotent).
            if self.metrics is not None:
                self.metrics.commits.labels(result="failed").inc()
            if self.log is not None:
                self.log.warning("commit_failed", offsets=todo, error=str(e))
            return {}
        self.committed.update(todo)
        return todo

    def forget(self, partitions) -> None:
        """Partitions revoked: a later re-assignment starts from the group's committed offsets."""
        for p in partitions:
            self.committed.pop(p, None)
