"""Structured logging, set up once: JSON lines in production (or when stdout is not a terminal),
readable key=value lines on a terminal. Every error log carries note_id/partition/offset where known."""
from __future__ import annotations

import logging
import sys

import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever sys.stderr is *now*. Loggers are cached on first use; binding the stream
    object at configure time would keep writing to a replaced (and maybe closed) stream, e.g. under
    pytest's per-test capture or after a daemon redirects its output."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """Idempotent. fmt: "json", "console" or "auto" (console on a TTY, JSON otherwise)."""
    global _configured
    if _configured:
        return
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    # Libraries that narrate at INFO on the root logger (milvus-lite's faiss loader: "Could not load
    # library with AVX512 support ...") would put non-JSON noise between our JSON lines.
    for noisy in ("faiss", "faiss.loader", "milvus_lite"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # pymilvus logs every failed RPC at ERROR with a traceback; the sinks classify and report the same
    # failure themselves (sink_retry, pipeline_failed), so its own lines would only add tracebacks.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )
    _configured = True


def is_configured() -> bool:
    return _configured


def get_logger(name: str | None = None, **bound):
    return structlog.get_logger(name, **bound) if name else structlog.get_logger(**bound)
