"""The worker's polling thread, stage by stage: what one poll of real notes costs it per note.

    python bench/polling.py [--package DIR] [--data amazon|mind] [--data-root DIR] [--notes 4096]
                            [--poll 512] [--generate category|both] [--repeats 3]

The polling thread (worker/app.py's loop) takes each poll's messages through three stages, all in the
worker's own process: ``decode`` (worker/decode.py: UTF-8, JSON, note.v1, id rules), ``tokenize``
(`encoding.prepare_many`: one batched tokenizer pass per poll, each note given its prompt) and ``batch``
(the consumed-records metric and `Batcher.add`). This runs the same functions on real notes as Kafka
messages (`confluent_kafka.Message`, the type the consumer returns; no broker: the bench starts after the
poll) and prints one JSON document with one row per (``path``, ``gil_load``), each giving per stage µs per
note of:

- ``thread_cpu_us``: the polling thread's own CPU. Python holds the GIL for it, so it is what the
  polling thread takes from the worker's other GIL users (the sink thread, the encode thread);
- ``wall_us``: the stage's wall time (the tokenizer's native pass runs on all cores, GIL released);
- ``process_cpu_us``: every thread's CPU while the stage ran (the tokenizer's native threads included).

``path``: ``composed``, the worker's (most notes' ids composed from their fields' own ids,
`notellm.prompts._Composer`), and ``whole``, every note's text encoded whole after its fields were
truncated (the path before it; the only one for a tokenizer composing is not proved for). ``gil_load``:
a thread of pure Python runs beside the stages, as the worker's sink and encode threads hold the GIL beside
its polling thread; every return from a native call (the tokenizer's passes) then waits for the GIL.
``ceiling_notes_s`` = 10^6 / the stages' summed wall µs: what one polling thread can feed the encoder.
The four rows are measured interleaved, the best pass of ``--repeats`` kept for each (other processes share
the CPU); ``whole_over_composed`` is the ratio of their summed wall times. Before timing, every prepared
prompt is checked equal to the one `PromptTokenizer.tokenize` gives the note alone. On an H200 host the
worker's polling thread held the GIL ~81 µs a note (docs/results/gpu, run 9); the embed-only encoder wants
~8,800 notes/s there.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("decode", "tokenize", "batch")
MAX_BYTES = 1 << 20


def messages(notes: list, topic: str = "notes") -> list:
    """`notes` (title, content, topic) as the note.v1 records a producer writes, as consumed messages."""
    import confluent_kafka

    out = []
    for i, x in enumerate(notes):
        note_id = f"note-{i}"
        doc = {"note_id": note_id, "title": x.title, "content": x.content, "author_id": f"author-{i % 97}",
               "published_at": 1_764_000_000_000 + i}
        if getattr(x, "topic", None):
            doc["topic"] = x.topic
        out.append(confluent_kafka.Message(topic=topic, partition=0, offset=i, key=note_id.encode(),
                                           value=json.dumps(doc, ensure_ascii=False).encode(),
                                           timestamp=(1, doc["published_at"])))
    return out


def load_messages(kind: str, n: int, root: Path) -> list:
    from bench.tokenizing import load_notes

    return messages(load_notes(kind, n, root))


def one_pass(msgs: list, poll: int, tokenizer, generate: str) -> dict[str, list[float]]:
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

    def tick(stage: str, before: tuple[float, ...]) -> tuple[float, ...]:
        now = tuple(f() for f in clock)
        for k in range(3):
            spent[stage][k] += now[k] - before[k]
        return now

    for i in range(0, len(msgs), poll):
        t = tuple(f() for f in clock)
        records = [decode(msg, MAX_BYTES) for msg in msgs[i:i + poll]]
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


class _GilLoad:
    """A thread of pure Python, holding the GIL whenever it can, while `on`."""

    def __init__(self) -> None:
        self.on = threading.Event()
        self.stop = False
        threading.Thread(target=self._run, name="gil-load", daemon=True).start()

    def _run(self) -> None:
        x = 0
        while not self.stop:
            self.on.wait(0.1)
            while self.on.is_set():
                for i in range(2000):
                    x += i


def measure(package: str | Path, msgs: list, *, poll: int = 512, generate: str = "category",
            repeats: int = 3) -> dict[str, Any]:
    """The four rows (composed / whole x without / with GIL load) for `msgs` on `package`'s tokenizer,
    interleaved, best pass of `repeats` each; prompts checked equal to the per-note ones first."""
    from worker.decode import decode
    from worker.encoding import prepare_many
    from worker.prompt_tokens import PromptTokenizer
    from worker.records import Note

    manifest = json.loads((Path(package) / "notellm.json").read_text())
    composed = PromptTokenizer(package, manifest)
    whole = PromptTokenizer(package, manifest)
    whole.prompts.composer = None
    paths = {"composed": composed, "whole": whole} if composed.prompts.composer is not None else {"whole": whole}
    notes = [decode(msg, MAX_BYTES) for msg in msgs]
    bad = [r for r in notes if not isinstance(r, Note)]
    if bad:
        raise RuntimeError(f"{len(bad)} of the bench's records did not decode: {bad[0]}")
    want = [composed.tokenize(n, generate) for n in notes]
    for name, pt in paths.items():
        got = [p for i in range(0, len(notes), poll) for p in prepare_many(pt, notes[i:i + poll], generate, "notes")]
        if [n.prompt for n in got] != want:
            raise RuntimeError(f"the batched prompts ({name}) differ from the per-note ones")
    load = _GilLoad()
    best: dict[tuple[str, bool], dict[str, list[float]]] = {}
    try:
        for name, pt in paths.items():
            one_pass(msgs[:poll], poll, pt, generate)  # warm-up (the composer's joint cache included)
        for _ in range(repeats):
            for gil in (False, True):
                for name, pt in paths.items():
                    if gil:
                        load.on.set()
                    try:
                        spent = one_pass(msgs, poll, pt, generate)
                    finally:
                        load.on.clear()
                    key = (name, gil)
                    if key not in best or sum(v[1] for v in spent.values()) < sum(v[1] for v in best[key].values()):
                        best[key] = spent
    finally:
        load.stop = True
        load.on.clear()
    n = len(msgs)
    rows = []
    for (name, gil), spent in best.items():
        stages = {s: {"thread_cpu_us": round(1e6 * v[0] / n, 1), "wall_us": round(1e6 * v[1] / n, 1),
                      "process_cpu_us": round(1e6 * v[2] / n, 1)} for s, v in spent.items()}
        total = {k: round(sum(stages[s][k] for s in STAGES), 1) for k in ("thread_cpu_us", "wall_us", "process_cpu_us")}
        rows.append({"path": name, "gil_load": gil, "stages": stages, "total": total,
                     "ceiling_notes_s": round(1e6 / total["wall_us"]) if total["wall_us"] else None})
    rows.sort(key=lambda r: (r["gil_load"], r["path"]))
    out: dict[str, Any] = {"notes": n, "poll": poll, "generate": generate, "cpus": os.cpu_count(),
                           "mean_prompt_tokens": round(sum(p.tokens for p in want) / len(want), 1), "rows": rows}
    if len(paths) == 2:
        wall = {(r["path"], r["gil_load"]): r["total"]["wall_us"] for r in rows}
        out["whole_over_composed"] = {("gil_load" if gil else "free"):
                                      round(wall["whole", gil] / wall["composed", gil], 2)
                                      for gil in (False, True) if wall["composed", gil]}
    return out


def main() -> int:
    from bench.tokenizing import package_and_data_args, package_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    package_and_data_args(ap, notes=4096)
    ap.add_argument("--poll", type=int, default=512, help="messages per poll (the worker polls up to its batch size)")
    ap.add_argument("--generate", choices=["category", "both"], default="category",
                    help="category: the embedding prompt only (embed-only and category workers); "
                         "both: the hashtag prompt too")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.notes < 1 or args.poll < 1 or args.repeats < 1:
        raise SystemExit("--notes, --poll and --repeats must be >= 1")
    pkg = package_dir(args.package)
    msgs = load_messages(args.data, args.notes, Path(args.data_root))
    try:
        doc = measure(pkg, msgs, poll=args.poll, generate=args.generate, repeats=args.repeats)
    except RuntimeError as e:
        raise SystemExit(f"bench/polling.py: {e}") from None
    print(json.dumps({"bench": "polling", "package": str(pkg), "data": args.data,
                      "python": platform.python_version(), **doc}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
