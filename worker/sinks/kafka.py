"""Kafka sinks: generated tags (`note_tags.v1` on notes.tags, keyed by note_id) and dead letters
(`dead_letter.v2` on notes.dlq, see worker/dead_letters.py). Idempotent producer.

The sink contract (worker/sinks/__init__.py):
- `add()` stages events (no I/O); `discard()` drops what is staged.
- `flush()` waits for every delivery report and always returns `[]`: Kafka never refuses one record for
  its data, because every event is bounded (tags: category and each hashtag cut to note_tags.v1's 256
  characters, at most `MAX_TAGS` distinct hashtags; dead letters: `dead_letters.build`). Should a delivery
  fail with MSG_SIZE_TOO_LARGE anyway (a topic whose `max.message.bytes` is below the bound), that record
  is re-staged as its *minimal* event — a dead letter without payload bytes (sizes and sha256 only), tags
  without category and hashtags — and sent again in the same flush; a refused minimal event is `GiveUp`
  (a configuration error, not the record's fault). Any other failure re-stages what was not acknowledged
  and raises `RetryLater` (retriable, timeouts) or `GiveUp` (fatal), so a retried flush loses nothing;
  re-sending an event whose report was lost only duplicates it (at-least-once; keyed, so a compacted
  topic converges).

Strings: generated text is made valid UTF-8 (a lone surrogate becomes "?") before it is cut. The event key
is the note id, which `decode()` guarantees to be valid Unicode; a Note breaking that contract is a bug,
and `add()` raises UnicodeEncodeError rather than inventing a key (a bug stops the worker uncommitted).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from worker import dead_letters
from worker.kafka_log import KafkaErrorLog
from worker.records import DeadLetter, Encoded
from worker.sinks import GiveUp, Rejected, RetryLater

MAX_TAG_CHARS = 256  # note_tags.v1 category / hashtag length (characters)
MAX_TAGS = 256
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes default
_TOO_LARGE = KafkaError.MSG_SIZE_TOO_LARGE
_TIMEOUTS = (KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT)


@dataclass(frozen=True, slots=True)
class _Out:
    """One staged message. `minimal` builds the smaller event for the same record (None: already minimal)."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    minimal: Callable[[], "_Out"] | None = None


_ACKED = object()


class KafkaEventSink:
    name = "kafka"

    def __init__(self, producer_config: dict, topic: str, *, flush_timeout_s: float = 30.0, log=None) -> None:
        conf = dict(producer_config)
        conf.setdefault("message.timeout.ms", int(flush_timeout_s * 1000))
        # Client errors logged on state changes (first of a kind, periodic summary, recovered), not per retry.
        self._errors = KafkaErrorLog(log, f"producer:{self.name}")
        if log is not None:
            conf["error_cb"] = lambda err: self._errors.error(err, "producer_error")
            conf["logger"] = self._errors  # librdkafka's own lines too, instead of raw stderr
        self.producer = Producer(conf)
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self.log = log
        self.shrunk = 0  # events re-sent minimal after MSG_SIZE_TOO_LARGE
        self._staged: list[_Out] = []

    def discard(self) -> None:
        self._staged.clear()

    def close_client(self) -> None:
        """Destroy the producer now (call after the last flush): left to interpreter shutdown, a client whose
        broker refused it can run its callbacks into a half-finalised interpreter (a crash after a clean
        exit code). The producer's callbacks refer back to this sink: dropping the reference here is what
        lets it go at once instead of at the garbage collector's convenience."""
        producer, self.producer = self.producer, None
        del producer

    def flush(self) -> list[Rejected]:
        if not self._staged:
            # Idle: serve the client's callbacks now (errors, logs), not in a burst at the next send or at
            # close; a turn without errors counts as working for the error log's recovery.
            self.producer.poll(0)
            self._errors.ok()
            return []
        deadline = time.monotonic() + self.flush_timeout_s
        while self._staged:
            batch, self._staged = self._staged, []
            self._staged = self._deliver(batch, deadline)
        return []

    def _deliver(self, batch: list[_Out], deadline: float) -> list[_Out]:
        """Produce `batch`; returns the minimal events to send next (records refused as too large).
        On any other failure re-stages what was not acknowledged and raises."""
        status: list[object] = [None] * len(batch)  # None pending | _ACKED | KafkaError | _Out (minimal)

        def settle(i: int, err: KafkaError | None) -> None:
            item = batch[i]
            if err is None:
                status[i] = _ACKED
            elif err.code() == _TOO_LARGE and item.minimal is not None:
                status[i] = item.minimal()
                self.shrunk += 1
                if self.log is not None:
                    self.log.warning("event_too_large", sink=self.name, topic=self.topic, bytes=len(item.value),
                                     action="re-sent without payload")
            else:
                status[i] = err

        for i, item in enumerate(batch):
            while True:
                try:
                    self.producer.produce(self.topic, key=item.key, value=item.value, headers=item.headers,
                                          on_delivery=lambda err, _msg, i=i: settle(i, err))
                    break
                except BufferError:  # local queue full: serve delivery reports and try again
                    self.producer.poll(0.05)
                    if time.monotonic() > deadline:
                        break
                except KafkaException as e:  # refused before sending (e.g. over message.max.bytes)
                    settle(i, e.args[0])
                    break
            if status[i] is None and time.monotonic() > deadline:
                break  # the rest stays pending (re-staged below)
        unacked = self.producer.flush(max(0.0, deadline - time.monotonic()))
        errors = [s for s in status if isinstance(s, KafkaError)]
        again = [s if isinstance(s, _Out) else item for item, s in zip(batch, status) if s is not _ACKED]
        if not errors and not any(s is None for s in status):
            self._errors.ok()  # every delivery acknowledged: ends a logged outage after a quiet window
            return again  # only minimal events left (or nothing)
        self._staged = again + self._staged
        fatal = [e for e in errors if e.fatal() or (not e.retriable() and e.code() not in _TIMEOUTS)]
        if fatal:
            raise GiveUp(self.name, f"{len(errors)} deliveries to {self.topic} failed: {fatal[0]}")
        raise RetryLater(self.name, f"{len(errors)} failed, {sum(s is None for s in status)} unacknowledged "
                                    f"({unacked} in flight) deliveries to {self.topic}")


