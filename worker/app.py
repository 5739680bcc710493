"""The worker app: wires Source → Batcher → Encoder → Sinks → Checkpoint and runs the polling loop.
No business logic lives here; each stage is its own module."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace
from typing import Callable

from worker.batcher import Batcher
from worker.checkpoint import Checkpoint, RetryPolicy
from worker.config import Settings
from worker.encoding import Encoder, encode_batch, load_encoder, note_text
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.pipeline import Pipeline
from worker.records import Batch, Note
from worker.sinks.kafka import DeadLetterSink, TagsSink
from worker.sinks.milvus import MilvusSink, MilvusStore
from worker.source import KafkaSource

POLL_S = 0.1  # longest single poll; the loop comes back at least this often
PAUSE_AFTER_S = 1.0  # a closed batch waiting longer than this for the encoder: pause and keep polling


class WorkerApp:
    """One consumer-group member (or one bounded replay when start/end offsets are given).

    Test hooks: pass an `encoder`, a shared `store` (one milvus-lite db may serve several apps in one
    process), and `wrap_sink(sink) -> sink` to inject faults."""

    def __init__(self, settings: Settings, *, encoder: Encoder | None = None, store: MilvusStore | None = None,
                 collection: str | None = None, create_alias: bool = True, group_id: str | None = None,
                 start_offsets: dict[int, int] | None = None, end_offsets: dict[int, int] | None = None,
                 wrap_sink: Callable | None = None, metrics: Metrics | None = None, http: bool = True,
                 dead_letter_input_errors: bool = True, name: str = "worker") -> None:
        self.s = settings
        self.log = get_logger("notellm.worker", app=name)
        self.metrics = metrics or Metrics()
        self._encoder = encoder
        self._own_encoder = False
        self._store = store
        self._own_store = store is None
        self._collection = collection
        self._create_alias = create_alias
        self._group_id = group_id
        self._start_offsets = start_offsets
        self._end_offsets = end_offsets
        self._wrap = wrap_sink or (lambda s: s)
        self._dlq_input_errors = dead_letter_input_errors  # False: replay/backfill re-read already dead-lettered records
        self._want_http = http and settings.http.port != 0
        self._stop = threading.Event()
        self._pending: deque[Batch] = deque()
        self._pending_since: float | None = None
        self.started = False
        self.warmed = False
        self.heartbeat = time.monotonic()
        self.http = None
        self.store: MilvusStore | None = None
        self.exit_reason = ""

    # -- wiring ----------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.s
        if self._encoder is None:
            m = s.model
            self._encoder = load_encoder(m.dir, device=m.device, intra_op_threads=m.intra_op_threads,
                                         max_batch_notes=s.batch.max_batch_notes,
                                         max_batch_tokens=s.batch.max_batch_tokens, max_new_tokens=m.max_new_tokens,
                                         isolation=m.isolation, log=(s.log.format, s.log.level))
            self._own_encoder = True
        enc = self.encoder = self._encoder
        if self._store is None:
            self._store = MilvusStore(s.milvus.uri, token=s.milvus.token.get_secret_value() if s.milvus.token else None,
                                      db_name=s.milvus.db_name, alias=s.milvus.collection, timeout_s=s.milvus.timeout_s)
        self.store = self._store
        # A dimension / model_version mismatch raises CollectionMismatch here: a clear startup error.
        self.collection = self.store.ensure(enc.dim, enc.model_version, collection=self._collection,
                                            create_alias=self._create_alias)
        if self._want_http:
            from worker.http import HttpServer
            self.http = HttpServer(self, s.http.host, s.http.port)
        enc.warmup()
        self.warmed = True
        k = s.kafka
        self.milvus_sink = self._wrap(MilvusSink(self.store, self.collection))
        self.tags_sink = None
        if s.model.generate != "none":
            self.tags_sink = self._wrap(TagsSink(k.producer_config(), k.topic_tags, source_topic=k.topic_notes,
                                                 flush_timeout_s=s.retry.flush_timeout_s, log=self.log))
        self.dlq_sink = self._wrap(DeadLetterSink(k.producer_config(), k.topic_dlq, worker_version=s.worker_version,
                                                  input_errors=self._dlq_input_errors,
                                                  flush_timeout_s=s.retry.flush_timeout_s, log=self.log))
        self.batcher = Batcher(max_notes=s.batch.max_batch_notes, max_tokens=s.batch.max_batch_tokens,
                               linger_s=s.batch.linger_ms / 1000.0, token_count=lambda n: enc.prompt_tokens(note_text(n)))
        self.source = KafkaSource(k.consumer_config(self._group_id), k.topic_notes, max_note_bytes=s.batch.max_note_bytes,
                                  on_assign=self._on_assign, on_revoke=self._on_revoke,
                                  on_stats=self.metrics.on_stats(k.topic_notes),
                                  on_commit=lambda ok: self.metrics.commits.labels(result="ok" if ok else "failed").inc(),
                                  start_offsets=self._start_offsets, end_offsets=self._end_offsets, log=self.log)
        r = s.retry
        self.checkpoint = Checkpoint(commit=self.source.commit, assigned=self.source.assigned,
                                     milvus=self.milvus_sink, tags=self.tags_sink, dlq=self.dlq_sink,
                                     policy=RetryPolicy(r.initial_s, r.max_wait_s, r.budget_s),
                                     metrics=self.metrics, log=self.log)
        self.pipeline = Pipeline(self._encode, self.checkpoint.complete, log=self.log,
                                 early_sink=self.checkpoint.early if s.model.generate != "none" else None)
        self.started = True
        self.log.info("worker_started", collection=self.collection, model_version=enc.model_version, dim=enc.dim,
                      providers=getattr(enc, "providers", None), topic=k.topic_notes,
                      group=self._group_id or k.group_id, http_port=self.http.port if self.http else None)

    def _encode(self, batch: Batch, idle: bool = False, early=None):
        gen = self.s.model.generate
        small = len(batch.notes) <= max(1, self.s.batch.max_batch_notes // 8)
        if idle and small and early is not None and gen != "none" and batch.notes:
            # Low load: make the notes searchable as soon as their vectors exist, before the (slower)
            # generation of category/hashtags; the full batch then re-upserts with tags and commits.
            # Only for small batches of an idle encoder (low load): under a backlog the encoder never
            # waits and batches are large, so this extra prefill never costs throughput.
            pre = encode_batch(self.encoder, replace(batch, notes=list(batch.notes), tombstones=[], dead=[]), "none")
            if pre.batch.notes:
                early(pre)
        enc = encode_batch(self.encoder, batch, gen, worker_version=self.s.worker_version,
                           topic=self.s.kafka.topic_notes)
        if batch.notes:
            self.metrics.batch_notes.observe(len(batch.notes))
            self.metrics.batch_tokens.observe(batch.padded_tokens)
            self.metrics.encode_seconds.observe(enc.encode_s)
        return enc

    # -- rebalance (called on the polling thread, inside poll) -------------------------------------
    def _on_assign(self, partitions: list[int]) -> None:
        self.log.info("partitions_assigned", partitions=partitions)
        self.metrics.assigned.set(len(self.source.assigned()) if self.started else len(partitions))

    def _on_revoke(self, partitions: list[int], lost: bool) -> None:
        # Finish what is already closed and in flight (committed while the partitions are still ours),
        # abandon the open batch's records of the revoked partitions (the next owner re-reads them).
        timeout = self.s.kafka.max_poll_interval_ms / 2000.0
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            if self.pipeline.submit(self._pending[0], timeout=max(0.0, deadline - time.monotonic())):
                self._pending.popleft()
        drained = self.pipeline.drain(max(0.0, deadline - time.monotonic()))
        if not lost:
            self.checkpoint.seal(partitions)
        dropped = self.batcher.drop_partitions(partitions)
        self.checkpoint.forget(partitions)
        self.log.info("partitions_revoked", partitions=partitions, lost=lost, drained=drained, abandoned=dropped)

    # -- the loop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop (signal-safe): stop polling, finish the current batch, flush, commit, close."""
        self._stop.set()

    def _hand_over(self) -> None:
        while self._pending and self.pipeline.offer(self._pending[0]):
            self._pending.popleft()

    def run(self) -> int:
        if not self.started:
            self.start()
        src, batcher, pipe, m = self.source, self.batcher, self.pipeline, self.metrics
        rc = 0
        try:
            while not self._stop.is_set():
                if pipe.error is not None:
                    rc, self.exit_reason = 1, f"pipeline failed: {pipe.error}"
                    break
                self.checkpoint.commit_ready()
                self._hand_over()
                now = time.monotonic()
                if self._pending:
                    # Backpressure. Briefly: just wait for the encoder's slot (pausing would make
                    # librdkafka drop its prefetched messages). For longer (slow encoder, sink retrying):
                    # pause the partitions and keep polling, so the worker stays in its group.
                    if self._pending_since is None:
                        self._pending_since = now
                    if now - self._pending_since < PAUSE_AFTER_S and not src.paused:
                        self.pipeline.wait_slot(POLL_S)
                        continue
                    src.pause()
                else:
                    self._pending_since = None
                    src.resume()
                m.paused.set(1 if src.paused else 0)
                # Linger closes a batch only when the encoder can take it at once; while it is backed up
                # the open batch keeps filling (full batches drain a backlog fastest).
                ready = not self._pending and pipe.slot_free()
                dl = batcher.deadline()
                # Until the linger deadline, wait for records; after it, take only what is already here.
                timeout = POLL_S if dl is None else min(POLL_S, max(0.0, dl - now))
                records = src.poll(timeout, max_messages=self.s.batch.max_batch_notes)
                if not records and not ready and dl is not None and dl <= now:
                    # A lingered-out batch waits for the encoder: wake when its slot frees, not on a timer
                    # (a tight poll loop would take CPU from the encoder).
                    pipe.wait_slot(POLL_S)
                now = time.monotonic()
                self.heartbeat = now
                ready = not self._pending and pipe.slot_free()
                for r in records:
                    m.consumed.labels(kind=type(r).__name__.lower()).inc()
                    for b in batcher.add(r, now, ready):
                        m.batches.labels(reason=b.reason).inc()
                        self._pending.append(b)
                        ready = False
                b = batcher.poll(now, ready)
                if b is not None:
                    m.batches.labels(reason=b.reason).inc()
                    self._pending.append(b)
                if src.exhausted and not records:
                    self.exit_reason = "range replayed"
                    break
            if rc == 0:
                rc = self._finish()
        except Exception as e:  # noqa: BLE001
            self.log.error("worker_crashed", error=str(e), exc_info=e)
            rc, self.exit_reason = 1, f"crashed: {e}"
        finally:
            self._close()
        self.log.info("worker_stopped", rc=rc, reason=self.exit_reason or "stopped")
        return rc

    def _finish(self) -> int:
        """Close the open batch, hand over everything, wait until it is committed."""
        b = self.batcher.flush(time.monotonic())
        if b is not None:
            self._pending.append(b)
        timeout = self.s.kafka.max_poll_interval_ms / 1000.0
        deadline = time.monotonic() + timeout
        while self._pending and self.pipeline.error is None and time.monotonic() < deadline:
            if self.pipeline.submit(self._pending[0], timeout=max(0.0, deadline - time.monotonic())):
                self._pending.popleft()
        drained = self.pipeline.drain(max(0.0, deadline - time.monotonic()))
        if self.pipeline.error is not None:
            self.exit_reason = f"pipeline failed: {self.pipeline.error}"
            return 1
        if not drained or self._pending:
            self.exit_reason = "shutdown timed out before the last batch was committed"
            return 1
        self.checkpoint.seal()
        return 0

    def _close(self) -> None:
        if not self.started:
            return
        self.pipeline.close(timeout=5.0)
        try:
            self.source.close()
        except Exception as e:  # noqa: BLE001
            self.log.warning("consumer_close_failed", error=str(e))
        for sink in (self.tags_sink, self.dlq_sink):
            if sink is not None:
                getattr(sink, "producer", None) and sink.producer.flush(5)
        if self.http is not None:
            self.http.close()
        if self._own_store:
            self.store.close()
        if self._own_encoder and hasattr(self.encoder, "close"):
            self.encoder.close()

    # -- probes ----------------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.started and (time.monotonic() - self.heartbeat) < 30 and self.pipeline.error is None

    def ready(self) -> tuple[bool, dict]:
        checks = {
            "partitions_assigned": bool(self.started and self.source.assigned()),
            "model_warmed": self.warmed,
            "milvus_reachable": bool(self._store is not None and self._store.ping()),
        }
        return all(checks.values()), checks
