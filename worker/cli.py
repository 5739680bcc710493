"""`notellm worker run | replay | backfill`.

Configuration comes from the environment (`NOTELLM_*`, see worker/config.py) and these flags, which
win over the environment. `run` consumes until SIGTERM/SIGINT and then finishes the batches in
flight, flushes, commits and exits 0 (1 when the final commit failed or the drain ran out of time); a
sink that stays down past its retry budget, or an encoder whose restarts are spent, exits 1 without
committing (the batch is re-read on restart); a collection built for another model exits 2, and so does
Kafka refusing the credentials or a broker certificate the configured CA does not verify (one
`kafka_security_error` line naming the cause, within seconds, not retried), and Milvus TLS that cannot
work (`milvus_config_error`). A Milvus that does not answer at start-up is waited for (`milvus_unreachable`).
SIGTERM/SIGINT are handled from the first moment (start-up included): they set one stop event that
every command checks."""
from __future__ import annotations

import argparse
import signal
import threading



def _int_or_auto(text: str) -> int | str:
    """argparse type for a batch limit: "auto" or an integer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None

def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (flags override NOTELLM_* environment variables)")
    g.add_argument("--bootstrap", dest="bootstrap_servers", help="Kafka bootstrap servers")
    g.add_argument("--topic", dest="topic_notes", help="topic of published notes (notes.published)")
    g.add_argument("--tags-topic", dest="topic_tags")
    g.add_argument("--dlq-topic", dest="topic_dlq")
    g.add_argument("--group", dest="group_id", help="consumer group")
    g.add_argument("--milvus-uri", dest="milvus_uri", help="milvus-lite db path or http(s)://host:19530")
    g.add_argument("--collection", dest="collection", help="Milvus collection alias (notes)")
    g.add_argument("--model", dest="model_dir", help="ONNX model package directory")
    g.add_argument("--generate", choices=["none", "category", "hashtags", "both"])
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--threads", dest="intra_op_threads", type=int, help="ONNX Runtime intra-op threads (0 = default)")
    g.add_argument("--max-batch-notes", type=_int_or_auto, help='an integer, or "auto" (calibrated at start-up)')
    g.add_argument("--max-batch-tokens", type=_int_or_auto, help='an integer, or "auto" (follows the notes limit)')
    g.add_argument("--linger-ms", type=int)
    g.add_argument("--http-port", type=int, help="metrics/health/similar port (0 = none)")
    g.add_argument("--log-format", choices=["auto", "json", "console"])
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="consume notes.published until SIGTERM/SIGINT")
    _common(run)
    rep = sub.add_parser("replay", help="re-process a range of notes.published with the same code path")
    _common(rep)
    frm = rep.add_mutually_exclusive_group(required=True)
    frm.add_argument("--from-timestamp", help="ISO 8601 time (UTC if no zone): first message at or after it")
    frm.add_argument("--from-offsets", help="partition:offset,... (partitions not named are not replayed)")
    rep.add_argument("--until", help="ISO time or partition:offset,... (exclusive); default: the end at start-up")
    rep.add_argument("--resend-dead-letters", action="store_true",
                     help="dead-letter malformed records again (default: skip them, the live worker already did)")
    bf = sub.add_parser("backfill", help="build a collection for a new model from the topic's start, then switch the alias")
    _common(bf)
    bf.add_argument("--new-model", dest="new_model", help="(alias of --model)")
    rd = sub.add_parser("redrive", help="re-publish dead letters' original records to notes.published")
    _common(rd)
    from worker import redrive

    redrive.configure(rd)


def settings_from(args):
    from worker.config import load_settings

    a = vars(args)
    over = {
        "kafka": {k: a.get(k) for k in ("bootstrap_servers", "topic_notes", "topic_tags", "topic_dlq", "group_id")},
        "milvus": {"uri": a.get("milvus_uri"), "collection": a.get("collection")},
        "model": {"dir": a.get("model_dir") or a.get("new_model"), "generate": a.get("generate"),
                  "device": a.get("device"), "intra_op_threads": a.get("intra_op_threads")},
        "batch": {"max_batch_notes": a.get("max_batch_notes"), "max_batch_tokens": a.get("max_batch_tokens"),
                  "linger_ms": a.get("linger_ms")},
        "http": {"port": a.get("http_port")},
        "log": {"format": a.get("log_format"), "level": a.get("log_level")},
    }
    return load_settings(over)


def stop_on_signals() -> threading.Event:
    """One stop event for the whole command, set by SIGTERM/SIGINT (graceful: the command finishes what
    is in flight). Installed first thing in `run`, before anything slow, so a signal during start-up ends
    cleanly (exit 0) instead of by the default handler (143)."""
    stop = threading.Event()

    def handler(signum, _frame):
        stop.set()
        from worker import logs

        if logs.is_configured():
            logs.get_logger("notellm.worker").info("signal_received", signal=signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def run(args) -> int:
    stop = stop_on_signals()
    from worker.logs import configure_logging, get_logger

    s = settings_from(args)
    configure_logging(s.log.format, s.log.level)
    get_logger("notellm.worker").info("command_starting", command=f"worker {args.action}", stop_requested=stop.is_set())
    if args.action == "run":
        from worker.app import WorkerApp

        return WorkerApp(s, stop=stop).run()
    if args.action == "replay":
        from worker.replay import replay

        return replay(s, from_timestamp=args.from_timestamp, from_offsets=args.from_offsets, until=args.until,
                      group=args.group_id, resend_dead_letters=args.resend_dead_letters, stop=stop)
    if args.action == "backfill":
        from worker.backfill import backfill

        return backfill(s, stop=stop)
    if args.action == "redrive":
        from worker import redrive

        return redrive.run(args, settings=s, stop=stop)
    return 2
