"""The production topology measured: `notellm worker run` processes on a real broker, against milvus-lite
and a Milvus server, with freshness measured as a reader sees it.

    python bench/topology.py [--bootstrap 127.0.0.1:9092] [--milvus-uri http://127.0.0.1:19530]
                             [--notes 3000] [--replicas 1,3] [--latency-seconds 30] [--backends lite,server]

For each backend:
- throughput: N replicas (one consumer group, 6 partitions; milvus-lite: one replica, it locks its db)
  are started and ready, then a backlog of real MIND notes is produced; notes/s = notes / time until
  the group's committed offsets reach the end.
- visible-in-search latency at half the one-replica capacity: notes are published at that steady rate
  (`published_at` stamped at produce time) and a reader in THIS process (a separate process from the
  workers) looks for each one until it finds it: on the server with its own pymilvus client at the
  readers' consistency level (Bounded), on milvus-lite through the worker's `/notes/{id}` (a primary-key
  read; the only way in: the worker's process holds the db; a vector search per probe, `/similar`, takes
  ~25 ms of the store lock in lite and starved the worker's own writes). p50/p95/p99 of found -
  published_at.
The encoder is the tiny exported test model, one intra-op thread per replica (it stands in for a fast
encoder; with SmolLM2 on this CPU every number would be the encoder's ~4 notes/s). Prints one JSON doc.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.worker import mind_docs, progress  # noqa: E402


LITE_PROBES = 4  # ids asked per round through the worker's /similar (publish order ~ visibility order)
LITE_ROUND_S = 0.1  # one round per 100 ms: ~40 searches/s, light next to the worker's own load


def topics_for(bootstrap: str, partitions: int = 6) -> dict:
    from confluent_kafka.admin import AdminClient, NewTopic

    a = AdminClient({"bootstrap.servers": bootstrap})
    names = {k: f"topo-{k}-{uuid.uuid4().hex[:8]}" for k in ("notes", "tags", "dlq")}
    fs = a.create_topics([NewTopic(names["notes"], partitions, -1), NewTopic(names["tags"], 3, -1),
                          NewTopic(names["dlq"], 1, -1)])
    for f in fs.values():
        f.result(30)
    time.sleep(0.5)
    return names


def producer(bootstrap: str):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 2})


def send(p, topic: str, doc: dict) -> int:
    doc = {**doc, "published_at": int(time.time() * 1000)}
    p.produce(topic, key=doc["note_id"].encode(), value=json.dumps(doc).encode())
    p.poll(0)
    return doc["published_at"]


def committed_total(bootstrap: str, group: str, topic: str, parts: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return sum(max(tp.offset, 0) for tp in c.committed([TopicPartition(topic, p) for p in range(parts)], timeout=10))
    finally:
        c.close()


class Replica:
    def __init__(self, name: str, bootstrap: str, topics: dict, group: str, model: str, uri: str, alias: str,
                 port: int, log_dir: Path) -> None:
        env = {**os.environ, "NOTELLM_LOG__FORMAT": "json", "NOTELLM_KAFKA__CLIENT_ID": name}
        cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", bootstrap,
               "--topic", topics["notes"], "--tags-topic", topics["tags"], "--dlq-topic", topics["dlq"],
               "--group", group, "--model", model, "--milvus-uri", uri, "--collection", alias,
               "--http-port", str(port), "--threads", "1", "--generate", "category"]
        self.port = port
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def assigned(self) -> bool:
        return '"partitions_assigned"' in self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait(pred, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def start_group(n: int, args, topics: dict, uri: str, alias: str, log_dir: Path) -> tuple[list[Replica], str]:
    group = f"topo-{uuid.uuid4().hex[:8]}"
    reps = [Replica(f"r{i}", args.bootstrap, topics, group, args.model, uri, alias, free_port(), log_dir)
            for i in range(n)]
    wait(lambda: all(r.ready() for r in reps), "replicas ready (calibrated, warmed, assigned)", 240)
    wait(lambda: all(r.assigned() for r in reps), "every replica assigned partitions", 120)
    return reps, group


def throughput(n: int, args, uri: str, alias: str, log_dir: Path) -> dict:
    topics = topics_for(args.bootstrap)
    reps, group = start_group(n, args, topics, uri, alias, log_dir)
    try:
        docs = mind_docs(args.notes, f"t{n}-{uuid.uuid4().hex[:4]}-")
        p = producer(args.bootstrap)
        t0 = time.monotonic()
        for d in docs:
            send(p, topics["notes"], d)
        p.flush(60)
        wait(lambda: committed_total(args.bootstrap, group, topics["notes"], 6) >= len(docs), "backlog committed", 600)
        dt = time.monotonic() - t0
        crashed = [r.log.name for r in reps if r.proc.poll() is not None]
        return {"replicas": n, "notes": len(docs), "seconds": round(dt, 2), "notes_per_s": round(len(docs) / dt, 1),
                "crashed": crashed}
    finally:
        codes = [r.stop() for r in reps]
        if any(codes):
            progress(f"replica exit codes {codes}")


class Reader(threading.Thread):
    """Looks for every published id until it finds it; records found - published_at (ms)."""

    def __init__(self, backend: str, uri: str, alias: str, port: int) -> None:
        super().__init__(daemon=True)
        self.backend, self.port = backend, port
        self.pending: dict[str, int] = {}
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.store = None
        if backend == "server":
            from worker.sinks.milvus import MilvusStore

            self.store = MilvusStore(uri, alias=alias, consistency_level="Bounded")

    def expect(self, note_id: str, published_ms: int) -> None:
        with self.lock:
            self.pending[note_id] = published_ms

    def _found(self, ids: list[str]) -> set[str]:
        if self.store is not None:
            return {r["note_id"] for r in self.store.get(ids, ["note_id"])}
        out = set()
        for i in ids:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/notes/{i}", timeout=2) as r:
                    if r.status == 200:
                        out.add(i)
            except urllib.error.HTTPError:
                pass
        return out

    def run(self) -> None:
        while not (self.stop.is_set() and not self.pending):
            with self.lock:
                ids = list(self.pending)
            if self.store is None:
                # One HTTP read per id, answered by the worker's own process (it holds the lite db): look
                # only at the oldest few, or the reader's load would slow the worker it measures.
                ids = ids[:LITE_PROBES]
            if ids:
                found = self._found(ids)
                now = time.time() * 1000
                with self.lock:
                    for i in found:
                        self.latencies.append(now - self.pending.pop(i))
            time.sleep(0.01 if self.store is not None else LITE_ROUND_S)


def latency(args, rate: float, backend: str, uri: str, alias: str, log_dir: Path) -> dict:
    topics = topics_for(args.bootstrap)
    reps, _ = start_group(1, args, topics, uri, alias, log_dir)
    reader = Reader(backend, uri, alias, reps[0].port)
    reader.start()
    try:
        p = producer(args.bootstrap)
        docs = mind_docs(max(1, int(rate * args.latency_seconds)), f"l-{uuid.uuid4().hex[:4]}-")
        t0 = time.monotonic()
        for k, d in enumerate(docs):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            reader.expect(d["note_id"], send(p, topics["notes"], d))
        p.flush(60)
        reader.stop.set()
        reader.join(120)
        lat = sorted(reader.latencies)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        return {"rate_notes_per_s": round(rate, 1), "published": len(docs), "found": len(lat),
                "not_found": len(reader.pending), "reader": "pymilvus Bounded" if backend == "server" else
                "worker /notes/{id}", "visible_ms": {"p50": round(q[49]), "p95": round(q[94]), "p99": round(q[98]),
                                                  "max": round(lat[-1]) if lat else None}}
    finally:
        reader.stop.set()
        for r in reps:
            r.stop()
        if reader.store is not None:
            reader.store.close()


def drop(uri: str, alias: str) -> None:
    from worker.sinks.milvus import MilvusStore

    st = MilvusStore(uri, alias=alias)
    try:
        phys = st.resolve()
        with st.locked() as c:
            if phys:
                c.drop_alias(alias)
                c.drop_collection(phys)
    finally:
        st.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("NOTELLM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="the Milvus server (scripts/milvus start)")
    ap.add_argument("--model", default=None, help="package dir (default: the tiny test model, exported once)")
    ap.add_argument("--notes", type=int, default=3000)
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--backends", default="lite,server")
    ap.add_argument("--latency-rate", type=float, default=None, help="notes/s for the latency run (default: half "
                    "the measured one-replica capacity)")
    ap.add_argument("--skip-throughput", action="store_true", help="latency only (needs --latency-rate)")
    args = ap.parse_args(argv)
    if args.model is None:
        from tests.worker_support import tiny_model_dir

        args.model = str(tiny_model_dir())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-topology-"))
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                 "notes": args.notes, "model": args.model, "logs": str(log_dir)}
    for backend in args.backends.split(","):
        res: dict = {}
        counts = [int(x) for x in args.replicas.split(",")] if backend == "server" else [1]
        for n in ([] if args.skip_throughput else counts):
            uri = args.milvus_uri if backend == "server" else str(log_dir / f"lite-{n}.db")
            alias = f"topo_{uuid.uuid4().hex[:8]}"
            progress(f"{backend}: {n} replica(s), {args.notes}-note backlog")
            res[f"replicas_{n}"] = throughput(n, args, uri, alias, log_dir)
            if backend == "server":
                drop(uri, alias)
        cap = 2 * args.latency_rate if args.latency_rate else res["replicas_1"]["notes_per_s"]
        uri = args.milvus_uri if backend == "server" else str(log_dir / "lite-latency.db")
        alias = f"topo_{uuid.uuid4().hex[:8]}"
        progress(f"{backend}: visible-in-search latency at {cap / 2:.0f} notes/s for {args.latency_seconds:.0f} s")
        res["latency_at_half_capacity"] = latency(args, cap / 2, backend, uri, alias, log_dir)
        if backend == "server":
            drop(uri, alias)
        if len(counts) > 1:
            res["scaling"] = {f"{n}_vs_1": round(res[f"replicas_{n}"]["notes_per_s"] / cap, 2) for n in counts[1:]}
        out[backend] = res
        progress(json.dumps(res))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
