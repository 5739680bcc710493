"""Evaluation metrics on constructed cases with known answers; report files; shared-layer detection."""
from __future__ import annotations

import json

import numpy as np
import pytest

from notellm.evaluate import (differences_report, markdown_report, paired_difference, pair_ranks, plot_recall,
                              recall_at_k, recall_report, recall_se, scaled_ks, score_ranks)


def _case():
    ids = ["A", "B", "C", "D"]
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    pairs = [("A", "B", 1.0), ("A", "C", 1.0), ("C", "D", 1.0)]
    return ids, emb, pairs


def test_ranks_and_recall_known_answer():
    ids, emb, pairs = _case()
    ranks = pair_ranks(emb, ids, pairs)
    # A's candidates: B (0.994) > C (0) > D (-1). From C: B (0.11) > A (0) == D (0): D ties with A.
    assert ranks.tolist() == [0.0, 1.0, 1.5]
    assert recall_at_k(ranks, [1, 2, 3]) == {"1": pytest.approx(1 / 3), "2": 1.0, "3": 1.0}


def test_query_is_never_its_own_candidate():
    ids = ["A", "B", "C"]
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    ranks = pair_ranks(emb, ids, [("A", "C", 1.0)])
    assert ranks.tolist() == [0.0]  # A itself (cos 1) is excluded


def test_buckets_split_the_pairs():
    ids, emb, pairs = _case()
    rep = recall_report(emb, ids, pairs, [1, 2], {"A": "unseen", "B": "low", "C": "high", "D": "low"})
    assert rep["pairs"] == {"all": 3, "unseen": 2, "low": 0, "high": 1}
    assert rep["recall"]["unseen"]["1"] == pytest.approx(0.5)
    assert rep["recall"]["high"]["2"] == 1.0
    assert np.isnan(rep["recall"]["low"]["1"])


def test_scaled_ks():
    assert scaled_ks(2913) == [1, 10, 50, 100]
    assert scaled_ks(499) == [1, 5, 25, 50]
    assert scaled_ks(3) == [1]


