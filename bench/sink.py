"""The Milvus sink's rows/s per worker process: milvus-lite in the process, milvus-lite in a child process
(NOTELLM_MILVUS__LITE_PROCESS) and a Milvus server, each of the last two also with the writes made by a
writer process (NOTELLM_MILVUS__WRITE_PROCESS: `-writer`), side by side, interleaved.

    python bench/sink.py [--backends lite,lite-process,server,lite-process-writer,server-writer]
                         [--milvus-uri http://127.0.0.1:19530] [--rows 2048] [--flushes 6] [--repeats 3]
                         [--notes mind]

Each flush is what the worker's sink stage does with one encoded batch: `MilvusSink.add` (one row per
note: real MIND titles, unit vectors of the collection's dim) then `MilvusSink.flush` (one upsert). The
same note ids are upserted again in every round after the first (the worker's replays are upserts of ids
already stored), so every backend holds `--rows` x `--flushes` rows. Reported per backend (best of
`--repeats` rounds, the backends taking turns): rows/s, the sink thread's CPU per row (pymilvus turning
rows into a request, the part of the sink that holds the worker's GIL; with a writer process only packing
the rows into columns for it), and the process CPU per row (milvus-lite's in-process server adds its own
here; a child's, a writer's or a server's does not count). The GPU run (docs/results/gpu, runs 9-10)
measured milvus-lite at 3,600-4,700 rows/s beside an encoder that embeds ~8,300 notes/s: this says which
part of that ceiling a Milvus server removes, and how much of the worker's GIL a writer process frees.
Prints one JSON document.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tokenizing import load_notes  # noqa: E402
from worker.records import Batch, Encoded, Note  # noqa: E402
from worker.sinks.milvus import MilvusSink, MilvusStore  # noqa: E402

BACKENDS = ("lite", "lite-process", "server", "lite-process-writer", "server-writer")
DIM = 128


def batches(texts: list, rows: int, flushes: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for f in range(flushes):
        notes = []
        for i in range(rows):
            t = texts[(f * rows + i) % len(texts)]
            notes.append(Note(note_id=f"sink-bench-{f}-{i}", title=t.title, content=t.content or "",
                              author_id="bench", published_at=1_700_000_000_000 + i, topic=t.topic,
                              category=None, hashtags=None, partition=i % 6, offset=f * rows + i))
        v = rng.standard_normal((rows, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        b = Batch(seq=f, notes=notes, tombstones=[], dead=[], offsets={}, records=rows, padded_tokens=0,
                  opened_at=0.0, closed_at=0.0, reason="notes")
        out.append(Encoded(batch=b, embeddings=v, categories=["news"] * rows, hashtags=[["bench"]] * rows,
                           model_version="sink-bench"))
    return out


def open_store(backend: str, tmp: Path, uri: str | None) -> MilvusStore:
    writer = backend.endswith("-writer")
    if backend.startswith("server"):
        return MilvusStore(uri, write_process=writer)
    return MilvusStore(str(tmp / f"{backend}.db"), lite_process=backend.startswith("lite-process"),
                       write_process=writer)


def one_round(sink: MilvusSink, work: list[Encoded]) -> dict[str, float]:
    t, c, p = time.perf_counter(), time.thread_time(), time.process_time()
    for enc in work:
        sink.add(enc)
        rejected = sink.flush()
        if rejected:
            raise RuntimeError(f"{len(rejected)} rows rejected: {rejected[0]}")
    return {"wall": time.perf_counter() - t, "thread_cpu": time.thread_time() - c, "process_cpu": time.process_time() - p}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--milvus-uri", default=os.environ.get("NOTELLM_MILVUS_URI", "http://127.0.0.1:19530"))
    ap.add_argument("--rows", type=int, default=2048, help="rows per flush (the worker's batch)")
    ap.add_argument("--flushes", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--notes", default="mind", help="shared dataset for the titles (bench.tokenizing.load_notes)")
    a = ap.parse_args(argv)
    backends = a.backends.split(",")
    if set(backends) - set(BACKENDS) or len(set(backends)) != len(backends):
        ap.error(f"--backends: each of {BACKENDS} at most once")
    work = batches(load_notes(a.notes, a.rows * a.flushes), a.rows, a.flushes)
    n = a.rows * a.flushes
    tmp = Path(tempfile.mkdtemp(prefix="sink-bench-"))
    # removed at exit, after pymilvus's in-process milvus-lite server (whose exit hook, registered later and
    # so run earlier, writes the db one last time)
    atexit.register(shutil.rmtree, tmp, True)
    sinks: dict[str, tuple[MilvusStore, MilvusSink, str]] = {}
    try:
        for b in backends:
            store = open_store(b, tmp, a.milvus_uri)
            coll = store.ensure(DIM, "sink-bench", collection=f"sink_bench_{uuid.uuid4().hex[:8]}",
                                create_alias=False)
            sinks[b] = (store, MilvusSink(store, coll), coll)
        rounds: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
        for r in range(a.repeats + 1):  # round 0 inserts (and warms up); later rounds upsert the same ids
            for b in backends:
                res = one_round(sinks[b][1], work)
                if r:
                    rounds[b].append(res)
                print(f"[sink] round {r} {b}: {n / res['wall']:,.0f} rows/s", file=sys.stderr, flush=True)
        out: dict = {"rows_per_flush": a.rows, "flushes": a.flushes, "rows": n, "repeats": a.repeats,
                     "cpus": len(os.sched_getaffinity(0)), "scratch": str(tmp), "backends": {}}
        for b in backends:
            best = min(rounds[b], key=lambda x: x["wall"])
            store, _, coll = sinks[b]
            out["backends"][b] = {
                "rows_per_s": round(n / best["wall"], 1),
                "rows_per_s_all": [round(n / x["wall"], 1) for x in rounds[b]],
                "sink_thread_cpu_us_per_row": round(best["thread_cpu"] / n * 1e6, 1),
                "process_cpu_us_per_row": round(best["process_cpu"] / n * 1e6, 1),
                "stored": store.count(coll),
            }
        base = out["backends"].get("lite", {}).get("rows_per_s")
        if base:
            out["vs_lite"] = {b: round(v["rows_per_s"] / base, 2) for b, v in out["backends"].items()}
    finally:
        for b, (store, _, coll) in sinks.items():
            if b.startswith("server"):
                try:
                    store.client.drop_collection(coll)
                except Exception:  # noqa: BLE001 - best effort: the server outlives the bench
                    pass
            store.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
