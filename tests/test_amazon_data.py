"""The Amazon review layout (`<P>.item.json` + `<P>.inter.json`) on the real ../shared/data/amazon-scientific,
its time split and the cold-start holdout."""
from __future__ import annotations

import json

import pytest

from notellm.data import detect_format, load_dataset
from notellm.pairs import (SplitConfig, choose_cold_notes, cooccurrence_scores, exposure_buckets, make_experiment,
                           time_split, unordered_unique)

AMAZON = "amazon-scientific"


@pytest.fixture(scope="module")
def amazon(shared_data):
    return load_dataset(shared_data / AMAZON)


@pytest.fixture(scope="module")
def raw(shared_data):
    d = shared_data / AMAZON
    return (json.loads((d / "Scientific.item.json").read_text(encoding="utf-8")),
            json.loads((d / "Scientific.inter.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def warm_split(amazon):
    return time_split(amazon)


@pytest.fixture(scope="module")
def cold_split(amazon):
    return time_split(amazon, cold_fraction=0.1, cold_seed=0)


def test_counts(shared_data, amazon):
    assert detect_format(shared_data / AMAZON) == "amazon"
    s = amazon.summary()
    assert (s["name"], s["notes"], s["users"], s["clicks"], s["dropped_clicks"]) == ("amazon", 4344, 8317, 58492, 0)
    assert amazon.meta["domain"] == "Scientific" and amazon.meta["time"] == "position"
    assert all(c.note in amazon.notes for c in amazon.clicks)
    assert len({(c.user, c.note) for c in amazon.clicks}) == len(amazon.clicks)  # one click per (user, item)


def test_categories(amazon):
    cats = [n.category for n in amazon.notes.values()]
    assert sum(1 for c in cats if not c) == 131
    named = set(c for c in cats if c)
    assert len(named) == 25
    # a comma followed by a space belongs to the name, not to the path
    assert {"Test, Measure & Inspect", "Tapes, Adhesives & Sealants", "Industrial Electrical"} <= named
    assert "Industrial & Scientific" not in named and all(n.topic == "" for n in amazon.notes.values())


def test_note_fields(amazon, raw):
    items, _ = raw
    n = amazon.notes["0"]
    assert n.id == "0" and n.title == items["0"]["title"] and n.category == "Industrial Electrical"
    assert n.content.startswith("Relay/CAPACITOR hard start kit")
    # deeper path elements, then the brand (its comma dropped: the hashtag output is comma-separated)
    assert n.hashtags == ("Passive Components", "Capacitors", "Sealed Unit Parts Co. Inc")
    n2 = amazon.notes["100"]
    assert n2.category == "Test, Measure & Inspect" and n2.content == ""
    assert n2.hashtags == ("Dimensional Measurement", "Calipers", "Digital Calipers", "Wixey")
    for nid in ("2028", "615", "3159", "1161"):  # HTML entities / tags / fragments in the raw text
        c = amazon.notes[nid].content
        assert "&rsquo;" not in c and "<li" not in c and not c.startswith("P>") and "&amp;" not in c
    assert "It’s great" in amazon.notes["2028"].content
    assert "Extension. Fits" in amazon.notes["615"].content
    for note in amazon.notes.values():
        assert all(t and "," not in t and len(t) <= 60 for t in note.hashtags)
        assert len({t.lower() for t in note.hashtags}) == len(note.hashtags)


def test_user_order_kept_and_time_is_position(amazon, raw):
    _, inter = raw
    by_user: dict[str, list] = {}
    for c in amazon.clicks:
        by_user.setdefault(c.user, []).append(c)
    assert len(by_user) == 8317
    for user in ("0", "1", "42", "8316"):
        seq = sorted(by_user[user], key=lambda c: c.timestamp)
        assert [c.note for c in seq] == [str(i) for i in inter[user]]
        assert [c.timestamp for c in seq] == [i * 86400.0 for i in range(len(seq))]
    # published_at = first seen = the earliest position over all users
    first = {}
    for c in amazon.clicks:
        first[c.note] = min(first.get(c.note, c.timestamp), c.timestamp)
    assert all(n.published_at == first[nid] for nid, n in amazon.notes.items())


def test_pair_counts(amazon, warm_split):
    # the README's figure: ~193k item pairs share a user (= an unlimited co-occurrence window)
    every = cooccurrence_scores(amazon.clicks, window=1e12)
    assert len({frozenset(k) for k in every}) == 193_041
    s = warm_split.summary()
    # measured: cut at position 6 (79.7% of clicks before it), 38,299 train / 19,623 test pairs
    assert s["split_time"] == 6 * 86400.0 and s["train_clicks"] == 46_641 and s["test_clicks"] == 11_851
    assert 30_000 <= s["train_pairs"] <= 45_000 and 15_000 <= s["test_pairs"] <= 25_000
    assert s["train_notes"] > 4_000 and s["test_notes"] > 3_000
    assert s["test_notes_unseen_in_training"] < 10  # 5-core: the time cut alone gives almost no cold notes
    assert max(c.timestamp for c in warm_split.train_clicks) < min(c.timestamp for c in warm_split.test_clicks)


def test_cold_holdout(amazon, cold_split):
    sp = cold_split
    cold = sp.cold_notes
    assert len(cold) == 434 and cold <= set(amazon.notes)  # 10% of the 4,344 clicked notes
    # no training pair, training click or training exposure touches a held-out note
    assert not any(p[0] in cold or p[1] in cold for p in sp.train_pairs)
    assert not any(c.note in cold for c in sp.train_clicks)
    assert all(c.note in cold for c in sp.held_out_clicks) and sp.held_out_clicks
    warm, cold_p = sp.warm_test_pairs, sp.cold_test_pairs
    assert len(warm) + len(cold_p) == len(sp.test_pairs)
    assert not any(p[0] in cold or p[1] in cold for p in warm)
    assert all(p[0] in cold or p[1] in cold for p in cold_p)
    s = sp.summary()
    # measured (seed 0): 33,584 train, 15,765 warm test, 7,886 cold test pairs; all 434 cold notes in them
    assert 28_000 <= s["train_pairs"] <= 40_000
    assert 12_000 <= s["warm_test_pairs"] <= 20_000 and 5_000 <= s["cold_test_pairs"] <= 11_000
    assert s["cold_test_notes"] > 400
    b = exposure_buckets(sp.test_notes, sp.train_counts)
    assert all(b[n] == "unseen" for n in cold)


def test_cold_holdout_is_seeded(amazon, cold_split):
    again = time_split(amazon, cold_fraction=0.1, cold_seed=0)
    assert again.cold_notes == cold_split.cold_notes
    assert again.train_pairs == cold_split.train_pairs and again.test_pairs == cold_split.test_pairs
    other = choose_cold_notes(amazon.notes, 0.1, seed=1)
    assert other != cold_split.cold_notes and len(other) == 434
    assert choose_cold_notes(reversed(list(amazon.notes)), 0.1, seed=0) == cold_split.cold_notes


def test_experiment_with_cold_fraction(amazon, cold_split):
    cfg = SplitConfig(cold_fraction=0.1, seed=0)
    assert SplitConfig.from_dict(cfg.to_dict()) == cfg
    exp = make_experiment(amazon, cfg)
    assert exp.cold_notes == cold_split.cold_notes
    assert not any(p[0] in exp.cold_notes or p[1] in exp.cold_notes for p in exp.train_pairs)
    assert len(exp.train_pairs) == len(unordered_unique(cold_split.train_pairs))
    s = exp.summary()
    assert s["used_cold_test_pairs"] == len(exp.cold_test_pairs) > 0
    assert s["used_warm_test_pairs"] == len(exp.warm_test_pairs) > 0


def test_generic_round_trip(amazon, tmp_path):
    from notellm.data import load_generic, write_generic

    back = load_generic(write_generic(amazon, tmp_path / "generic"))
    assert back.notes == amazon.notes and back.clicks == amazon.clicks
    assert sum(1 for n in amazon.notes.values() if not n.content) == 123  # 3% without a description
