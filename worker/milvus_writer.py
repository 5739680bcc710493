"""Milvus writes from a supervised child process (`NOTELLM_MILVUS__WRITE_PROCESS=true`).

Why: pymilvus builds every upsert request in Python, ~55-60 µs per row (`bench/sink.py`), and in the
worker that work holds the GIL that the polling thread (decode, prompts) and the encode stage's host side
need too. With an encoder as fast as a GPU's, the worker process's GIL is what limits one worker
(design-notes, "The worker at GPU speed"). With this option the sink thread only packs the staged rows
into columns (one [n, dim] float32 array and a list per field, ~5 µs per row) and sends them down a pipe;
a child process with its own pymilvus client rebuilds the rows and upserts them on another core.

The child needs an address to connect to: a Milvus server's URI, or the gRPC address of a milvus-lite db
served from a child (`NOTELLM_MILVUS__LITE_PROCESS=true`); an embedded milvus-lite db belongs to the
worker's own process and cannot be written from another.

The contract is the store's, unchanged: the child classifies a failure with `classify()` (data /
transient / fatal) and the parent raises `WriteFailed` carrying that class, so the sink bisects, retries
or gives up exactly as for an in-process client. A child that has died, or that has not answered within
the call's timeout plus `REPLY_GRACE_S` (it is then killed), raises `WriterGone`, which is fatal: the
worker stops without committing and its restart starts a fresh child. The child ignores SIGINT/SIGTERM
(shutdown is the parent's job), ends when its pipe closes, and dies with its parent (PR_SET_PDEATHSIG,
`worker.children`).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import numpy as np

from worker.children import PipedChild, die_with_parent

START_TIMEOUT_S = 120.0  # spawn, import pymilvus, connect
REPLY_GRACE_S = 30.0     # beyond the call's own timeout before a silent child is called stuck and killed
VECTOR_FIELD = "embedding"


class WriterError(RuntimeError):
    """The Milvus writer process could not start."""


class WriterGone(RuntimeError):
    """The Milvus writer process died or stopped answering (fatal for the worker)."""

    milvus_kind = "fatal"


class WriteFailed(Exception):
    """A write the child's client failed; `milvus_kind` is the child's `classify()` of the error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.milvus_kind = kind
        self.message = message


def pack_rows(rows: list[dict]) -> dict[str, Any]:
    """`rows` (every row with the same fields, as `build_row` makes them) as columns: one list per field and
    the vectors as one [n, dim] float32 array. Raises ValueError for rows whose fields or vector sizes
    differ (a bug upstream: the sink checks the dimension before writing)."""
    if not rows:
        return {}
    keys = list(rows[0])
    cols: dict[str, Any] = {}
    for k in keys:
        col = [r[k] for r in rows]
        cols[k] = np.stack([np.asarray(v, dtype=np.float32) for v in col]) if k == VECTOR_FIELD else col
    if any(len(r) != len(keys) for r in rows):
        raise ValueError("rows with different fields in one upsert")
    return cols


def unpack_rows(cols: dict[str, Any]) -> list[dict]:
    """The rows `pack_rows` packed (each vector a row view of the array)."""
    if not cols:
        return []
    keys = list(cols)
    return [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]


def _serve(conn, kw: dict[str, Any]) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from pymilvus import MilvusClient

        from worker.sinks.milvus import _message, classify

        client = MilvusClient(**kw)
    except Exception as e:  # noqa: BLE001 - handed to the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ok", os.getpid()))
        while True:
            try:
                op, collection, payload, timeout_s = conn.recv()
            except (EOFError, OSError):  # the parent closed the pipe or died
                return
            try:
                if op == "upsert":
                    client.upsert(collection, unpack_rows(payload), timeout=timeout_s)
                elif op == "delete":
                    client.delete(collection, filter=payload, timeout=timeout_s)
                else:
                    raise ValueError(f"unknown writer op {op!r}")
            except Exception as e:  # noqa: BLE001 - classified and handed to the parent
                conn.send(("err", classify(e), _message(e)))
            else:
                conn.send(("ok", None))
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - ending anyway
            pass


class MilvusWriter(PipedChild):
    """A child process with its own pymilvus client of `uri`; `upsert` and `delete` run there. Calls are
    serialised (one request on the pipe at a time) by the writer's own lock, not the store's: reads on the
    worker's client run beside them."""

    def __init__(self, uri: str, *, token: str | None = None, db_name: str | None = None, tls=None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        from worker.sinks.milvus import client_kwargs, shown

        kw = client_kwargs(uri, token=token, db_name=db_name, tls=tls)
        self.uri = uri
        self._lock = threading.Lock()
        super().__init__(_serve, (kw,), name="notellm-milvus-writer", what=f"the Milvus writer process for {shown(uri)}",
                         error=WriterError, start_timeout_s=start_timeout_s)

    def upsert(self, collection: str, rows: list[dict], timeout_s: float) -> None:
        self._call("upsert", collection, pack_rows(rows), timeout_s)

    def delete(self, collection: str, filter: str, timeout_s: float) -> None:  # noqa: A002 - pymilvus's name
        self._call("delete", collection, filter, timeout_s)

    def _call(self, op: str, collection: str, payload: Any, timeout_s: float) -> None:
        with self._lock:
            try:
                self._conn.send((op, collection, payload, timeout_s))
                if not self._conn.poll(timeout_s + REPLY_GRACE_S):
                    self._stop(0)
                    raise WriterGone(f"the Milvus writer process (pid {self.pid}) did not answer a {op} within "
                                     f"{timeout_s + REPLY_GRACE_S:g} s; killed")
                reply = self._conn.recv()
            except (EOFError, OSError) as e:
                self._proc.join(1)  # the pipe closes as the child dies: let its exit status be known
                raise WriterGone(f"the Milvus writer process (pid {self.pid}, {self.exit_status()}) is gone: "
                                 f"{type(e).__name__}") from None
        if reply[0] != "ok":
            _, kind, message = reply
            raise WriteFailed(kind, message)

    def close(self) -> None:
        """End the child (a call in flight finishes first: it holds the lock) and wait for it."""
        with self._lock:
            super().close()
