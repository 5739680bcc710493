"""Choose the encoder's batch size on the device it runs on, by measuring it (issue 13).

The best batch depends on the device: on a 2-core CPU, ONNX Runtime embeds ~9.3 notes/s at 1–8 notes
per batch but 6.7 at 32; on a GPU throughput keeps growing into the hundreds. `calibrate` measures
notes/s for growing candidate batch sizes through the `Encoder` protocol only (`tokenize` + `encode`,
with the worker's `generate` task), so it works the same for the in-process engine and for the
`ProcessEncoder` child, and re-creates nothing:

- limits by device (`device_defaults`, from the encoder's providers): candidates are powers of two up to
  `max_notes` (512 on CPU, 2048 on CUDA), within `budget_s` (20 s on CPU, 60 s on CUDA);
- inputs: a fixed built-in set of 8 realistic note texts (`BUILTIN_NOTES`, prompt lengths spread like real
  notes: 76–149 tokens, median 105, with the SmolLM2 tokenizer; MIND news: p5 73, median 102, p90 150).
  Every candidate processes the same mix: a batch of n < len(set) notes covers the whole set in
  several calls, the order alternates short and long notes;
- each candidate size reaches the engine as one batch: before measuring it, the engine's own
  sub-batching limits are raised to it (`worker.encoders.set_batch_limits`); one untimed call warms the
  shape up (on CPU skipped where a call is predicted to take >= `warmup_below_s`: a slow CPU, where its
  share is small and the budget is short; on CUDA always), then whole passes are timed for at least
  `min_measure_s`, and the best pass counts (noise on a shared machine only ever slows a pass down);
- the batch grows while throughput improves by more than `min_gain` (3 %); after `patience` candidates
  without such a gain, or when the next candidate would not fit in what is left of `budget_s`, it stops
  (the budget can be overrun only by a call that takes longer than predicted from the previous one);
- throughput counts the worker's own cost per batch (`batch_overhead_s`, ~10 ms: the pipeline around the
  encoder shares the machine): n / (seconds to encode n + overhead); the encoder's own notes/s are
  what is reported;
- choice: the smallest measured batch within `tolerance` (5 %) of the best throughput (smaller batches,
  lower latency); token budget: that many notes x the longest calibration prompt (the shape measured),
  unless the operator fixed it;
- it never raises for a measurement problem: nothing measured (tokenising failed, the first call failed,
  stopped) gives the configured defaults (`calibrated=False`, with the reason); a failure at a larger size
  keeps what was measured below it. A dead engine is restarted once.

The encoder's limits are left at the returned values. One log line: `encoder.calibrated`.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from notellm.prompts import NoteText
from worker.encoders import DEFAULT_BATCH_NOTES, DEFAULT_TOKENS_PER_NOTE, set_batch_limits
from worker.logs import get_logger
from worker.records import Prompt


@dataclass(frozen=True)
class DeviceDefaults:
    """What "auto" means for the calibration's largest batch, its time budget and its warm-up, per device.

    - CPU: candidates up to 512 notes in 20 s; a shape is warmed up only when a call is predicted to take
      under 1 s (on a slow CPU the warm-up's share is small and the budget short). The best CPU batch is
      1-8 notes, found long before 512.
    - CUDA: up to 2048 notes in 60 s, every shape warmed up first. On an H200 throughput still grew from
      1024 to 2048 notes in both modes (embed-only 8,098 -> 8,792 notes/s, run 9; category generation
      1,959 -> 2,159, run 8: docs/results/gpu), and a first call on a new shape pays allocations and
      kernel plans, which would make the largest sizes, measured by one call, look slower than they are."""

    device: str
    max_notes: int
    budget_s: float
    warmup_below_s: float


CPU_DEFAULTS = DeviceDefaults("cpu", 512, 20.0, 1.0)
CUDA_DEFAULTS = DeviceDefaults("cuda", 2048, 60.0, float("inf"))


def device_defaults(encoder: Any) -> DeviceDefaults:
    """The calibration defaults for the device `encoder` runs on (its ONNX Runtime providers)."""
    providers = [str(p) for p in (getattr(encoder, "providers", None) or [])]
    return CUDA_DEFAULTS if any(p.startswith("CUDA") for p in providers) else CPU_DEFAULTS


def candidate_sizes(max_notes: int) -> tuple[int, ...]:
    """The batch sizes the calibration tries, in order: powers of two up to `max_notes`, then `max_notes`
    itself when it is not one."""
    out, n = [], 1
    while n <= max_notes:
        out.append(n)
        n *= 2
    if max_notes >= 1 and out[-1] != max_notes:
        out.append(max_notes)
    return tuple(out)


# The worker's own cost per batch besides the encoder (poll, decode, batching, Milvus upsert, tags, commit).
# It shares the machine with the encoder, so the batch is chosen on n / (encode time of n + this), not on
# the encoder alone: bench/worker.py, tiny model, 2 cores, milvus-lite: ~13 ms per batch (worker 500 notes/s
# at 16 notes per batch vs 630 at 32, with the encoder alone equally fast at both); without it the
# calibration chose 16 there and the worker lost 20 %.
BATCH_OVERHEAD_S = 0.010

# Written for this module (no dataset is needed at runtime). Alternating short and long, so that any
# prefix has about the mix of the whole set.
BUILTIN_NOTES: tuple[NoteText, ...] = tuple(NoteText(title=t, content=c, topic=topic) for t, topic, c in (
    ("Sunset from the pier tonight", "photography",
     "No filter. Ten minutes of pink and orange over the water, then it was gone."),
    ("Weekend hike report: the ridge trail above the lake, start early and bring extra water", "travel",
     "Started at the north trailhead at 6:30 to beat the heat. The first two miles climb steadily through pine "
     "forest, then the trail opens onto the ridge with views over the whole lake and the peaks behind it. "
     "Bring more water than you think, there is none after the first creek crossing. The loop took us five and "
     "a half hours with a long lunch stop, about 11 miles and 2,400 feet of climbing. Parking fills by 8 on "
     "Saturdays."),
    ("Gym log, day 40", "fitness",
     "Deadlift personal record at 100 kg today. Slow progress is still progress."),
    ("Budget mechanical keyboard review after six weeks of daily typing and some gaming", "tech",
     "I switched from a laptop keyboard to a $45 hot-swap board with linear switches. Typing feels smoother and "
     "quieter than I expected, the stabilisers rattle a bit on the space bar, and the software is basic but works "
     "on Linux. Battery lasts about two weeks with the backlight off. Worth it if you type all day; skip it if you "
     "game competitively, the polling rate is only 125 Hz."),
    ("Late-night ramen near the station", "food",
     "Found a tiny counter-only ramen place open until 2am. Rich pork broth, thin noodles, and the soft egg was "
     "perfect."),
    ("Beginner watercolour: fixing muddy skies", "art",
     "My skies kept turning grey-brown. Three things fixed it: wet the paper evenly first and wait for the sheen "
     "to fade, mix far more paint than you need so you never stop halfway, and never go back into a drying wash. "
     "Ultramarine plus a touch of burnt sienna for clouds, lifted out with a dry brush while still damp. Practise "
     "on small cards, ten minutes each, and keep the ones that failed to compare later; the difference after a "
     "month surprised me."),
    ("Why the stadium vote matters for our neighborhood", "news",
     "The council votes Tuesday on the stadium plan. Traffic, rents and the park on 5th street are all on the "
     "table; here is what each option would change for people who live nearby."),
    ("Thrifted linen blazer, styled three ways", "fashion",
     "Picked this up for $12 at the Saturday market. Wore it over a white tee with jeans, with a slip dress, and "
     "belted as a top for dinner. Linen wrinkles, I've made peace with it."),
))


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` chose and why. `notes_per_s`: (batch size, measured notes/s) per candidate measured,
    in order; `calibrated=False`: nothing usable was measured and the defaults were returned."""

    batch_notes: int
    batch_tokens: int
    notes_per_s: tuple[tuple[int, float], ...]
    seconds: float
    calibrated: bool
    reason: str                  # why the search stopped ("plateau", "budget", ...) or why it fell back
    generate: str = "none"
    batch_overhead_s: float = 0.0  # the worker's cost per batch the choice added to the encoder's time
    prompt_tokens: int = 0       # the longest calibration prompt (tokens per note of the token budget)
    failures: tuple[tuple[int, str], ...] = ()
    device: str = "cpu"          # whose defaults applied (`device_defaults`), and the limits searched within
    max_notes: int = 0
    budget_s: float = 0.0

    @property
    def rates(self) -> dict[int, float]:
        return dict(self.notes_per_s)

    def as_log(self) -> dict[str, Any]:
        return {"batch_notes": self.batch_notes, "batch_tokens": self.batch_tokens, "calibrated": self.calibrated,
                "reason": self.reason, "generate": self.generate, "seconds": round(self.seconds, 2),
                "notes_per_s": {str(n): round(r, 2) for n, r in self.notes_per_s},
                "batch_overhead_ms": round(self.batch_overhead_s * 1000, 2), "device": self.device,
                "max_notes": self.max_notes, "budget_s": self.budget_s,
                **({"failures": {str(n): e for n, e in self.failures}} if self.failures else {})}


_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, Calibration]]" = weakref.WeakKeyDictionary()


