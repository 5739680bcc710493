"""The worker's polling thread, stage by stage: what one poll of real notes costs it per note.

    python bench/polling.py [--package DIR] [--data amazon|mind] [--data-root DIR] [--notes 4096]
                            [--poll 512] [--generate category|both] [--repeats 5] [--gil-load]

The polling thread (worker/app.py's loop) takes each poll's messages through three stages, all in the
worker's own process: ``decode`` (worker/decode.py: UTF-8, JSON, note.v1, id rules), ``tokenize``
(`encoding.prepare_many`: one batched tokenizer pass per poll, each note given its prompt) and ``batch``
(the consumed-records metric and `Batcher.add`). This runs the same functions on real notes as Kafka
messages (`confluent_kafka.Message`, the type the consumer returns; no broker: the bench starts after the
poll) and prints one JSON document with, per stage, µs per note of:

- ``thread_cpu_us``: the polling thread's own CPU. Python holds the GIL for it, so it is what the
  polling thread takes from the worker's other GIL users (the sink thread, the encode thread);
- ``wall_us``: the stage's wall time (the tokenizer's native pass runs on all cores, GIL released);
- ``process_cpu_us``: every thread's CPU while the stage ran (the tokenizer's native threads included).

``ceiling_notes_s`` = 10^6 / the stages' summed wall µs: what one polling thread can feed the encoder
when nothing else holds the GIL. ``--gil-load`` runs a thread of pure Python beside it all along, as the
worker's sink and encode threads hold the GIL beside its polling thread: then every return from a native
call (the tokenizer's passes) waits for the GIL, and the wall shows what each such call costs. The best
pass of ``--repeats`` is kept (other processes share the CPU).
Before timing, every prepared prompt is checked equal to the one `PromptTokenizer.tokenize` gives the
note alone. On an H200 host the worker's polling thread held the GIL ~81 µs a note (docs/results/gpu,
run 9); the embed-only encoder wants ~8,800 notes/s there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

STAGES = ("decode", "tokenize", "batch")


def messages(kind: str, n: int, root: Path, topic: str = "notes") -> list:
    """`n` real notes as the note.v1 records a producer writes, as consumed messages (partition 0)."""
    import confluent_kafka

    from notellm.data import load_dataset

    path = root / ("amazon-scientific" if kind == "amazon" else "mind-small-sample")
    items = list(load_dataset(path).notes.values())
    if not items:
        raise SystemExit(f"no notes in {path}")
    out = []
    for i in range(n):
        x = items[i % len(items)]
        note_id = f"{x.id}#{i}"
        doc = {"note_id": note_id, "title": x.title, "content": x.content, "author_id": f"author-{i % 97}",
               "published_at": 1_764_000_000_000 + i}
        if getattr(x, "topic", None):
            doc["topic"] = x.topic
        out.append(confluent_kafka.Message(topic=topic, partition=0, offset=i, key=note_id.encode(),
                                           value=json.dumps(doc, ensure_ascii=False).encode(),
                                           timestamp=(1, doc["published_at"])))
    return out


def one_pass(msgs: list, poll: int, tokenizer, generate: str, max_bytes: int) -> dict[str, list[float]]:
    """The polling thread's stages over `msgs`, one poll of `poll` messages at a time, as worker/app.py
    runs them; per stage [thread CPU, wall, process CPU] seconds summed over the polls."""
    from worker.batcher import Batcher
    from worker.decode import decode
    from worker.encoding import prepare_many
    from worker.metrics import Metrics
    from worker.records import Note

    m = Metrics()
    batcher = Batcher(max_notes=2048, max_tokens=1 << 30, linger_s=3600.0)
    spent = {s: [0.0, 0.0, 0.0] for s in STAGES}
    clock = (time.thread_time, time.perf_counter, time.process_time)

    def tick(stage: str, before: tuple[float, float, float]) -> tuple[float, float, float]:
        now = tuple(f() for f in clock)
        for k in range(3):
            spent[stage][k] += now[k] - before[k]
        return now

    for i in range(0, len(msgs), poll):
        t = tuple(f() for f in clock)
        records = [decode(msg, max_bytes) for msg in msgs[i:i + poll]]
        t = tick("decode", t)
        prepared = iter(prepare_many(tokenizer, [r for r in records if isinstance(r, Note)], generate, "notes"))
        t = tick("tokenize", t)
        for kind, n in Counter(type(r).__name__.lower() for r in records).items():
            m.consumed.labels(kind=kind).inc(n)
        for r in records:
            if isinstance(r, Note):
                r = next(prepared)
            batcher.add(r, 0.0, True)
        tick("batch", t)
    return spent


def _hold_gil(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(2000):
            x += i


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default=str(REPO / ".local/models/notellm-default-onnx"),
                    help="an exported package (notellm.json + tokenizer.json); `scripts/demo` writes the default")
    ap.add_argument("--data", choices=["amazon", "mind"], default="amazon")
    ap.add_argument("--data-root", default=str(DATA), help="the folder holding the data sets (default ../shared/data)")
    ap.add_argument("--notes", type=int, default=4096)
    ap.add_argument("--poll", type=int, default=512, help="messages per poll (the worker polls up to its batch size)")
    ap.add_argument("--generate", choices=["category", "both"], default="category",
                    help="category: the embedding prompt only (embed-only and category workers); "
                         "both: the hashtag prompt too")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gil-load", action="store_true", help="a thread of pure Python holds the GIL beside the stages")
    args = ap.parse_args()
    if args.notes < 1 or args.poll < 1 or args.repeats < 1:
        raise SystemExit("--notes, --poll and --repeats must be >= 1")

    from worker.decode import decode
    from worker.encoding import prepare_many
    from worker.prompt_tokens import PromptTokenizer
    from worker.records import Note

    pkg = Path(args.package)
    if not (pkg / "notellm.json").exists():
        raise SystemExit(f"{pkg}: no exported package (run scripts/demo once, or `notellm export`)")
    pt = PromptTokenizer(pkg, json.loads((pkg / "notellm.json").read_text()))
    msgs = messages(args.data, args.notes, Path(args.data_root))
    max_bytes = 1 << 20
    notes = [decode(msg, max_bytes) for msg in msgs]
    bad = [r for r in notes if not isinstance(r, Note)]
    if bad:
        raise SystemExit(f"{len(bad)} of the bench's records did not decode: {bad[0]}")
    got = [p for i in range(0, len(notes), args.poll)
           for p in prepare_many(pt, notes[i:i + args.poll], args.generate, "notes")]
    if [n.prompt for n in got] != [pt.tokenize(n, args.generate) for n in notes]:
        raise SystemExit("the batched prompts differ from the per-note ones")

    one_pass(msgs[:args.poll], args.poll, pt, args.generate, max_bytes)  # warm-up
    stop = threading.Event()
    if args.gil_load:
        threading.Thread(target=_hold_gil, args=(stop,), name="gil-load", daemon=True).start()
    best = None
    for _ in range(args.repeats):
        spent = one_pass(msgs, args.poll, pt, args.generate, max_bytes)
        if best is None or sum(v[1] for v in spent.values()) < sum(v[1] for v in best.values()):
            best = spent
    stop.set()
    n = len(msgs)
    stages = {s: {"thread_cpu_us": round(1e6 * v[0] / n, 1), "wall_us": round(1e6 * v[1] / n, 1),
                  "process_cpu_us": round(1e6 * v[2] / n, 1)} for s, v in best.items()}
    total = {k: round(sum(stages[s][k] for s in STAGES), 1) for k in ("thread_cpu_us", "wall_us", "process_cpu_us")}
    print(json.dumps({"bench": "polling", "package": str(pkg), "data": args.data, "notes": n, "poll": args.poll,
                      "generate": args.generate, "gil_load": args.gil_load, "cpus": os.cpu_count(),
                      "python": platform.python_version(),
                      "mean_prompt_tokens": round(sum(x.prompt.tokens for x in got) / len(got), 1),
                      "stages": stages, "total": total,
                      "ceiling_notes_s": round(1e6 / total["wall_us"]) if total["wall_us"] else None}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
