"""A milvus-lite database served from a supervised child process (`NOTELLM_MILVUS__LITE_PROCESS=true`).

Why: milvus-lite 3.x is pure Python. Embedded (the default), pymilvus starts its gRPC server in the
caller's process, so every row it applies holds the GIL that the worker's polling thread (decode,
prompts) and sink thread (row packing) need too. With an encoder as fast as a GPU's, that shared GIL is
what limits one worker process (gpu-check's `worker/embed` phase measures it, per thread). Served from a
child, the database applies rows on another core. The worker then talks to it as to a server, over
gRPC on 127.0.0.1; everything milvus-lite-specific (one process per db, AUTOINDEX) stays as it is.

The child (`_serve`) opens the db (milvus-lite takes an exclusive LOCK on it; while another process
still holds it, e.g. a predecessor being killed, it retries for up to `lock_wait_s`), serves it on a free
port of 127.0.0.1, answers ("ok", port) or ("err", text) on its pipe, and serves until that pipe closes:
then it stops the server (calls in flight finish) and closes the db, which releases the LOCK. It ignores
SIGINT/SIGTERM (shutdown is the parent's job) and dies with its parent (PR_SET_PDEATHSIG: a SIGKILLed
worker takes its db server with it, as it does embedded), started from one long-lived thread
(`worker.children`).

A dead child is not a transient fault: `LiteServer.alive()` says so, and `MilvusStore` turns the failed
call into `LiteServerGone`, which its classifier calls fatal, so the worker stops without committing and
its restart starts a fresh child.
"""
from __future__ import annotations

import os
import signal
import time

from worker.children import PipedChild, die_with_parent

START_TIMEOUT_S = 120.0  # import + open (a large db replays its WAL)
LOCK_WAIT_S = 30.0       # how long a new child waits for a predecessor's LOCK


class LiteServerError(RuntimeError):
    """The milvus-lite server process could not start."""


class LiteServerGone(RuntimeError):
    """The milvus-lite server process exited while the store was in use (fatal for the worker)."""


def _serve(conn, data_dir: str, lock_wait_s: float) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from milvus_lite.adapter.grpc.server import start_server_in_thread
        from milvus_lite.exceptions import DataDirLockedError

        deadline = time.monotonic() + lock_wait_s
        while True:
            try:
                server, db, port = start_server_in_thread(data_dir, host="127.0.0.1", port=0)
                break
            except DataDirLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
    except Exception as e:  # noqa: BLE001 - handed to the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ok", port))
        conn.recv()  # nothing is ever sent: returns (EOFError) when the parent closes the pipe or dies
    except (EOFError, OSError):
        pass
    finally:
        server.stop(grace=5).wait()
        db.close()


class LiteServer(PipedChild):
    """One milvus-lite db served by a child process; `uri` is what a pymilvus client connects to.
    `close()` stops the server (calls in flight finish) and waits for the db to close."""

    def __init__(self, data_dir: str, *, start_timeout_s: float = START_TIMEOUT_S,
                 lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.data_dir = os.path.abspath(data_dir)
        super().__init__(_serve, (self.data_dir, lock_wait_s), name="notellm-milvus-lite",
                         what=f"the milvus-lite server for {self.data_dir}", error=LiteServerError,
                         start_timeout_s=start_timeout_s)
        self.port = int(self.ready)
        self.uri = f"http://127.0.0.1:{self.port}"
