"""`notellm demo`: the whole path on this machine, with real notes.

1. export the trained default NoteLLM to ONNX if absent or older than its artifact
   (`notellm export --model models/notellm-default --out DIR`: the committed LoRA adapter, projection and
   `[EMB]` row, merged onto SmolLM2-135M);
2. start the worker (`notellm worker run`, a real subprocess with its HTTP port);
3. publish ~100 notes to notes.published and show the worker catching up: Amazon Industrial & Scientific
   products that the default model never saw in training (its artifact lists them), or MIND news
   (`--data .../news.tsv`);
4. read the generated categories back (/notes/{id}) and count how many match the data's own;
5. publish one more note and measure publish → searchable (polling the worker's /similar endpoint),
   then print its neighbours and generated category/hashtags beside the data's own;
6. stop the worker with SIGTERM (it finishes, flushes, commits, exits 0).
The broker must be running (`scripts/kafka start`; scripts/demo does it)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "amazon-scientific"
DEFAULT_ADAPTER = REPO / "models" / "notellm-default"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=".local/models/notellm-default-onnx",
                   help="ONNX package (exported from --source if absent or older than it)")
    p.add_argument("--source", default=str(DEFAULT_ADAPTER),
                   help="what the package is exported from: the trained default artifact, a saved NoteLLM, "
                        "or smollm2 (the untrained base)")
    p.add_argument("--notes", type=int, default=100, help="notes to publish before the measured one")
    p.add_argument("--bootstrap", default=os.environ.get("NOTELLM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    p.add_argument("--milvus-uri", default=".local/milvus/demo.db")
    p.add_argument("--http-port", type=int, default=8089)
    p.add_argument("--generate", default="both", choices=["none", "category", "hashtags", "both"])
    p.add_argument("--data", default=str(DATA),
                   help="an Amazon-layout directory (<P>.item.json + <P>.inter.json) or a MIND news.tsv")
    p.add_argument("--timeout", type=float, default=300.0, help="give up waiting for the worker after this")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mind_notes(path: Path, n: int, skip: int = 0) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            c = line.rstrip("\n").split("\t")
            if i < skip or len(c) < 5 or not c[3]:
                continue
            out.append({"schema_version": "note.v1", "note_id": c[0], "title": c[3], "content": c[4],
                        "topic": c[2], "category": None, "author_id": "mind", "published_at": 0,
                        "_truth": {"category": c[1], "hashtags": [c[2]]}})
            if len(out) >= n:
                break
    return out


def amazon_notes(path: Path, n: int, first: list[str]) -> list[dict]:
    """``n`` products as notes, those in ``first`` (the notes the model never trained on) before the rest.
    The data's own category and tags ride along under ``_truth`` (not published)."""
    from notellm.data import load_amazon

    notes = load_amazon(path).notes
    order = [i for i in first if i in notes] + sorted(set(notes) - set(first), key=lambda i: int(i) if i.isdigit() else 0)
    out = []
    for nid in order[:n]:
        m = notes[nid]
        out.append({"schema_version": "note.v1", "note_id": f"amazon-{nid}", "title": m.title, "content": m.content,
                    "topic": None, "category": None, "author_id": "amazon", "published_at": 0,
                    "_truth": {"category": m.category, "hashtags": list(m.hashtags)}})
    return out


def demo_notes(data: Path, n: int, source: Path) -> tuple[list[dict], str]:
    if data.is_dir():
        held_out = []
        cfg = source / "adapter.json"
        if cfg.exists():
            held_out = list(json.loads(cfg.read_text()).get("held_out_notes") or [])
        what = "Amazon Industrial & Scientific products" + (", none of them seen in training" if held_out else "")
        return amazon_notes(data, n, held_out), what
    return mind_notes(data, n), "MIND news notes"


