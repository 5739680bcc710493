"""The `notellm` console script.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`; the module
is imported only when its subcommand runs, so `notellm --help` (and the worker's commands) work in an
environment without torch. Command modules keep heavy imports inside `run`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("worker.cli", "run / replay / backfill the streaming worker (Kafka -> ONNX -> Milvus + tags)"),
    "demo": ("worker.demo", "end-to-end demo: local Kafka + milvus-lite + SmolLM2 ONNX worker on real notes"),
    "similar": ("worker.similar", "print the nearest notes of a note id (via a running worker or Milvus)"),
    "smoke": ("worker.smoke", "check the local stack: Kafka round trip + milvus-lite upsert/search"),
    "export": ("export.cli", "export a NoteLLM checkpoint to a validated ONNX package"),
    "embed": ("export.embed_cli", "embed one note with an ONNX package and print its vector and tags"),
    "train": ("notellm.train", "train NoteLLM (GCL + CSFT) on co-click data"),
    "eval": ("notellm.evaluate", "evaluate NoteLLM and baselines on co-click pairs (table + plot)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="notellm",
        description="notellm-stream: NoteLLM embeddings and tags for new notes, Kafka -> ONNX -> Milvus.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # gRPC's C core (pymilvus's transport) writes its own INFO lines to stderr, e.g. each failed TLS
    # handshake, between the JSON log lines; errors reach the logs through pymilvus's exceptions. Set
    # GRPC_VERBOSITY yourself to see them. Before anything imports grpc (child processes inherit it).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            top.print_usage(sys.stderr)
            print(f"notellm: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"notellm {name}: needs the missing package {e.name!r} "
              f"(install the matching extra, e.g. `pip install 'notellm-stream[model]'`)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"notellm {name}", description=help_)
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    from pydantic import ValidationError

    from worker.sinks.milvus import MilvusConfigError, MilvusUnreachable

    try:
        return int(module.run(args) or 0)
    except ValidationError as e:
        if e.title != "Settings":
            raise
        from worker.config import settings_error_text

        print(f"notellm {name}: {settings_error_text(e)} (see docs/configuration.md)", file=sys.stderr)
        return 2
    except MilvusConfigError as e:  # a TLS file missing, a certificate not trusted: retrying cannot help
        print(f"notellm {name}: {e} (check NOTELLM_MILVUS__URI and NOTELLM_MILVUS__TLS_*)", file=sys.stderr)
        return 2
    except MilvusUnreachable as e:  # e.g. `backfill` started while Milvus is down: its Job retries
        print(f"notellm {name}: {e} (is it running? check NOTELLM_MILVUS__URI)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
