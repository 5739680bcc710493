"""bench/sink.py runs the worker's Milvus sink against milvus-lite in the process, milvus-lite in a child
process and the Milvus server (the last two also through a writer process), stores every row once whatever
the number of upsert rounds, leaves no collection behind on the server, and prints its JSON (the rates are
the bench's to report, not a test's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_sink_measures_every_backend_and_stores_each_row_once(milvus_server):
    p = subprocess.run([sys.executable, str(REPO / "bench" / "sink.py"), "--milvus-uri", milvus_server,
                        "--rows", "32", "--flushes", "2", "--repeats", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["rows"] == 64 and set(doc["backends"]) == {"lite", "lite-process", "server", "lite-process-writer",
                                                          "server-writer"}
    for name, b in doc["backends"].items():
        # round 0 inserted, rounds 1-2 upserted the same ids: nothing duplicated
        assert b["stored"] == 64, (name, b)
        assert b["rows_per_s"] > 0 and len(b["rows_per_s_all"]) == 2
        assert 0 < b["sink_thread_cpu_us_per_row"] <= b["process_cpu_us_per_row"] + 1.0
    assert doc["vs_lite"]["lite"] == 1.0
    assert not Path(doc["scratch"]).exists()  # its milvus-lite dbs are removed at exit
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_server, timeout=30)
    try:
        assert not [c for c in client.list_collections() if c.startswith("sink_bench_")]
    finally:
        client.close()


def test_bench_sink_refuses_an_unknown_or_repeated_backend():
    for bad in ("lite,lite", "sqlite"):
        p = subprocess.run([sys.executable, str(REPO / "bench" / "sink.py"), "--backends", bad],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "--backends" in p.stderr, (bad, p.stderr[-500:])
