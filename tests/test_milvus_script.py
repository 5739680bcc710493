"""scripts/milvus on a server of its own (its own directory and ports, so the shared test server keeps running):
start returns only when a client call succeeds, start twice is harmless, a port held by another process is
refused, status tells, a client round trip works, and stop ends exactly the processes it started."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPT = str(REPO / "scripts" / "milvus")
pytestmark = pytest.mark.timeout(400)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _ports() -> tuple[int, int]:
    """A free gRPC port and a free etcd client port whose next port (etcd's peer port) is free too."""
    rng = random.Random()
    for _ in range(200):
        grpc, etcd = rng.randrange(20000, 30000), rng.randrange(30000, 39000)
        if _free(grpc) and _free(etcd) and _free(etcd + 1):
            return grpc, etcd
    raise AssertionError("no free ports")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _server_pid(data_dir: str) -> int | None:
    want = f"{data_dir}/bin/milvus\0run\0standalone\0"
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline") as f:
                    if f.read() == want:
                        return int(p)
            except OSError:
                pass
    return None


def test_start_twice_status_round_trip_and_stop(tmp_path):
    from pymilvus import DataType, MilvusClient

    grpc, etcd = _ports()
    d = tmp_path / "milvus"
    args = ["--dir", str(d), "--port", str(grpc), "--etcd-port", str(etcd)]
    uri = f"http://127.0.0.1:{grpc}"
    try:
        t0 = time.monotonic()
        first = _run("start", *args)
        assert first.returncode == 0, first.stderr[-3000:]
        assert first.stdout.strip().splitlines()[-1] == uri
        took = time.monotonic() - t0
        wrapper = int((d / "milvus.pid").read_text())
        server = _server_pid(str(d / "data"))
        assert server and _alive(wrapper) and _alive(server)
        assert "ready on" in first.stderr, first.stderr

        # a real client call answers at once: start returned only when the server served one
        client = MilvusClient(uri=uri, timeout=10)
        assert client.get_server_version().startswith("v2.3.5")

        again = _run("start", *args, timeout=60)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == uri, again.stderr
        assert "already running" in again.stderr and int((d / "milvus.pid").read_text()) == wrapper
        assert _server_pid(str(d / "data")) == server

        st = _run("status", *args, timeout=60)
        assert st.returncode == 0 and st.stdout.startswith(f"running pid={wrapper} uri={uri}"), st.stdout

        # another directory asking for the same gRPC port is refused, and starts nothing
        other = _run("start", "--dir", str(tmp_path / "other"), "--port", str(grpc), "--etcd-port", str(etcd + 2),
                     timeout=60)
        assert other.returncode == 1 and f"port {grpc} on 127.0.0.1 is already in use" in other.stderr, other.stderr
        assert not (tmp_path / "other" / "milvus.pid").exists()

        # a round trip: create, upsert, read back at Strong consistency, search
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        idx = client.prepare_index_params()
        idx.add_index(field_name="v", index_type="HNSW", metric_type="COSINE", params={"M": 8, "efConstruction": 64})
        client.create_collection("roundtrip", schema=schema, index_params=idx)
        vecs = np.eye(4, dtype=np.float32)
        client.upsert("roundtrip", [{"id": f"r{i}", "v": vecs[i].tolist()} for i in range(4)])
        got = client.query("roundtrip", filter='id in ["r2"]', output_fields=["v"], consistency_level="Strong")
        assert [r["id"] for r in got] == ["r2"] and np.allclose(got[0]["v"], vecs[2])
        hits = client.search("roundtrip", data=[vecs[3].tolist()], limit=1, consistency_level="Strong")[0]
        assert hits[0]["id"] == "r3"
        client.close()

        t0 = time.monotonic()
        stop = _run("stop", *args, timeout=60)
        assert stop.returncode == 0 and f"stopped (pid {wrapper})" in stop.stderr, stop.stderr
        assert not _alive(wrapper) and not _alive(server) and time.monotonic() - t0 < 20
        assert _free(grpc) or not _server_pid(str(d / "data"))
        assert not (d / "milvus.pid").exists()
        st = _run("status", *args, timeout=60)
        assert st.returncode == 3 and st.stdout.strip() == "stopped"
        again = _run("stop", *args, timeout=60)
        assert again.returncode == 0 and "not running" in again.stderr
        print(f"milvus script: first start {took:.1f}s")
    finally:
        _run("stop", *args, timeout=60)
        shutil.rmtree(d / "data", ignore_errors=True)  # ~400 MB (the server's binaries + rocksmq)
