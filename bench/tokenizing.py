"""The polling thread's tokenisation: one note at a time (`tokenize`) vs one batched pass per poll
(`tokenize_many`, what the worker does), same notes, same process, interleaved.

    python bench/tokenizing.py [--package DIR] [--data amazon|mind] [--data-root DIR] [--notes 2048]
                               [--polls 64,512] [--repeats 3]

Prints one JSON document: ms per note and notes/s for each mode and generate task ("category": the
embedding prompt only; "both": the hashtag prompt too), and the ratio per-note / batched. Where the
tokenizers library has ``encode_batch_fast`` (no offsets; what the adapter uses), the batched pass is also
timed through ``encode_batch`` (offsets computed and dropped), interleaved with it, wall and CPU time:
``offsets_cost`` = with offsets / without. The best of
``--repeats`` is kept for each (other processes share the CPU). Every batched result is checked equal to
the per-note one before it is timed. The tokenizers library runs a batch on all cores, so the ratio grows
with the core count (`cpus` is in the output). This bounds how many notes/s one worker's polling thread
can feed the encoder: on an H200 the per-note path capped one process at ~1,900 notes/s against ORT's
~3,600 embed-only (docs/results/gpu/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def load_notes(kind: str, n: int, root: Path = DATA) -> list:
    from notellm.data import load_dataset
    from notellm.prompts import NoteText

    path = root / ("amazon-scientific" if kind == "amazon" else "mind-small-sample")
    ds = load_dataset(path)
    notes = [NoteText(title=x.title, content=x.content, topic=getattr(x, "topic", None)) for x in ds.notes.values()]
    if not notes:
        raise SystemExit(f"no notes in {path}")
    return (notes * (n // len(notes) + 1))[:n]


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_pair(fns, repeats: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds for each of `fns`, run interleaved `repeats` times, best of each."""
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            best[i] = (min(best[i][0], time.perf_counter() - t), min(best[i][1], time.process_time() - c))
    return best


def package_and_data_args(ap: argparse.ArgumentParser, notes: int) -> None:
    """--package, --data, --data-root and --notes, as the tokenizer benches (this one, bench/polling.py) take them."""
    ap.add_argument("--package", default=str(REPO / ".local/models/notellm-default-onnx"),
                    help="an exported package (notellm.json + tokenizer.json); `scripts/demo` writes the default")
    ap.add_argument("--data", choices=["amazon", "mind"], default="amazon")
    ap.add_argument("--data-root", default=str(DATA), help="the folder holding the data sets (default ../shared/data)")
    ap.add_argument("--notes", type=int, default=notes)


def package_dir(path: str) -> Path:
    """`path` as an exported package's folder, or exit saying there is none."""
    pkg = Path(path)
    if not (pkg / "notellm.json").exists():
        raise SystemExit(f"{pkg}: no exported package (run scripts/demo once, or `notellm export`)")
    return pkg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    package_and_data_args(ap, notes=2048)
    ap.add_argument("--polls", default="64,512", help="notes per poll (the worker polls up to its batch size)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from worker.prompt_tokens import PromptTokenizer

    pkg = package_dir(args.package)
    pt = PromptTokenizer(pkg, json.loads((pkg / "notellm.json").read_text()))
    notes = load_notes(args.data, args.notes, Path(args.data_root))
    polls = [int(x) for x in args.polls.split(",") if x]
    rows = []
    for gen in ("category", "both"):
        ref = [pt.tokenize(n, gen) for n in notes]
        for size in polls:
            chunks = [notes[i:i + size] for i in range(0, len(notes), size)]
            got = [p for c in chunks for p in pt.tokenize_many(c, gen)]
            if got != ref:
                raise SystemExit(f"batched prompts differ from the per-note ones ({gen}, poll {size})")
            one = best_of(lambda: [pt.tokenize(n, gen) for n in notes], args.repeats)
            many = best_of(lambda: [pt.tokenize_many(c, gen) for c in chunks], args.repeats)
            row = {"generate": gen, "poll_notes": size,
                   "per_note_ms": round(1000 * one / len(notes), 4),
                   "batched_ms": round(1000 * many / len(notes), 4),
                   "per_note_notes_s": round(len(notes) / one), "batched_notes_s": round(len(notes) / many),
                   "ratio": round(one / many, 2)}
            t = pt.prompts.tok
            if t.fast_batches:  # the same pass with the offsets computed (and dropped), interleaved
                def run(fast: bool):
                    t.fast_batches = fast
                    try:
                        return [p for c in chunks for p in pt.tokenize_many(c, gen)]
                    finally:
                        t.fast_batches = True

                if run(False) != ref:
                    raise SystemExit(f"prompts through encode_batch differ ({gen}, poll {size})")
                (fw, fc), (sw, sc) = best_pair([lambda: run(True), lambda: run(False)], args.repeats)
                row["offsets_cost"] = {"without_ms": round(1000 * fw / len(notes), 4),
                                       "with_ms": round(1000 * sw / len(notes), 4),
                                       "without_cpu_ms": round(1000 * fc / len(notes), 4),
                                       "with_cpu_ms": round(1000 * sc / len(notes), 4),
                                       "wall": round(sw / fw, 2), "cpu": round(sc / fc, 2)}
            rows.append(row)
    print(json.dumps({"bench": "tokenize", "package": str(pkg), "data": args.data, "notes": len(notes),
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "mean_prompt_tokens": round(sum(p.tokens for p in ref) / len(ref), 1),
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