def calibrated(encoder: Any, generate: str) -> Calibration | None:
    """The last successful calibration of this encoder object for `generate` (None if never)."""
    try:
        return _CACHE.get(encoder, {}).get(generate)
    except TypeError:  # not weak-referenceable
        return None


def with_overhead(n: int, rate: float, overhead_s: float) -> float:
    """notes/s of batches of n when each batch also costs `overhead_s` besides the encoder's n / rate."""
    if overhead_s <= 0 or rate == float("inf"):
        return rate
    return n / (n / rate + overhead_s)


def choose(rates: dict[int, float], tolerance: float = 0.05, overhead_s: float = 0.0) -> int:
    """The smallest batch size whose throughput (with `overhead_s` per batch) is within `tolerance` of the best."""
    eff = {n: with_overhead(n, r, overhead_s) for n, r in rates.items()}
    best = max(eff.values())
    return min(n for n, r in eff.items() if r >= (1.0 - tolerance) * best)


def _batches(prompts: Sequence[Prompt], n: int) -> list[list[Prompt]]:
    """One measurement pass for batch size n: the whole set (cycled) in batches of n, so every candidate
    sees the same mix of lengths; a batch of n >= len(set) is the set cycled to n."""
    k = len(prompts)
    total = n * max(1, -(-k // n))
    seq = [prompts[i % k] for i in range(total)]
    return [seq[i:i + n] for i in range(0, total, n)]


def calibrate(encoder: Any, notes: Iterable[Any] | None = None, *, generate: str = "none",
              candidates: Sequence[int] | None = None, budget_s: float | None = None, max_notes: int | None = None,
              max_tokens: int | None = None, default_notes: int = DEFAULT_BATCH_NOTES,
              default_tokens: int | None = None, min_gain: float = 0.03, tolerance: float = 0.05, patience: int = 2,
              min_measure_s: float = 0.5, warmup_below_s: float | None = None,
              batch_overhead_s: float = BATCH_OVERHEAD_S,
              call_timeout_s: float | None = 120.0,
              should_stop: Callable[[], bool] | None = None, clock: Callable[[], float] = time.perf_counter,
              log: Any = None) -> Calibration:
    """Measure `encoder` (tokenize + encode with `generate`) at growing batch sizes and choose one; see the
    module docstring. `notes`: note-like objects (title, content, topic) or `Prompt`s (default:
    `BUILTIN_NOTES`); `max_tokens`: a token budget fixed by the operator (else notes x longest prompt);
    `default_notes`/`default_tokens`: the fallback; `call_timeout_s`: each encode call's deadline (a child
    process is killed past it); `should_stop`: checked between calls (a shutdown during start-up).
    `max_notes`, `budget_s`, `warmup_below_s`: None = the encoder's device's (`device_defaults`);
    `candidates`: None = `candidate_sizes(max_notes)`."""
    log = log or get_logger("worker.calibrate")
    t0 = clock()
    dev = device_defaults(encoder)
    max_notes = dev.max_notes if max_notes is None else max_notes
    budget_s = dev.budget_s if budget_s is None else budget_s
    warmup_below_s = dev.warmup_below_s if warmup_below_s is None else warmup_below_s
    candidates = candidate_sizes(max_notes) if candidates is None else candidates
    fallback_tokens = max_tokens or default_tokens or default_notes * DEFAULT_TOKENS_PER_NOTE
    rates: dict[int, float] = {}
    failures: dict[int, str] = {}
    reason = "all candidates measured"
    longest = 0

    def elapsed() -> float:
        return clock() - t0

    def stopping() -> bool:
        try:
            return bool(should_stop and should_stop())
        except Exception:  # noqa: BLE001
            return False

    def call(batch: list[Prompt]) -> float:
        s = clock()
        vecs, _cats, _tags = encoder.encode(batch, generate, timeout_s=call_timeout_s)
        dt = clock() - s
        if np.shape(vecs)[0] != len(batch):
            raise ValueError(f"encoder returned {np.shape(vecs)[0]} vectors for {len(batch)} notes")
        return dt

    try:
        items = list(BUILTIN_NOTES if notes is None else notes)
        prompts = [x if isinstance(x, Prompt) else encoder.tokenize(x, generate) for x in items]
        if not prompts:
            raise ValueError("no calibration notes")
        longest = max(p.tokens for p in prompts)
    except Exception as e:  # noqa: BLE001 - a measurement problem: fall back
        prompts, reason = [], f"could not tokenise the calibration notes: {type(e).__name__}: {e}"

    sizes = sorted({int(c) for c in candidates if 1 <= int(c) <= max_notes})
    if prompts and not sizes:
        reason = f"no candidate batch size <= max_notes={max_notes}"
    best, stale = 0.0, 0
    per_note_s: float | None = None  # the last candidate's seconds per note, to predict the next one
    limits_applied = False
    for n in sizes if prompts else ():
        passes = _batches(prompts, n)
        pass_notes = sum(len(b) for b in passes)
        if stopping():
            reason = "stopped"
            break
        left = budget_s - elapsed()
        warm = per_note_s is None or per_note_s * n < warmup_below_s
        if per_note_s is not None and per_note_s * (n * warm + pass_notes) > left:
            reason = "budget"
            break
        try:
            limits_applied = set_batch_limits(encoder, n, max(n * longest, max_tokens or 0))
            first = call(passes[0]) if warm else None  # warms this shape up (allocations, first-call costs)
            done, spent, k = 0, 0.0, 0
            full, best_pass, p_notes, p_time = 0, 0.0, 0, 0.0
            while not (spent >= min_measure_s and full >= 1):
                batch = passes[k % len(passes)]
                if done and elapsed() + (spent / done) * len(batch) > budget_s:
                    break  # keep what was measured
                if stopping():
                    break
                dt = call(batch)
                k += 1
                spent, done, p_time, p_notes = spent + dt, done + len(batch), p_time + dt, p_notes + len(batch)
                if k % len(passes) == 0:  # a whole pass: the same mix of notes for every candidate
                    full += 1
                    best_pass = max(best_pass, p_notes / p_time if p_time > 0 else float("inf"))
                    p_notes, p_time = 0, 0.0
            if not done and first is not None:  # no time left after the warm-up: it is the measurement
                spent, done = first, len(passes[0])
        except Exception as e:  # noqa: BLE001 - OOM, a dead child, a timeout: keep the smaller sizes
            failures[n] = f"{type(e).__name__}: {e}"[:300]
            reason = f"failed at {n} notes"
            break
        if not done:  # stopped before anything was timed
            reason = "stopped"
            break
        # the best whole pass (noise on a shared machine only slows a pass down); else the mean so far
        rate = best_pass if full else (done / spent if spent > 0 else float("inf"))
        rates[n] = rate
        per_note_s = spent / done
        eff = with_overhead(n, rate, batch_overhead_s)
        if eff > best * (1.0 + min_gain):
            best, stale = eff, 0
        else:
            stale += 1
            if stale >= patience:
                reason = "plateau"
                break
        if elapsed() >= budget_s:
            reason = "budget"
            break
    if stopping():
        reason = "stopped"

    if rates and reason != "stopped":
        notes_n = choose(rates, tolerance, batch_overhead_s)
        tokens = max_tokens or max(16, notes_n * longest)
        ok = True
    else:
        notes_n, tokens, ok = default_notes, fallback_tokens, False
    if limits_applied or failures:
        _apply(encoder, notes_n, tokens, log)
    cal = Calibration(batch_notes=notes_n, batch_tokens=tokens, notes_per_s=tuple(rates.items()),
                      seconds=elapsed(), calibrated=ok, reason=reason, generate=generate, prompt_tokens=longest,
                      failures=tuple(failures.items()), batch_overhead_s=batch_overhead_s, device=dev.device,
                      max_notes=max_notes, budget_s=budget_s)
    fields = {**cal.as_log(), "providers": list(getattr(encoder, "providers", None) or []),
              "limits_applied": limits_applied}
    if ok:
        log.info("encoder.calibrated", **fields)
        try:
            _CACHE.setdefault(encoder, {})[generate] = cal
        except TypeError:
            pass
    else:
        log.warning("encoder.calibrated", **fields, fallback=True)
    return cal


def _apply(encoder: Any, notes: int, tokens: int, log: Any) -> None:
    """Leave the engine at the chosen limits; a dead engine is restarted (at those limits: a ProcessEncoder
    keeps them for its next child even when the running one is gone)."""
    try:
        set_batch_limits(encoder, notes, tokens)
    except Exception as e:  # noqa: BLE001
        log.warning("encoder.calibration_limits_failed", error=f"{type(e).__name__}: {e}")
    health = getattr(encoder, "health", None)
    try:
        healthy = health is None or health().ok
    except Exception:  # noqa: BLE001
        healthy = False
    if not healthy:
        try:
            encoder.restart()
            set_batch_limits(encoder, notes, tokens)
            log.warning("encoder.restarted_after_calibration")
        except Exception as e:  # noqa: BLE001 - the worker's warm-up will report it
            log.error("encoder.restart_after_calibration_failed", error=f"{type(e).__name__}: {e}")
