"""Co-occurrence pair scoring and the time split, on hand-computed toy logs."""
from __future__ import annotations

import pytest

from notellm.data import Click
from notellm.pairs import (DAY, batch_pairs, choose_cold_notes, cooccurrence_scores, exposure_buckets, limit_pairs,
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


@pytest.fixture(scope="module")
def real_experiments(shared_data):
    """The default experiment (time split, test_fraction 0.2, no holdout) on MovieLens and MIND."""
    from notellm.data import load_dataset
    from notellm.pairs import SplitConfig, make_experiment

    return {name: make_experiment(load_dataset(shared_data / name), SplitConfig())
            for name in ("movielens-latest-small", "mind-small-sample")}


def test_real_movielens_split(real_experiments):
    sp = real_experiments["movielens-latest-small"].split
    s = sp.summary()
    assert s["train_pairs"] > 10_000 and s["test_pairs"] > 1_000
    assert s["test_notes_unseen_in_training"] > 0
    assert max(c.timestamp for c in sp.train_clicks) < min(c.timestamp for c in sp.test_clicks)


def _cold_toy():
    # four users; X is the note held out below
    return [Click("u1", "A", 0.0), Click("u1", "B", 1.0), Click("u1", "X", 2.0),
            Click("u2", "A", 3.0), Click("u2", "X", 4.0), Click("u2", "C", 5.0),
            Click("u3", "B", 6.0), Click("u3", "C", 7.0),
            # later period
            Click("u4", "A", 100.0), Click("u4", "C", 101.0), Click("u4", "X", 102.0),
            Click("u5", "D", 103.0), Click("u5", "B", 104.0)]


def test_cold_holdout_keeps_held_out_notes_out_of_training():
    clicks = _cold_toy()
    sp = time_split(clicks, test_fraction=0.35, cold_notes={"X"})
    assert sp.split_time == 100.0 and sp.cold_notes == frozenset({"X"})
    assert [c.note for c in sp.held_out_clicks] == ["X", "X"]
    assert all(c.note != "X" for c in sp.train_clicks) and sp.train_counts["X"] == 0
    assert {(a, b) for a, b, _ in sp.train_pairs} == {("A", "B"), ("A", "C"), ("B", "C")}
    # warm: later-period pairs without X and not already trained (A->C is); cold: every pair with X, whole log
    assert {(a, b) for a, b, _ in sp.warm_test_pairs} == {("D", "B")}
    assert {(a, b) for a, b, _ in sp.cold_test_pairs} == {("A", "X"), ("B", "X"), ("X", "C"), ("C", "X")}
    assert sp.test_pairs == sp.warm_test_pairs + sp.cold_test_pairs
    s = sp.summary()
    assert (s["cold_notes"], s["cold_test_pairs"], s["warm_test_pairs"], s["held_out_clicks"]) == (1, 4, 1, 2)
    assert exposure_buckets(sp.test_notes, sp.train_counts)["X"] == "unseen"


def test_choose_cold_notes_is_seeded_and_order_free():
    notes = [f"n{i}" for i in range(50)]
    a = choose_cold_notes(notes, 0.1, seed=7)
    assert len(a) == 5 and a <= set(notes)
    assert a == choose_cold_notes(reversed(notes), 0.1, seed=7) == choose_cold_notes(notes * 2, 0.1, seed=7)
    assert choose_cold_notes(notes, 0.0) == frozenset() and len(choose_cold_notes(notes[:3], 0.01)) == 1
    with pytest.raises(ValueError):
        choose_cold_notes(notes, 1.0)
    sp = time_split(_cold_toy(), test_fraction=0.35, cold_fraction=0.25, cold_seed=3)
    assert sp.cold_notes == choose_cold_notes("ABCDX", 0.25, seed=3)


def test_default_split_unchanged_on_movielens_and_mind(real_experiments):
    """No holdout by default: the figures and the exact pairs are those of the code before the holdout."""
    import hashlib
    import json

    pinned = {
        "movielens-latest-small": ({"split_time": 1454621693.0, "train_clicks": 38864, "test_clicks": 9716,
                                    "train_pairs": 44988, "train_notes": 5069, "test_pairs": 25765,
                                    "test_notes": 2914, "test_notes_unseen_in_training": 1096,
                                    "used_train_pairs": 44845, "used_train_notes": 5069, "used_test_pairs": 25765,
                                    "used_test_notes": 2914, "used_test_notes_unseen": 1096}, "83f5cc2760f64fc6"),
        "mind-small-sample": ({"split_time": 1573662852.0, "train_clicks": 4423, "test_clicks": 1106,
                               "train_pairs": 2161, "train_notes": 517, "test_pairs": 837, "test_notes": 270,
                               "test_notes_unseen_in_training": 55, "used_train_pairs": 2152,
                               "used_train_notes": 517, "used_test_pairs": 837, "used_test_notes": 270,
                               "used_test_notes_unseen": 55}, "0c837f37658ec64e"),
    }
    for name, (summary, digest) in pinned.items():
        e = real_experiments[name]
        assert e.cold_notes == frozenset() and e.cold_test_pairs == [] and e.warm_test_pairs == e.test_pairs
        assert e.summary() == summary
        got = hashlib.sha256(json.dumps([e.train_pairs, e.test_pairs,
                                         sorted(e.split.train_counts.items())]).encode()).hexdigest()[:16]
        assert got == digest, name
