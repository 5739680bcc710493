"""`notellm embed --model DIR "title" "content" [--topic T] [--task both]`: embed one note with an ONNX
package (no torch) and print the first values of its vector and the generated category / hashtags."""
from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="ONNX package directory (from `notellm export`)")
    parser.add_argument("title")
    parser.add_argument("content")
    parser.add_argument("--topic", default=None)
    parser.add_argument("--task", choices=["none", "category", "hashtags", "both"], default="both")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--values", type=int, default=8, help="how many vector values to print")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    import time

    from notellm.prompts import NoteText
    from worker.encoder import OnnxNoteEncoder
    from worker.logs import configure_logging

    configure_logging("console", "WARNING")
    enc = OnnxNoteEncoder(args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    note = NoteText(title=args.title, content=args.content, topic=args.topic)
    t0 = time.perf_counter()
    if args.task == "none":
        vec = enc.embed([note])
        cats, tags = [None], [[]]
    else:
        vec, cats, tags = enc.embed_and_generate([note], args.task)
    ms = (time.perf_counter() - t0) * 1000
    v = vec[0]
    if args.json:
        print(json.dumps({"model_version": enc.model_version, "dim": enc.dim, "vector": [float(x) for x in v],
                          "category": cats[0], "hashtags": tags[0], "ms": round(ms, 1)}, ensure_ascii=False))
        return 0
    head = ", ".join(f"{x:+.4f}" for x in v[: args.values])
    print(f"model_version {enc.model_version}  dim {enc.dim}  providers {enc.providers}")
    print(f"vector[:{args.values}] [{head}, ...]  |v|={float((v * v).sum()) ** 0.5:.4f}")
    if args.task in ("category", "both"):
        print(f"category {cats[0]!r}")
    if args.task in ("hashtags", "both"):
        print(f"hashtags {tags[0]!r}")
    print(f"{ms:.0f} ms")
    return 0