def _clean(s: str, limit: int) -> str:
    """Generated text as valid UTF-8, cut to `limit` characters."""
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s[:limit]


class TagsSink(KafkaEventSink):
    name = "tags"

    def __init__(self, *a, source_topic: str = "", **kw) -> None:
        super().__init__(*a, **kw)
        self.source_topic = source_topic

    def add(self, enc: Encoded) -> None:
        now = int(time.time() * 1000)
        for i, n in enumerate(enc.batch.notes):
            category = enc.categories[i] if enc.categories else None
            tags = [_clean(t, MAX_TAG_CHARS) for t in (enc.hashtags[i] if enc.hashtags else []) if t]
            doc = {
                "schema_version": "note_tags.v1",
                "note_id": n.note_id,
                "category": None if category is None else _clean(category, MAX_TAG_CHARS),
                "hashtags": list(dict.fromkeys(tags))[:MAX_TAGS],
                "model_version": enc.model_version,
                "source": {"topic": self.source_topic, "partition": n.partition, "offset": n.offset},
                "produced_at": now,
            }
            key = n.note_id.encode("utf-8")
            self._staged.append(_Out(key, _dumps(doc), minimal=lambda k=key, d=doc: _Out(
                k, _dumps({**d, "category": None, "hashtags": []}))))


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class DeadLetterSink(KafkaEventSink):
    name = "dlq"

    def __init__(self, producer_config: dict, topic: str, *, worker_version: str, max_value_bytes: int,
                 input_errors: bool = True, **kw) -> None:
        """`max_value_bytes`: values up to this size are carried whole, larger ones truncated (see
        worker/dead_letters.py); the worst-case event must fit the producer's message.max.bytes (else
        ValueError). `input_errors=False` (replay, backfill): records that failed decoding or validation
        are not dead-lettered again (the live worker already did, and re-reading them cannot change that);
        `encode_failed` and `sink_rejected` depend on the model and the store and are always sent."""
        limit = int(producer_config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
        if dead_letters.max_event_bytes(max_value_bytes) > limit:
            raise ValueError(f"dead-letter events with max_value_bytes={max_value_bytes} may reach "
                             f"{dead_letters.max_event_bytes(max_value_bytes)} bytes, over message.max.bytes={limit}")
        super().__init__(producer_config, topic, **kw)
        self.worker_version = worker_version
        self.max_value_bytes = max_value_bytes
        self.input_errors = input_errors
        self.skipped = 0  # input errors not re-sent (input_errors=False)

    def letters(self, enc: Encoded) -> list[DeadLetter]:
        """What this sink sends for `enc` (no side effect)."""
        return self._wanted([*enc.batch.dead, *enc.failed])

    def _wanted(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        return list(letters) if self.input_errors else [d for d in letters if not d.input_error]

    def add(self, enc: Encoded) -> None:
        self.add_letters([*enc.batch.dead, *enc.failed])

    def add_letters(self, letters: list[DeadLetter]) -> None:
        """Stage dead letters from any stage (e.g. `sink_rejected` from the checkpoint); input errors are
        skipped (counted in `skipped`) when `input_errors=False`."""
        wanted = self._wanted(letters)
        self.skipped += len(letters) - len(wanted)
        for d in wanted:
            self._staged.append(_Out(*self._build(d, True), minimal=lambda d=d: _Out(*self._build(d, False))))

    def _build(self, d: DeadLetter, payload: bool):
        return dead_letters.build(d, worker_version=self.worker_version, max_value_bytes=self.max_value_bytes,
                                  payload=payload)
