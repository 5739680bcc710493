"""Kafka sinks: generated tags (`note_tags.v1` on notes.tags) and dead letters (`dead_letter.v1` on
notes.dlq). Idempotent producer, keyed by note_id. `flush()` waits for every delivery report and
raises on any failure; what failed stays staged, so the next flush re-produces it (at-least-once,
keyed, so a compacted topic converges)."""
from __future__ import annotations

import json
import time

from confluent_kafka import KafkaError, KafkaException, Producer

from worker.records import DeadLetter, Encoded
from worker.sinks import GiveUp, RetryLater

Message = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]


class KafkaEventSink:
    name = "kafka"

    def __init__(self, producer_config: dict, topic: str, *, flush_timeout_s: float = 30.0, log=None) -> None:
        conf = dict(producer_config)
        conf.setdefault("message.timeout.ms", int(flush_timeout_s * 1000))
        if log is not None:
            conf["error_cb"] = lambda err: log.warning("producer_error", sink=self.name, error=str(err))
        self.producer = Producer(conf)
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self._staged: list[Message] = []

    def _stage(self, key: bytes | None, value: bytes, headers=None) -> None:
        self._staged.append((key, value, headers))

    def pending(self) -> int:
        return len(self._staged)

    def flush(self) -> None:
        if not self._staged:
            return
        batch, self._staged = self._staged, []
        failed: list[Message] = []
        fatal: list[KafkaError] = []
        acked = [0]

        def report(item: Message):
            def cb(err, _msg):
                if err is None:
                    acked[0] += 1
                else:
                    failed.append(item)
                    if err.fatal() or not err.retriable() and err.code() not in (KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT):
                        fatal.append(err)
            return cb

        deadline = time.monotonic() + self.flush_timeout_s
        unsent: list[Message] = []
        for i, item in enumerate(batch):
            k, v, h = item
            while True:
                try:
                    self.producer.produce(self.topic, key=k, value=v, headers=h, on_delivery=report(item))
                    break
                except BufferError:  # local queue full: serve delivery reports and try again
                    self.producer.poll(0.05)
                    if time.monotonic() > deadline:
                        unsent = batch[i:]
                        break
                except KafkaException as e:
                    self._staged = batch[i:] + self._staged
                    raise GiveUp(self.name, f"produce to {self.topic}: {e}") from e
            if unsent:
                break
        remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining or failed or unsent:
            # Anything not acked is staged again; re-producing an in-flight one only duplicates it.
            sent = batch[: len(batch) - len(unsent)]
            if remaining:
                self._staged = list(sent) + unsent + self._staged  # unknown which ones: resend all
            else:
                self._staged = failed + unsent + self._staged
            if fatal:
                raise GiveUp(self.name, f"{len(failed)} deliveries to {self.topic} failed: {fatal[0]}")
            raise RetryLater(self.name, f"{len(failed) + len(unsent)} failed, {remaining} unacked deliveries to {self.topic}")


class TagsSink(KafkaEventSink):
    name = "tags"

    def __init__(self, *a, source_topic: str = "", **kw) -> None:
        super().__init__(*a, **kw)
        self.source_topic = source_topic

    def add(self, enc: Encoded) -> None:
        now = int(time.time() * 1000)
        for i, n in enumerate(enc.batch.notes):
            doc = {
                "schema_version": "note_tags.v1",
                "note_id": n.note_id,
                "category": enc.categories[i] if enc.categories else None,
                "hashtags": list(dict.fromkeys(enc.hashtags[i])) if enc.hashtags else [],
                "model_version": enc.model_version,
                "source": {"topic": self.source_topic, "partition": n.partition, "offset": n.offset},
                "produced_at": now,
            }
            self._stage(n.note_id.encode(), json.dumps(doc, ensure_ascii=False).encode())


class DeadLetterSink(KafkaEventSink):
    name = "dlq"

    def __init__(self, *a, worker_version: str = "", input_errors: bool = True, **kw) -> None:
        """`input_errors=False` (replay, backfill): records that failed decoding or validation are not
        dead-lettered again (the live worker already did, and re-reading them cannot change that);
        `encode_failed` depends on the model and is always sent."""
        super().__init__(*a, **kw)
        self.worker_version = worker_version
        self.input_errors = input_errors
        self.skipped = 0

    def letters(self, enc: Encoded) -> list[DeadLetter]:
        """What this sink sends for `enc`."""
        if self.input_errors:
            return [*enc.batch.dead, *enc.failed]
        return list(enc.failed)

    def add(self, enc: Encoded) -> None:
        if not self.input_errors:
            self.skipped += len(enc.batch.dead)
        for d in self.letters(enc):
            self.add_one(d)

    def add_one(self, d: DeadLetter) -> None:
        headers = [
            ("error_kind", d.error_kind.encode()),
            ("error_message", d.error_message[:500].encode("utf-8", "replace")),
            ("source_topic", d.topic.encode()),
            ("source_partition", str(d.partition).encode()),
            ("source_offset", str(d.offset).encode()),
        ]
        self._stage(d.key, json.dumps(d.to_event(self.worker_version)).encode(), headers)
