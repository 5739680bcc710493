"""The worker app: wires Source → Batcher → Encoder → Sinks → Checkpoint and runs the polling loop.
No business logic lives here; each stage is its own module and owns its contract for one bad record:

- decode (worker/decode.py) and tokenisation (`encoding.prepare_many`) are total: a bad record becomes a
  DeadLetter that travels with its batch;
- the encoder stage (`encoding.EncodeStage`) dead-letters a note the encoder rejects as a note, restarts
  the engine on an engine fault, and fails the pipeline only when its restarts are spent;
- sinks return the rows the store refused for their data (dead-lettered by the checkpoint), retry
  transient faults, and write only for partitions this worker owns (worker/ownership.py);
- the checkpoint commits offsets only after every sink acknowledged.
Any wait here is bounded: start-up stops at a signal, a revoke and a shutdown drain for at most
`lifecycle.drain_s`, and the exit code says whether the last commit succeeded. Kafka refusing the credentials
or the broker's certificate failing verification (worker/kafka_log.py) ends the run at once with exit 2, a
configuration error like a collection built for another model, instead of being retried forever.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Callable

from confluent_kafka import KafkaError, KafkaException
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from worker.batcher import Batcher
from worker.checkpoint import Checkpoint, RetryPolicy
from worker.config import Settings
from worker.encoders import load_configured_encoder, resolve_limits, set_batch_limits
from worker.encoding import EncodeStage, Encoder, prepare_many
from worker.kafka_log import KafkaSecurityError
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.ownership import Ownership
from worker.pipeline import Pipeline
from worker.records import Batch, Note
from worker.sinks.kafka import DeadLetterSink, TagsSink
from worker.sinks.milvus import CollectionMismatch, MilvusConfigError, MilvusSink, MilvusStore, MilvusUnreachable, shown
from worker.source import KafkaSource
from worker.visibility import VisibilityProbe

POLL_S = 0.1  # longest single poll; the loop comes back at least this often
PAUSE_AFTER_S = 1.0  # a closed batch waiting longer than this for the encoder: pause and keep polling
STALE_LOOP_S = 30.0  # /healthz fails when the polling loop has not turned for this long


class StartupInterrupted(Exception):
    """A stop was requested while the worker was starting."""


def _config_refused(e: BaseException) -> str | None:
    """librdkafka's message when `e` is a client refusing its configuration (_INVALID_ARG), else None."""
    err = e.args[0] if isinstance(e, KafkaException) and e.args else None
    if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
        return err.str()
    return None


