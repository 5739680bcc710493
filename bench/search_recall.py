"""Recall and latency of the worker's similarity search on a Milvus server, per HNSW candidate list `ef`
(NOTELLM_MILVUS__SEARCH_EF), through the store's own path (`MilvusStore.similar`: the note's stored vector,
then a top-(k+1) search without the note itself).

    python bench/search_recall.py [--milvus-uri http://127.0.0.1:19530] [--notes 50000] [--dim 128]
                                  [--clusters 500] [--spread 0.6] [--queries 200] [--k 10]
                                  [--efs default,16,32,64,128,256]

The collection is the store's (`MilvusStore.ensure`: HNSW, M 16, efConstruction 200, cosine), filled with
`--notes` unit vectors drawn around `--clusters` centres (embeddings of notes on a few hundred subjects are
clustered; uniform noise is a harsher case), flushed, and searched once the server reports every row
indexed (a sealed segment not yet indexed is searched exactly, which would flatter every ef). Truth is the
exact top-k by cosine, computed here with numpy. `default` is the server's own ef (the store given
`search_ef=None`). The vectors are synthetic: encoding 50,000 notes on this CPU would take hours, and the
index's recall depends on the vectors' geometry, not on where they came from. The queries read at Bounded
consistency (the default readers'), after the data is visible. Prints one JSON document: per ef, recall@k
(mean and standard error over the queries) and the milliseconds per `similar` call (median and p95).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.topology import drop  # noqa: E402
from worker.sinks.milvus import MilvusStore  # noqa: E402

CHUNK = 2048


def vectors(n: int, dim: int, clusters: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(store: MilvusStore, x: np.ndarray) -> str:
    coll = store.ensure(x.shape[1], "recall-bench")
    for lo in range(0, len(x), CHUNK):
        store.upsert(coll, [{"note_id": f"n{i}", "embedding": x[i].tolist(), "model_version": "recall-bench",
                             "category": "", "hashtags": [], "published_at": i, "author_id": "bench",
                             "title": f"note {i}"} for i in range(lo, min(len(x), lo + CHUNK))])
    with store.locked() as c:
        c.flush(coll)
        t0 = time.monotonic()
        while True:
            d = c.describe_index(coll, "embedding")
            if int(d.get("indexed_rows", 0)) >= len(x) and int(d.get("pending_index_rows", 0)) == 0:
                break
            if time.monotonic() - t0 > 600:
                raise TimeoutError(f"the index did not cover {len(x)} rows within 600 s: {d}")
            time.sleep(0.5)
    return coll


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--milvus-uri", default="http://127.0.0.1:19530")
    ap.add_argument("--notes", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--spread", type=float, default=0.6)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--efs", default="default,16,32,64,128,256")
    a = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)  # pymilvus's own retry chatter
    efs = [None if e == "default" else int(e) for e in a.efs.split(",")]
    x = vectors(a.notes, a.dim, a.clusters, a.spread)
    alias = f"recall_bench_{uuid.uuid4().hex[:8]}"
    store = MilvusStore(a.milvus_uri, alias=alias, consistency_level="Bounded")
    out: dict = {"milvus_uri": a.milvus_uri, "notes": a.notes, "dim": a.dim, "clusters": a.clusters,
                 "spread": a.spread, "queries": a.queries, "k": a.k, "index": "HNSW M=16 efConstruction=200",
                 "results": []}
    try:
        t0 = time.perf_counter()
        coll = fill(store, x)
        out["fill_and_index_s"] = round(time.perf_counter() - t0, 1)
        print(f"filled and indexed {a.notes} rows in {out['fill_and_index_s']} s", file=sys.stderr)
        q = np.random.default_rng(1).choice(a.notes, a.queries, replace=False)
        sims = x[q] @ x.T
        sims[np.arange(len(q)), q] = -np.inf  # the note itself is not its own neighbour
        truth = np.argsort(-sims, axis=1)[:, :a.k]
        for ef in efs:
            reader = MilvusStore(a.milvus_uri, alias=alias, consistency_level="Bounded", search_ef=ef)
            try:
                rec, ms = [], []
                for row, i in enumerate(q):
                    t = time.perf_counter()
                    ans = reader.similar(f"n{i}", a.k, coll)
                    ms.append((time.perf_counter() - t) * 1000)
                    got = {int(h["note_id"][1:]) for h in ans["neighbours"]}
                    rec.append(len(got & set(truth[row].tolist())) / a.k)
            finally:
                reader.close()
            r = np.asarray(rec)
            res = {"ef": ef if ef is not None else "default", f"recall@{a.k}": round(float(r.mean()), 4),
                   "recall_se": round(float(r.std(ddof=1) / np.sqrt(len(r))), 4),
                   "ms_median": round(float(np.median(ms)), 2), "ms_p95": round(float(np.percentile(ms, 95)), 2)}
            out["results"].append(res)
            print(json.dumps(res), file=sys.stderr)
    finally:
        store.close()
        drop(a.milvus_uri, alias)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
