"""Prometheus metrics of one worker app (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

_SIZE = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_FRESH = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        if registry is None:  # the worker's own registry: also the process's CPU, memory and file descriptors
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.consumed = Counter("notellm_consumed", "Kafka records consumed", ["kind"], registry=r)
        self.embedded = Counter("notellm_embedded", "Notes embedded and upserted into Milvus", registry=r)
        self.dead_lettered = Counter("notellm_dead_lettered", "Records sent to the DLQ", ["reason"], registry=r)
        self.deleted = Counter("notellm_deleted", "Vectors deleted by tombstones", registry=r)
        self.batches = Counter("notellm_batches", "Micro-batches closed", ["reason"], registry=r)
        self.batch_notes = Histogram("notellm_batch_notes", "Notes per encoded batch", buckets=_SIZE, registry=r)
        self.batch_tokens = Histogram("notellm_batch_tokens", "Padded tokens per encoded batch", buckets=_TOKENS, registry=r)
        self.batch_max_notes = Gauge("notellm_batch_max_notes", "Notes per batch in use (source: calibrated, "
                                     "configured, default, fallback)", ["source"], registry=r)
        self.batch_max_tokens = Gauge("notellm_batch_max_tokens", "Padded tokens per batch in use", ["source"],
                                      registry=r)
        self.encode_seconds = Histogram("notellm_encode_seconds", "Encoder time per batch", buckets=_SECONDS, registry=r)
        self.freshness = Histogram("notellm_freshness_seconds", "Sink-ack time minus published_at", buckets=_FRESH, registry=r)
        self.visible = Histogram("notellm_visible_seconds", "published_at -> found by a read at the readers' "
                                 "consistency level (sampled, see worker/visibility.py)", buckets=_FRESH, registry=r)
        self.visible_after_ack = Histogram("notellm_visible_after_ack_seconds", "Milvus ack -> visible to a reader "
                                           "(sampled)", buckets=_SECONDS, registry=r)
        self.engine_restarts = Counter("notellm_engine_restarts", "Encoder restarts after an engine fault (crash, "
                                       "hang, invalid output); the restart budget is NOTELLM_MODEL__ENGINE_RESTARTS "
                                       "per batch", registry=r)
        self.sink_retries = Counter("notellm_sink_retries", "Transient sink failures retried", ["sink"], registry=r)
        self.commits = Counter("notellm_commits", "Offset commits", ["result"], registry=r)
        self.lag = Gauge("notellm_consumer_lag", "Consumer lag per partition (messages)", ["partition"], registry=r)
        self.assigned = Gauge("notellm_assigned_partitions", "Partitions assigned to this worker", registry=r)
        self.paused = Gauge("notellm_paused", "1 while the source is paused (backpressure)", registry=r)

    def forget_partitions(self, partitions) -> None:
        """Drop the lag series of partitions this worker no longer owns (else their last value stays
        exported from this pod while another pod consumes them)."""
        for p in partitions:
            try:
                self.lag.remove(str(p))
            except KeyError:
                pass

    def on_stats(self, topic: str):
        def handle(stats: dict) -> None:
            parts = stats.get("topics", {}).get(topic, {}).get("partitions", {})
            for p, info in parts.items():
                if p == "-1":
                    continue
                lag = info.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    self.lag.labels(partition=p).set(lag)
        return handle
