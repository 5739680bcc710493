"""Training data and the frozen-layer cache of `notellm train` (library: no argument parsing).

- The pair split's options (`SPLIT_OPTIONS`, `split_config`): shared by training and `notellm eval`.
- `LayerSplit`: a NoteLLM's decoder run in two parts, the frozen lower K layers and the rest.
- Note rows: each note's fixed training sequence (`note_rows`: the CSFT task drawn once, seeded) and its
  evaluation prompt (`eval_note_rows`), padded into batches by `pad_rows`.
- The frozen-layer cache: the lower layers' outputs per note, computed once (`build_cache`), kept in a file
  when asked (`load_or_build_cache`) and padded into batches (`pad_cached`).
- The held-out sample of the learning curve and its metrics (`heldout_sample`, `heldout_metrics`).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# ------------------------------------------------------------------------------------------ the split

# option name (a `notellm train` / `notellm eval` flag, a `TrainConfig` field) -> `pairs.SplitConfig` field
SPLIT_OPTIONS = {"test_fraction": "test_fraction", "window_days": "window_days", "lower": "lower",
                 "upper": "upper", "top_t": "top_t", "max_train_notes": "max_train_notes",
                 "max_train_pairs": "max_train_pairs", "max_test_notes": "max_test_notes",
                 "split_seed": "seed", "cold_fraction": "cold_fraction"}


def split_config(options, base=None):
    """The `pairs.SplitConfig` that `options` (any object with the `SPLIT_OPTIONS` attributes: parsed
    arguments, a `TrainConfig`) describe, on top of `base` (default: SplitConfig's defaults). An option
    that is None or missing keeps the base's value."""
    from notellm.pairs import SplitConfig

    cfg = SplitConfig.from_dict(base.to_dict() if base is not None else {})
    for name, attr in SPLIT_OPTIONS.items():
        v = getattr(options, name, None)
        if v is not None:
            setattr(cfg, attr, v)
    return cfg


# ------------------------------------------------------------------------------------- the layer split

@contextmanager
def swapped_layers(decoder, layers, norm=None):
    """Temporarily run `decoder` (a HF base model) with another layer list (and final norm)."""
    import torch.nn as nn

    old_layers, old_norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(layers)
    if norm is not None:
        decoder.norm = norm
    try:
        yield decoder
    finally:
        decoder.layers = old_layers
        decoder.norm = old_norm


class LayerSplit:
    """Runs a NoteLLM's decoder in two parts: the frozen lower K layers and the rest.

    lower(ids, mask) -> hidden after layer K (before the final norm); upper(hidden, mask) -> final normed
    hidden. upper(lower(x)) equals the decoder's own output (same positions, same causal/padding mask).
    """

    def __init__(self, model, k: int):
        import torch.nn as nn

        from notellm.model import position_ids_from_mask

        self.model = model
        self.k = k
        self._pos = position_ids_from_mask
        self._identity = nn.Identity()

    @property
    def decoder(self):
        return self.model.lm.get_decoder()

    def lower(self, input_ids, attention_mask):
        dec = self.decoder
        layers = list(dec.layers)
        with swapped_layers(dec, layers[: self.k], self._identity):
            out = dec(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=self._pos(attention_mask), use_cache=False)
        return out.last_hidden_state

    def upper(self, hidden, attention_mask):
        dec = self.decoder
        layers = list(dec.layers)
        with swapped_layers(dec, layers[self.k:]):
            out = dec(inputs_embeds=hidden, attention_mask=attention_mask,
                      position_ids=self._pos(attention_mask), use_cache=False)
        return out.last_hidden_state


# ------------------------------------------------------------------------------ note rows and the cache

@dataclass
class NoteRow:
    """One note's token ids, CSFT labels (-100 outside the output), vector position and task."""

    ids: list[int]
    labels: list[int]
    emb_pos: int
    task: str


def note_rows(model, notes: dict, note_ids, *, r_hashtags: float, num_topics: int,
              seed: int) -> dict[str, NoteRow]:
    """The fixed training sequence of each note (task drawn once, seeded; see `notellm.train_loop`).

    The rows do not depend on alpha, so the NoteLLM and the alpha = 0 run share a frozen-layer cache;
    with alpha = 0 the labels are simply not used.
    """
    rng = random.Random(seed)
    rows = {}
    for nid in sorted(note_ids):
        n = notes[nid]
        has_tags = bool(n.hashtags)
        has_cat = bool(n.category and n.category.strip())
        u, jr = rng.random(), rng.random()
        if not (has_tags or has_cat):
            b = model.tokenize_notes([n], "category")
            task = "none"
        elif has_tags and (u < r_hashtags or not has_cat):
            jmax = min(len(n.hashtags), num_topics)
            j = 1 + int(jr * jmax)
            b = model.tokenize_notes([n], "hashtags", hashtags=[list(n.hashtags)], j=j)
            task = "hashtags"
        else:
            b = model.tokenize_notes([n], "category", categories=[n.category])
            task = "category"
        ids = b.input_ids[0].tolist()
        labels = b.labels[0].tolist() if b.labels is not None else [-100] * len(ids)
        rows[nid] = NoteRow(ids, labels, int(b.emb_positions[0]), task)
    return rows


def eval_note_rows(model, notes: dict, note_ids) -> dict[str, NoteRow]:
    """Each note's prompt up to its vector position, as `notellm eval` embeds it (category prompt, no
    continuation): the held-out curve reads the vectors the final evaluation will read."""
    rows = {}
    for nid in sorted(note_ids):
        b = model.tokenize_notes([notes[nid]], "category", include_continuation=False)
        ids = b.input_ids[0].tolist()
        rows[nid] = NoteRow(ids, [-100] * len(ids), int(b.emb_positions[0]), "eval")
    return rows


def rows_fingerprint(rows: dict[str, NoteRow], base_id: str, k: int) -> str:
    """What a frozen-layer cache depends on: the rows' token ids, the base and K (a sha256 hex digest)."""
    import hashlib

    h = hashlib.sha256(f"{base_id}|{k}".encode())
    for nid in sorted(rows):
        h.update(nid.encode() + b":" + ",".join(map(str, rows[nid].ids)).encode() + b";")
    return h.hexdigest()


def pad_rows(rows: list[NoteRow], pad_id: int, device):
    """Right-padded batch of `rows`: (input ids, attention mask, labels, vector positions) on `device`."""
    import torch

    T = max(len(r.ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    pos = torch.zeros(n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        pos[i] = r.emb_pos
    return ids.to(device), mask.to(device), labels.to(device), pos.to(device)


def build_cache(split: LayerSplit, rows: dict[str, NoteRow], pad_id: int, device, *, batch_size: int = 16,
                progress: bool = True) -> dict:
    """note id -> lower-layer hidden states [len, hidden] (CPU, float32), in length-sorted batches."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(rows, key=lambda k: len(rows[k].ids))
    cache = {}
    bar = tqdm(total=len(order), desc="caching frozen layers", unit="note", disable=not progress,
               file=sys.stderr, mininterval=5)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            keys = order[s: s + batch_size]
            ids, mask, _, _ = pad_rows([rows[k] for k in keys], pad_id, device)
            h = split.lower(ids, mask).float().cpu()
            for i, k in enumerate(keys):
                cache[k] = h[i, : len(rows[k].ids)].clone()
            bar.update(len(keys))
    bar.close()
    return cache


def pad_cached(cache: dict, keys: list[str], device):
    """The cached lower-layer states of `keys`, zero-padded to [n, T, hidden] on `device`."""
    import torch

    T = max(cache[k].shape[0] for k in keys)
    H = cache[keys[0]].shape[1]
    out = torch.zeros((len(keys), T, H), dtype=torch.float32)
    for i, k in enumerate(keys):
        out[i, : cache[k].shape[0]] = cache[k]
    return out.to(device)


def final_hidden_at_prefix_end(model, split, rows: dict, keys: list[str], cache: dict | None, device,
                                batch_size: int = 16):
    """[n, hidden] final (normed) hidden states at each note's vector position, no grad."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(keys), batch_size):
            kk = keys[s: s + batch_size]
            ids, mask, _, pos = pad_rows([rows[k] for k in kk], model.pad_token_id, device)
            if cache is not None:
                h = split.upper(pad_cached(cache, kk, device), mask)
            else:
                h = model._hidden(ids, mask)
            out.append(h[torch.arange(h.shape[0], device=h.device), (pos - 1).clamp(min=0)].float().cpu())
    return torch.cat(out)


def load_or_build_cache(split: LayerSplit, rows: dict[str, NoteRow], pad_id: int, device, *, base_id: str,
                        cache_path=None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """The frozen-layer cache of `rows` (see `build_cache`). With `cache_path`, a file built for the same
    rows, base and K is reused, and a new cache is written there (atomically)."""
    import torch

    t0 = time.time()
    fp = rows_fingerprint(rows, base_id, split.k)
    cpath = Path(cache_path) if cache_path else None
    if cpath is not None and cpath.exists():
        saved = torch.load(cpath, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fp:
            log(f"loaded the frozen-layer cache {cpath} ({len(saved['cache'])} notes)")
            return saved["cache"]
        log(f"{cpath} was built for other notes/base/layers: recomputing")
    cache = build_cache(split, rows, pad_id, device, progress=progress)
    log(f"cached layers 0..{split.k - 1} for {len(cache)} notes in {time.time() - t0:.1f}s")
    if cpath is not None:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": fp, "cache": cache}, str(cpath) + ".tmp")
        os.replace(str(cpath) + ".tmp", cpath)
    return cache

# ----------------------------------------------------------------------------- held-out learning curve

@dataclass
class HeldOutSample:
    """A fixed held-out sample (drawn once per run): the pool of test notes, the test pairs among them
    (Recall@k: each pair's first note queries the pool) and batches of unordered pairs for the GCL loss."""

    pool: list[str]
    recall_pairs: list[tuple]
    loss_batches: list[list[tuple]]

    @property
    def loss_pairs(self) -> int:
        return sum(len(b) for b in self.loss_batches)


def heldout_sample(test_pairs, *, max_notes: int, max_pairs: int, batch_size: int, seed: int) -> HeldOutSample:
    """Up to `max_notes` test notes dense in test pairs (`pairs.limit_pairs`), and up to `max_pairs` of
    their unordered pairs in batches of `batch_size` with no note twice (batches of one pair are dropped:
    they have no negative)."""
    from notellm.pairs import batch_pairs, limit_pairs, unordered_unique

    pairs = limit_pairs(list(test_pairs), max_notes, seed)
    pool = sorted({x for p in pairs for x in p[:2]})
    uniq = unordered_unique(pairs)
    if len(uniq) > max_pairs:
        uniq = random.Random(seed).sample(uniq, max_pairs)
    batches = [b for b in batch_pairs(uniq, batch_size, seed, 0) if len(b) >= 2]
    return HeldOutSample(pool, pairs, batches)


def heldout_metrics(emb, sample: HeldOutSample, gcl, *, ks, buckets: dict, cold=frozenset()) -> dict:
    """Held-out GCL (plain InfoNCE at the current temperature: no logQ, no masking, so runs with and without
    those levers compare) and Recall@k (`evaluate.recall_report`) from the pool's vectors `emb` [n, d]."""
    import torch

    from notellm.evaluate import recall_report

    index = {n: i for i, n in enumerate(sample.pool)}
    tot = acc = chance = 0.0
    n = 0
    with torch.no_grad():
        for b in sample.loss_batches:
            ia = torch.tensor([index[p[0]] for p in b], device=emb.device)
            ib = torch.tensor([index[p[1]] for p in b], device=emb.device)
            parts = gcl(emb[ia], emb[ib])
            tot += float(parts["gcl"]) * len(b)
            acc += float(parts["gcl_acc"]) * len(b)
            chance += math.log(2 * len(b) - 1) * len(b)
            n += len(b)
    rep = recall_report(emb.float().cpu().numpy(), sample.pool, sample.recall_pairs, ks, buckets, cold)
    out = {"heldout_gcl": tot / n if n else None, "heldout_acc": acc / n if n else None,
           "heldout_chance": chance / n if n else None, "heldout_loss_pairs": n,
           "heldout_recall": rep["recall"]["all"], "heldout_pairs": rep["pairs"]["all"], "pool": len(sample.pool)}
    if cold:
        for g in ("warm", "cold"):
            out[f"heldout_recall_{g}"] = rep["recall"][g]
            out[f"heldout_pairs_{g}"] = rep["pairs"][g]
    return out

