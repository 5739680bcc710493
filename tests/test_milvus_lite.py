"""Milvus is real (milvus-lite and a Milvus 2.3 server): create, upsert, search, upsert the same ids again ->
count unchanged."""
from __future__ import annotations

import numpy as np
from pymilvus import DataType, MilvusClient


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _id(hit) -> str:
    return hit.get("note_id", hit.get("id"))  # milvus-lite names the primary key field; a 2.3 server says "id"


def test_upsert_is_idempotent(milvus_backend):
    import os

    if not milvus_backend.is_server:
        os.makedirs(os.path.dirname(milvus_backend.uri), exist_ok=True)
    client = MilvusClient(milvus_backend.uri)
    name = milvus_backend.alias  # unique per test on the server (dropped afterwards)
    strong = {"consistency_level": "Strong"}  # a server's default (Bounded) may not see the last writes yet
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("note_id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=16)
    schema.add_field("title", DataType.VARCHAR, max_length=512)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)

    v = _vectors(100, 16, 0)
    rows = [{"note_id": f"n{i}", "vector": v[i].tolist(), "title": f"first {i}"} for i in range(100)]
    client.upsert(name, rows)
    if not milvus_backend.is_server:  # a server's flush seals segments (seconds); Strong reads suffice there
        client.flush(name)
    assert client.query(name, filter="", output_fields=["count(*)"], **strong)[0]["count(*)"] == 100

    hits = client.search(name, data=[v[7].tolist()], limit=3, output_fields=["title"], **strong)[0]
    assert _id(hits[0]) == "n7" and abs(hits[0]["distance"] - 1.0) < 1e-4

    # Same ids again with new vectors and titles: replaced, not duplicated.
    v2 = _vectors(100, 16, 1)
    client.upsert(name, [{"note_id": f"n{i}", "vector": v2[i].tolist(), "title": f"second {i}"} for i in range(100)])
    if not milvus_backend.is_server:  # a server's flush seals segments (seconds); Strong reads suffice there
        client.flush(name)
    assert client.query(name, filter="", output_fields=["count(*)"], **strong)[0]["count(*)"] == 100
    got = client.get(name, ids=["n7"], output_fields=["title", "vector"], **strong)[0]
    assert got["title"] == "second 7"
    assert np.allclose(np.asarray(got["vector"], dtype=np.float32), v2[7], atol=1e-6)
    hits = client.search(name, data=[v2[42].tolist()], limit=1, **strong)[0]
    assert _id(hits[0]) == "n42"
    client.close()