class WorkerApp:
    """One consumer-group member (or one bounded replay when start/end offsets are given).

    Test hooks: pass an `encoder`, a shared `store` (one milvus-lite db may serve several apps in one
    process), and `wrap_sink(sink) -> sink` to inject faults.

    Batch limits (`batch_notes`, `batch_tokens`, set by `start`): with `batch.max_batch_notes="auto"` the
    encoder is calibrated on this device (worker/calibrate.py) when `calibrate` is True; None (default):
    only an encoder this app builds itself is calibrated, an encoder passed in keeps its last calibration
    for this task if it has one, else the defaults (32 notes / 4096 tokens). An integer setting is used
    as it is (no calibration)."""

    def __init__(self, settings: Settings, *, encoder: Encoder | None = None, store: MilvusStore | None = None,
                 collection: str | None = None, create_alias: bool = True, group_id: str | None = None,
                 start_offsets: dict[int, int] | None = None, end_offsets: dict[int, int] | None = None,
                 wrap_sink: Callable | None = None, metrics: Metrics | None = None, http: bool = True,
                 dead_letter_input_errors: bool = True, name: str = "worker",
                 stop: threading.Event | None = None, calibrate: bool | None = None) -> None:
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
        self._stop = stop if stop is not None else threading.Event()
        self._calibrate = calibrate
        self.calibration = None  # worker.calibrate.Calibration when this app measured (or reused) one
        self.batch_notes, self.batch_tokens = resolve_limits(settings.batch.max_batch_notes,
                                                             settings.batch.max_batch_tokens)
        self.batch_source = "default" if settings.batch.calibrate else "configured"
        self._pending: deque[Batch] = deque()
        self._pending_since: float | None = None
        self._opened: list = []  # what start() opened, closed in reverse by _close()
        self.ownership = Ownership()
        self.started = False
        self.warmed = False
        self.heartbeat = time.monotonic()
        self.http = None
        self.store: MilvusStore | None = None
        self.stage: EncodeStage | None = None
        self.pipeline: Pipeline | None = None
        self.exit_reason = ""

    # -- wiring ----------------------------------------------------------------------------------
    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise StartupInterrupted()

    def _open_store(self) -> MilvusStore:
        """The configured store, once Milvus answers. While none answers at the address (a Milvus restart
        or upgrade, a pod that starts first), wait and try again, every NOTELLM_RETRY__INITIAL_S doubling
        to NOTELLM_RETRY__MAX_WAIT_S, one `milvus_unreachable` warning each, until it answers or a stop
        is requested: back within seconds of Milvus, not after a crash loop's back-off (up to 5 min).
        The startup probe bounds the wait. A configuration that cannot work (MilvusConfigError) is not
        retried."""
        r, t0 = self.s.retry, time.monotonic()

        def sleep(seconds: float) -> None:  # a stop request ends the wait
            if self._stop.wait(seconds):
                raise StartupInterrupted()

        def warn(state) -> None:
            self.log.warning("milvus_unreachable", error=str(state.outcome.exception()),
                             attempt=state.attempt_number, waited_s=round(time.monotonic() - t0, 1),
                             retry_in_s=round(state.next_action.sleep, 1))

        for attempt in Retrying(retry=retry_if_exception_type(MilvusUnreachable), before_sleep=warn, sleep=sleep,
                                wait=wait_exponential(multiplier=r.initial_s, max=r.max_wait_s), reraise=True):
            with attempt:
                self._check_stop()
                return MilvusStore.from_settings(self.s.milvus)
        raise AssertionError("unreachable: Retrying returns or raises")

    def start(self) -> None:
        s, k = self.s, self.s.kafka
        self._check_stop()
        if self._encoder is None:
            self._encoder = load_configured_encoder(s, log=(s.log.format, s.log.level))
            self._own_encoder = True
            self._opened.append(self._encoder.close)
        enc = self.encoder = self._encoder
        self._check_stop()
        if self._store is None:
            self._store = self._open_store()
            self._opened.append(self._store.close)
            if self._store.lite_server is not None:
                ls = self._store.lite_server
                self.log.info("milvus_lite_server_started", pid=ls.pid, uri=ls.uri, db=ls.data_dir)
            if self._store.writer is not None:
                self.log.info("milvus_writer_started", pid=self._store.writer.pid, uri=shown(self._store.writer.uri))
        self.store = self._store
        # A dimension / model_version mismatch raises CollectionMismatch here: a clear startup error.
        self.collection = self.store.ensure(enc.dim, enc.model_version, collection=self._collection,
                                            create_alias=self._create_alias)
        if self._want_http:
            from worker.http import HttpServer
            self.http = HttpServer(self, s.http.host, s.http.port, max_k=s.http.max_k)
            self._opened.append(self.http.close)
        self._check_stop()
        self._choose_batch_limits(enc)
        self._check_stop()
        enc.warmup(s.model.generate)  # at the chosen limits (the largest batch shape the worker will send)
        self.warmed = True
        self._check_stop()
        self.stage = EncodeStage(enc, topic=k.topic_notes, restarts=s.model.engine_restarts,
                                 timeout_s=s.model.batch_timeout_s, log=self.log,
                                 on_restart=self.metrics.engine_restarts.inc)
        self.milvus_sink = self._wrap(MilvusSink(self.store, self.collection))
        self.tags_sink = None
        if s.model.generate != "none":
            self.tags_sink = self._wrap(TagsSink(k.producer_config(), k.topic_tags, source_topic=k.topic_notes,
                                                 flush_timeout_s=s.retry.flush_timeout_s, log=self.log))
        self.dlq_sink = self._wrap(DeadLetterSink(k.producer_config(), k.topic_dlq, worker_version=s.worker_version,
                                                  input_errors=self._dlq_input_errors,
                                                  max_value_bytes=k.dlq_max_value_bytes,
                                                  flush_timeout_s=s.retry.flush_timeout_s, log=self.log))
        self.batcher = Batcher(max_notes=self.batch_notes, max_tokens=self.batch_tokens,
                               linger_s=s.batch.linger_ms / 1000.0)
        self.source = KafkaSource(k.consumer_config(self._group_id), k.topic_notes, max_note_bytes=s.batch.max_note_bytes,
                                  on_assign=self._on_assign, on_revoke=self._on_revoke,
                                  on_stats=self.metrics.on_stats(k.topic_notes),
                                  on_commit=lambda ok: self.metrics.commits.labels(result="ok" if ok else "failed").inc(),
                                  start_offsets=self._start_offsets, end_offsets=self._end_offsets, log=self.log)
        self._opened.append(self._close_source)
        self.probe = None
        if s.milvus.visibility_probe:
            self.probe = VisibilityProbe(self.store, self.collection, consistency_level=s.milvus.read_consistency,
                                         metrics=self.metrics, log=self.log)
            self._opened.append(self.probe.close)
        r = s.retry
        self.checkpoint = Checkpoint(commit=self.source.commit, ownership=self.ownership,
                                     milvus=self.milvus_sink, tags=self.tags_sink, dlq=self.dlq_sink,
                                     topic=k.topic_notes, policy=RetryPolicy(r.initial_s, r.max_wait_s, r.budget_s),
                                     metrics=self.metrics, log=self.log, on_acked=self._acked)
        self.pipeline = Pipeline(self._encode, self.checkpoint.complete, log=self.log,
                                 early_sink=self.checkpoint.early if s.model.generate != "none" else None)
        self._opened.append(lambda: self.pipeline.close(timeout=5.0))
        self.started = True
        self.log.info("worker_started", collection=self.collection, model_version=enc.model_version, dim=enc.dim,
                      providers=getattr(enc, "providers", None), topic=k.topic_notes,
                      group=self._group_id or k.group_id, http_port=self.http.port if self.http else None,
                      batch_notes=self.batch_notes, batch_tokens=self.batch_tokens, batch_source=self.batch_source)

    def _choose_batch_limits(self, enc: Encoder) -> None:
        """Set `batch_notes` / `batch_tokens` (the batcher's limits): configured, calibrated, or the defaults."""
        from worker import calibrate as cal

        b, gen = self.s.batch, self.s.model.generate
        wanted = self._calibrate if self._calibrate is not None else self._own_encoder
        if b.calibrate:
            fixed_tokens = None if b.max_batch_tokens == "auto" else int(b.max_batch_tokens)
            found = cal.calibrated(enc, gen)
            if found is not None and fixed_tokens is None:
                self.calibration = found
                self.batch_source = "calibrated"
                self.batch_notes, self.batch_tokens = found.batch_notes, found.batch_tokens
                set_batch_limits(enc, self.batch_notes, self.batch_tokens)
            elif wanted:
                auto = lambda v: None if v == "auto" else v  # noqa: E731 - "auto": by the encoder's device
                c = cal.calibrate(enc, generate=gen, budget_s=auto(b.calibration_budget_s),
                                  max_notes=auto(b.calibration_max_notes), max_tokens=fixed_tokens,
                                  default_notes=self.batch_notes, default_tokens=self.batch_tokens,
                                  call_timeout_s=self.s.model.batch_timeout_s, should_stop=self._stop.is_set)
                self.calibration = c
                self.batch_source = "calibrated" if c.calibrated else "fallback"
                self.batch_notes, self.batch_tokens = c.batch_notes, c.batch_tokens
        self.metrics.batch_max_notes.labels(source=self.batch_source).set(self.batch_notes)
        self.metrics.batch_max_tokens.labels(source=self.batch_source).set(self.batch_tokens)

    def _encode(self, batch: Batch, idle: bool = False, early=None):
        gen = self.s.model.generate
        small = len(batch.notes) <= max(1, self.batch_notes // 8)
        if idle and small and early is not None and gen != "none" and batch.notes:
            # Low load: make the notes searchable as soon as their vectors exist, before the (slower)
            # generation of category/hashtags; the full batch then re-upserts with tags and commits.
            # Only for small batches of an idle encoder (low load): under a backlog the encoder never
            # waits and batches are large, so this extra prefill never costs throughput.
            pre = self.stage(replace(batch, notes=list(batch.notes), tombstones=[], dead=[]), "none")
            if pre.batch.notes:
                early(pre)
        enc = self.stage(batch, gen)
        if batch.notes:
            self.metrics.batch_notes.observe(len(batch.notes))
            self.metrics.batch_tokens.observe(batch.padded_tokens)
            self.metrics.encode_seconds.observe(enc.encode_s)
        return enc

    def _acked(self, enc, acked_ms: float) -> None:
        if self.probe is not None:
            n = enc.batch.notes[-1]
            self.probe.offer(n.note_id, n.published_at, acked_ms)

    # -- rebalance (called on the polling thread, inside poll) -------------------------------------
    def _on_assign(self, partitions: list[int]) -> None:
        self.ownership.assign(partitions)
        self.log.info("partitions_assigned", partitions=partitions)
        self.metrics.assigned.set(len(self.ownership.owned()))

    def _on_revoke(self, partitions: list[int], lost: bool) -> None:
        # Revoked (not lost): finish what is closed and in flight within a bounded time and commit it while
        # the partitions are still ours. Lost: another member may own them already, so fence at once.
        # Either way, the fence then stops every later write for them, and the open batch's records of
        # these partitions are abandoned (the next owner re-reads them from the committed offsets).
        drained = False
        if not lost and self.pipeline is not None:
            budget = min(self.s.lifecycle.drain_s, self.s.kafka.max_poll_interval_ms / 2000.0)
            drained = self._hand_over_all(time.monotonic() + budget)
            self.checkpoint.seal(partitions)
        self.ownership.revoke(partitions)  # waits for a write in progress; none starts afterwards
        dropped = self.batcher.drop_partitions(partitions) if self.started else 0
        if self.started:
            self.checkpoint.forget(partitions)
        self.metrics.assigned.set(len(self.ownership.owned()))
        self.metrics.forget_partitions(partitions)
        self.log.info("partitions_revoked", partitions=partitions, lost=lost, drained=drained, abandoned=dropped)

    def _hand_over_all(self, deadline: float) -> bool:
        """Submit every closed batch and wait until all are committed, by `deadline`. True when drained."""
        while self._pending and self.pipeline.error is None:
            if not self.pipeline.submit(self._pending[0], timeout=max(0.0, deadline - time.monotonic())):
                break
            self._pending.popleft()
        if self._pending:
            return False
        return self.pipeline.drain(max(0.0, deadline - time.monotonic()))

    # -- the loop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop (signal-safe, also during start-up): stop polling, finish, flush, commit, close."""
        self._stop.set()

    def _hand_over(self) -> None:
        while self._pending and self.pipeline.offer(self._pending[0]):
            self._pending.popleft()

    def _close_batch(self, b: Batch) -> None:
        b.owner = self.ownership.stamp(b.offsets)
        self.metrics.batches.labels(reason=b.reason).inc()
        self._pending.append(b)

    def run(self) -> int:
        rc = 0
        try:
            if not self.started:
                self.start()
            rc = self._loop()
        except StartupInterrupted:
            rc, self.exit_reason = 0, "stopped during start-up"
        except CollectionMismatch as e:
            self.log.error("collection_mismatch", error=str(e))
            rc, self.exit_reason = 2, f"collection mismatch: {e}"
        except MilvusConfigError as e:  # a TLS file missing, a certificate not trusted: retrying cannot help
            self.log.error("milvus_config_error", error=str(e), uri=shown(self.s.milvus.uri),
                           hint="check NOTELLM_MILVUS__URI and the NOTELLM_MILVUS__TLS_* settings")
            rc, self.exit_reason = 2, f"Milvus configuration: {e}"
        except KafkaSecurityError as e:  # credentials refused / certificate untrusted: retrying cannot help
            e.report(self.log, self.s.kafka.bootstrap_servers, security_protocol=self.s.kafka.security_protocol)
            rc, self.exit_reason = 2, f"Kafka {e.cause}"
        except Exception as e:  # noqa: BLE001 - a bug or a fatal client error: report it, exit non-zero
            refused = _config_refused(e)
            if refused is not None:
                # librdkafka refused its configuration when a client was made: a CA / certificate / key file
                # that does not exist or does not parse, an unknown NOTELLM_KAFKA__EXTRA property
                self.log.error("kafka_config_error", error=refused, bootstrap=self.s.kafka.bootstrap_servers,
                               security_protocol=self.s.kafka.security_protocol,
                               hint="check the NOTELLM_KAFKA__SSL_* paths and NOTELLM_KAFKA__EXTRA")
                rc, self.exit_reason = 2, f"Kafka configuration refused: {refused}"
            else:
                self.log.error("worker_crashed", error=str(e), error_type=type(e).__name__, exc_info=e)
                rc, self.exit_reason = 1, f"crashed: {type(e).__name__}: {e}"
        finally:
            self._close()
        self.log.info("worker_stopped", rc=rc, reason=self.exit_reason or "stopped")
        return rc

    def _loop(self) -> int:
        src, batcher, pipe, m = self.source, self.batcher, self.pipeline, self.metrics
        gen, topic = self.s.model.generate, self.s.kafka.topic_notes
        while not self._stop.is_set():
            if pipe.error is not None:
                self.exit_reason = f"pipeline failed: {pipe.error}"
                return 1
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
                    pipe.wait_slot(POLL_S)
                    self.heartbeat = time.monotonic()
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
            records = src.poll(timeout, max_messages=self.batch_notes)
            if not records and not ready and dl is not None and dl <= now:
                # A lingered-out batch waits for the encoder: wake when its slot frees, not on a timer.
                pipe.wait_slot(POLL_S)
            now = time.monotonic()
            self.heartbeat = now
            ready = not self._pending and pipe.slot_free()
            # Every note of the poll tokenised once, here, in one batched pass; total (a note that cannot
            # be tokenised comes back as its dead letter, in its place).
            prepared = iter(prepare_many(self.encoder, [r for r in records if isinstance(r, Note)], gen, topic))
            kinds = Counter(type(r).__name__.lower() for r in records)  # one metric update per kind per poll
            for kind, n in kinds.items():
                m.consumed.labels(kind=kind).inc(n)
            for r in records:
                if isinstance(r, Note):
                    r = next(prepared)
                for b in batcher.add(r, now, ready):
                    self._close_batch(b)
                    ready = False
            b = batcher.poll(now, ready)
            if b is not None:
                self._close_batch(b)
            if src.exhausted and not records:
                self.exit_reason = "range replayed"
                break
        return self._finish()

    def _finish(self) -> int:
        """Close the open batch, hand everything over, wait (bounded) until it is committed. 0 only when
        everything consumed was committed and the broker acknowledged the final commit."""
        b = self.batcher.flush(time.monotonic())
        if b is not None:
            self._close_batch(b)
        drained = self._hand_over_all(time.monotonic() + self.s.lifecycle.drain_s)
        if self.pipeline.error is not None:
            self.exit_reason = f"pipeline failed: {self.pipeline.error}"
            return 1
        if not drained:
            self.exit_reason = f"shutdown: batches still in flight after {self.s.lifecycle.drain_s:g} s (not committed)"
            return 1
        if not self.checkpoint.seal():
            self.exit_reason = "shutdown: the final offset commit failed"
            return 1
        return 0

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as e:  # noqa: BLE001
            self.log.warning("consumer_close_failed", error=str(e))

    def _close(self) -> None:
        """Close what start() opened, in reverse order; each step bounded, none may stop the others."""
        if self.started:
            for sink in (self.tags_sink, self.dlq_sink):
                producer = getattr(sink, "producer", None)
                if producer is not None:
                    producer.flush(5)
        while self._opened:
            close = self._opened.pop()
            try:
                close()
            except Exception as e:  # noqa: BLE001
                self.log.warning("close_failed", error=str(e), error_type=type(e).__name__)
        for sink in (getattr(self, "tags_sink", None), getattr(self, "dlq_sink", None)):
            # nothing writes any more: destroy the producers now, not at interpreter shutdown
            close_client = getattr(sink, "close_client", None)
            if close_client is not None:
                close_client()

    # -- probes ----------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, dict]:
        """Liveness: the loop turns, the pipeline has not failed, the encoder answers within its deadline."""
        if not self.started:
            return False, {"started": False}
        enc = self.stage.health()
        checks = {
            "loop_alive": (time.monotonic() - self.heartbeat) < STALE_LOOP_S,
            "pipeline_ok": self.pipeline.error is None,
            "encoder_ok": enc.ok,
        }
        detail = {"encoder": enc.detail} if enc.detail else {}
        return all(checks.values()), {**checks, **detail}

    def ready(self) -> tuple[bool, dict]:
        """Readiness: partitions assigned, model warmed, Milvus reachable (never waits on a long write)."""
        checks = {
            "partitions_assigned": bool(self.started and self.ownership.owned()),
            "model_warmed": self.warmed,
            "milvus_reachable": bool(self._store is not None and self._store.reachable()),
        }
        return all(checks.values()), checks
