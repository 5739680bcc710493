"""Checkpoint: the only code that commits offsets, and only after every sink acknowledged.

`Checkpoint.complete(encoded)` runs on the sink thread, in this order:
  1. Milvus: upserts + tombstone deletes. Rows the store refuses for their data come back as
     `Rejected`; they become `sink_rejected` dead letters and get no tags; the rest of the batch goes on.
  2. tags (for the rows Milvus holds), then dead letters (decode, encoder and sink rejections).
  3. the batch's offsets are marked ready; the polling thread, which owns the consumer, commits them
     (`commit_ready`, asynchronous; `seal` synchronously on shutdown and before a revoke).
Every write happens inside `Ownership.hold(batch.owner)`: only records of partitions this worker still
owns under the same assignment are written, and a revoke waits for a write in progress. What a worker
lost is discarded, never written late, never committed.
A transient sink error (`RetryLater`) is retried with exponential backoff and jitter for a bounded time;
meanwhile the pipeline backs up and the polling loop pauses its partitions but keeps polling, so the
worker stays in its group. `GiveUp`, or a spent retry budget, raises `CheckpointFailed`: the worker
exits non-zero without committing and the batch is re-read on restart (upserts are idempotent).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import KafkaError, KafkaException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from worker.ownership import Ownership
from worker.records import DeadLetter, Encoded
from worker.sinks import Rejected, SinkError


class CheckpointFailed(RuntimeError):
    """A sink could not be flushed: nothing of the batch was committed."""


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.2
    max_wait_s: float = 5.0
    budget_s: float = 60.0


class Checkpoint:
    def __init__(self, *, commit: Callable[..., object], ownership: Ownership, milvus, tags=None, dlq=None,
                 topic: str = "", policy: RetryPolicy = RetryPolicy(), metrics=None, log=None,
                 on_acked: Callable[[Encoded, float], None] | None = None) -> None:
        """`on_acked(encoded, acked_ms)`: called after a batch's Milvus write (e.g. the visibility probe)."""
        self._commit_fn = commit
        self.ownership = ownership
        self.milvus, self.tags, self.dlq = milvus, tags, dlq
        self.topic = topic
        self.policy = policy
        self.metrics = metrics
        self.log = log
        self._on_acked = on_acked
        self.committed: dict[int, int] = {}
        self._ready: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- sink thread -------------------------------------------------------------------------------
    def complete(self, enc: Encoded) -> dict[int, int]:
        """Make `enc` durable in every sink, then mark its offsets ready. Returns what was marked."""
        b = enc.batch
        # 1. Milvus
        rejected = self._write(self.milvus, enc)
        acked_ms = time.time() * 1000
        letters = [DeadLetter.of(r.note, "sink_rejected", r.reason, self.topic) for r in rejected]
        kept = enc.without({r.note.note_id for r in rejected})
        # 2. tags, then dead letters
        if self.tags is not None:
            self._write(self.tags, kept)
        if self.dlq is not None:
            self._write(self.dlq, kept, letters)
        # 3. offsets of the partitions still ours (the commit itself happens on the polling thread)
        with self.ownership.hold(b.owner) as owned, self._lock:
            done = {p: o for p, o in b.offsets.items() if p in owned}
            for p, o in done.items():
                if o > self._ready.get(p, -1):
                    self._ready[p] = o
        if len(done) < len(b.offsets) and self.log is not None:
            self.log.warning("batch_partitions_lost", batch=b.seq, lost=sorted(set(b.offsets) - set(done)))
        if self.metrics is not None:
            self._count(kept.only(set(done)), [d for d in letters if d.partition in done], acked_ms)
        if self._on_acked is not None and kept.batch.notes:
            self._on_acked(kept, acked_ms)
        return done

    def early(self, enc: Encoded) -> None:
        """Vectors ahead of generation (low load): upsert now so the notes are searchable sooner.
        One attempt, never a commit: `complete()` of the full batch does steps 1-3 as always."""
        with self.ownership.hold(enc.batch.owner) as owned:
            self.milvus.discard()
            self.milvus.add(enc.only(owned))
            try:
                self.milvus.flush()
            finally:
                self.milvus.discard()

    def _write(self, sink, enc: Encoded, letters: list[DeadLetter] = ()) -> list[Rejected]:
        """Stage `enc` (the owned part) in `sink` and flush it, retrying transient faults. What is staged
        follows ownership: when a partition is lost between attempts, its records are dropped."""
        b = enc.batch
        staged: set[int] | None = None

        def attempt() -> list[Rejected]:
            nonlocal staged
            with self.ownership.hold(b.owner) as owned:
                if owned != staged:
                    sink.discard()
                    sink.add(enc.only(owned))
                    if letters:
                        sink.add_letters([d for d in letters if d.partition in owned])
                    staged = owned
                return sink.flush() if owned else []

        def on_retry(state) -> None:
            if self.metrics is not None:
                self.metrics.sink_retries.labels(sink=sink.name).inc()
            if self.log is not None:
                self.log.warning("sink_retry", sink=sink.name, attempt=state.attempt_number,
                                 error=str(state.outcome.exception()), batch=b.seq, offsets=b.offsets)

        p = self.policy
        try:
            for a in Retrying(retry=retry_if_exception(lambda e: isinstance(e, SinkError) and e.retryable),
                              wait=wait_random_exponential(multiplier=p.initial_s, max=p.max_wait_s),
                              stop=stop_after_delay(p.budget_s), before_sleep=on_retry, reraise=True):
                with a:
                    return attempt()
        except SinkError as e:
            sink.discard()
            raise CheckpointFailed(f"sink {sink.name} failed for batch {b.seq} "
                                   f"({'retry budget spent' if e.retryable else 'not retryable'}): {e}") from e
        return []  # unreachable: Retrying either returns or raises

    def _count(self, enc: Encoded, rejected: list[DeadLetter], acked_ms: float) -> None:
        m, b = self.metrics, enc.batch
        m.embedded.inc(len(b.notes))
        m.deleted.inc(len(b.tombstones))
        sent = [*self.dlq.letters(enc), *rejected] if self.dlq is not None else []
        for d in sent:
            m.dead_lettered.labels(reason=d.error_kind).inc()
        for n in b.notes:
            m.freshness.observe(max(0.0, (acked_ms - n.published_at) / 1000.0))

    # -- polling thread ----------------------------------------------------------------------------
    def commit_ready(self) -> None:
        """Commit (asynchronously) what the sink stage made durable since the last call."""
        with self._lock:
            todo, self._ready = self._ready, {}
        self._commit(todo, wait=False)

    def seal(self, partitions=None) -> bool:
        """Synchronously commit the latest durable offsets (after the pipeline drained: shutdown, revoke),
        so they are on the broker before we let go. True when the broker acknowledged (or nothing to do)."""
        self.commit_ready()
        todo = {p: o for p, o in self.committed.items() if partitions is None or p in partitions}
        return self._commit(todo, wait=True, force=True)

    def _commit(self, offsets: dict[int, int], *, wait: bool, force: bool = False) -> bool:
        """THE offset commit: every commit of the worker goes through here."""
        mine = self.ownership.owned()
        todo = {p: o for p, o in offsets.items() if p in mine and (force or o > self.committed.get(p, -1))}
        if not todo:
            return True

        def retriable(e: BaseException) -> bool:
            err = e.args[0] if isinstance(e, KafkaException) and e.args else None
            return isinstance(err, KafkaError) and err.retriable()

        try:
            for a in Retrying(retry=retry_if_exception(retriable), stop=stop_after_attempt(5),
                              wait=wait_random_exponential(multiplier=0.1, max=1.0), reraise=True):
                with a:
                    self._commit_fn(todo, wait=wait)
        except KafkaException as e:
            # Not fatal while running: the data is durable in every sink; the next owner of a partition
            # re-reads from its last committed offset and re-upserts (idempotent). `seal` reports it.
            if self.metrics is not None:
                self.metrics.commits.labels(result="failed").inc()
            if self.log is not None:
                self.log.warning("commit_failed", offsets=todo, error=str(e))
            return False
        self.committed.update(todo)
        return True

    def forget(self, partitions) -> None:
        """Partitions revoked: a later re-assignment starts from the group's committed offsets."""
        with self._lock:
            for p in partitions:
                self.committed.pop(p, None)
                self._ready.pop(p, None)
