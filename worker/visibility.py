"""Freshness as a reader sees it: publish -> found by a read, from a client of its own, at the consistency
level the readers use (`NOTELLM_MILVUS__READ_CONSISTENCY`, default Bounded).

An acknowledged upsert is not yet visible to every reader of a Milvus server: under Bounded consistency a
query node may serve a snapshot that lags the writes by up to the server's graceful time. So the Milvus
ack time (`notellm_freshness_seconds`) is only a lower bound. After each committed batch the checkpoint
offers one of its notes here (the newest offer replaces one still waiting; one probe at a time, at most
one per `min_gap_s`, so the cost is one small primary-key query per poll interval while a probe runs); the probe polls until the row with that
note's `published_at` is returned and records `notellm_visible_seconds` (published_at -> visible) and
`notellm_visible_after_ack_seconds` (Milvus ack -> visible). On milvus-lite both are ~the ack time.
"""
from __future__ import annotations

import threading
import time

from worker.sinks.milvus import MilvusStore


class VisibilityProbe:
    def __init__(self, store: MilvusStore, collection: str, *, consistency_level: str = "Bounded", metrics=None,
                 interval_s: float = 0.05, give_up_s: float = 60.0, min_gap_s: float = 1.0, log=None) -> None:
        # a client of its own on the worker's Milvus (address, credentials, TLS), reading as readers do
        self.store = store.reader(collection, consistency_level=consistency_level, timeout_s=5.0)
        self.metrics = metrics
        self.interval_s = interval_s
        self.give_up_s = give_up_s
        self.min_gap_s = min_gap_s  # at most one probe per this many seconds (a backlog offers every batch)
        self.log = log
        self._cv = threading.Condition()
        self._offer: tuple[str, int, float] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="notellm-visibility", daemon=True)
        self._thread.start()

    def offer(self, note_id: str, published_at_ms: int, acked_ms: float) -> None:
        with self._cv:
            self._offer = (note_id, published_at_ms, acked_ms)
            self._cv.notify()

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)
        self.store.close()

    def _visible(self, note_id: str, published_at_ms: int) -> bool:
        rows = self.store.get([note_id], ["published_at"], wait_s=1.0)
        return any(int(r["published_at"]) == published_at_ms for r in rows)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._offer is not None or self._closed)
                if self._closed:
                    return
                note_id, published_at_ms, acked_ms = self._offer  # type: ignore[misc]
                self._offer = None
            started = time.monotonic()
            deadline = started + self.give_up_s
            while not self._closed and time.monotonic() < deadline:
                try:
                    if self._visible(note_id, published_at_ms):
                        now_ms = time.time() * 1000
                        if self.metrics is not None:
                            self.metrics.visible.observe(max(0.0, (now_ms - published_at_ms) / 1000.0))
                            self.metrics.visible_after_ack.observe(max(0.0, (now_ms - acked_ms) / 1000.0))
                        break
                except Exception as e:  # noqa: BLE001 - a probe is best effort; the sinks report real faults
                    if self.log is not None:
                        self.log.debug("visibility_probe_failed", note_id=note_id, error=str(e))
                time.sleep(self.interval_s)
            with self._cv:
                self._cv.wait_for(lambda: self._closed, max(0.0, started + self.min_gap_s - time.monotonic()))
