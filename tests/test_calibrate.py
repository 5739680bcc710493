"""Batch size chosen per device by measurement (worker/calibrate.py, issue 13).

The choice logic runs on a fake engine with a known throughput curve and a fake clock (each call
"takes" n / rate(n) seconds, n = the size of each sub-batch the engine itself cuts, so a candidate
that did not reach the engine as one batch would measure wrong). The real tiny exported model runs
through the real OnnxNoteEncoder inside a WorkerApp on the real broker and milvus-lite; the child
process path is checked for its limits (`ProcessEncoder.set_batch_limits`, kept across restarts)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_worker_e2e import settings_for, topics  # noqa: F401 - fixture
from tests.worker_support import AppThread, note_doc, produce_notes, tiny_dir, wait_committed_to_end  # noqa: F401
from worker.calibrate import (BUILTIN_NOTES, CPU_DEFAULTS, CUDA_DEFAULTS, Calibration, calibrate, calibrated,
                              candidate_sizes, choose, device_defaults)
from worker.config import load_settings
from worker.encoders import DEFAULT_BATCH_NOTES, DEFAULT_BATCH_TOKENS, resolve_limits, set_batch_limits
from worker.encoding import EngineError, NoteError
from worker.records import Prompt

pytestmark = pytest.mark.timeout(300)


class CurveEncoder:
    """`Encoder` protocol with a known throughput curve: `rate(n)` notes/s for an engine batch of n.
    Sub-batches by its own `max_batch_notes` like the real engine. `fail_at`: EngineError for engine
    batches >= it; `fail_tokenize`: NoteError from tokenize."""

    def __init__(self, rate, *, fail_at: int | None = None, fail_tokenize: bool = False,
                 max_batch_notes: int = 4, max_batch_tokens: int = 600, providers=("CurveProvider",)) -> None:
        self.rate, self.fail_at, self.fail_tokenize = rate, fail_at, fail_tokenize
        self.max_batch_notes, self.max_batch_tokens = max_batch_notes, max_batch_tokens
        self.manifest, self.model_version, self.dim, self.providers = {}, "curve", 4, list(providers)
        self.now = 0.0
        self.engine_batches: list[int] = []
        self.restarts = 0
        self.healthy = True

    def clock(self) -> float:
        return self.now

    def warmup(self, generate="both") -> None:
        pass

    def tokenize(self, note, generate) -> Prompt:
        if self.fail_tokenize:
            raise NoteError("no tokenizer")
        return Prompt(category=(1,) * 8, hashtags=(1,) * 4 if generate in ("hashtags", "both") else None,
                      tokens=40 + len(note.content.split()))

    def encode(self, prompts, generate, *, timeout_s=None):
        for i in range(0, len(prompts), self.max_batch_notes):
            b = len(prompts[i:i + self.max_batch_notes])
            if self.fail_at is not None and b >= self.fail_at:
                self.healthy = False
                raise EngineError(f"out of memory at {b}")
            self.engine_batches.append(b)
            self.now += b / self.rate(b)
        n = len(prompts)
        return np.full((n, 4), 0.5, np.float32), [None] * n, [[] for _ in range(n)]

    def health(self):
        from worker.encoding import EncoderHealth
        return EncoderHealth(self.healthy)

    def restart(self) -> None:
        self.restarts += 1
        self.healthy = True


def _curve(points: dict[int, float]):
    return lambda n: points[n]


def _longest(enc) -> int:
    return max(enc.tokenize(n, "none").tokens for n in BUILTIN_NOTES)


def test_choose_is_the_smallest_within_tolerance():
    assert choose({1: 10, 2: 20, 4: 40, 8: 41}) == 4
    assert choose({1: 10, 2: 20, 4: 40, 8: 41}, tolerance=0.0) == 8
    assert choose({1: 100, 2: 90}) == 1


def test_peak_is_found_and_reaches_the_engine_as_one_batch():
    # rises to a peak at 64, then falls: 64 is chosen, the search stops two sizes after the peak
    enc = CurveEncoder(_curve({1: 10, 2: 18, 4: 30, 8: 45, 16: 60, 32: 70, 64: 80, 128: 60, 256: 40, 512: 20}))
    c = calibrate(enc, generate="category", clock=enc.clock, budget_s=1e6, batch_overhead_s=0)
    assert isinstance(c, Calibration) and c.calibrated
    assert c.batch_notes == 64 and c.reason == "plateau"
    assert [n for n, _ in c.notes_per_s] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert c.rates[64] == pytest.approx(80) and c.rates[128] == pytest.approx(60)
    # each candidate reached the engine whole, although the engine was built with max_batch_notes=4
    assert {64, 128, 256} <= set(enc.engine_batches) and 512 not in enc.engine_batches
    # the token budget matches the measured shape: notes x the longest calibration prompt
    assert c.prompt_tokens == _longest(enc) and c.batch_tokens == 64 * c.prompt_tokens
    # the engine is left at the chosen limits
    assert (enc.max_batch_notes, enc.max_batch_tokens) == (64, c.batch_tokens)
    assert calibrated(enc, "category") is c and calibrated(enc, "both") is None


def test_plateau_takes_the_smallest_batch_within_5_percent():
    # CPU-like: flat from 4 on (within noise), slightly worse at 32+
    enc = CurveEncoder(_curve({1: 7.0, 2: 8.6, 4: 9.2, 8: 9.3, 16: 9.1, 32: 6.7, 64: 6.0}))
    c = calibrate(enc, clock=enc.clock, budget_s=1e6, batch_overhead_s=0)
    assert c.batch_notes == 4 and c.reason == "plateau"
    assert 32 not in c.rates  # stopped after two sizes without a > 3 % gain (8, 16)
    # GPU-like: grows into the hundreds, flat after 256: the smallest within 5 % of the best
    gpu = {n: min(n, 256) * 10.0 for n in candidate_sizes(512)}
    gpu[512] = 2570.0
    enc = CurveEncoder(_curve(gpu))
    c = calibrate(enc, clock=enc.clock, budget_s=1e6, batch_overhead_s=0)
    assert c.batch_notes == 256 and c.rates[512] == pytest.approx(2570.0)


def test_candidates_and_limits_by_device():
    assert candidate_sizes(512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert candidate_sizes(2048)[-3:] == (512, 1024, 2048)
    assert candidate_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100) and candidate_sizes(1) == (1,)
    assert device_defaults(CurveEncoder(float)) is CPU_DEFAULTS
    assert device_defaults(CurveEncoder(float, providers=("CPUExecutionProvider",))) is CPU_DEFAULTS
    assert device_defaults(CurveEncoder(float, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))) \
        is CUDA_DEFAULTS
    assert (CPU_DEFAULTS.max_notes, CUDA_DEFAULTS.max_notes) == (512, 2048)


def test_on_cuda_the_search_reaches_2048_notes_and_warms_every_shape_up():
    # H200-like (runs 8-9): throughput still grows from 1024 to 2048 notes (embed-only 8,098 -> 8,792/s)
    h200 = {n: 8792.0 * n / (n + 180) for n in candidate_sizes(512)}  # 6,505/s at 512
    h200.update({1024: 8098.0, 2048: 8792.0})
    log = []
    enc = CurveEncoder(_curve(h200), providers=("CUDAExecutionProvider", "CPUExecutionProvider"))

    class Log:
        def info(self, event, **kw):
            log.append(kw)

    c = calibrate(enc, clock=enc.clock, log=Log())  # every limit by the device
    assert c.calibrated and c.batch_notes == 2048 and max(c.rates) == 2048 and c.reason == "all candidates measured"
    assert c.seconds <= CUDA_DEFAULTS.budget_s
    assert log[0]["device"] == "cuda" and log[0]["max_notes"] == 2048 and log[0]["budget_s"] == 60.0
    # every candidate's shape runs once untimed before its measured calls, also where a call takes > 1 s
    # (the CPU's rule skips those): a tenth of that speed, generation-like, 2.3 s a call at 2048
    enc = CurveEncoder(lambda n: h200[n] / 10, providers=("CUDAExecutionProvider",))
    c = calibrate(enc, clock=enc.clock)
    assert c.batch_notes == 2048 and c.seconds <= CUDA_DEFAULTS.budget_s
    assert [enc.engine_batches.count(n) for n in (512, 1024, 2048)] == [2, 2, 2]  # warm-up + one measured pass
    # the same curve on a CPU-provider encoder: capped at 512 (its default), the shape warm-up by prediction
    enc = CurveEncoder(_curve(h200))
    c = calibrate(enc, clock=enc.clock)
    assert max(c.rates) == 512 and c.batch_notes == 512 and 1024 not in enc.engine_batches
    # an operator's cap that is not a power of two is itself a candidate
    enc = CurveEncoder(_curve({**h200, 1500: 8500.0}))
    c = calibrate(enc, clock=enc.clock, max_notes=1500, budget_s=1e6)
    assert [n for n, _ in c.notes_per_s][-2:] == [1024, 1500] and c.batch_notes == 1500


def test_the_workers_cost_per_batch_favours_larger_batches_on_a_flat_curve():
    # a fast encoder, flat from 16 to 32: alone, 16 would do; but every batch also costs the worker
    # ~10 ms (Milvus upsert, commit, ...) on the same machine, so larger batches win
    curve = {1: 500, 2: 700, 4: 900, 8: 1100, 16: 1200, 32: 1200, 64: 1150, 128: 1100, 256: 1000, 512: 900}
    assert choose(curve) == 16
    enc = CurveEncoder(_curve(curve))
    c = calibrate(enc, clock=enc.clock, budget_s=1e6, batch_overhead_s=0.010)
    assert c.batch_notes == 64 and c.rates[16] == pytest.approx(1200)  # the encoder's own rates are reported
    assert c.as_log()["batch_overhead_ms"] == 10
    assert choose(curve, overhead_s=0.010) == 64


def test_time_budget_is_respected():
    # every size is better than the last (per-call overhead): only the budget stops the search
    rate = lambda n: n / (0.05 + 0.01 * n)  # noqa: E731
    enc = CurveEncoder(rate)
    c = calibrate(enc, clock=enc.clock, budget_s=3.0, batch_overhead_s=0)
    assert c.calibrated and c.reason == "budget"
    assert c.seconds <= 3.0 + 1e-9
    measured = [n for n, _ in c.notes_per_s]
    assert measured and measured[-1] < 512 and c.batch_notes == measured[-1]
    # a budget the first candidate alone exceeds: that measurement is used, nothing larger is tried
    enc = CurveEncoder(lambda n: 1.0)  # one note per second: a pass of 1-note batches takes 10 s
    c = calibrate(enc, clock=enc.clock, budget_s=2.0)
    assert [n for n, _ in c.notes_per_s] == [1] and c.batch_notes == 1 and c.seconds <= 3.0


def test_failures_fall_back_or_keep_what_was_measured():
    defaults = (DEFAULT_BATCH_NOTES, DEFAULT_BATCH_TOKENS)
    # tokenising fails: the configured defaults, the engine untouched
    enc = CurveEncoder(lambda n: 10.0, fail_tokenize=True)
    c = calibrate(enc, clock=enc.clock)
    assert not c.calibrated and (c.batch_notes, c.batch_tokens) == defaults and "tokenise" in c.reason
    assert (enc.max_batch_notes, enc.max_batch_tokens) == (4, 600) and calibrated(enc, "none") is None
    # the very first call fails: defaults, applied to the engine, which is restarted (it reported unhealthy)
    enc = CurveEncoder(lambda n: 10.0, fail_at=1)
    c = calibrate(enc, clock=enc.clock, default_notes=24, default_tokens=3000)
    assert not c.calibrated and (c.batch_notes, c.batch_tokens) == (24, 3000)
    assert c.failures and c.failures[0][0] == 1 and "out of memory" in c.failures[0][1]
    assert (enc.max_batch_notes, enc.max_batch_tokens) == (24, 3000) and enc.restarts == 1
    # out of memory at 128 notes: the search stops there and chooses among the smaller sizes
    enc = CurveEncoder(lambda n: float(n), fail_at=128)
    c = calibrate(enc, clock=enc.clock, budget_s=1e6)
    assert c.calibrated and c.batch_notes == 64 and c.reason == "failed at 128 notes"
    assert enc.max_batch_notes == 64 and enc.restarts == 1
    # an operator's token budget is kept; max_notes caps the candidates
    enc = CurveEncoder(lambda n: float(n))
    c = calibrate(enc, clock=enc.clock, budget_s=1e6, max_tokens=5000, max_notes=16)
    assert (c.batch_notes, c.batch_tokens) == (16, 5000) and enc.max_batch_tokens == 5000
    # a stop request (shutdown during start-up): defaults, at once
    enc = CurveEncoder(lambda n: 10.0)
    c = calibrate(enc, clock=enc.clock, should_stop=lambda: True)
    assert not c.calibrated and c.reason == "stopped" and not enc.engine_batches
    # ... also when it comes between two candidates' calls (a slow engine: no warm-up call to fall back on)
    asked = []
    enc = CurveEncoder(lambda n: 1.0)
    c = calibrate(enc, clock=enc.clock, budget_s=1e6, should_stop=lambda: asked.append(1) or len(asked) >= 11)
    assert not c.calibrated and c.reason == "stopped" and 2 not in enc.engine_batches
    # an encoder without limits (a plain fake) is still measured through the protocol
    from tests.fakes import FakeEncoder
    c = calibrate(FakeEncoder(), budget_s=2.0, min_measure_s=0.05)
    assert c.calibrated and c.seconds < 4.0


def test_settings_auto_by_default_integer_disables_calibration(monkeypatch):
    import pydantic

    monkeypatch.delenv("NOTELLM_BATCH__MAX_BATCH_NOTES", raising=False)
    s = load_settings()
    assert s.batch.max_batch_notes == "auto" and s.batch.max_batch_tokens == "auto" and s.batch.calibrate
    assert s.batch.calibration_max_notes == "auto" and s.batch.calibration_budget_s == "auto"
    assert resolve_limits("auto", "auto") == (32, 4096) and resolve_limits(8, "auto") == (8, 1024)
    monkeypatch.setenv("NOTELLM_BATCH__MAX_BATCH_NOTES", "8")
    monkeypatch.setenv("NOTELLM_BATCH__CALIBRATION_BUDGET_S", "5")
    s = load_settings()
    assert s.batch.max_batch_notes == 8 and not s.batch.calibrate and s.batch.calibration_budget_s == 5
    for bad in ({"max_batch_notes": 0}, {"max_batch_notes": "big"}, {"max_batch_tokens": 8},
                {"calibration_budget_s": 0}, {"calibration_budget_s": 601}, {"calibration_max_notes": 0},
                {"calibration_max_notes": "big"}):
        with pytest.raises(pydantic.ValidationError):
            load_settings({"batch": bad})


def test_app_calibrates_only_when_asked_and_auto(monkeypatch):
    from worker.app import WorkerApp

    curve = _curve({1: 10, 2: 18, 4: 30, 8: 45, 16: 60, 32: 70, 64: 71, 128: 60, 256: 40, 512: 20})
    # an explicit integer: no calibration, even when asked
    enc = CurveEncoder(curve)
    app = WorkerApp(load_settings({"batch": {"max_batch_notes": 8}}), encoder=enc, calibrate=True)
    app._choose_batch_limits(enc)
    assert (app.batch_notes, app.batch_tokens, app.batch_source) == (8, 1024, "configured")
    assert app.calibration is None and not enc.engine_batches
    # "auto" with an encoder passed in and not asked: the defaults, nothing measured
    app = WorkerApp(load_settings({"batch": {"max_batch_notes": "auto", "calibration_budget_s": 60}}), encoder=enc)
    app._choose_batch_limits(enc)
    assert (app.batch_notes, app.batch_tokens, app.batch_source) == (32, 4096, "default") and not enc.engine_batches
    # asked: measured (real clock here, so the fake's timings do not matter: only that it ran and applied)
    app = WorkerApp(load_settings({"batch": {"max_batch_notes": "auto", "calibration_budget_s": 3}}), encoder=enc,
                    calibrate=True)
    app._choose_batch_limits(enc)
    assert app.batch_source == "calibrated" and app.calibration is not None and enc.engine_batches
    assert (app.batch_notes, app.batch_tokens) == (app.calibration.batch_notes, app.calibration.batch_tokens)
    assert enc.max_batch_notes == app.batch_notes
    # a later app on the same encoder (backfill rounds) reuses it without measuring again
    seen = len(enc.engine_batches)
    app2 = WorkerApp(load_settings({"batch": {"max_batch_notes": "auto"}}), encoder=enc)
    app2._choose_batch_limits(enc)
    assert app2.calibration is app.calibration and len(enc.engine_batches) == seen
    gauge = app2.metrics.registry.get_sample_value("notellm_batch_max_notes", {"source": "calibrated"})
    assert gauge == app.batch_notes
    # the operator's cap reaches the search beyond the device's default (512 on this CPU-provider fake):
    # a curve still growing at 1024 is measured there, and 1024 is chosen
    import worker.calibrate as cal

    enc = CurveEncoder(lambda n: 10.0 * n)
    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **kw: real(*a, clock=enc.clock, **kw))  # the curve's time
    app = WorkerApp(load_settings({"batch": {"max_batch_notes": "auto", "calibration_max_notes": 1024}}),
                    encoder=enc, calibrate=True)
    app._choose_batch_limits(enc)
    assert max(app.calibration.rates) == 1024 and app.batch_notes == 1024
    # "auto" (the default): the device's cap and budget, 512 notes and 20 s for this CPU-provider fake
    enc = CurveEncoder(lambda n: 10.0 * n)
    app = WorkerApp(load_settings({"batch": {"max_batch_notes": "auto"}}), encoder=enc, calibrate=True)
    app._choose_batch_limits(enc)
    assert max(app.calibration.rates) == 512 and app.calibration.reason == "all candidates measured"


class LimitsEcho:
    """Engine for the child-process test (factory "tests.test_calibrate:LimitsEcho"): each note's
    category is the engine's current "max_batch_notes/max_batch_tokens"."""

    def __init__(self, model_dir, *, max_batch_notes: int, max_batch_tokens: int, **_kw) -> None:
        self.max_batch_notes, self.max_batch_tokens = max_batch_notes, max_batch_tokens
        self.manifest = json.loads((Path(model_dir) / "notellm.json").read_text())
        self.model_version, self.dim, self.providers = str(self.manifest["model_version"]), 4, ["EchoProvider"]

    def warmup(self, generate="both") -> None:
        pass

    def encode(self, prompts, generate, *, timeout_s=None):
        n = len(prompts)
        return (np.full((n, 4), 0.5, np.float32), [f"{self.max_batch_notes}/{self.max_batch_tokens}"] * n,
                [[] for _ in range(n)])


