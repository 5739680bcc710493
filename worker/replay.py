"""`notellm worker replay`: re-process a range of notes.published with the live worker's code path
(same Source → Batcher → Encoder → Sinks → Checkpoint), in assign mode from explicit start offsets
up to an end (a time, offsets, or the end of each partition at start-up). Upserts are idempotent, so a
replay over already-processed notes only re-writes them. Offsets are committed to `--group`
(default `<group>-replay`), never to the live group."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone

from confluent_kafka import Consumer

from worker.config import Settings
from worker.kafka_log import routed
from worker.logs import get_logger
from worker.source import offsets_for_time, parse_offsets, partitions_of, watermarks


def parse_time_ms(text: str) -> int:
    """ISO 8601 (UTC when no zone is given) -> epoch milliseconds."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def resolve_range(s: Settings, *, from_timestamp: str | None, from_offsets: str | None, until: str | None):
    topic = s.kafka.topic_notes
    c = Consumer(routed({**s.kafka.common_config(), "group.id": f"notellm-replay-probe-{uuid.uuid4().hex[:6]}"},
                        get_logger("notellm.replay"), "replay:probe"))
    try:
        parts = partitions_of(c, topic)
        wm = watermarks(c, topic, parts)
        if from_offsets:
            start = parse_offsets(from_offsets)
        else:
            start = offsets_for_time(c, topic, parts, parse_time_ms(from_timestamp))
        if until is None:
            end = {p: wm[p][1] for p in start}
        elif ":" in until and "T" not in until and "-" not in until.split(":")[0]:
            end = {p: o for p, o in parse_offsets(until).items() if p in start}
            end.update({p: wm[p][1] for p in start if p not in end})
        else:
            end = offsets_for_time(c, topic, start, parse_time_ms(until))
        start = {p: max(o, wm[p][0]) for p, o in start.items()}
        end = {p: min(end[p], wm[p][1]) for p in start}
        return start, end
    finally:
        c.close()


def replay(s: Settings, *, from_timestamp=None, from_offsets=None, until=None, group=None,
           encoder=None, store=None, resend_dead_letters: bool = False, stop: threading.Event | None = None) -> int:
    """`resend_dead_letters=False` (default): records that fail decoding/validation were dead-lettered when
    the live worker read them; the replay skips them (counted in the log) instead of duplicating them on
    the DLQ. Notes the encoder rejects are always dead-lettered (that depends on the model)."""
    from worker.app import WorkerApp
    from worker.logs import get_logger

    start, end = resolve_range(s, from_timestamp=from_timestamp, from_offsets=from_offsets, until=until)
    group = group or f"{s.kafka.group_id}-replay"
    log = get_logger("notellm.replay")
    log.info("replay_range", start=start, end=end, group=group, messages=sum(max(0, end[p] - start[p]) for p in start))
    t0 = time.monotonic()
    app = WorkerApp(s, encoder=encoder, store=store, group_id=group, start_offsets=start, end_offsets=end,
                    dead_letter_input_errors=resend_dead_letters, name="replay", stop=stop)
    rc = app.run()
    log.info("replay_done", rc=rc, seconds=round(time.monotonic() - t0, 2),
             embedded=app.metrics.embedded._value.get() if app.started else 0,
             dead_letters_not_resent=getattr(getattr(app, "dlq_sink", None), "skipped", 0))
    return rc
