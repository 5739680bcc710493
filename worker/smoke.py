"""`notellm smoke`: check that the local stack answers — a Kafka round trip (produce a note, read it
back in a fresh consumer group, validate it against note.v1) and a milvus-lite (or server) upsert +
search + re-upsert. Prints one JSON line with timings; exits non-zero with a clear message on failure
(2, within seconds, when Kafka refuses the credentials or the broker's certificate is not trusted).
It checks connectivity and contracts; the product's data path is `notellm worker run`."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: settings)")
    p.add_argument("--milvus-uri", help="Milvus URI or milvus-lite db path (default: settings)")
    p.add_argument("--topic", default="notellm.smoke", help="topic used for the round trip")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from confluent_kafka import Consumer, KafkaException, Producer
    from pymilvus import DataType

    import schemas
    from worker.config import load_settings
    from worker.kafka_log import KafkaSecurityError, routed
    from worker.logs import configure_logging, get_logger
    from worker.sinks.milvus import connection_of, open_client

    s = load_settings({"kafka": {"bootstrap_servers": args.bootstrap}, "milvus": {"uri": args.milvus_uri}})
    configure_logging(s.log.format, s.log.level)
    log = get_logger("smoke")
    out: dict = {"bootstrap": s.kafka.bootstrap_servers, "milvus_uri": s.milvus.uri}

    # 1. Kafka: produce one keyed note, read it back, validate it.
    note_id = f"smoke-{uuid.uuid4().hex[:10]}"
    doc = {"note_id": note_id, "title": "smoke test", "content": "is the broker there?", "author_id": "smoke",
           "published_at": int(time.time() * 1000)}
    t0 = time.perf_counter()
    try:
        # Client errors through worker/kafka_log.py: a line per kind of error, not per connection attempt.
        # A security failure raises KafkaSecurityError from the poll/flush that serves the error callback.
        producer = Producer(routed(s.kafka.producer_config(), log, "smoke:producer", fatal_security=True))
        producer.produce(args.topic, key=note_id.encode(), value=json.dumps(doc).encode())
        flush_until = time.monotonic() + 30
        while producer.flush(1) != 0:  # in slices: the callbacks' exceptions surface after each
            if time.monotonic() > flush_until:
                raise KafkaException(f"message not delivered to {args.topic} within 30 s")
        consumer = Consumer(routed(s.kafka.consumer_config(group_id=f"smoke-{uuid.uuid4().hex[:8]}"), log,
                                   "smoke:consumer", fatal_security=True))
        consumer.subscribe([args.topic])
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None and msg.key() == note_id.encode():
                got = json.loads(msg.value())
        consumer.close()
    except KafkaSecurityError as e:
        e.report(log, s.kafka.bootstrap_servers, command="notellm smoke", stream=sys.stdout)
        return 2
    except KafkaException as e:
        log.error("kafka_unreachable", error=str(e), bootstrap=s.kafka.bootstrap_servers)
        print(f"notellm smoke: Kafka at {s.kafka.bootstrap_servers} failed: {e} (is `scripts/kafka start` running?)")
        return 1
    if got is None:
        print(f"notellm smoke: produced {note_id} to {args.topic} but could not read it back within 30 s")
        return 1
    schemas.validate("note.v1", got)
    out["kafka_roundtrip_ms"] = round((time.perf_counter() - t0) * 1000, 1)

    # 2. Milvus: create a small collection, upsert, search, upsert again (count unchanged).
    t0 = time.perf_counter()
    if s.milvus.is_lite:
        Path(s.milvus.uri).parent.mkdir(parents=True, exist_ok=True)
    client = open_client(s.milvus.uri, **connection_of(s.milvus))
    name = "notellm_smoke"
    if client.has_collection(name):
        client.drop_collection(name)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("note_id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
    # Index without waiting for it (sync=False): the wait asks for a timestamp (AllocTimestamp) that the
    # in-process milvus-lite server does not implement, and it prints that server-side traceback.
    client.create_collection(name, schema=schema)
    client.create_index(name, index, sync=False)
    client.load_collection(name)
    vecs = np.eye(8, dtype=np.float32)
    rows = [{"note_id": f"{note_id}-{i}", "vector": vecs[i].tolist()} for i in range(8)]
    client.upsert(name, rows)
    client.upsert(name, rows)
    count = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
    hit = client.search(name, data=[vecs[3].tolist()], limit=1, consistency_level="Strong")[0][0]
    client.drop_collection(name)
    client.close()
    ok = count == 8 and hit["note_id"] == f"{note_id}-3"
    out.update(milvus_ms=round((time.perf_counter() - t0) * 1000, 1), milvus_count_after_reupsert=count, ok=ok)
    print(json.dumps(out))
    return 0 if ok else 1
