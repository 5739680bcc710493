"""Helpers for the worker's integration tests: produce notes, read topics back, wait on commits,
run a WorkerApp in a thread. Always the real broker; Milvus is a real milvus-lite db or, through the
`milvus_backend` fixture (tests/conftest.py), also a real Milvus server."""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def note_doc(i: int, *, prefix: str = "n", title: str | None = None, content: str | None = None) -> dict:
    words = ["apple", "river", "storm", "market", "vote", "game", "recipe", "movie", "travel", "science"]
    w = words[i % len(words)]
    return {
        "schema_version": "note.v1",
        "note_id": f"{prefix}{i:05d}",
        "title": title if title is not None else f"{w.title()} story number {i}",
        "content": content if content is not None else f"A short note about {w} and {words[(i * 7) % 10]} ({i}).",
        "author_id": f"u{i % 17}",
        "published_at": int(time.time() * 1000),
    }


def producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})


def produce_notes(bootstrap: str, topic: str, docs, *, now_published: bool = True) -> list[str]:
    p = producer(bootstrap)
    ids = []
    for d in docs:
        if now_published:
            d = {**d, "published_at": int(time.time() * 1000)}
        p.produce(topic, key=d["note_id"].encode(), value=json.dumps(d).encode())
        ids.append(d["note_id"])
        p.poll(0)
    assert p.flush(30) == 0
    return ids


def produce_raw(bootstrap: str, topic: str, items) -> None:
    """items: (key bytes|None, value bytes|None) pairs."""
    p = producer(bootstrap)
    for k, v in items:
        p.produce(topic, key=k, value=v)
    assert p.flush(30) == 0


def high_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4().hex[:6]}"})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions}
    finally:
        c.close()


def committed(bootstrap: str, group: str, topic: str, partitions) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in partitions], timeout=10)}
    finally:
        c.close()


def wait_committed_to_end(bootstrap: str, group: str, topic: str, timeout: float = 120.0, alive=None) -> dict[int, int]:
    hw = high_watermarks(bootstrap, topic)
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = committed(bootstrap, group, topic, hw)
        if all(o == 0 or got.get(p, -1) >= o for p, o in hw.items()):
            return got
        if alive is not None and not alive():
            break
        time.sleep(0.3)
    raise AssertionError(f"committed {got} did not reach the end {hw} of {topic} for group {group}")


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list:
    """Every message of `topic`, from the start to the current end."""
    hw = high_watermarks(bootstrap, topic)
    want = {p: o for p, o in hw.items() if o > 0}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"rd-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in want])
    out, pos = [], {p: 0 for p in want}
    deadline = time.monotonic() + timeout
    try:
        while any(pos[p] < want[p] for p in want) and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error():
                    continue
                out.append(m)
                pos[m.partition()] = m.offset() + 1
    finally:
        c.close()
    return out


def tag_ids(bootstrap: str, topic: str) -> list[str]:
    return [m.key().decode() for m in read_topic(bootstrap, topic)]


def dlq_events(bootstrap: str, topic: str) -> list[tuple[dict, dict]]:
    return [(json.loads(m.value()), {k: v.decode() for k, v in (m.headers() or [])}) for m in read_topic(bootstrap, topic)]


def wait_until(pred, what: str, timeout: float = 60.0, interval: float = 0.1) -> None:
    """Wait until `pred()` is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_process_gone(pid: int, what: str, timeout: float = 10.0) -> None:
    """Wait until process `pid` no longer exists; AssertionError(`what`) after `timeout`."""
    import os

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(what)


class AppThread:
    """Run a WorkerApp.run() in a thread; .stop() returns its exit code."""

    def __init__(self, app) -> None:
        self.app = app
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.rc = self.app.run()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 60.0) -> int | None:
        self.app.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.rc


# -- the encoder of the integration tests -------------------------------------------------------------
import pytest  # noqa: E402


def tiny_model_dir() -> Path:
    """The tiny random Llama exported by tests/tiny.py, cached under .local/cache keyed by the export
    code's hash (the export needs torch and ~30 s; the worker tests only read the package)."""
    import hashlib
    import shutil

    h = hashlib.sha256()
    for f in sorted([*REPO.glob("export/*.py"), REPO / "notellm/model.py", REPO / "notellm/base_models.py",
                     REPO / "notellm/prompts.py", REPO / "tests/tiny.py"]):
        if f.exists():
            h.update(f.name.encode() + f.read_bytes())
    cached = REPO / ".local" / "cache" / f"tiny-onnx-{h.hexdigest()[:12]}"
    if (cached / ".complete").exists():
        return cached
    from tests.tiny import tiny_package

    src, _manifest = tiny_package("fp32")
    tmp = cached.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    return cached


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="session")
def encoder(tiny_dir):
    from worker.encoders import load_encoder
    enc = load_encoder(tiny_dir, device="cpu", intra_op_threads=1)
    enc.warmup()
    return enc