def source_stamp(source: str) -> str:
    """What the package was exported from: a directory's files' sha256, or the base's name."""
    import hashlib

    d = Path(source)
    if not d.is_dir():
        return source
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_package(model: Path, source: str) -> int:
    """Export ``source`` to ``model`` unless the package there was exported from the same source."""
    stamp_file = model.with_name(model.name + ".source")
    stamp = source_stamp(source)
    if (model / "notellm.json").exists() and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return 0
    if (model / "notellm.json").exists():
        say(f"{model} was exported from another source, or has no record of it: exporting it again")
    say(f"exporting {source} to {model} (validated against torch; on the first run and when the source changes) ...")
    rc = subprocess.call([sys.executable, "-m", "notellm.cli", "export", "--model", str(source), "--out", str(model)],
                         cwd=REPO)
    if rc == 0:
        stamp_file.write_text(stamp + "\n")
    return rc


def report_categories(base: str, notes: list[dict], truth: dict, wait_s: float = 60.0) -> None:
    """How the stored generated categories of the published notes compare with the data's own (read back
    through the worker's /notes endpoint; generation can finish a moment after the vector is searchable)."""
    from urllib.parse import quote

    got: dict[str, str] = {}
    deadline = time.monotonic() + wait_s
    while len(got) < len(notes) and time.monotonic() < deadline:
        for d in notes:
            if d["note_id"] not in got:
                code, row = http_json(f"{base}/notes/{quote(d['note_id'], safe='')}")
                if code == 200 and row and row.get("category"):
                    got[d["note_id"]] = row["category"]
        if len(got) < len(notes):
            time.sleep(0.5)
    judged = [(d, got[d["note_id"]]) for d in notes if d["note_id"] in got and truth[d["note_id"]]["category"]]
    if not judged:
        say("no generated category stored yet")
        return
    right = [d for d, c in judged if c.lower() == truth[d["note_id"]]["category"].lower()]
    say(f"generated categories: {len(right)} of {len(judged)} match the data's own "
        f"({100 * len(right) / len(judged):.0f} %); for example:")
    for d, c in judged[:4]:
        say(f"  {d['title'][:60]!r} -> {c!r} (data: {truth[d['note_id']]['category']!r})")


