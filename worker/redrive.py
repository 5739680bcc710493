"""`notellm worker redrive`: send dead letters' ORIGINAL records back to the notes topic.

Reads the DLQ topic (`settings.kafka.topic_dlq`) with a fresh consumer in assign mode, from the start of
each partition (or `from_offsets`) up to its high watermark at start-up, so events dead-lettered while it
runs are not re-driven in the same pass (no loop). It commits nothing. Each event selected by kind is
re-produced with its original key, value and headers to `settings.kafka.topic_notes` (or `target_topic`)
— onto the partition it came from when re-driving into its source topic, so it stays ordered with the
other records of its key. Events that do not hold their record whole (a truncated value or key, dropped
headers) are skipped, counted and logged; events that are not dead letters are counted as unreadable.
dead_letter.v1 events (older workers) carry no headers and are re-driven without them.

Caveats for the operator: a re-driven record is processed again like a new one, so
- input errors (`not_json`, `too_large`, ...) come back to the DLQ unless the input's contract or the
  worker's limits changed: select kinds with `--kind`;
- re-driving an older version of a note after a newer version or a tombstone of it overwrites or
  revives it.

Prints one JSON summary on stdout; exit 0 when every selected, complete event was delivered (or, in a
dry run, counted) and every partition was read to its end, else 1; 2 with one line on stderr when it
cannot start (Kafka unreachable within `timeout_s`, an unknown topic, bad arguments), and 2 with one
`kafka_security_error` line and one line on stderr when Kafka refuses the credentials or the broker's
certificate is not trusted (not retried). The clients' own errors go through worker/kafka_log.py (one line
per kind of error, not one per connection attempt).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid

from worker.dead_letters import original, parse
from worker.records import ERROR_KINDS


def configure(p: argparse.ArgumentParser) -> None:
    """Flags of `notellm worker redrive` (the common ones, --bootstrap, --topic (the target), --dlq-topic,
    come from worker/cli.py)."""
    p.add_argument("--kind", dest="kinds", action="append", choices=ERROR_KINDS,
                   help="re-drive only dead letters of this error kind (repeatable; default: every kind)")
    p.add_argument("--dry-run", action="store_true", help="read and count, produce nothing")
    p.add_argument("--dlq-from-offsets", dest="dlq_from_offsets",
                   help="partition:offset,... of the DLQ to start at (partitions not named are not read)")
    p.add_argument("--timeout", dest="redrive_timeout_s", type=float, default=120.0,
                   help="seconds to read the DLQ to its end and deliver (default 120)")


def run(args, *, settings, stop: threading.Event | None = None) -> int:
    """Run `redrive` for parsed `args` (kinds, dry_run, dlq_from_offsets, redrive_timeout_s) with the
    command's `settings` (worker/cli.py builds them); `stop`: set to end the read early."""
    from confluent_kafka import KafkaException

    from worker.kafka_log import KafkaSecurityError
    from worker.source import parse_offsets

    try:
        start = parse_offsets(args.dlq_from_offsets) if getattr(args, "dlq_from_offsets", None) else None
        return redrive(settings, kinds=set(args.kinds) if args.kinds else None, dry_run=args.dry_run,
                       from_offsets=start, timeout_s=getattr(args, "redrive_timeout_s", 120.0), stop=stop)
    except KafkaSecurityError as e:
        from worker.logs import get_logger

        e.report(get_logger("notellm.redrive"), settings.kafka.bootstrap_servers, command="notellm worker redrive")
        return 2
    except KafkaException as e:
        err = e.args[0] if e.args else None
        what = err.str() if hasattr(err, "str") else str(e)
        print(f"notellm worker redrive: Kafka at {settings.kafka.bootstrap_servers} failed: {what}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"notellm worker redrive: {e}", file=sys.stderr)
        return 2


def redrive(settings, *, kinds: set[str] | None = None, dry_run: bool = False,
            from_offsets: dict[int, int] | None = None, target_topic: str | None = None,
            timeout_s: float = 120.0, stop: threading.Event | None = None) -> int:
    """Re-drive the DLQ's events of `kinds` (None: every kind); see the module docstring. Returns the
    exit code and prints the JSON summary."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

    from worker.kafka_log import routed
    from worker.logs import get_logger
    from worker.source import partitions_of, watermarks

    unknown = set(kinds or ()) - set(ERROR_KINDS)
    if unknown:
        raise ValueError(f"unknown error kinds {sorted(unknown)}; known: {', '.join(ERROR_KINDS)}")
    k = settings.kafka
    dlq, target = k.topic_dlq, target_topic or k.topic_notes
    log = get_logger("notellm.redrive")
    deadline = time.monotonic() + timeout_s

    def left() -> float:  # a metadata/offset request's timeout: what is left of `timeout_s`, 1 to 10 s
        return max(1.0, min(10.0, deadline - time.monotonic()))

    consumer = Consumer(routed({**k.common_config(), "group.id": f"notellm-redrive-{uuid.uuid4().hex[:8]}",
                                "enable.auto.commit": False, "enable.partition.eof": True,
                                "auto.offset.reset": "earliest"}, log, "redrive:consumer", fatal_security=True))
    producer = None if dry_run else Producer(routed(
        {**k.producer_config(), "message.timeout.ms": max(1000, int(timeout_s * 1000))}, log, "redrive:producer",
        fatal_security=True))
    summary = {"dlq_topic": dlq, "target_topic": target, "dry_run": dry_run,
               "kinds": sorted(kinds) if kinds else None, "range": {}, "read": 0, "selected": 0, "by_kind": {},
               "restorable": 0, "produced": 0, "failed": 0, "skipped_truncated": 0, "skipped_unreadable": 0,
               "complete": False}
    failures: list[str] = []

    def delivered(err, _msg) -> None:
        if err is None:
            summary["produced"] += 1
        else:
            summary["failed"] += 1
            failures.append(str(err))

    try:
        parts = partitions_of(consumer, dlq, timeout=left())
        target_parts = set(partitions_of(consumer, target, timeout=left()))
        wm = watermarks(consumer, dlq, parts, timeout=left())
        chosen = parts if from_offsets is None else [p for p in parts if p in from_offsets]
        start = {p: max(wm[p][0], (from_offsets or {}).get(p, 0)) for p in chosen}
        end = {p: wm[p][1] for p in chosen}
        summary["range"] = {str(p): [start[p], end[p]] for p in chosen}
        todo = {p for p in chosen if start[p] < end[p]}
        if todo:
            consumer.assign([TopicPartition(dlq, p, start[p]) for p in sorted(todo)])
        while todo and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            for msg in consumer.consume(500, timeout=0.5):
                p = msg.partition()
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(p)
                        continue
                    raise RuntimeError(f"reading {dlq}: {msg.error()}")
                if p not in todo or msg.offset() >= end[p]:
                    todo.discard(p)
                    continue
                if msg.offset() + 1 >= end[p]:
                    todo.discard(p)
                summary["read"] += 1
                where = {"partition": p, "offset": msg.offset()}
                try:
                    ev = parse(msg.value() or b"")
                    kind = ev["error_kind"]
                    if kinds and kind not in kinds:
                        continue
                    summary["selected"] += 1
                    summary["by_kind"][kind] = summary["by_kind"].get(kind, 0) + 1
                    raw = original(ev)
                except ValueError as e:
                    summary["skipped_unreadable"] += 1
                    log.warning("redrive_unreadable", **where, error=str(e)[:300])
                    continue
                if raw is None:
                    summary["skipped_truncated"] += 1
                    log.warning("redrive_truncated", **where, kind=kind, source=ev["source"])
                    continue
                summary["restorable"] += 1
                if producer is None:
                    continue
                src = ev["source"]
                same = src["topic"] == target and src["partition"] in target_parts
                kw = {"partition": src["partition"]} if same else {}
                _produce(producer, target, raw, delivered, deadline, **kw)
        summary["complete"] = not todo
        if producer is not None:
            left = producer.flush(max(1.0, deadline - time.monotonic()))
            summary["failed"] += left
    except KafkaException:
        # A request that timed out: serve the client's queued errors first, so that a security failure
        # (credentials refused, certificate not trusted) raises KafkaSecurityError, the real cause.
        consumer.poll(0)
        raise
    finally:
        consumer.close()
    if failures:
        log.error("redrive_delivery_failed", count=len(failures), first=failures[0])
    print(json.dumps(summary, sort_keys=True))
    ok = summary["complete"] and summary["failed"] == 0 and summary["produced"] == (0 if dry_run else summary["restorable"])
    return 0 if ok else 1


def _produce(producer, topic: str, raw, on_delivery, deadline: float, **kw) -> None:
    while True:
        try:
            producer.produce(topic, key=raw.key, value=raw.value, headers=list(raw.headers) or None,
                             on_delivery=on_delivery, **kw)
            return
        except BufferError:  # local queue full: serve delivery reports and try again
            if time.monotonic() > deadline:
                raise TimeoutError(f"producer queue to {topic} still full at the deadline") from None
            producer.poll(0.1)