def test_report_files(tmp_path):
    ids, emb, pairs = _case()
    buckets = {"A": "unseen", "B": "low", "C": "high", "D": "low"}
    res = {"data": {"name": "toy"}, "pool": 4, "ks": [1, 2], "pairs": {"all": 3, "unseen": 2, "low": 0, "high": 1},
           "models": {}}
    for name in ("m1", "m2"):
        r = recall_report(emb, ids, pairs, [1, 2], buckets)
        r["seconds"] = {"embed": 1.0}
        res["models"][name] = r
    res["models"]["m2"]["generation"] = {"category_accuracy": 0.5, "category_notes": 2, "hashtag_precision": 0.25,
                                         "hashtag_recall": float("nan"), "hashtag_notes": 0}
    res["models"]["m1"]["generation"] = {"category_accuracy": 0.75, "category_notes": 4, "category_accuracy_open": 0.5,
                                         "category_in_set_open": 0.25, "hashtag_precision": 0.1,
                                         "hashtag_recall": 0.2, "hashtag_notes": 4}
    md = markdown_report(res)
    # R@1 = 1/3; clustered by query (A: 1 hit of 2 pairs, C: 0 of 1): se = sqrt(2 * 2/9) / 3 = 2/9
    assert "| m1 | 33.3 ± 22.2 | 100.0 ± 0.0 |" in md and "| m2 | 50.0 (n=2) | 50.0 | – | 25.0 | – (n=0) |" in md
    assert "| m1 | 75.0 (n=4) | 50.0 | 25.0 | 10.0 | 20.0 (n=4) |" in md  # closed set: as served, then free
    plot_recall(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(res, default=str)


def test_shared_lower_layers_detects_trained_layers():
    import torch
    from notellm.base_models import tiny_llama
    from notellm.evaluate import shared_lower_layers
    from notellm.model import NoteLLM

    lm1, tok = tiny_llama(0, num_layers=3)
    lm2, _ = tiny_llama(0, num_layers=3, tokenizer=tok)
    m1 = NoteLLM.from_base(model=lm1, tokenizer=tok)
    m2 = NoteLLM.from_base(model=lm2, tokenizer=tok)
    assert shared_lower_layers([m1, m2]) == 2  # all equal: the last layer is still left per model
    with torch.no_grad():
        m2.lm.get_decoder().layers[1].mlp.up_proj.weight.add_(1e-3)
    assert shared_lower_layers([m1, m2]) == 1


def test_warm_and_cold_groups_only_with_a_holdout():
    ids, emb, pairs = _case()
    buckets = {"A": "unseen", "B": "low", "C": "high", "D": "low"}
    plain = recall_report(emb, ids, pairs, [1, 2], buckets)
    assert set(plain["pairs"]) == {"all", "unseen", "low", "high"}
    rep = recall_report(emb, ids, pairs, [1, 2], buckets, cold=frozenset({"D"}))
    # a pair is cold when either note is held out: (C, D) is cold, (A, B) and (A, C) warm
    assert rep["pairs"]["warm"] == 2 and rep["pairs"]["cold"] == 1
    assert rep["recall"]["warm"] == {"1": 0.5, "2": 1.0}
    assert rep["recall"]["cold"] == {"1": 0.0, "2": 1.0}  # C's partner D ties with A at rank 1.5
    assert {k: v for k, v in rep["pairs"].items() if k in plain["pairs"]} == plain["pairs"]


def test_report_files_show_warm_and_cold_rows_only_with_a_holdout(tmp_path):
    ids, emb, pairs = _case()
    buckets = {"A": "unseen", "B": "low", "C": "high", "D": "low"}
    for cold in (frozenset(), frozenset({"D"})):
        rep = recall_report(emb, ids, pairs, [1, 2], buckets, cold=cold)
        rep["seconds"] = {}
        res = {"data": {"name": "toy"}, "pool": 4, "ks": [1, 2], "pairs": dict(rep["pairs"]), "models": {"m": rep}}
        md = markdown_report(res)
        if cold:
            assert "(pairs: warm 2, cold 1)" in md and "| m | 50.0 | 100.0 | 0.0 | 100.0 |" in md
            assert "| Model | warm R@1 | warm R@2 | cold R@1 | cold R@2 |" in md
        else:
            assert "warm" not in md and "cold" not in md
        plot_recall(res, tmp_path / f"p{len(cold)}.png")
        assert (tmp_path / f"p{len(cold)}.png").stat().st_size > 1000


def test_popularity_ranks_known_answer():
    ids = ["A", "B", "C", "D", "E"]
    clicks = np.array([9.0, 5.0, 5.0, 1.0, 0.0])
    pairs = [("A", "B", 1.0), ("B", "D", 1.0), ("D", "A", 1.0), ("E", "C", 1.0)]
    # A's candidates B, C (5, tied), D, E: B is first, tied with C -> 0.5. B's: A (9) > C (5) > D: rank 2.
    # D's: A first -> 0. E's: A > B == C: C ranks 1 + 0.5.
    assert score_ranks(clicks, ids, pairs).tolist() == [0.5, 2.0, 0.0, 1.5]


def test_recall_se_is_clustered_by_query():
    ranks = np.array([0.0, 5.0, 0.0, 5.0])
    # two queries, each 1 hit of 2: no between-query variation -> se 0; one query per pair -> binomial-like
    assert recall_se(ranks, ["q1", "q1", "q2", "q2"], [1]) == {"1": 0.0}
    se = recall_se(ranks, ["a", "b", "c", "d"], [1])["1"]
    assert se == pytest.approx(np.sqrt(4 / 3 * 4 * 0.25) / 4)
    assert np.isnan(recall_se(ranks, ["a"] * 4, [1])["1"])  # one cluster: no standard error


def test_paired_difference_known_answer_and_smaller_than_independent_errors():
    q = ["q1", "q1", "q2", "q2"]
    a, b = np.array([0.0, 0.0, 5.0, 5.0]), np.array([5.0, 0.0, 5.0, 0.0])
    # k=1: hits a = 1,1,0,0; b = 0,1,0,1; d = 1,0,0,-1 -> mean 0; cluster sums +1, -1 -> sqrt(2 * 2) / 4
    d = paired_difference(a, b, q, [1])
    assert d["diff"]["1"] == 0.0 and d["se"]["1"] == pytest.approx(0.5)
    same = paired_difference(a, a, q, [1, 6])
    assert same["diff"] == {"1": 0.0, "6": 0.0} and same["se"] == {"1": 0.0, "6": 0.0}
    # two correlated models (B = A with a few ranks pushed out): the paired error is far below the
    # errors added as if independent, and the gap is what it was built to be
    rng = np.random.default_rng(0)
    queries = [f"q{i // 3}" for i in range(3000)]
    ra = rng.integers(0, 100, 3000).astype(float)
    rb = ra.copy()
    rb[rng.random(3000) < 0.1] = 99.0
    d = paired_difference(ra, rb, queries, [10])
    se_a, se_b = recall_se(ra, queries, [10])["10"], recall_se(rb, queries, [10])["10"]
    expect = recall_at_k(ra, [10])["10"] - recall_at_k(rb, [10])["10"]
    assert d["diff"]["10"] == pytest.approx(expect) and d["diff"]["10"] > 0
    assert d["se"]["10"] < 0.5 * np.sqrt(se_a ** 2 + se_b ** 2)


def test_differences_report_pairs_trained_models_with_every_other_row_and_marks_two_se(tmp_path):
    ids, emb, pairs = _case()
    pairs = pairs * 20  # enough pairs per query for standard errors
    pairs = [(p[0], p[1], 1.0) for p in pairs] + [("B", "A", 1.0)] * 10 + [("D", "C", 1.0)] * 10
    good = pair_ranks(emb, ids, pairs)
    bad = good + 3.0
    ranks = {"pop": bad, "sbert": bad, "NoteLLM": good}
    sel = {"all": np.ones(len(pairs), dtype=bool)}
    rows = differences_report(ranks, ["NoteLLM"], pairs, [1, 2], sel)
    assert [(r["model"], r["versus"]) for r in rows] == [("NoteLLM", "pop"), ("NoteLLM", "sbert")]
    assert rows[0]["groups"]["all"]["diff"]["1"] > 0
    res = {"data": {"name": "toy"}, "pool": 4, "ks": [1, 2], "pairs": {"all": len(pairs), "unseen": 0, "low": 0,
                                                                      "high": 0},
           "models": {}, "differences": rows}
    md = markdown_report(res)
    assert "| NoteLLM − sbert | **+" in md and "paired standard error" in md


def test_add_to_keeps_the_rows_of_the_same_measurement_only(tmp_path):
    from notellm.evaluate import kept_rows

    same = {"split_config": {"seed": 0}, "pool": 50, "pairs": {"all": 10}, "ks": [1, 5]}
    earlier = {**same, "command": "notellm eval ...", "train_configs": {"NoteLLM": {"steps_done": 3}},
               "models": {"Popularity": {"r": 1}, "NoteLLM": {"r": 2}, "SentenceBERT zero-shot": {"r": 3}}}
    f = tmp_path / "results.json"
    f.write_text(json.dumps(earlier))
    res = {**same, "models": {}, "train_configs": {}}
    kept_rows(res, f, replace={"NoteLLM"})
    assert list(res["models"]) == ["Popularity", "SentenceBERT zero-shot"] and res["train_configs"] == {}
    assert res["kept_from"]["rows"] == ["Popularity", "SentenceBERT zero-shot"]
    for key, other in (("pool", 51), ("ks", [1, 10]), ("split_config", {"seed": 1}), ("pairs", {"all": 9})):
        with pytest.raises(ValueError, match=key):
            kept_rows({**same, key: other, "models": {}, "train_configs": {}}, f, replace=set())
    with pytest.raises(ValueError, match="cannot read"):
        kept_rows(res, tmp_path / "missing.json", replace=set())
