"""`notellm eval`: Recall@k of NoteLLM and baselines on held-out co-occurrence pairs, plus generation quality.

    notellm eval --data ../shared/data/movielens-latest-small --model runs/notellm \
        --extra-model "NoteLLM w/o CSFT=runs/notellm-a0" --baselines --out docs/results/movielens

Protocol (NoteLLM's): the test pairs come from the later clicks of the time split (the same split the
model was trained with, read from its train_config.json). Every test note is embedded once; each note
that starts a test pair is a query; its candidates are all test notes except itself; a pair (A, B) counts
as a hit at k when B ranks in A's top k (ties share ranks evenly). Recall@k = hits / pairs.
k defaults to 1, 10, 50, 100 scaled down for small pools (see `scaled_ks`). Recall is reported overall
and by the exposure bucket of the query note: `unseen` (no click in the training period: cold start),
`low` / `high` (training click count below / at-or-above the median of the seen test notes). With the
cold-start holdout (`--cold-fraction` > 0: notes held out of training entirely) it is also reported for
`warm` pairs (no held-out note) and `cold` pairs (either note held out); without it those groups are absent.

With `--baselines`: a text-free popularity row (candidates ranked by their training-period clicks, the
same for every query), SentenceBERT zero-shot and fine-tuned on the training pairs, and the base LLM
zero-shot. Every recall comes with its standard error, clustered by query note (`recall_se`), and every
trained model's gap to every other row of the same run with the paired standard error of that gap
(`paired_difference`: per pair hit_A - hit_B, clustered by query; the number a "beats by two standard
errors" claim needs, far below the two rows' errors added as if independent).

Generation: category accuracy (exact, case-insensitive) and hashtag precision / recall (against the
note's hashtags, case-insensitive) of greedy outputs (Hugging Face generate) on a seeded sample of test
notes, for each NoteLLM model.

Writes OUT/results.json, OUT/results.md (tables) and OUT/recall_at_k.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

BUCKETS = ("all", "unseen", "low", "high")
COLD_GROUPS = ("warm", "cold")  # only when the cold-start holdout is on
POPULARITY = "Popularity (training clicks, text-free)"


# ------------------------------------------------------------------------------------------- metrics

def scaled_ks(pool: int) -> list[int]:
    """1, 10, 50, 100 for pools of >= 1000 candidates; proportionally smaller (>= 1, distinct) below."""
    if pool >= 1000:
        ks = [1, 10, 50, 100]
    else:
        ks = [1] + [max(1, round(pool * f)) for f in (0.01, 0.05, 0.10)]
    return sorted({k for k in ks if k <= max(1, pool)})


def pair_ranks(emb: np.ndarray, ids: Sequence[str], pairs: Sequence[tuple]) -> np.ndarray:
    """0-based rank of each pair's partner among all other notes, by cosine to the query.

    Candidates exclude the query itself; ties count half (rank = #better + #tied_others / 2).
    """
    index = {n: i for i, n in enumerate(ids)}
    e = emb.astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    by_q: dict[int, list[tuple[int, int]]] = {}
    for pi, p in enumerate(pairs):
        by_q.setdefault(index[p[0]], []).append((pi, index[p[1]]))
    ranks = np.zeros(len(pairs), dtype=np.float64)
    qs = sorted(by_q)
    for s in range(0, len(qs), 256):
        chunk = qs[s: s + 256]
        sims = e[chunk] @ e.T
        sims = np.round(sims, 6)  # float noise is not a ranking signal
        for row, q in enumerate(chunk):
            srow = sims[row]
            srow[q] = -np.inf
            for pi, t in by_q[q]:
                st = srow[t]
                better = int((srow > st).sum())
                tied = int((srow == st).sum()) - 1
                ranks[pi] = better + tied / 2.0
    return ranks


def score_ranks(scores: np.ndarray, ids: Sequence[str], pairs: Sequence[tuple]) -> np.ndarray:
    """The same ranks when every query orders the candidates by one query-independent score (the text-free
    popularity row: training-period clicks). The query is not its own candidate; ties count half."""
    index = {n: i for i, n in enumerate(ids)}
    s = np.asarray(scores, dtype=np.float64)
    order = np.sort(s)
    ranks = np.zeros(len(pairs), dtype=np.float64)
    for pi, p in enumerate(pairs):
        q, t = index[p[0]], index[p[1]]
        st = s[t]
        hi, lo = np.searchsorted(order, st, side="right"), np.searchsorted(order, st, side="left")
        better, tied = len(s) - hi, (hi - lo) - 1  # the target is not tied with itself
        if s[q] > st:
            better -= 1
        elif s[q] == st:
            tied -= 1
        ranks[pi] = better + tied / 2.0
    return ranks


def _clusters(queries: Sequence[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q, []).append(i)
    return list(groups.values())


def clustered_se(values: np.ndarray, clusters: list[list[int]]) -> float:
    """Standard error of the mean of per-pair ``values``, clustered (a query's pairs are not independent
    draws): sqrt(G / (G - 1) * sum_q (sum_q v - mean * n_q)^2) / N over G clusters and N pairs."""
    n, g = len(values), len(clusters)
    if n == 0 or g < 2:
        return float("nan")
    m = values.mean()
    dev = np.array([values[ix].sum() - m * len(ix) for ix in clusters])
    return float(np.sqrt(g / (g - 1) * (dev ** 2).sum()) / n)


def recall_se(ranks: np.ndarray, queries: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    """Standard error of Recall@k, clustered by query note (see `clustered_se`)."""
    idx = _clusters(queries)
    return {str(k): clustered_se((ranks < k).astype(np.float64), idx) for k in ks}


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, queries: Sequence[str],
                      ks: Sequence[int], *, clusters: list[list[int]] | None = None) -> dict[str, dict[str, float]]:
    """Recall@k of model A minus model B on the same pairs, with the standard error of that difference,
    paired (per pair: hit_A - hit_B) and clustered by query note. Two models' errors are strongly
    correlated on shared pairs, so this is much smaller than sqrt(se_A^2 + se_B^2): it is the number to
    compare a gap with. ``clusters``: `_clusters(queries)`, when the caller already has it.
    {"diff": {k: d}, "se": {k: se}}."""
    idx = clusters if clusters is not None else _clusters(queries)
    out: dict[str, dict[str, float]] = {"diff": {}, "se": {}}
    for k in ks:
        d = (ranks_a < k).astype(np.float64) - (ranks_b < k).astype(np.float64)
        out["diff"][str(k)] = float(d.mean()) if len(d) else float("nan")
        out["se"][str(k)] = clustered_se(d, idx)
    return out


def differences_report(ranks: dict[str, np.ndarray], trained: Sequence[str], pairs: Sequence[tuple],
                       ks: Sequence[int], groups: dict[str, np.ndarray]) -> list[dict]:
    """For each trained model, its paired Recall@k difference to every other model that is not a trained
    one, per group of pairs (``groups``: name -> boolean selection, e.g. all / cold)."""
    queries = np.array([p[0] for p in pairs], dtype=object)
    clusters = {g: _clusters(list(queries[sel])) for g, sel in groups.items()}  # the same for every model
    rows = []
    for a in (m for m in trained if m in ranks):
        for b in (m for m in ranks if m not in trained):
            rows.append({"model": a, "versus": b, "groups": {
                g: paired_difference(ranks[a][sel], ranks[b][sel], (), ks, clusters=clusters[g])
                for g, sel in groups.items()}})
    return rows


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    if len(ranks) == 0:
        return {str(k): float("nan") for k in ks}
    return {str(k): float((ranks < k).mean()) for k in ks}


def is_cold_pair(p: tuple, cold) -> bool:
    return p[0] in cold or p[1] in cold


def pair_groups(pairs: Sequence[tuple], buckets: dict[str, str], cold=frozenset()) -> dict[str, np.ndarray]:
    """group -> boolean selection of `pairs`: the exposure buckets of the query note, plus `warm` / `cold`
    (a pair is cold when either note is held out) when `cold` is non-empty."""
    out = {b: np.array([b == "all" or buckets[p[0]] == b for p in pairs], dtype=bool) for b in BUCKETS}
    if cold:
        c = np.array([is_cold_pair(p, cold) for p in pairs], dtype=bool)
        out["warm"], out["cold"] = ~c, c
    return out


def recall_report(emb: np.ndarray, ids: Sequence[str], pairs: Sequence[tuple], ks: Sequence[int],
                  buckets: dict[str, str], cold=frozenset()) -> dict:
    return ranks_report(pair_ranks(emb, ids, pairs), pairs, ks, buckets, cold)


def ranks_report(ranks: np.ndarray, pairs: Sequence[tuple], ks: Sequence[int], buckets: dict[str, str],
                 cold=frozenset()) -> dict:
    """Recall@k and its standard error (clustered by query) per group of pairs, from the pairs' ranks."""
    out = {"recall": {}, "se": {}, "pairs": {}}
    queries = np.array([p[0] for p in pairs], dtype=object)
    for b, sel in pair_groups(pairs, buckets, cold).items():
        out["recall"][b] = recall_at_k(ranks[sel], ks)
        out["se"][b] = recall_se(ranks[sel], list(queries[sel]), ks)
        out["pairs"][b] = int(sel.sum())
    out["mean_rank"] = float(ranks.mean()) if len(ranks) else float("nan")
    return out


def generation_report(model, notes: Sequence, *, max_new_tokens: int = 12, batch_size: int = 16,
                      progress: bool = True, desc: str = "") -> dict:
    """Category accuracy and hashtag precision/recall of greedy outputs (micro-averaged over tags). For a
    model with a closed category set (`NoteLLM.categories`) the category is decoded within it, as served
    (`category_accuracy`), and also freely (`category_accuracy_open`, with `category_in_set_open`: the share
    of free outputs that are one of the set's names)."""
    from tqdm.auto import tqdm

    from notellm.prompts import dedupe_tags, parse_category, parse_hashtags

    cat_notes = [n for n in notes if n.category]
    tag_notes = [n for n in notes if n.hashtags]
    res = {"category_notes": len(cat_notes), "hashtag_notes": len(tag_notes), "examples": []}
    bar = tqdm(total=len(cat_notes) + len(tag_notes), desc=f"generate {desc}".strip(), unit="note",
               disable=not progress, file=sys.stderr, mininterval=5)
    closed = getattr(model, "category_trie", None) is not None
    names = {c.lower() for c in getattr(model, "categories", ())}
    correct = correct_open = in_set_open = 0
    for s in range(0, len(cat_notes), batch_size):
        chunk = cat_notes[s: s + batch_size]
        _, texts = model.generate_notes(chunk, "category", max_new_tokens=max_new_tokens, batch_size=batch_size)
        _, open_texts = (model.generate_notes(chunk, "category", max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, constrain=False) if closed else (None, texts))
        for n, t, o in zip(chunk, texts, open_texts):
            pred, pred_open = parse_category(t), parse_category(o)
            correct += pred is not None and pred.lower() == n.category.strip().lower()
            correct_open += pred_open is not None and pred_open.lower() == n.category.strip().lower()
            in_set_open += pred_open is not None and pred_open.lower() in names
            if len(res["examples"]) < 8:
                ex = {"id": n.id, "title": n.title, "category": n.category, "generated": t}
                res["examples"].append({**ex, "generated_open": o} if closed else ex)
        bar.update(len(chunk))
    def share(k: int) -> float:
        return k / len(cat_notes) if cat_notes else float("nan")

    res["category_accuracy"] = share(correct)
    if closed:
        res.update(category_set=len(names), category_accuracy_open=share(correct_open),
                   category_in_set_open=share(in_set_open))
    tp = n_pred = n_gold = 0
    for s in range(0, len(tag_notes), batch_size):
        chunk = tag_notes[s: s + batch_size]
        _, texts = model.generate_notes(chunk, "hashtags", max_new_tokens=max_new_tokens * 2,
                                        batch_size=batch_size)
        for n, t in zip(chunk, texts):
            pred = {x.lower() for x in parse_hashtags(t)}
            gold = {x.lower() for x in dedupe_tags(n.hashtags)}
            tp += len(pred & gold)
            n_pred += len(pred)
            n_gold += len(gold)
            if len(res["examples"]) < 12:
                res["examples"].append({"id": n.id, "title": n.title, "hashtags": list(n.hashtags),
                                        "generated": t})
        bar.update(len(chunk))
    bar.close()
    res["hashtag_precision"] = tp / n_pred if n_pred else float("nan")
    res["hashtag_recall"] = tp / n_gold if n_gold else float("nan")
    return res


# ------------------------------------------------------------------------------------------ reporting

def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _fmt_se(m: dict, group: str, k) -> str:
    """Recall (%) ± its standard error, where the report has one."""
    r, se = m["recall"].get(group, {}).get(str(k)), m.get("se", {}).get(group, {}).get(str(k))
    if se is None or (isinstance(se, float) and np.isnan(se)) or r is None:
        return _fmt(r)
    return f"{_fmt(r)} ± {100 * se:.1f}"


def markdown_report(results: dict) -> str:
    ks = results["ks"]
    models = results["models"]
    lines = [f"# Recall@k on {results['data']['name']} (pool of {results['pool']} test notes, "
             f"{results['pairs']['all']} test pairs)", "",
             "Recall (%) ± one standard error (clustered by query note).", ""]
    lines += ["| Model | " + " | ".join(f"R@{k}" for k in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt_se(m, "all", k) for k in ks) + " |")
    pool = results["pool"]
    lines.append("| *random ranking (expected)* | " + " | ".join(_fmt(min(1.0, k / max(1, pool - 1))) for k in ks)
                 + " |")
    lines += ["", "Recall (%) by exposure of the query note "
              f"(pairs: unseen {results['pairs']['unseen']}, low {results['pairs']['low']}, "
              f"high {results['pairs']['high']}):", ""]
    sub = [k for k in ks if k != 1][:2] or ks
    head = []
    for b in ("unseen", "low", "high"):
        head += [f"{b} R@{k}" for k in sub]
    lines += ["| Model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, m in models.items():
        cells = [_fmt(m["recall"][b][str(k)]) for b in ("unseen", "low", "high") for k in sub]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "cold" in results["pairs"]:
        lines += ["", "Recall (%) on warm pairs (no held-out note) and cold pairs (a note held out of training "
                  f"entirely) (pairs: warm {results['pairs']['warm']}, cold {results['pairs']['cold']}):", ""]
        head = [f"{g} R@{k}" for g in COLD_GROUPS for k in ks]
        lines += ["| Model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for name, m in models.items():
            cells = [_fmt_se(m, g, k) for g in COLD_GROUPS for k in ks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diffs = results.get("differences") or []
    if diffs:
        groups = [g for g in ("all", "cold") if g in diffs[0]["groups"]]
        lines += ["", "Differences in Recall (percentage points) ± the paired standard error of the difference "
                  "(per pair hit_A - hit_B, clustered by query note; models of this run only); ** where the gap "
                  "exceeds two standard errors:", ""]
        head = [f"{'' if g == 'all' else g + ' '}R@{k}" for g in groups for k in ks]
        lines += ["| Model − versus | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for row in diffs:
            cells = []
            for g in groups:
                d = row["groups"][g]
                for k in ks:
                    x, se = d["diff"][str(k)], d["se"][str(k)]
                    if x is None or np.isnan(x):
                        cells.append("–")
                        continue
                    mark = "**" if se is not None and not np.isnan(se) and abs(x) > 2 * se else ""
                    cells.append(f"{mark}{100 * x:+.1f} ± {100 * se:.1f}{mark}")
            lines.append(f"| {row['model']} − {row['versus']} | " + " | ".join(cells) + " |")
    gen = {n: m["generation"] for n, m in models.items() if m.get("generation")}
    if gen:
        lines += ["", "Generation on test notes (greedy; category decoded within the model's category set where "
                  "it has one, and freely):", "",
                  "| Model | category acc. (%) | free: acc. (%) | free: a name of the set (%) | hashtag precision (%) "
                  "| hashtag recall (%) |", "|---|---|---|---|---|---|"]
        for name, g in gen.items():
            lines.append(f"| {name} | {_fmt(g['category_accuracy'])} (n={g['category_notes']}) | "
                         f"{_fmt(g.get('category_accuracy_open', g['category_accuracy']))} | "
                         f"{_fmt(g.get('category_in_set_open'))} | "
                         f"{_fmt(g['hashtag_precision'])} | {_fmt(g['hashtag_recall'])} (n={g['hashtag_notes']}) |")
    lines += ["", "Seconds per model (embedding the pool; training where it happened in this run):", ""]
    for name, m in models.items():
        t = m.get("seconds", {})
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    return "\n".join(lines) + "\n"


def plot_recall(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["ks"]
    groups = BUCKETS + (COLD_GROUPS if "cold" in results["pairs"] else ())
    fig, axes = plt.subplots(1, len(groups), figsize=(4.25 * len(groups), 4.2), sharey=True)
    for ax, b in zip(axes, groups):
        for name, m in results["models"].items():
            r, se = m["recall"].get(b, {}), m.get("se", {}).get(b, {})
            ax.errorbar(ks, [r.get(str(k), float("nan")) for k in ks], yerr=[se.get(str(k), 0.0) for k in ks],
                        marker="o", capsize=2, label=name)
        ax.plot(ks, [min(1.0, k / max(1, results["pool"] - 1)) for k in ks], ls="--", color="grey",
                label="random ranking")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_title(f"{b} (pairs: {results['pairs'][b]})")
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@k")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Recall@k, {results['data']['name']} test pairs (pool {results['pool']} notes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



# ------------------------------------------------------------------------------ LLM vectors, shared work

def shared_lower_layers(models: Sequence) -> int:
    """How many lower decoder layers (with the token embeddings) are bit-identical in all `models`.

    Models trained with `--freeze-layers K` from the same base share them with each other and with the
    base, so their lower-layer outputs are computed once per note and only the upper layers run per model.
    """
    import torch

    if len(models) < 2:
        return 0
    decs = [m.lm.get_decoder() for m in models]
    e0 = decs[0].embed_tokens.weight
    for d in decs[1:]:
        e = d.embed_tokens.weight
        if e.shape != e0.shape or not torch.equal(e, e0):
            return 0
    n = min(len(d.layers) for d in decs)
    k = 0
    for i in range(n):
        p0 = dict(decs[0].layers[i].named_parameters())
        for d in decs[1:]:
            pi = dict(d.layers[i].named_parameters())
            if pi.keys() != p0.keys() or not all(torch.equal(pi[x], p0[x]) for x in p0):
                return k
        k = i + 1
    return k - 1 if k == n else k  # always leave at least one layer to the per-model part


def llm_vectors(models: dict, notes: Sequence, *, batch_size: int = 16, progress: bool = True) -> tuple[dict, int, dict]:
    """name -> [n, d] vectors for several LLMs at once. `models`: name -> (NoteLLM, kind) with kind
    "notellm" (projected vector) or "base" (zero-shot: raw final hidden state at the same position).
    Returns (vectors, number of shared lower layers, seconds per model incl. its share of the lower pass)."""
    import torch
    from tqdm.auto import tqdm

    from notellm.train import LayerSplit

    names = list(models)
    ms = [models[n][0] for n in names]
    k = shared_lower_layers(ms)
    ref = LayerSplit(ms[0], k)
    splits = [LayerSplit(m, k) for m in ms]
    order = sorted(range(len(notes)), key=lambda i: len(notes[i].title) + len(notes[i].content))
    vecs = {n: [None] * len(notes) for n in names}
    secs = {n: 0.0 for n in names}
    lower_s = 0.0
    bar = tqdm(total=len(notes), desc=f"LLM vectors ({len(names)} models, {k} shared layers)", unit="note",
               disable=not progress, file=sys.stderr, mininterval=5)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            b = ms[0].tokenize_notes([notes[i] for i in idx], "category", include_continuation=False,
                                     device=ms[0].device)
            t0 = time.time()
            h = ref.lower(b.input_ids, b.attention_mask)
            lower_s += time.time() - t0
            pos = (b.emb_positions - 1).clamp(min=0)
            rows_i = torch.arange(h.shape[0], device=h.device)
            for name, m, sp in zip(names, ms, splits):
                t0 = time.time()
                hid = sp.upper(h, b.attention_mask)
                last = hid[rows_i, pos]
                if models[name][1] == "base":
                    v = torch.nn.functional.normalize(last.float(), dim=-1)
                else:
                    v = m.project(last)
                for i, row in zip(idx, v.cpu().numpy()):
                    vecs[name][i] = row
                secs[name] += time.time() - t0
            bar.update(len(idx))
    bar.close()
    out = {n: np.stack(v).astype(np.float32) for n, v in vecs.items()}
    return out, k, {n: secs[n] + lower_s / len(names) for n in names}

def rewrite_reports(out_dir) -> None:
    """Re-write results.md and recall_at_k.png from an existing results.json (no model is run)."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    (out / "results.md").write_text(markdown_report(results))
    plot_recall(results, out / "recall_at_k.png")


# ------------------------------------------------------------------------------------------------ CLI

def kept_rows(results: dict, earlier: Path, *, replace: set[str]) -> None:
    """Copy the rows of an earlier results.json into ``results`` (all but those in ``replace``), after
    checking it measured the same thing: split configuration, pool, pair counts and k list."""
    try:
        old = json.loads(earlier.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {earlier}: {e}") from e
    for key in ("split_config", "pool", "pairs", "ks"):
        if old.get(key) != results[key]:
            raise ValueError(f"{earlier} measured another {key} ({old.get(key)} here {results[key]})")
    for name, row in old.get("models", {}).items():
        if name not in replace:
            results["models"][name] = row
            if name in old.get("train_configs", {}):
                results["train_configs"][name] = old["train_configs"][name]
    results["kept_from"] = {"file": str(earlier), "command": old.get("command"),
                            "rows": [n for n in old.get("models", {}) if n not in replace]}


def configure(p: argparse.ArgumentParser) -> None:
    from notellm.train import add_split_args

    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="a trained NoteLLM directory (repeatable; default name 'NoteLLM')")
    p.add_argument("--extra-model", action="append", default=[], metavar="NAME=DIR",
                   help="another NoteLLM directory to compare, e.g. 'NoteLLM w/o CSFT=runs/a0'")
    p.add_argument("--baselines", action="store_true",
                   help="also SentenceBERT zero-shot, SentenceBERT fine-tuned on the train pairs, base LLM zero-shot")
    p.add_argument("--base", default=None, help="base LLM for the zero-shot baseline (default: the model's)")
    p.add_argument("--out", default=None, help="output directory (default MODEL/eval, or --add-to's)")
    p.add_argument("--add-to", default=None, metavar="DIR",
                   help="an earlier evaluation (DIR/results.json) of the same split and pool: its rows are kept "
                        "and only the models given here are evaluated and added (or replaced)")
    p.add_argument("--ks", default=None, help="comma-separated k list (default: scaled to the pool)")
    p.add_argument("--gen-notes", type=int, default=200, help="test notes sampled for generation metrics (0=off)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sbert-epochs", type=float, default=1.0)
    p.add_argument("--sbert-batch-size", type=int, default=32)
    p.add_argument("--sbert-lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    add_split_args(p, defaults_none=True)


def _named(spec: str, default: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    return default, spec


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from notellm.baselines import (finetune_sbert, load_sbert,
                                   sbert_embed)
    from notellm.data import load_dataset
    from notellm.model import NoteLLM
    from notellm.pairs import SplitConfig, exposure_buckets, make_experiment
    from notellm.train import load_train_config, split_config_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.no_progress
    t_all = time.time()
    models = [_named(s, "NoteLLM" if i == 0 else f"NoteLLM {i + 1}") for i, s in enumerate(args.model)]
    models += [_named(s, f"model {i + 1}") for i, s in enumerate(args.extra_model)]
    if not models and not args.baselines:
        print("notellm eval: give --model DIR and/or --baselines", file=sys.stderr)
        return 2
    tcfg = None
    for _, path in models:
        tcfg = load_train_config(path)
        if tcfg:
            break
    split_cfg = split_config_from_args(args, SplitConfig.from_dict(tcfg["split"]) if tcfg else None)
    ds = load_dataset(args.data)
    exp = make_experiment(ds, split_cfg)
    test_ids = exp.test_notes
    if not exp.test_pairs:
        print("notellm eval: no test pairs", file=sys.stderr)
        return 2
    notes = [ds.notes[n] for n in test_ids]
    buckets = exposure_buckets(test_ids, exp.split.train_counts)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else scaled_ks(len(test_ids) - 1)
    out = Path(args.out or args.add_to or (Path(models[0][1]) / "eval" if models else "eval"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"split: {json.dumps(exp.summary())}", file=sys.stderr)
    print(f"pool {len(test_ids)} notes, {len(exp.test_pairs)} pairs, k = {ks}", file=sys.stderr)
    rng = random.Random(args.seed)
    gen_notes = rng.sample(notes, min(args.gen_notes, len(notes))) if args.gen_notes else []

    results = {"data": ds.summary(), "split": exp.summary(), "split_config": split_cfg.to_dict(), "ks": ks,
               "pool": len(test_ids), "pairs": {}, "models": {}, "command": "notellm " + " ".join(sys.argv[1:]),
               "train_configs": {}}
    cold = exp.cold_notes
    for b, sel in pair_groups(exp.test_pairs, buckets, cold).items():
        results["pairs"][b] = int(sel.sum())
    if args.add_to:
        try:
            kept_rows(results, Path(args.add_to) / "results.json", replace={n for n, _ in models})
        except ValueError as e:
            print(f"notellm eval: --add-to: {e}", file=sys.stderr)
            return 2
    if cold:
        print(f"cold-start holdout: {len(cold)} notes; test pairs warm {results['pairs']['warm']}, "
              f"cold {results['pairs']['cold']}", file=sys.stderr)

    all_ranks: dict[str, np.ndarray] = {}  # this run's models, for the paired differences

    def record(name: str, emb: np.ndarray | None, seconds: dict, extra: dict | None = None,
               ranks: np.ndarray | None = None) -> None:
        if ranks is None:
            ranks = pair_ranks(emb, test_ids, exp.test_pairs)
        all_ranks[name] = ranks
        rep = ranks_report(ranks, exp.test_pairs, ks, buckets, cold)
        rep["seconds"] = seconds
        rep.update(extra or {})
        results["models"][name] = rep
        r = rep["recall"]["all"]
        print(f"{name}: " + ", ".join(f"R@{k}={100 * r[str(k)]:.1f}" for k in ks), file=sys.stderr)
        if cold:
            print(f"{name}: " + ", ".join(f"{g} R@{ks[-1]}={100 * rep['recall'][g][str(ks[-1])]:.1f}"
                                          for g in COLD_GROUPS), file=sys.stderr)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    if args.baselines:
        # Text-free: every query ranks the candidates by their clicks in the training period (a cold note has
        # none). The test pairs reward popularity; a model has to beat this to be worth its text.
        pop = np.array([exp.split.train_counts.get(n, 0) for n in test_ids], dtype=np.float64)
        record(POPULARITY, None, {"rank": 0.0}, ranks=score_ranks(pop, test_ids, exp.test_pairs))
        t0 = time.time()
        sb = load_sbert(device=device)
        record("SentenceBERT zero-shot", sbert_embed(sb, notes, progress=progress),
               {"embed": time.time() - t0})
        t0 = time.time()
        log = finetune_sbert(sb, exp.train_pairs, ds.notes, epochs=args.sbert_epochs,
                             batch_size=args.sbert_batch_size, lr=args.sbert_lr, seed=args.seed, progress=progress)
        t_ft = time.time() - t0
        t0 = time.time()
        record("SentenceBERT fine-tuned", sbert_embed(sb, notes, progress=progress),
               {"train": t_ft, "embed": time.time() - t0}, {"train_log": log})
        del sb

    llms: dict = {}
    if args.baselines:
        base = args.base or (tcfg["args"]["base"] if tcfg else "smollm2")
        prompt_cfg = NoteLLM.load(models[0][1]).prompt_config if models else None
        bm = NoteLLM.from_base(base, prompt_config=prompt_cfg).to(device)
        bm.eval()
        llms["Base LLM zero-shot"] = (bm, "base")
    for name, path in models:
        m = NoteLLM.load(path, device=device)
        m.eval()
        llms[name] = (m, "notellm")
    if llms:
        vecs, k_shared, secs = llm_vectors(llms, notes, batch_size=args.batch_size, progress=progress)
        results["llm_shared_lower_layers"] = k_shared
        print(f"LLM vectors: {k_shared} lower layers shared by {len(llms)} models", file=sys.stderr)
        paths = dict(models)
        for name, (m, kind) in llms.items():
            sec = {"embed": secs[name]}
            extra = {"base": m.base_model_id} if kind == "base" else {"path": str(paths[name])}
            tc = load_train_config(paths[name]) if kind == "notellm" else None
            if tc:
                results["train_configs"][name] = tc
                if "train_seconds" in tc:
                    sec = {"train": tc["train_seconds"], **sec}
            trained_csft = kind == "notellm" and (tc is None or tc["args"].get("alpha", 1.0) > 0)
            if gen_notes and trained_csft:
                t0 = time.time()
                extra["generation"] = generation_report(m, gen_notes, max_new_tokens=args.max_new_tokens,
                                                        batch_size=args.batch_size, progress=progress, desc=name)
                sec["generate"] = time.time() - t0
            record(name, vecs[name], sec, extra)
        del llms

    groups = {g: sel for g, sel in pair_groups(exp.test_pairs, buckets, cold).items() if g in ("all", "cold")}
    results["differences"] = differences_report(all_ranks, [name for name, _ in models], exp.test_pairs, ks,
                                                groups)
    results["seconds_total"] = round(time.time() - t_all, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown_report(results))
    plot_recall(results, out / "recall_at_k.png")
    print(markdown_report(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'recall_at_k.png'}", file=sys.stderr)
    return 0
