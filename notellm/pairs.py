"""Co-occurrence pairs (NoteLLM, section 4.1) and the time split used for training and evaluation.

For every user u, with clicks sorted by time: each ordered pair (A clicked, then B clicked within
`window` seconds, A != B) adds 1/N_u to s(A -> B), where N_u is the number of distinct notes u clicked
(in the click set given). A user contributes to a given ordered pair at most once. Then, per note A,
neighbours whose score is above `upper` or below `lower` are dropped and the top `top_t` kept (ties by
note id, so the result is deterministic).

`time_split` cuts the click log at a time quantile: training pairs come only from the earlier clicks,
test pairs only from the later ones, so notes that first appear after the cut are genuinely unseen at
training time (cold start). Exposure = a note's number of clicks in the training period.

True cold start (`cold_fraction` > 0, default off): on logs where every note is clicked early (e.g. a
5-core Amazon set) the time cut leaves almost no unseen notes, so a seeded random share of the clicked notes
is held out of training entirely (`choose_cold_notes`): their clicks leave the training period, so no
training pair touches them; the evaluation pairs are then the warm test pairs (later period, no held-out
note) plus every selected pair, over the whole log, that involves a held-out note (`Split.cold_notes`,
`Split.warm_test_pairs`, `Split.cold_test_pairs`).

Pure numpy + stdlib: no torch.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from notellm.data import Click, Dataset

DAY = 86400.0
__all__ = [
    "DAY", "cooccurrence_scores", "select_pairs", "build_pairs", "Split", "time_split", "limit_pairs",
    "unordered_unique", "batch_pairs", "exposure_buckets", "SplitConfig", "Experiment", "make_experiment",
    "choose_cold_notes", "split_cold",
]


def cooccurrence_scores(clicks: Iterable[Click], window: float = 7 * DAY) -> dict[tuple[str, str], float]:
    """s(A -> B) = sum over users who clicked B within `window` seconds after A of 1/N_u."""
    by_user: dict[str, list[tuple[float, str]]] = {}
    for c in clicks:
        by_user.setdefault(c.user, []).append((c.timestamp, c.note))
    ids: dict[str, int] = {}
    for evs in by_user.values():
        for _, n in evs:
            ids.setdefault(n, len(ids))
    names = list(ids)
    n_notes = max(len(ids), 1)
    keys_acc: list[np.ndarray] = []
    w_acc: list[np.ndarray] = []
    pending = 0

    def reduce() -> None:
        nonlocal pending
        if len(keys_acc) <= 1:
            return
        k = np.concatenate(keys_acc)
        w = np.concatenate(w_acc)
        uk, inv = np.unique(k, return_inverse=True)
        keys_acc[:] = [uk]
        w_acc[:] = [np.bincount(inv, weights=w)]
        pending = 0

    for user in sorted(by_user):
        evs = sorted(by_user[user])
        codes = np.fromiter((ids[n] for _, n in evs), dtype=np.int64, count=len(evs))
        times = np.fromiter((t for t, _ in evs), dtype=np.float64, count=len(evs))
        n_u = len(set(codes.tolist()))
        if n_u < 2:
            continue
        end = np.searchsorted(times, times + window, side="right")
        lengths = end - np.arange(len(evs)) - 1
        total = int(lengths.sum())
        if total == 0:
            continue
        a = np.repeat(codes, lengths)
        # b index for event i runs over i+1 .. end[i]-1
        starts = np.repeat(np.arange(len(evs)) + 1, lengths)
        offs = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        b = codes[starts + offs]
        keep = a != b
        key = np.unique(a[keep] * n_notes + b[keep])  # once per user
        keys_acc.append(key)
        w_acc.append(np.full(len(key), 1.0 / n_u))
        pending += len(key)
        if pending > 5_000_000:
            reduce()
    if not keys_acc:
        return {}
    reduce()
    k, w = keys_acc[0], w_acc[0]
    qa, qb = np.divmod(k, n_notes)
    return {(names[x], names[y]): float(s) for x, y, s in zip(qa.tolist(), qb.tolist(), w.tolist())}


def select_pairs(scores: dict[tuple[str, str], float], *, lower: float | None = None,
                 upper: float | None = None, top_t: int = 10) -> list[tuple[str, str, float]]:
    """Per note A: drop neighbours with s > upper or s < lower, keep the top `top_t` by score."""
    by_a: dict[str, list[tuple[float, str]]] = {}
    for (a, b), s in scores.items():
        if (lower is not None and s < lower) or (upper is not None and s > upper):
            continue
        by_a.setdefault(a, []).append((s, b))
    out = []
    for a in sorted(by_a):
        nb = sorted(by_a[a], key=lambda sb: (-sb[0], sb[1]))[:top_t]
        out.extend((a, b, s) for s, b in nb)
    return out


def build_pairs(clicks: Iterable[Click], *, window: float = 7 * DAY, lower: float | None = None,
                upper: float | None = None, top_t: int = 10) -> list[tuple[str, str, float]]:
    return select_pairs(cooccurrence_scores(clicks, window), lower=lower, upper=upper, top_t=top_t)


def unordered_unique(pairs: Iterable[tuple]) -> list[tuple]:
    """Keep one of (A, B) and (B, A) (the first met), for training."""
    seen: set[frozenset] = set()
    out = []
    for p in pairs:
        key = frozenset(p[:2])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def choose_cold_notes(notes: Iterable[str], fraction: float, seed: int = 0) -> frozenset[str]:
    """A seeded random `fraction` of the distinct `notes` (at least one when `fraction` > 0).

    The ids are sorted before the draw, so the result depends only on the set of notes, the fraction and
    the seed (not on click order).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"cold fraction must be in [0, 1), got {fraction}")
    pool = sorted(set(notes))
    if fraction == 0.0 or not pool:
        return frozenset()
    k = max(1, int(round(fraction * len(pool))))
    return frozenset(random.Random(seed).sample(pool, k))


