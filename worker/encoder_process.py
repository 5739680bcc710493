"""The ONNX encoder in a child process, behind the same `Encoder` protocol.

Why: on a CPU-only host the worker's own Python work (consume, decode, validate, count prompt tokens,
the in-process milvus-lite upsert, produce tags) holds the GIL, and the encoder's Python parts
(tokenisation, decoding loop) wait for it. In a child process the encoder keeps a core to itself and
the polling/sink work runs beside it in parallel, not interleaved. Notes go to the child as
(title, content, topic) tuples and float32 vectors come back through a pipe: ~100 µs per batch.

The parent counts prompt tokens itself (the batcher needs them before a batch exists) with a
tokenizer-only PromptEncoder built from the same manifest: the same code path as the encoder's
`prompt_tokens`. The child exits when the parent's end of the pipe closes (also on SIGKILL of the
parent: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np


from worker.encoding import EncoderUnavailable


class EncoderProcessDied(EncoderUnavailable):
    pass


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the closed pipe still ends the child
        pass


def _serve(conn, model_dir: str, kwargs: dict, log_cfg: tuple[str, str]) -> None:
    import signal

    _die_with_parent()
    # Shutdown is the parent's job (it finishes the batch, then closes the pipe): a Ctrl-C or SIGTERM
    # sent to the whole process group must not kill the encoder under an in-flight batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from worker.logs import configure_logging

    configure_logging(*log_cfg)  # stderr, like the parent (never stdout)
    from notellm.prompts import NoteText
    from worker.encoder import OnnxNoteEncoder

    try:
        enc = OnnxNoteEncoder(model_dir, **kwargs)
    except Exception as e:  # noqa: BLE001
        conn.send(("err", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", {"manifest": enc.manifest, "model_version": enc.model_version, "dim": enc.dim,
                      "providers": list(enc.providers)}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "warmup":
                res = enc.warmup()
            elif op == "embed":
                res = enc.embed([NoteText(*t) for t in args[0]])
            elif op == "embed_and_generate":
                res = enc.embed_and_generate([NoteText(*t) for t in args[0]], args[1])
            elif op == "stop":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown op {op!r}")
            conn.send(("ok", res))
        except Exception as e:  # noqa: BLE001 - the parent decides (encode_batch isolates bad notes)
            conn.send(("err", f"{type(e).__name__}: {e}"))


def token_counter(model_dir: Path, manifest: dict):
    """prompt_tokens(note) without an ONNX session: tokenizer + prompt config from the manifest."""
    from tokenizers import Tokenizer

    from notellm.prompts import PromptConfig, PromptEncoder

    tok = Tokenizer.from_file(str(Path(model_dir) / manifest.get("tokenizer", "tokenizer.json")))
    tok.no_padding()
    tok.no_truncation()
    pe = PromptEncoder(tok, PromptConfig.from_dict(manifest["prompt"]),
                       eos_token_id=int(manifest["special_tokens"]["eos"]["id"]))

    def count(note) -> int:
        e = pe.encode(note, "category")
        return len(e.prefix_ids) + len(e.continuation_ids)

    return count


_LIVE: "weakref.WeakSet[ProcessEncoder]" = weakref.WeakSet()
_ATEXIT = False


def _close_all() -> None:
    """At interpreter exit, before multiprocessing joins its children: the child ignores SIGTERM (so
    multiprocessing's terminate() would not end it) and exits only when its pipe closes. Without this, a
    caller that forgot close() would hang at exit."""
    for enc in list(_LIVE):
        enc.close()


class ProcessEncoder:
    def __init__(self, model_dir, *, log_format: str | None = None, log_level: str | None = None, **kwargs: Any) -> None:
        import os

        log_cfg = (log_format or os.environ.get("NOTELLM_LOG__FORMAT", "auto"),
                   log_level or os.environ.get("NOTELLM_LOG__LEVEL", "INFO"))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, str(model_dir), kwargs, log_cfg), daemon=True,
                                 name="notellm-encoder")
        self._proc.start()
        child.close()
        global _ATEXIT
        if not _ATEXIT:  # registered after multiprocessing's own exit hook, so it runs before it (LIFO)
            atexit.register(_close_all)
            _ATEXIT = True
        _LIVE.add(self)
        self._closed = False
        self._lock = threading.Lock()
        info = self._recv()
        self.manifest: dict = info["manifest"]
        self.model_version: str = info["model_version"]
        self.dim: int = info["dim"]
        self.providers: list[str] = info["providers"]
        self._count = token_counter(Path(model_dir), self.manifest)

    def _recv(self):
        try:
            status, val = self._conn.recv()
        except (EOFError, OSError) as e:
            raise EncoderProcessDied(f"encoder process exited (code {self._proc.exitcode})") from e
        if status == "err":
            raise RuntimeError(f"encoder process: {val}")
        return val

    def _call(self, op: str, *args):
        with self._lock:
            try:
                self._conn.send((op, args))
            except (BrokenPipeError, OSError) as e:
                raise EncoderProcessDied(f"encoder process exited (code {self._proc.exitcode})") from e
            return self._recv()

    @staticmethod
    def _tuples(notes: Sequence[Any]) -> list[tuple]:
        return [(n.title, n.content, n.topic) for n in notes]

    def warmup(self) -> None:
        self._call("warmup")

    def prompt_tokens(self, note) -> int:
        return self._count(note)

    def embed(self, notes) -> np.ndarray:
        return self._call("embed", self._tuples(notes))

    def embed_and_generate(self, notes, task):
        return self._call("embed_and_generate", self._tuples(notes), task)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call("stop")
        except Exception:  # noqa: BLE001
            pass
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
