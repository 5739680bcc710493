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

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - registers its exit hook now, so _close_all (registered later) runs first
import os
import signal
import time
import weakref

from worker.children import Spawner, die_with_parent

START_TIMEOUT_S = 120.0  # import + open (a large db replays its WAL)
LOCK_WAIT_S = 30.0       # how long a new child waits for a predecessor's LOCK
STOP_TIMEOUT_S = 15.0    # close(): the child's graceful stop, then it is killed


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


_LIVE: "weakref.WeakSet[LiteServer]" = weakref.WeakSet()


def _close_all() -> None:
    """At interpreter exit, before multiprocessing joins its children (the child ignores the SIGTERM it
    sends and ends only when its pipe closes): close the servers nobody closed."""
    for server in list(_LIVE):
        server.close()


atexit.register(_close_all)


class LiteServer:
    """One milvus-lite db served by a child process; `uri` is what a pymilvus client connects to."""

    def __init__(self, data_dir: str, *, start_timeout_s: float = START_TIMEOUT_S,
                 lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.data_dir = os.path.abspath(data_dir)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.data_dir, lock_wait_s), daemon=True,
                                 name="notellm-milvus-lite")
        try:
            Spawner.start(self._proc)
        finally:
            child.close()
        try:
            if not self._conn.poll(start_timeout_s):
                raise LiteServerError(f"the milvus-lite server for {self.data_dir} did not start within "
                                      f"{start_timeout_s:g} s")
            status, val = self._conn.recv()
        except EOFError:
            self._stop(0)
            raise LiteServerError(f"the milvus-lite server for {self.data_dir} exited while starting "
                                  f"({self.exit_status()})") from None
        except BaseException:
            self._stop(0)
            raise
        if status != "ok":
            self._stop(0)
            raise LiteServerError(f"the milvus-lite server for {self.data_dir} could not start: {val}")
        self.port = int(val)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.pid = self._proc.pid
        _LIVE.add(self)

    def alive(self) -> bool:
        return self._proc.is_alive()

    def exit_status(self) -> str:
        code = self._proc.exitcode
        if code is None:
            return "running"
        return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        """Stop the server (calls in flight finish) and wait for the db to close; kill it after
        STOP_TIMEOUT_S."""
        self._stop(STOP_TIMEOUT_S)

    def _stop(self, wait_s: float) -> None:
        _LIVE.discard(self)
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(wait_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
