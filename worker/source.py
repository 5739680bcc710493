"""Source: owns the Kafka consumer (poll, pause/resume, rebalance callbacks) and turns bytes into
`Note` / `Tombstone` / `DeadLetter`. Nothing downstream sees raw bytes.

Two modes: `subscribe` (a consumer group member, the live worker) and `assign` (explicit start
offsets and optional end offsets, for replay/backfill; the source reports `exhausted` once every
partition reached its end).

A security failure (credentials refused, broker certificate not trusted: worker/kafka_log.py) raises
`KafkaSecurityError` from `poll`, like a fatal client error: retrying cannot fix the configuration.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from worker.decode import decode
from worker.kafka_log import KafkaErrorLog
from worker.records import Record

class KafkaSource:
    """The consumer. Callbacks run on the polling thread (inside `poll`)."""

    def __init__(self, consumer_config: dict, topic: str, *, max_note_bytes: int,
                 on_assign: Callable[[list[int]], None] | None = None,
                 on_revoke: Callable[[list[int], bool], None] | None = None,
                 on_stats: Callable[[dict], None] | None = None,
                 on_commit: Callable[[bool], None] | None = None,
                 start_offsets: dict[int, int] | None = None,
                 end_offsets: dict[int, int] | None = None,
                 log=None) -> None:
        self.topic = topic
        self.max_note_bytes = max_note_bytes
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_stats = on_stats
        self._log = log
        self._paused = False
        self._end = dict(end_offsets or {})
        self._done: set[int] = set()
        conf = dict(consumer_config)
        if on_stats is not None:
            conf.setdefault("statistics.interval.ms", 5000)
            conf["stats_cb"] = self._stats
        # Client errors logged on state changes, not per retry; a security failure raises from poll().
        self._errors = KafkaErrorLog(log, "consumer", fatal_security=True)
        conf["error_cb"] = self._error
        if log is not None:
            conf["logger"] = self._errors  # librdkafka's own lines too, instead of raw stderr
        conf["on_commit"] = self._committed_cb
        self._on_commit = on_commit
        self.consumer = Consumer(conf)
        self.manual = start_offsets is not None
        if self.manual:
            tps = [TopicPartition(topic, p, o) for p, o in sorted(start_offsets.items())]
            # Partitions whose range is empty are done before they start.
            for p, o in start_offsets.items():
                if p in self._end and o >= self._end[p]:
                    self._done.add(p)
            tps = [tp for tp in tps if tp.partition not in self._done]
            self.consumer.assign(tps)
            if on_assign:
                on_assign(sorted({tp.partition for tp in tps} | self._done))
        else:
            self.consumer.subscribe([topic], on_assign=self._assign_cb, on_revoke=self._revoke_cb,
                                    on_lost=self._lost_cb)

    # -- callbacks (polling thread) --------------------------------------------------------------
    def _assign_cb(self, consumer, partitions) -> None:
        parts = [tp.partition for tp in partitions]
        if partitions:
            # Reconcile the pause state on every assignment: librdkafka keeps a partition's pause flag
            # across revoke -> re-assign, so a partition paused under backpressure and revoked would come
            # back paused while the source believes it is running.
            if self._paused:
                consumer.pause(partitions)
            else:
                consumer.resume(partitions)
        if self._on_assign:
            self._on_assign(parts)

    def _revoke_cb(self, consumer, partitions, lost: bool = False) -> None:
        parts = [tp.partition for tp in partitions]
        if self._on_revoke:
            self._on_revoke(parts, lost)  # finishes in-flight work while the partitions are still ours

    def _lost_cb(self, consumer, partitions) -> None:
        self._revoke_cb(consumer, partitions, lost=True)

    def _stats(self, raw: str) -> None:
        try:
            self._on_stats(json.loads(raw))  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - stats are best effort
            pass

    def _error(self, err: KafkaError) -> None:
        self._errors.error(err, "kafka_error")

    # -- state -----------------------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        """Manual mode with end offsets: every partition read to its end."""
        return self.manual and bool(self._end) and self._done >= set(self._end)

    # -- polling ---------------------------------------------------------------------------------
    def poll(self, timeout: float, max_messages: int = 500) -> list[Record]:
        out: list[Record] = []
        clean = True
        for msg in self.consumer.consume(num_messages=max_messages, timeout=timeout):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                self._errors.error(err, "consume_error")
                clean = False
                continue
            p = msg.partition()
            if self._end:
                end = self._end.get(p)
                if p in self._done or (end is not None and msg.offset() >= end):
                    self._finish_partition(p)
                    continue
            out.append(decode(msg, self.max_note_bytes))
            if self._end and p in self._end and msg.offset() + 1 >= self._end[p]:
                self._finish_partition(p)
        if clean:
            self._errors.ok()  # a poll turn without errors: ends a logged outage after a quiet window
        if self._end and not out:
            # An end offset may never be delivered (compaction, transaction markers): the position says.
            todo = [TopicPartition(self.topic, p) for p in self._end if p not in self._done]
            for tp in self.consumer.position(todo) if todo else []:
                if tp.offset >= 0 and tp.offset >= self._end[tp.partition]:
                    self._finish_partition(tp.partition)
        return out

    def _finish_partition(self, p: int) -> None:
        if p not in self._done:
            self._done.add(p)
            self.consumer.pause([TopicPartition(self.topic, p)])

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.consumer.pause(self.consumer.assignment())

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            tps = [tp for tp in self.consumer.assignment() if tp.partition not in self._done]
            if tps:
                self.consumer.resume(tps)

    @property
    def paused(self) -> bool:
        return self._paused

    def commit(self, offsets: dict[int, int], *, wait: bool) -> None:
        """Commit partition -> next offset. Only checkpoint.py calls this.

        `wait=False` from the sink thread (a synchronous commit there blocks while the polling thread
        sits in consume(); the result arrives in `_committed_cb` on the polling thread); `wait=True`
        only from the polling thread (shutdown, revoke), after the pipeline drained."""
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
        if tps:
            self.consumer.commit(offsets=tps, asynchronous=not wait)

    def _committed_cb(self, err, partitions) -> None:
        bad = [tp for tp in partitions or [] if tp.error is not None]
        if (err is not None or bad) and self._log is not None:
            self._log.warning("commit_failed", error=str(err) if err else None,
                              partitions={tp.partition: str(tp.error) for tp in bad})
        if self._on_commit is not None:
            self._on_commit(err is None and not bad)

    def close(self) -> None:
        self.consumer.close()  # enable.auto.commit=false: closing never commits


def parse_offsets(spec: str) -> dict[int, int]:
    """'0:10,1:0,2:5' -> {0: 10, 1: 0, 2: 5}."""
    out: dict[int, int] = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        p, _, o = part.partition(":")
        out[int(p)] = int(o)
    return out


def partitions_of(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if md is None or md.error is not None:
        raise RuntimeError(f"topic {topic!r} not found: {getattr(md, 'error', None)}")
    return sorted(md.partitions)


def watermarks(consumer: Consumer, topic: str, partitions: Iterable[int], timeout: float = 10.0) -> dict[int, tuple[int, int]]:
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in partitions}


def offsets_for_time(consumer: Consumer, topic: str, partitions: Iterable[int], ts_ms: int, timeout: float = 10.0) -> dict[int, int]:
    """First offset at or after ts_ms per partition (the high watermark when none)."""
    parts = list(partitions)
    res = consumer.offsets_for_times([TopicPartition(topic, p, ts_ms) for p in parts], timeout=timeout)
    out = {}
    for tp in res:
        if tp.offset < 0:
            out[tp.partition] = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout)[1]
        else:
            out[tp.partition] = tp.offset
    return out


__all__ = ["KafkaSource", "parse_offsets", "partitions_of", "watermarks", "offsets_for_time", "OFFSET_BEGINNING"]
