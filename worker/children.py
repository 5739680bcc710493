"""Supervised child processes (the encoder's, milvus-lite's, the Milvus writer's): how they are started and
how they end.

- `die_with_parent()`, called first in the child: PR_SET_PDEATHSIG, so the kernel kills the child when
  its parent dies, SIGKILL included (Linux; elsewhere the child's closed pipe still ends it).
- `Spawner.start(proc)` starts a `multiprocessing` process from one daemon thread that lives as long as the
  process: PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so a child started from
  a short-lived thread (a restart on a pipeline thread) would be killed when that thread ends.
- `PipedChild`: a child that serves one pipe (milvus-lite's server, the Milvus writer). It answers
  ("ok", value) or ("err", text) once ready, ignores SIGINT/SIGTERM (shutdown is the parent's job) and
  ends when the pipe closes; `close()` closes the pipe and waits for it (then kills it). Children nobody
  closed are closed at interpreter exit, before multiprocessing joins them (they ignore the SIGTERM it
  sends and would be waited for forever).
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - registers its exit hook now, so _close_all (registered later) runs first
import queue
import signal
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable


def die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the closed pipe still ends the child
        pass


class Spawner:
    """Starts children from one daemon thread that lives as long as the process (see the module)."""

    _lock = threading.Lock()
    _q: "queue.SimpleQueue[tuple[Any, Future]] | None" = None

    @classmethod
    def start(cls, proc) -> None:
        with cls._lock:
            if cls._q is None:
                cls._q = queue.SimpleQueue()
                threading.Thread(target=cls._run, args=(cls._q,), name="notellm-spawner", daemon=True).start()
        done: Future = Future()
        cls._q.put((proc, done))
        done.result()

    @staticmethod
    def _run(q) -> None:
        while True:
            proc, done = q.get()
            try:
                proc.start()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)
            else:
                done.set_result(None)


STOP_TIMEOUT_S = 15.0  # PipedChild.close(): the child's graceful end, then it is killed

_LIVE: "weakref.WeakSet[PipedChild]" = weakref.WeakSet()


def _close_all() -> None:
    for child in list(_LIVE):
        child.close()


atexit.register(_close_all)


class PipedChild:
    """A supervised child process serving one pipe: `target(conn, *args)` runs in it (it should call
    `die_with_parent()` and ignore SIGINT/SIGTERM first), answers ("ok", value) or ("err", text) when ready,
    then serves until the pipe closes. Start-up failures raise `error` with `what` in the message; `ready`
    is the value of the "ok"."""

    def __init__(self, target: Callable[..., None], args: tuple, *, name: str, what: str,
                 error: type[Exception], start_timeout_s: float) -> None:
        self.what = what
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(child, *args), daemon=True, name=name)
        try:
            Spawner.start(self._proc)
        finally:
            child.close()
        try:
            if not self._conn.poll(start_timeout_s):
                raise error(f"{what} did not start within {start_timeout_s:g} s")
            status, val = self._conn.recv()
        except EOFError:
            self._stop(0)
            raise error(f"{what} exited while starting ({self.exit_status()})") from None
        except BaseException:
            self._stop(0)
            raise
        if status != "ok":
            self._stop(0)
            raise error(f"{what} could not start: {val}")
        self.ready = val
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
        """Close the pipe (the child ends its work and exits) and wait for it; kill it after STOP_TIMEOUT_S."""
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
