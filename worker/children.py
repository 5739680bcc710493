"""Supervised child processes (the encoder's, milvus-lite's): how they are started and how they end.

- `die_with_parent()`, called first in the child: PR_SET_PDEATHSIG, so the kernel kills the child when
  its parent dies, SIGKILL included (Linux; elsewhere the child's closed pipe still ends it).
- `Spawner.start(proc)` starts a `multiprocessing` process from one daemon thread that lives as long as the
  process: PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so a child started from
  a short-lived thread (a restart on a pipeline thread) would be killed when that thread ends.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any


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
