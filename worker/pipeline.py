"""Two stage threads between the polling loop and the checkpoint: encode, then sink+commit.

Each stage is fed through a one-slot queue, so while the encoder runs batch k, batch k+1 waits
assembled (one-slot prefetch) and the sinks flush batch k-1 at the same time. ONNX Runtime and the
Milvus / librdkafka clients release the GIL while they work, so the three overlap on separate cores.
Batches reach the sink stage in the order they were submitted, so commits are monotonic.
The first error stops both stages (`error`); later batches are dropped uncommitted (re-read on restart).
Nothing here waits without a bound or polls in a loop: every wait is on the condition variable.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from worker.records import Batch, Encoded

_STOP = object()
_EARLY = object()


class Pipeline:
    def __init__(self, encode: Callable[..., Encoded], sink: Callable[[Encoded], object], *, log=None,
                 early_sink: Callable[[Encoded], object] | None = None) -> None:
        """`encode(batch, idle, early)`: `idle` says the encoder had nothing waiting when this batch came
        (low load); `early(encoded)` hands vectors ahead of generation to `early_sink` (no commit)."""
        self._encode = encode
        self._sink = sink
        self._early_sink = early_sink
        self._log = log
        self._q_encode: queue.Queue = queue.Queue(maxsize=1)
        self._q_sink: queue.Queue = queue.Queue(maxsize=1)
        self._cv = threading.Condition()
        self._in_flight = 0
        self.error: BaseException | None = None
        self.busy_s = {"encode": 0.0, "sink": 0.0}
        self._threads = [
            threading.Thread(target=self._encode_loop, name="notellm-encode", daemon=True),
            threading.Thread(target=self._sink_loop, name="notellm-sink", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- producer side (polling thread) ------------------------------------------------------------
    def offer(self, batch: Batch) -> bool:
        """Hand a closed batch to the encoder stage without blocking; False when the slot is full or the
        pipeline failed."""
        if self.error is not None:
            return False
        with self._cv:
            self._in_flight += 1
        try:
            self._q_encode.put_nowait(batch)
            return True
        except queue.Full:
            self._done()
            return False

    def submit(self, batch: Batch, timeout: float) -> bool:
        """Blocking hand-over (shutdown, rebalance): waits on the slot, never spins."""
        deadline = time.monotonic() + timeout
        while self.error is None:
            if self.offer(batch):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_slot(left)
        return False

    def wait_slot(self, timeout: float) -> None:
        """Block until the encoder's input slot is free, the pipeline failed, or `timeout`."""
        with self._cv:
            self._cv.wait_for(lambda: self._q_encode.empty() or self.error is not None, timeout)

    def slot_free(self) -> bool:
        """The encoder's input slot is empty: a batch closed now would be taken without waiting."""
        return self._q_encode.empty() and self.error is None

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted batch is committed (True), or failed / `timeout` (False)."""
        with self._cv:
            self._cv.wait_for(lambda: self._in_flight == 0 or self.error is not None, timeout)
            return self._in_flight == 0 and self.error is None

    def close(self, timeout: float = 10.0) -> None:
        """Stop both threads (bounded: a stage stuck in a call is left behind, it is a daemon thread)."""
        deadline = time.monotonic() + timeout
        try:
            self._q_encode.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- stages ------------------------------------------------------------------------------------
    def _done(self) -> None:
        with self._cv:
            self._in_flight -= 1
            self._cv.notify_all()

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
            if self._log is not None:
                self._log.error("pipeline_failed", error=str(e), error_type=type(e).__name__)
        with self._cv:
            self._cv.notify_all()

    def _encode_loop(self) -> None:
        while True:
            idle = self._q_encode.empty()  # nothing was waiting: low load
            item = self._q_encode.get()
            with self._cv:
                self._cv.notify_all()  # the slot is free: wake a waiting polling thread
            if item is _STOP:
                self._q_sink.put(_STOP)
                return
            if self.error is not None:
                self._done()
                continue
            t0 = time.perf_counter()
            try:
                enc = self._encode(item, idle, self._early)
            except BaseException as e:  # noqa: BLE001 - the encode stage already retried what it could
                self._fail(e)
                self._done()
                continue
            finally:
                self.busy_s["encode"] += time.perf_counter() - t0
            self._q_sink.put(enc)

    def _early(self, enc: Encoded) -> None:
        if self._early_sink is not None and self.error is None:
            self._q_sink.put((_EARLY, enc))

    def _sink_loop(self) -> None:
        while True:
            item = self._q_sink.get()
            if item is _STOP:
                return
            if isinstance(item, tuple) and item[0] is _EARLY:
                try:
                    if self.error is None:
                        self._early_sink(item[1])  # type: ignore[misc]
                except Exception as e:  # noqa: BLE001 - best effort: the full batch upserts again
                    if self._log is not None:
                        self._log.warning("early_upsert_failed", error=str(e))
                continue
            t0 = time.perf_counter()
            try:
                if self.error is None:
                    self._sink(item)
            except BaseException as e:  # noqa: BLE001
                self._fail(e)
            finally:
                self.busy_s["sink"] += time.perf_counter() - t0
                self._done()
