"""The encoder engine in a supervised child process, behind the `Encoder` protocol (worker/encoding.py).

Why a child: on a CPU-only host the worker's own Python work (consume, decode, validate, the in-process
milvus-lite upsert, produce tags) holds the GIL, and the encoder's Python parts (the decoding loop) wait
for it; in a child the encoder keeps a core to itself. And a child can be supervised: a call that does
not answer within its deadline is ended by killing the child, and `restart()` starts a fresh one.

The parent tokenises (`PromptTokenizer`, the same code the in-process encoder uses: the batcher needs
the token counts before a batch exists) and ships prompt ids to the child; float32 vectors and the
generated texts come back through a pipe. Errors: a NoteError raised in the child comes back as
NoteError with its index; any other exception in the child, a dead child (EOF) or a missed deadline is
an EngineError.

Lifetime: the child ignores SIGINT/SIGTERM (shutdown is the parent's job: finish the batch, then close
the pipe) and exits when the pipe closes; PR_SET_PDEATHSIG kills it when the parent dies (also by
SIGKILL); an atexit hook closes encoders nobody closed. Every child is started from one long-lived
thread, because PR_SET_PDEATHSIG fires when the *thread* that started the child exits.

`factory` ("module:callable", called as ``factory(model_dir, **kwargs)`` in the child) builds the engine:
by default `OnnxNoteEncoder`; tests inject faulty engines this way.
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - registers its exit hook now, so _close_all (registered later) runs first
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from worker.children import Spawner, die_with_parent
from worker.encoding import EncoderHealth, EngineError, GenerateTask, NoteError
from worker.prompt_tokens import PromptTokenizer
from worker.records import Prompt

DEFAULT_FACTORY = "worker.encoder:OnnxNoteEncoder"


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by "module:callable"."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"factory must look like 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _serve(conn, model_dir: str, factory: str, kwargs: dict, log_cfg: tuple[str, str]) -> None:
    """The child: build the engine, answer ("ok", value) | ("note", (message, index)) | ("err", text)."""
    import signal

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from worker.logs import configure_logging

    configure_logging(*log_cfg)  # stderr, like the parent (never stdout)
    try:
        enc = load_factory(factory)(model_dir, **kwargs)
        info = {"manifest": enc.manifest, "model_version": enc.model_version, "dim": enc.dim,
                "providers": list(enc.providers)}
    except Exception as e:  # noqa: BLE001
        conn.send(("err", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", info))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            conn.send(("ok", None))
            return
        try:
            if op == "warmup":
                reply: tuple = ("ok", enc.warmup(*args))
            elif op == "encode":
                payload, generate = args
                reply = ("ok", enc.encode([Prompt(*p) for p in payload], generate))
            elif op == "limits":  # the engine's sub-batching limits (OnnxNoteEncoder attributes)
                enc.max_batch_notes, enc.max_batch_tokens = (int(x) for x in args)
                reply = ("ok", None)
            else:
                raise ValueError(f"unknown op {op!r}")
        except NoteError as e:
            reply = ("note", (str(e), e.index))
        except Exception as e:  # noqa: BLE001 - the parent turns it into an EngineError
            reply = ("err", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - an unpicklable reply is the engine's bug
            conn.send(("err", f"unsendable reply: {type(e).__name__}: {e}"))


_LIVE: "weakref.WeakSet[ProcessEncoder]" = weakref.WeakSet()
_ATEXIT = False


def _close_all() -> None:
    """At interpreter exit, before multiprocessing joins its children: the child ignores SIGTERM (so
    multiprocessing's terminate() would not end it) and exits only when its pipe closes. Without this, a
    caller that forgot close() would hang at exit."""
    for enc in list(_LIVE):
        enc.close()


class ProcessEncoder:
    """`Encoder` whose engine (`factory(model_dir, **kwargs)`) runs in a child process.

    `encode(..., timeout_s)` kills the child when it does not answer in time; `restart()` replaces the
    child (bounded by `start_timeout_s`, which also bounds start-up and warm-up). One call at a time
    (calls from several threads are serialised); `health()` never blocks."""

    def __init__(self, model_dir, *, factory: str = DEFAULT_FACTORY, log_format: str | None = None,
                 log_level: str | None = None, start_timeout_s: float = 300.0, **kwargs: Any) -> None:
        global _ATEXIT
        self._model_dir = str(model_dir)
        self._factory = factory
        self._kwargs = kwargs
        self._log_cfg = (log_format or os.environ.get("NOTELLM_LOG__FORMAT", "auto"),
                         log_level or os.environ.get("NOTELLM_LOG__LEVEL", "INFO"))
        self._start_timeout_s = float(start_timeout_s)
        self._lock = threading.Lock()
        self._closed = False
        self._proc = None
        self._conn = None
        self._killed: str | None = None  # why the parent ended the current child
        self._deadline: float | None = None  # monotonic deadline of the call in flight
        self.restarts = 0
        if not _ATEXIT:  # after multiprocessing.util's exit hook (imported above), so it runs before it (LIFO)
            atexit.register(_close_all)
            _ATEXIT = True
        _LIVE.add(self)
        with self._lock:
            info = self._spawn()
        self.manifest: dict = info["manifest"]
        self.model_version: str = info["model_version"]
        self.dim: int = info["dim"]
        self.providers: list[str] = info["providers"]
        self.prompt_tokenizer = PromptTokenizer(Path(model_dir), self.manifest)

    # ------------------------------------------------------------------------------------ protocol
    def warmup(self, generate: GenerateTask = "both") -> None:
        self._call("warmup", (generate,), self._start_timeout_s)

    def tokenize(self, note, generate: GenerateTask) -> Prompt:
        return self.prompt_tokenizer.tokenize(note, generate)

    def tokenize_many(self, notes, generate: GenerateTask) -> list[Prompt | NoteError]:
        return self.prompt_tokenizer.tokenize_many(notes, generate)

    def encode(self, prompts: Sequence[Prompt], generate: GenerateTask, *, timeout_s: float | None = None
               ) -> tuple[np.ndarray, list[str | None], list[list[str]]]:
        payload = [(p.category, p.hashtags, p.tokens) for p in prompts]
        return self._call("encode", (payload, generate), timeout_s)

    def set_batch_limits(self, max_batch_notes: int, max_batch_tokens: int) -> None:
        """Set the engine's sub-batching limits (its `max_batch_notes` / `max_batch_tokens`) in the running
        child and for every child `restart()` starts (kept even when the running child is gone)."""
        n, t = int(max_batch_notes), int(max_batch_tokens)
        if n < 1 or t < 1:
            raise ValueError("max_batch_notes and max_batch_tokens must be >= 1")
        with self._lock:
            self._kwargs = {**self._kwargs, "max_batch_notes": n, "max_batch_tokens": t}
            reply = self._exchange("limits", (n, t), self._start_timeout_s)
        self._answer(reply)

    def health(self) -> EncoderHealth:
        if self._closed:
            return EncoderHealth(False, "encoder is closed")
        proc = self._proc
        if proc is None or not proc.is_alive():
            return EncoderHealth(False, self._gone())
        deadline = self._deadline
        if deadline is not None and time.monotonic() > deadline:
            return EncoderHealth(False, "encoder call is past its deadline")
        return EncoderHealth(True)

    def restart(self) -> None:
        """Kill the child, start a new one and warm it up (each step bounded by `start_timeout_s`)."""
        with self._lock:
            if self._closed:
                raise EngineError("encoder is closed")
            self._kill("replaced by restart()")
            info = self._spawn()
            if (info["dim"], info["model_version"]) != (self.dim, self.model_version):
                self._kill("restarted with another model")
                raise EngineError(f"restarted encoder is {info['model_version']} (dim {info['dim']}), "
                                  f"expected {self.model_version} (dim {self.dim})")
            self.providers = info["providers"]
            self._answer(self._exchange("warmup", (), self._start_timeout_s))
            self.restarts += 1
            if self._closed:  # close() ran meanwhile: it could not stop the child it did not see yet
                self._kill("closed during restart()")
                raise EngineError("encoder is closed")

    def close(self) -> None:
        """Stop the child (gracefully when no call is in flight, else by SIGKILL); idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        proc, conn = self._proc, self._conn
        stopped = False
        if self._lock.acquire(timeout=1.0):
            try:
                if proc is not None and proc.is_alive() and conn is not None:
                    conn.send(("stop", ()))
                    stopped = conn.poll(5) and conn.recv() == ("ok", None)
            except Exception:  # noqa: BLE001 - the child is killed below
                pass
            finally:
                self._lock.release()
        if proc is not None:
            if stopped:
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if conn is not None:
            conn.close()

    # ----------------------------------------------------------------------------------- internals
    def _gone(self) -> str:
        if self._killed:
            return f"encoder process was killed: {self._killed}"
        code = None if self._proc is None else self._proc.exitcode
        return f"encoder process exited (code {code})"

    def _spawn(self) -> dict:
        """Start a child and wait for its ("ok", info) (lock held)."""
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self._model_dir, self._factory, self._kwargs, self._log_cfg),
                           daemon=True, name="notellm-encoder")
        self._proc, self._conn, self._killed = proc, conn, None
        try:
            Spawner.start(proc)
        finally:
            child.close()
        status, val = self._receive(self._start_timeout_s)
        if status != "ok":
            self._kill("failed to start")
            raise EngineError(f"encoder process could not start: {val}")
        return val

    def _kill(self, why: str) -> None:
        """End the current child now (lock held or not needed)."""
        proc, conn = self._proc, self._conn
        self._killed = why
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)
        if conn is not None:
            conn.close()

    def _receive(self, timeout_s: float | None) -> tuple[str, Any]:
        conn = self._conn
        try:
            if timeout_s is not None and not conn.poll(timeout_s):
                self._kill(f"no answer within {timeout_s:g} s")
                raise EngineError(f"encoder did not answer within {timeout_s:g} s")
            return conn.recv()
        except (EOFError, OSError) as e:
            if self._proc is not None:
                self._proc.join(1)  # the pipe closed: let its exit code arrive
            raise EngineError(self._gone()) from e

    def _exchange(self, op: str, args: tuple, timeout_s: float | None) -> tuple[str, Any]:
        """Send one request and wait for its reply (lock held)."""
        if self._closed:
            raise EngineError("encoder is closed")
        if self._proc is None or not self._proc.is_alive():
            raise EngineError(self._gone())
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            try:
                self._conn.send((op, args))
            except (EOFError, OSError) as e:
                raise EngineError(self._gone()) from e
            return self._receive(timeout_s)
        finally:
            self._deadline = None

    @staticmethod
    def _answer(reply: tuple[str, Any]) -> Any:
        status, val = reply
        if status == "ok":
            return val
        if status == "note":
            raise NoteError(*val)
        raise EngineError(f"encoder process: {val}")

    def _call(self, op: str, args: tuple, timeout_s: float | None) -> Any:
        with self._lock:
            reply = self._exchange(op, args, timeout_s)
        return self._answer(reply)
