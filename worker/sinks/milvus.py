"""Milvus sink: idempotent upsert keyed by note_id (+ deletes for tombstones).

`MilvusStore` owns the client and the collection: created on first start (dimension from the model
manifest, COSINE, an index suited to the deployment), reached through an alias (`collection`) that
points at a physical collection named after the model version, so `worker backfill` can build a new
one and switch the alias atomically. A dimension or model_version mismatch is a startup error.

One store may be shared by several sinks in one process (milvus-lite locks its db to one process);
calls are serialised by a lock.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import numpy as np

from worker.records import Encoded
from worker.sinks import GiveUp, RetryLater

PROP_MODEL_VERSION = "notellm.model_version"
PROP_DIM = "notellm.dim"
MAX_HASHTAGS = 64
TITLE_MAX = 4096


class CollectionMismatch(RuntimeError):
    """The existing collection was built for another model (dimension or model_version)."""


def _classify(exc: Exception, what: str):
    from pymilvus.exceptions import DataNotMatchException, DataTypeNotMatchException, MilvusException, ParamError

    if isinstance(exc, (ParamError, DataNotMatchException, DataTypeNotMatchException)):
        return GiveUp("milvus", f"{what}: {exc}")
    if isinstance(exc, MilvusException) and getattr(exc, "code", None) in (6, 1100):  # bad data / invalid param
        return GiveUp("milvus", f"{what}: {exc}")
    return RetryLater("milvus", f"{what}: {type(exc).__name__}: {exc}")


def physical_name(alias: str, model_version: str) -> str:
    return f"{alias}__{re.sub(r'[^0-9A-Za-z_]', '_', model_version)[:24]}"


class MilvusStore:
    def __init__(self, uri: str, *, token: str | None = None, db_name: str | None = None,
                 alias: str = "notes", timeout_s: float = 30.0) -> None:
        from pymilvus import MilvusClient

        self.uri = uri
        self.alias = alias
        self.timeout_s = timeout_s
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
        if self.is_lite:
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        kw: dict[str, Any] = {"uri": uri}
        if token:
            kw["token"] = token
        if db_name:
            kw["db_name"] = db_name
        self.client = MilvusClient(**kw)
        self.lock = threading.RLock()

    # -- collection management -------------------------------------------------------------------
    def resolve(self, name: str | None = None) -> str | None:
        """Physical collection behind alias `name` (or the collection itself), None if absent."""
        name = name or self.alias
        with self.lock:
            # list first: describe_alias on a missing alias makes pymilvus log an ERROR on a normal first start
            if name in self.client.list_aliases().get("aliases", []):
                return self.client.describe_alias(name)["collection_name"]
            return name if self.client.has_collection(name) else None

    def describe(self, collection: str) -> tuple[int | None, str | None]:
        with self.lock:
            d = self.client.describe_collection(collection)
        dim = next((int(f["params"]["dim"]) for f in d["fields"] if f["name"] == "embedding"), None)
        return dim, (d.get("properties") or {}).get(PROP_MODEL_VERSION)

    def create(self, collection: str, dim: int, model_version: str) -> None:
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                       description=f"notellm embeddings, model_version={model_version}")
        s.add_field("note_id", DataType.VARCHAR, is_primary=True, max_length=256)
        s.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("model_version", DataType.VARCHAR, max_length=128)
        s.add_field("category", DataType.VARCHAR, max_length=256, nullable=True)
        s.add_field("hashtags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_HASHTAGS, max_length=256)
        s.add_field("published_at", DataType.INT64)
        s.add_field("author_id", DataType.VARCHAR, max_length=256)
        s.add_field("title", DataType.VARCHAR, max_length=TITLE_MAX)
        ip = self.client.prepare_index_params()
        if self.is_lite:
            ip.add_index(field_name="embedding", index_type="AUTOINDEX", metric_type="COSINE")
        else:  # a server: HNSW is a good default for low-latency top-k at this scale
            ip.add_index(field_name="embedding", index_type="HNSW", metric_type="COSINE",
                         params={"M": 16, "efConstruction": 200})
        with self.lock:
            self.client.create_collection(collection, schema=s, index_params=ip,
                                          properties={PROP_MODEL_VERSION: model_version, PROP_DIM: str(dim)})

    def ensure(self, dim: int, model_version: str, *, collection: str | None = None, create_alias: bool = True) -> str:
        """The physical collection to write to; created (and aliased) if missing. Raises
        CollectionMismatch when the existing one was built for another model."""
        with self.lock:
            phys = collection or self.resolve()
            if phys is None or (collection and not self.client.has_collection(collection)):
                phys = collection or physical_name(self.alias, model_version)
                if not self.client.has_collection(phys):
                    self.create(phys, dim, model_version)
                if create_alias and collection is None:
                    self.client.create_alias(phys, self.alias)
                return phys
            have_dim, have_mv = self.describe(phys)
            if have_dim != dim:
                raise CollectionMismatch(
                    f"Milvus collection {phys!r} (alias {self.alias!r}) has embedding dim {have_dim}, but the model "
                    f"produces {dim}: point the worker at the model it was built with, or run `notellm worker backfill`.")
            if have_mv is not None and have_mv != model_version:
                raise CollectionMismatch(
                    f"Milvus collection {phys!r} (alias {self.alias!r}) holds vectors of model_version {have_mv!r}, "
                    f"but the model is {model_version!r}: mixing them would corrupt search. Run "
                    f"`notellm worker backfill --model DIR` to build a new collection and switch the alias.")
            self.load(phys)
            return phys

    def load(self, collection: str | None = None) -> None:
        """Load a collection that is released (a reopened milvus-lite db starts released)."""
        name = collection or self.alias
        with self.lock:
            state = str(self.client.get_load_state(name).get("state", ""))
            if "NotLoad" in state or "released" in state.lower():
                self.client.load_collection(name)

    def switch_alias(self, collection: str) -> None:
        with self.lock:
            if self.alias in self.client.list_aliases().get("aliases", []):
                self.client.alter_alias(collection, self.alias)
            else:
                self.client.create_alias(collection, self.alias)

    def ping(self) -> bool:
        try:
            with self.lock:
                self.client.has_collection(self.alias)
            return True
        except Exception:  # noqa: BLE001
            return False

    # -- reads -----------------------------------------------------------------------------------
    def similar(self, note_id: str, k: int = 10, collection: str | None = None) -> dict:
        coll = collection or self.alias
        fields = ["title", "category", "hashtags", "published_at", "model_version"]
        self.load(coll)
        with self.lock:
            got = self.client.get(coll, ids=[note_id], output_fields=["embedding", *fields])
            if not got:
                raise KeyError(note_id)
            me = got[0]
            hits = self.client.search(coll, data=[list(me["embedding"])], limit=k + 1, output_fields=fields)[0]
        out = []
        for h in hits:
            hid = h.get("id", h.get("note_id"))
            if hid == note_id:
                continue
            ent = h.get("entity", {})
            out.append({"note_id": hid, "score": float(h["distance"]), **{f: ent.get(f) for f in fields[:3]}})
        q = {f: me.get(f) for f in fields}
        q["note_id"] = note_id
        return {"note": q, "neighbours": out[:k]}

    def count(self, collection: str | None = None) -> int:
        self.load(collection)
        with self.lock:
            r = self.client.query(collection or self.alias, filter="", output_fields=["count(*)"])
        return int(r[0]["count(*)"])

    def all_ids(self, collection: str | None = None) -> list[str]:
        """Every note_id in the collection (tests, backfill checks)."""
        self.load(collection)
        with self.lock:
            it = self.client.query_iterator(collection or self.alias, batch_size=1000, filter="", output_fields=["note_id"])
            out: list[str] = []
            while True:
                page = it.next()
                if not page:
                    it.close()
                    return out
                out.extend(r["note_id"] for r in page)

    def close(self) -> None:
        with self.lock:
            self.client.close()


class MilvusSink:
    name = "milvus"

    def __init__(self, store: MilvusStore, collection: str) -> None:
        self.store = store
        self.collection = collection
        self._rows: dict[str, dict] = {}
        self._deletes: set[str] = set()

    def add(self, enc: Encoded) -> None:
        b = enc.batch
        vecs = np.asarray(enc.embeddings, dtype=np.float32)  # rows go to pymilvus as float32 arrays
        for i, n in enumerate(b.notes):
            tags = enc.hashtags[i] if enc.hashtags else []
            self._deletes.discard(n.note_id)
            self._rows[n.note_id] = {
                "note_id": n.note_id,
                "embedding": vecs[i],
                "model_version": enc.model_version,
                "category": (enc.categories[i] if enc.categories else None) or None,
                "hashtags": [t[:256] for t in tags[:MAX_HASHTAGS]],
                "published_at": int(n.published_at),
                "author_id": n.author_id,
                "title": n.title[:TITLE_MAX],
            }
        for t in b.tombstones:
            self._rows.pop(t.note_id, None)
            self._deletes.add(t.note_id)
        # A note the encoder failed on goes to the DLQ; it must not stay searchable (an early upsert
        # at low load may have written its vector before generation failed).
        for d in enc.failed:
            if d.note_id and d.note_id not in self._rows:
                self._deletes.add(d.note_id)

    def flush(self) -> None:
        """Upsert staged rows, delete tombstoned ids; staged work stays until it succeeded."""
        if self._rows:
            try:
                with self.store.lock:
                    self.store.client.upsert(self.collection, list(self._rows.values()), timeout=self.store.timeout_s)
            except Exception as e:  # noqa: BLE001
                raise _classify(e, f"upsert of {len(self._rows)} rows") from e
            self._rows.clear()
        if self._deletes:
            ids = sorted(self._deletes)
            try:
                with self.store.lock:
                    self.store.client.delete(self.collection, ids=ids, timeout=self.store.timeout_s)
            except Exception as e:  # noqa: BLE001
                raise _classify(e, f"delete of {len(ids)} ids") from e
            self._deletes.clear()

    def pending(self) -> int:
        return len(self._rows) + len(self._deletes)

    def discard(self) -> None:
        self._rows.clear()
        self._deletes.clear()