def split_cold(pairs: Iterable[tuple], cold_notes: Iterable[str]) -> tuple[list[tuple], list[tuple]]:
    """(warm, cold): the pairs with no held-out note, and those with at least one."""
    cold = cold_notes if isinstance(cold_notes, (set, frozenset)) else set(cold_notes)
    warm_p, cold_p = [], []
    for p in pairs:
        (cold_p if p[0] in cold or p[1] in cold else warm_p).append(p)
    return warm_p, cold_p


class _WarmCold:
    """`test_pairs` split by the cold-start holdout (`cold_notes`): pairs without / with a held-out note."""

    @property
    def warm_test_pairs(self) -> list[tuple[str, str, float]]:
        return split_cold(self.test_pairs, self.cold_notes)[0]  # type: ignore[attr-defined]

    @property
    def cold_test_pairs(self) -> list[tuple[str, str, float]]:
        return split_cold(self.test_pairs, self.cold_notes)[1]  # type: ignore[attr-defined]


@dataclass
class Split(_WarmCold):
    split_time: float
    train_clicks: list[Click]
    test_clicks: list[Click]
    train_pairs: list[tuple[str, str, float]]
    test_pairs: list[tuple[str, str, float]]  # every evaluation pair: warm ones, then cold ones
    train_counts: Counter = field(default_factory=Counter)  # clicks per note before the cut (exposure)
    cold_notes: frozenset = frozenset()  # notes held out of training entirely (empty: holdout off)
    held_out_clicks: list[Click] = field(default_factory=list)  # their clicks before the cut

    @property
    def train_notes(self) -> set[str]:
        return {x for p in self.train_pairs for x in p[:2]}

    @property
    def test_notes(self) -> list[str]:
        return sorted({x for p in self.test_pairs for x in p[:2]})

    def summary(self) -> dict:
        tn = self.test_notes
        unseen = [n for n in tn if self.train_counts.get(n, 0) == 0]
        out = {"split_time": self.split_time, "train_clicks": len(self.train_clicks),
               "test_clicks": len(self.test_clicks), "train_pairs": len(self.train_pairs),
               "train_notes": len(self.train_notes), "test_pairs": len(self.test_pairs),
               "test_notes": len(tn), "test_notes_unseen_in_training": len(unseen)}
        if self.cold_notes:
            warm, cold = split_cold(self.test_pairs, self.cold_notes)
            out.update({"cold_notes": len(self.cold_notes), "held_out_clicks": len(self.held_out_clicks),
                        "warm_test_pairs": len(warm), "cold_test_pairs": len(cold),
                        "cold_test_notes": sum(1 for n in tn if n in self.cold_notes)})
        return out