def http_json(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, None


def metric(base: str, name: str) -> float:
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
    except Exception:  # noqa: BLE001
        pass
    return 0.0


def kafka_log():
    """The logger the demo's Kafka clients report their errors to (worker/kafka_log.py: a line per kind of
    error, not librdkafka's line per connection attempt on stderr)."""
    from worker.logs import configure_logging, get_logger

    configure_logging("auto", "WARNING")
    return get_logger("notellm.demo")


def ensure_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    from worker.kafka_log import routed

    a = AdminClient(routed({"bootstrap.servers": bootstrap}, kafka_log(), "demo:admin"))
    have = set(a.list_topics(timeout=10).topics)
    new = [NewTopic(t, 3 if t.endswith("published") or t.endswith("tags") else 1, 1) for t in names if t not in have]
    for f in (a.create_topics(new).values() if new else []):
        f.result(30)


def run(args) -> int:
    from confluent_kafka import KafkaException, Producer

    from worker.kafka_log import routed

    t_start = time.monotonic()
    model = Path(args.model)
    rc = ensure_package(model, args.source)
    if rc != 0:
        say("export failed")
        return rc
    # A fresh database each run: otherwise earlier runs' copies of a note rank first among its neighbours.
    db = Path(args.milvus_uri)
    if db.exists():
        say(f"removing the previous demo database {db}")
        shutil.rmtree(db) if db.is_dir() else db.unlink()  # milvus-lite 3 keeps a directory, 2.x a file
    topics = ["notes.published", "notes.tags", "notes.dlq"]
    try:
        ensure_topics(args.bootstrap, topics)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        say(f"Kafka at {args.bootstrap} failed: {err.str() if hasattr(err, 'str') else e} (is `scripts/kafka start` "
            f"running?)")
        return 1
    base = f"http://127.0.0.1:{args.http_port}"
    cmd = [sys.executable, "-m", "notellm.cli", "worker", "run", "--bootstrap", args.bootstrap, "--model", str(model),
           "--milvus-uri", args.milvus_uri, "--http-port", str(args.http_port), "--generate", args.generate,
           "--group", "notellm-demo", "--log-format", "json", "--log-level", "WARNING"]
    log_path = REPO / ".local" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"starting the worker: {' '.join(cmd[2:])}  (log: {log_path})")
    worker = subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            code, body = http_json(f"{base}/readyz")
            if code == 200:
                break
            if worker.poll() is not None:
                say(f"worker exited with {worker.returncode}; last log lines:\n" + log_path.read_text()[-2000:])
                return 1
            if time.monotonic() > deadline:
                say("worker did not become ready")
                return 1
            time.sleep(0.5)
        say(f"worker ready ({time.monotonic() - t_start:.1f}s): partitions assigned, model warmed, Milvus reachable")

        run_id = uuid.uuid4().hex[:6]
        notes, what = demo_notes(Path(args.data), args.notes + 1, Path(args.source))
        truth = {d["note_id"]: d.pop("_truth") for d in notes}
        probe, notes = notes[-1], notes[:-1]
        p = Producer(routed({"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "acks": "all"},
                            kafka_log(), "demo:producer"))
        start_embedded = metric(base, "notellm_embedded_total")
        for d in notes:
            d = {**d, "published_at": int(time.time() * 1000)}
            p.produce("notes.published", key=d["note_id"].encode(), value=json.dumps(d).encode())
        p.flush(30)
        say(f"published {len(notes)} {what} to notes.published; the worker embeds them "
            f"(+ generates {args.generate}) ...")
        last = -1
        while True:
            done = int(metric(base, "notellm_embedded_total") - start_embedded)
            if done != last:
                say(f"  {done}/{len(notes)} notes searchable")
                last = done
            if done >= len(notes):
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                say("worker stopped or timed out while catching up")
                return 1
            time.sleep(1.0)

        if args.generate in ("category", "both"):
            report_categories(base, notes, truth)

        probe_id = f"{probe['note_id']}-{run_id}"
        doc = {**probe, "note_id": probe_id, "published_at": int(time.time() * 1000)}
        say(f"publishing one more note: {probe_id}: {probe['title']!r}")
        t0 = time.time()
        p.produce("notes.published", key=probe_id.encode(), value=json.dumps(doc).encode())
        p.flush(10)
        while True:
            code, ans = http_json(f"{base}/similar/{probe_id}?k=5")
            if code == 200:
                break
            if time.time() - t0 > 60:
                say("the note did not become searchable within 60 s")
                return 1
            time.sleep(0.02)
        latency = time.time() - t0
        say(f"publish -> searchable: {latency * 1000:.0f} ms (published_at -> found by a similarity query)")
        if args.generate != "none":
            # At low load the vector is upserted before generation finishes; the tags follow.
            while not (ans["note"].get("category") or ans["note"].get("hashtags")) and time.time() - t0 < 60:
                time.sleep(0.05)
                code, ans = http_json(f"{base}/similar/{probe_id}?k=5")
            say(f"publish -> generated tags stored: {(time.time() - t0) * 1000:.0f} ms")
        from worker.similar import render

        print(render(ans), flush=True)
        t = truth[probe["note_id"]]
        say(f"the data's own category and tags for {probe['note_id']}: {t['category']!r}; {', '.join(t['hashtags'])}")
        say(f"the same from the CLI: notellm similar {probe_id} --url {base}")
        return 0
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                rc = worker.wait(120)
                say(f"worker stopped on SIGTERM with exit code {rc}")
            except subprocess.TimeoutExpired:
                worker.kill()
        say(f"demo took {time.monotonic() - t_start:.0f}s")


if __name__ == "__main__":  # python -m worker.demo (the same as `notellm demo`)
    _p = argparse.ArgumentParser(prog="notellm demo", description=__doc__)
    configure(_p)
    raise SystemExit(run(_p.parse_args()))
