"""Co-occurrence pair scoring and the time split, on hand-computed toy logs."""
from __future__ import annotations

import pytest

from notellm.data import Click
from notellm.pairs import (DAY, batch_pairs, cooccurrence_scores, exposure_buckets, limit_pairs,
                           select_pairs, time_split)


def _toy():
    return [
        # u1 clicks A, B (1 day later), C (10 days after A, 9 after B): only A->B is inside 7 days. N=3.
        Click("u1", "A", 0.0), Click("u1", "B", 1 * DAY), Click("u1", "C", 10 * DAY),
        # u2: A then B two days later. N=2.
        Click("u2", "A", 0.0), Click("u2", "B", 2 * DAY),
        # u3: B, A, B again: B->A and A->B (once per user), B->B ignored. N=2.
        Click("u3", "B", 0.0), Click("u3", "A", 1 * DAY), Click("u3", "B", 2 * DAY),
    ]


def test_scores_match_hand_computation():
    s = cooccurrence_scores(_toy(), window=7 * DAY)
    assert s == pytest.approx({("A", "B"): 1 / 3 + 1 / 2 + 1 / 2, ("B", "A"): 1 / 2})


def test_window_is_inclusive_and_order_matters():
    clicks = [Click("u", "A", 0.0), Click("u", "B", 7 * DAY), Click("u", "C", 7 * DAY + 1)]
    s = cooccurrence_scores(clicks, window=7 * DAY)
    assert set(s) == {("A", "B"), ("B", "C")}
    assert s[("A", "B")] == pytest.approx(1 / 3)


def test_select_thresholds_and_top_t():
    scores = {("A", "B"): 0.9, ("A", "C"): 0.5, ("A", "D"): 0.4, ("A", "E"): 0.01, ("A", "F"): 5.0,
              ("B", "A"): 0.3}
    got = select_pairs(scores, lower=0.05, upper=1.0, top_t=2)
    assert [(a, b) for a, b, _ in got] == [("A", "B"), ("A", "C"), ("B", "A")]


def test_time_split_keeps_sides_apart_and_finds_cold_notes():
    clicks = [Click("u1", "A", 0.0), Click("u1", "B", 1.0), Click("u2", "A", 2.0), Click("u2", "B", 3.0),
              # later period: a new note N appears, co-clicked with A and B
              Click("u3", "A", 100.0), Click("u3", "N", 101.0), Click("u4", "B", 102.0), Click("u4", "N", 103.0),
              Click("u5", "A", 104.0), Click("u5", "B", 105.0)]
    sp = time_split(clicks, test_fraction=0.6)
    assert sp.split_time == 100.0
    assert all(c.timestamp < 100.0 for c in sp.train_clicks)
    assert {(a, b) for a, b, _ in sp.train_pairs} == {("A", "B")}
    # A->B is a training pair: dropped from the test; the cold note N remains.
    assert {(a, b) for a, b, _ in sp.test_pairs} == {("A", "N"), ("B", "N")}
    assert sp.summary()["test_notes_unseen_in_training"] == 1
    b = exposure_buckets(sp.test_notes, sp.train_counts)
    assert b["N"] == "unseen" and b["A"] in ("low", "high")


def test_limit_and_batches():
    pairs = [(f"n{i}", f"n{i+1}", 1.0) for i in range(20)]
    lim = limit_pairs(pairs, max_notes=8, seed=1)
    notes = {x for p in lim for x in p[:2]}
    assert 0 < len(notes) <= 8
    batches = batch_pairs(pairs, batch_size=4, seed=0)
    assert sorted(p for b in batches for p in b) == sorted(pairs)
    for b in batches:
        ids = [x for p in b for x in p[:2]]
        assert len(ids) == len(set(ids)) and len(b) <= 4


def test_real_movielens_split(shared_data):
    from notellm.data import load_movielens
    ds = load_movielens(shared_data / "movielens-latest-small")
    sp = time_split(ds, test_fraction=0.2)
    s = sp.summary()
    assert s["train_pairs"] > 10_000 and s["test_pairs"] > 1_000
    assert s["test_notes_unseen_in_training"] > 0
    assert max(c.timestamp for c in sp.train_clicks) < min(c.timestamp for c in sp.test_clicks)