def time_split(ds: Dataset | Sequence[Click], *, test_fraction: float = 0.2, window: float = 7 * DAY,
               lower: float | None = None, upper: float | None = None, top_t: int = 10,
               drop_train_pairs_from_test: bool = True, cold_fraction: float = 0.0, cold_seed: int = 0,
               cold_notes: Iterable[str] | None = None) -> Split:
    """Cut the click log at the (1 - test_fraction) time quantile; pairs on each side separately.

    With `drop_train_pairs_from_test`, a test pair whose two notes already form a training pair (either
    order) is removed: the test measures pairs the model never saw.

    Cold-start holdout (off by default): `cold_fraction` of the clicked notes, drawn with `cold_seed`
    (or exactly `cold_notes` when given), are held out of training entirely: their clicks before the cut
    are removed (kept in `held_out_clicks`), so no training pair and no training exposure involves them.
    The test pairs are then the later-period pairs without a held-out note (warm), followed by the pairs
    selected over the whole log (same scoring) that involve a held-out note (cold).
    """
    clicks = sorted(ds.clicks if isinstance(ds, Dataset) else ds, key=lambda c: c.timestamp)
    if not clicks:
        raise ValueError("no clicks")
    cut = clicks[min(len(clicks) - 1, int(len(clicks) * (1.0 - test_fraction)))].timestamp
    if cold_notes is not None:
        cold = frozenset(cold_notes)
    else:
        cold = choose_cold_notes((c.note for c in clicks), cold_fraction, cold_seed)
    train_c = [c for c in clicks if c.timestamp < cut and c.note not in cold]
    held_out = [c for c in clicks if c.timestamp < cut and c.note in cold]
    test_c = [c for c in clicks if c.timestamp >= cut]
    kw = dict(window=window, lower=lower, upper=upper, top_t=top_t)
    train_p = build_pairs(train_c, **kw)
    test_p = build_pairs(test_c, **kw)
    if drop_train_pairs_from_test:
        seen = {frozenset(p[:2]) for p in train_p}
        test_p = [p for p in test_p if frozenset(p[:2]) not in seen]
    if cold:
        test_p = split_cold(test_p, cold)[0] + split_cold(build_pairs(clicks, **kw), cold)[1]
    return Split(cut, train_c, test_c, train_p, test_p, Counter(c.note for c in train_c), cold, held_out)