def test_process_encoder_limits_reach_the_child_and_survive_restarts(tiny_dir):
    from worker.encoder_process import ProcessEncoder

    enc = ProcessEncoder(tiny_dir, factory="tests.test_calibrate:LimitsEcho", max_batch_notes=32,
                         max_batch_tokens=4096)
    try:
        prompts = [enc.tokenize(n, "none") for n in BUILTIN_NOTES[:2]]
        assert enc.encode(prompts, "none")[1] == ["32/4096"] * 2
        assert set_batch_limits(enc, 5, 700)
        assert enc.encode(prompts, "none")[1] == ["5/700"] * 2
        enc.restart()
        assert enc.encode(prompts, "none")[1] == ["5/700"] * 2
        enc._kill("test: the child died")  # limits set while the child is gone still reach the next one
        with pytest.raises(EngineError):
            set_batch_limits(enc, 7, 900)
        enc.restart()
        assert enc.encode(prompts, "none")[1] == ["7/900"] * 2
    finally:
        enc.close()


def test_worker_app_calibrates_the_real_tiny_model_and_batches_by_it(kafka_bootstrap, topics, milvus_uri, tiny_dir):
    from worker.app import WorkerApp
    from worker.encoder import OnnxNoteEncoder
    from worker.sinks.milvus import MilvusStore

    budget = 6.0
    s = settings_for(kafka_bootstrap, topics, milvus_uri,
                     model={"dir": str(tiny_dir), "generate": "category", "device": "cpu", "intra_op_threads": 1,
                            "isolation": "thread"},
                     batch={"max_batch_notes": "auto", "calibration_budget_s": budget, "linger_ms": 20})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(300)])
    sizes: list[int] = []

    class Sizes:
        def __init__(self, sink):
            self.sink, self.name = sink, sink.name

        def add(self, enc):
            sizes.append(len(enc.batch.notes))
            self.sink.add(enc)

        def __getattr__(self, k):
            return getattr(self.sink, k)

    app = WorkerApp(s, wrap_sink=lambda sk: Sizes(sk) if sk.name == "milvus" else sk)  # builds its own encoder
    t0 = time.monotonic()
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=180, alive=t.alive)
    assert t.stop() == 0
    c = app.calibration
    assert isinstance(app.encoder, OnnxNoteEncoder) and c is not None and c.calibrated, c
    # within its budget (plus at most one call longer than predicted: these calls take milliseconds)
    assert c.seconds <= budget + 2.0 and time.monotonic() - t0 > c.seconds
    assert len(c.notes_per_s) >= 3 and c.batch_notes in c.rates and c.generate == "category"
    # the batcher and the engine use the calibrated value
    assert (app.batcher.max_notes, app.batcher.max_tokens) == (c.batch_notes, c.batch_tokens)
    assert (app.encoder.max_batch_notes, app.encoder.max_batch_tokens) == (c.batch_notes, c.batch_tokens)
    assert sizes and max(sizes) <= c.batch_notes and sum(sizes) >= len(ids)
    assert app.metrics.registry.get_sample_value("notellm_batch_max_notes", {"source": "calibrated"}) == c.batch_notes
    store = MilvusStore(milvus_uri, alias="notes")
    try:
        assert set(store.all_ids()) == set(ids)
    finally:
        store.close()
