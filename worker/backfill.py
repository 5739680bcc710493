"""`notellm worker backfill --model NEW_DIR`: build a collection for a new model from the start of
notes.published, then switch the Milvus alias to it, so readers never see mixed model versions.

Same code path as the worker (a bounded WorkerApp per round, assign mode, its own consumer group
`<group>-backfill-<model_version>`). It reads to the end offsets taken when a round starts, then
starts another round for what arrived meanwhile, until a round finds at most `catch_up` new records
("caught up"); then it points the alias at the new collection. Afterwards run the worker with the new
model and `--group <that backfill group>` to continue exactly where the backfill stopped.
With milvus-lite (one process per db) stop the live worker first; a Milvus server has no such limit.
"""
from __future__ import annotations

import threading
import uuid

from confluent_kafka import Consumer

from worker.config import Settings
from worker.source import partitions_of, watermarks


def _probe(s: Settings, log) -> Consumer:
    """A consumer that only reads partitions and watermarks; its client errors go through the error log
    (worker/kafka_log.py: a line per kind of error, not librdkafka's line per connection attempt)."""
    from worker.kafka_log import routed

    return Consumer(routed({**s.kafka.common_config(), "group.id": f"notellm-backfill-probe-{uuid.uuid4().hex[:6]}"},
                           log, "backfill:probe"))


STOPPED = 3  # exit code: a stop request ended it before the alias switch


def backfill(s: Settings, *, encoder=None, store=None, catch_up: int = 100, max_rounds: int = 10,
             stop: threading.Event | None = None) -> int:
    """0 when the alias points at the new collection; the WorkerApp's code when a round failed; STOPPED (3)
    when a stop request ended it after the round in progress, without switching the alias."""
    from worker.app import WorkerApp
    from worker.encoders import load_configured_encoder
    from worker.logs import get_logger
    from worker.sinks.milvus import MilvusStore, physical_name

    log = get_logger("notellm.backfill")
    m = s.model
    enc = encoder or load_configured_encoder(s)
    own_store = store is None
    store = store or MilvusStore.from_settings(s.milvus)
    try:
        current = store.resolve()
        target = physical_name(s.milvus.collection, enc.model_version)
        if current == target:
            log.info("backfill_not_needed", alias=s.milvus.collection, collection=current)
            return 0
        store.ensure(enc.dim, enc.model_version, collection=target, create_alias=False)
        group = f"{s.kafka.group_id}-backfill-{enc.model_version[:24]}"
        topic = s.kafka.topic_notes
        probe = _probe(s, log)
        try:
            parts = partitions_of(probe, topic)
            start = {p: lo for p, (lo, _hi) in watermarks(probe, topic, parts).items()}
        finally:
            probe.close()
        for rnd in range(1, max_rounds + 1):
            probe = _probe(s, log)
            try:
                end = {p: hi for p, (_lo, hi) in watermarks(probe, topic, parts).items()}
            finally:
                probe.close()
            todo = sum(max(0, end[p] - start[p]) for p in parts)
            log.info("backfill_round", round=rnd, collection=target, records=todo, start=start, end=end)
            if todo:
                # Input errors were dead-lettered by the live worker already: not again (encode_failed still is).
                app = WorkerApp(s, encoder=enc, store=store, collection=target, create_alias=False, group_id=group,
                                start_offsets=start, end_offsets=end, http=False, dead_letter_input_errors=False,
                                name="backfill", stop=stop)
                rc = app.run()
                if rc != 0:
                    log.error("backfill_failed", round=rnd, rc=rc, reason=app.exit_reason)
                    return rc
            if stop is not None and stop.is_set():
                # Not done: the alias still points at the old collection. Non-zero, so a Kubernetes Job whose
                # pod was evicted is retried rather than shown Complete (a rerun is idempotent: upserts).
                log.warning("backfill_stopped", round=rnd, collection=target, alias_switched=False, rc=STOPPED)
                return STOPPED
            start = end
            if todo <= catch_up:
                break
        store.switch_alias(target)
        log.info("backfill_switched", alias=s.milvus.collection, collection=target, previous=current, group=group,
                 next_step=f"run the worker with --model {m.dir} --group {group}")
        print(f"alias {s.milvus.collection!r} -> {target!r} (was {current!r}); continue with: "
              f"notellm worker run --model {m.dir} --group {group}")
        return 0
    finally:
        if own_store:
            store.close()
        if encoder is None and hasattr(enc, "close"):
            enc.close()