def limit_pairs(pairs: Sequence[tuple], max_notes: int, seed: int = 0) -> list[tuple]:
    """Restrict pairs to a random set of at most `max_notes` notes (both ends inside it).

    Pairs are visited in a seeded random order; a pair's notes join the set while it fits. All pairs
    among the chosen notes are kept, so the candidate pool (= the chosen notes) stays dense in pairs.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen: set[str] = set()
    for i in order:
        a, b = pairs[i][0], pairs[i][1]
        new = {a, b} - chosen
        if len(chosen) + len(new) <= max_notes:
            chosen |= new
        if len(chosen) >= max_notes:
            break
    return [p for p in pairs if p[0] in chosen and p[1] in chosen]


def batch_pairs(pairs: Sequence[tuple], batch_size: int, seed: int = 0, epoch: int = 0) -> list[list[tuple]]:
    """Shuffle and group pairs into batches in which no note appears twice (no false in-batch negatives).

    A pair that would repeat a note is deferred to a later batch; every pair is used exactly once.
    """
    rest = list(pairs)
    random.Random(seed * 1_000_003 + epoch).shuffle(rest)
    batches: list[list[tuple]] = []
    while rest:
        batch, used, deferred = [], set(), []
        for p in rest:
            if len(batch) < batch_size and p[0] not in used and p[1] not in used:
                batch.append(p)
                used.update(p[:2])
            else:
                deferred.append(p)
        batches.append(batch)
        rest = deferred
    return batches


def exposure_buckets(notes: Iterable[str], train_counts: Counter) -> dict[str, str]:
    """note -> 'unseen' (no training click), 'low' or 'high' (split at the median of the seen notes' counts)."""
    notes = list(notes)
    seen = sorted(train_counts.get(n, 0) for n in notes if train_counts.get(n, 0) > 0)
    median = seen[len(seen) // 2] if seen else 0
    out = {}
    for n in notes:
        c = train_counts.get(n, 0)
        out[n] = "unseen" if c == 0 else ("low" if c < median else "high")
    return out


@dataclass
class SplitConfig:
    """Everything that decides which pairs train and which test; saved with a trained model so that
    `notellm eval` rebuilds the very same split."""

    test_fraction: float = 0.2
    window_days: float = 7.0
    lower: float | None = None
    upper: float | None = None
    top_t: int = 10
    max_train_notes: int | None = None  # restrict train pairs to a random note set (see limit_pairs)
    max_train_pairs: int | None = None  # random subsample of the (unordered, de-duplicated) train pairs
    max_test_notes: int | None = None   # candidate pool cap (see limit_pairs)
    seed: int = 0
    cold_fraction: float = 0.0          # share of notes held out of training entirely (seeded by `seed`)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SplitConfig":
        d = dict(d or {})
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Experiment(_WarmCold):
    split: Split
    train_pairs: list[tuple[str, str, float]]  # what training (and the fine-tuned SBERT) uses
    test_pairs: list[tuple[str, str, float]]   # what evaluation uses
    config: SplitConfig

    @property
    def test_notes(self) -> list[str]:
        return sorted({x for p in self.test_pairs for x in p[:2]})

    @property
    def cold_notes(self) -> frozenset:
        return self.split.cold_notes

    def summary(self) -> dict:
        s = self.split.summary()
        tn = self.test_notes
        s.update({"used_train_pairs": len(self.train_pairs),
                  "used_train_notes": len({x for p in self.train_pairs for x in p[:2]}),
                  "used_test_pairs": len(self.test_pairs), "used_test_notes": len(tn),
                  "used_test_notes_unseen": sum(1 for n in tn if self.split.train_counts.get(n, 0) == 0)})
        if self.cold_notes:
            warm, cold = split_cold(self.test_pairs, self.cold_notes)
            s.update({"used_warm_test_pairs": len(warm), "used_cold_test_pairs": len(cold),
                      "used_cold_test_notes": sum(1 for n in tn if n in self.cold_notes)})
        return s


def make_experiment(ds: Dataset, cfg: SplitConfig) -> Experiment:
    """Time split (+ the cold-start holdout when `cfg.cold_fraction` > 0) + the seeded subsamples of train
    pairs and test notes (deterministic for a config)."""
    sp = time_split(ds, test_fraction=cfg.test_fraction, window=cfg.window_days * DAY, lower=cfg.lower,
                    upper=cfg.upper, top_t=cfg.top_t, cold_fraction=cfg.cold_fraction, cold_seed=cfg.seed)
    train = unordered_unique(sp.train_pairs)
    if cfg.max_train_notes is not None:
        train = limit_pairs(train, cfg.max_train_notes, cfg.seed)
    if cfg.max_train_pairs is not None and len(train) > cfg.max_train_pairs:
        rng = random.Random(cfg.seed)
        train = sorted(rng.sample(train, cfg.max_train_pairs))
    test = sp.test_pairs
    if cfg.max_test_notes is not None:
        test = limit_pairs(test, cfg.max_test_notes, cfg.seed)
    return Experiment(sp, train, test, cfg)
