"""bench/search_recall.py against the real Milvus server, small: it fills the store's own collection, waits for
the index, reports recall against the exact top-k per ef, and leaves no collection behind."""
from __future__ import annotations

import json

from bench import search_recall


def test_search_recall_bench_reports_each_ef_and_cleans_up(milvus_server, capsys):
    from pymilvus import MilvusClient

    out = search_recall.main(["--milvus-uri", milvus_server, "--notes", "3000", "--queries", "20", "--k", "5",
                              "--efs", "default,8,64"])
    assert json.loads(capsys.readouterr().out) == out
    assert [r["ef"] for r in out["results"]] == ["default", 8, 64]
    for r in out["results"]:
        assert 0.8 <= r["recall@5"] <= 1.0 and r["recall_se"] >= 0 and 0 < r["ms_median"] <= r["ms_p95"]
    c = MilvusClient(uri=milvus_server, timeout=30)
    try:
        assert not [n for n in c.list_collections() if n.startswith("recall_bench_")]
    finally:
        c.close()
