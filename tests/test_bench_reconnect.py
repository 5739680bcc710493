"""bench/reconnect.py against the real Milvus server: one short outage through a relay, both option sets,
one JSON document; the worker's options bring the client back within seconds."""
from __future__ import annotations

import json

import pytest

from bench import reconnect

pytestmark = pytest.mark.timeout(120)


def test_reconnect_bench_prints_one_row_per_outage(milvus_server_backend, capsys):
    assert reconnect.main(["--milvus-uri", milvus_server_backend.uri, "--outages", "3", "--probe-s", "0.5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "reconnect" and doc["worker_grpc_options"] == {"grpc.max_reconnect_backoff_ms": 5000}
    (row,) = doc["rows"]
    assert row["outage_s"] == 3.0
    assert 0 <= row["grpc_default_lag_s"] < 60 and 0 <= row["worker_lag_s"] < 9
