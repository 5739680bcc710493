"""`notellm train`: NoteLLM training (GCL + CSFT) on co-occurrence pairs.

    notellm train --data ../shared/data/movielens-latest-small --base smollm2 --out runs/notellm

- Pairs: `notellm.pairs.make_experiment` (time split; training pairs only from the earlier clicks).
- Each step takes B pairs = 2B notes (no note twice in a micro-batch), one forward pass gives the note
  vectors (GCL, in-batch negatives) and the CSFT loss on the output tokens. A note's CSFT task is drawn
  once per run (seeded): j hashtags with probability r (default 0.4) when it has hashtags, otherwise its
  category; a note with neither trains GCL only.
- L = (L_gcl + alpha * L_csft) / (1 + alpha); alpha = 0 trains "NoteLLM without CSFT" (and skips the
  output tokens entirely).
- The GCL corrects in-batch sampling (`notellm.losses.BatchPrior`, both on by default): logQ subtracts
  log q(candidate) (its share of the training pairs) from every logit (`--no-logq`), and candidates that
  are known training partners of the anchor, other than its target, are masked (`--no-mask-known`).
- The temperature starts at scale 5 (`--tau-init` ln 5) and has its own learning rate (`--tau-lr`); the
  projection trains at `--proj-lr`, the rest at `--lr`.
- AdamW with linear warmup then linear decay, gradient accumulation, bf16 autocast on GPU (fp32 on CPU).
  The schedule ends at the run's last step: one of `--epochs`, `--max-steps` or, with
  `--time-budget-min`, the steps the budget holds at the step time measured over the first few steps
  (held-out evaluations included); the budget still stops a run that slows down.
- Held-out learning curve (`--eval-every N`, default 25, 0 = off): before the first step, every N steps and
  after the last, the GCL loss (plain InfoNCE: no logQ, no masking) on a fixed sample of test pairs and
  Recall@k on a fixed pool of test notes (warm / cold pairs too with `--cold-fraction`), appended to
  OUT/curves.jsonl and drawn in OUT/curves.png. Judge learning by these, not by the training loss: with
  a few hundred training notes a falling training loss is mostly memorisation.
- CPU options: `--freeze-layers K` freezes the embeddings + the lower K decoder layers; with
  `--cache-frozen` (default when K > 0) their outputs are computed once per note and reused every epoch,
  so a step runs only the upper layers. `--lora-r R` puts LoRA adapters (peft) on the unfrozen layers
  (0 = train those layers fully). The projection and the GCL temperature always train.
- Checkpoints every `--checkpoint-every` optimizer steps under OUT/checkpoint/ carry the run config, the
  trainable parameters, optimizer/scheduler state and RNG state; `--resume` continues from there.
- The output directory is written with `NoteLLM.save` (LoRA merged), so `notellm export OUT` works on it;
  it also holds `train_config.json` and `train_log.jsonl` (one line per logged step, with the loss parts).
- `--cold-fraction F` holds a seeded share of the notes out of training entirely (`notellm.pairs`), so
  `notellm eval` can report cold-start recall apart (it reads the split from train_config.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

TRAIN_CONFIG = "train_config.json"
TRAIN_LOG = "train_log.jsonl"
CURVES_LOG = "curves.jsonl"
CURVES_PLOT = "curves.png"
CHECKPOINT_DIR = "checkpoint"
TAU_INIT = math.log(5.0)  # scale 5 at the start (see configure)
PLAN_AFTER_STEPS = 4  # a time-budgeted run sizes its schedule after this many steps (step 1 not timed)
REPLAN_EVERY_STEPS = 25  # ... and re-sizes it this often (at each held-out evaluation when those are on)


# ------------------------------------------------------------------------------------------ arguments

def add_split_args(p: argparse.ArgumentParser, *, defaults_none: bool = False) -> None:
    """Options that define the pair split (shared by train and eval). With `defaults_none`, unset options
    stay None so eval can take them from the model's train_config.json."""
    from notellm.pairs import SplitConfig

    d = SplitConfig()
    g = p.add_argument_group("pairs / split")
    nd = (lambda v: None) if defaults_none else (lambda v: v)
    g.add_argument("--test-fraction", type=float, default=nd(d.test_fraction),
                   help=f"share of clicks (latest by time) that form the test period (default {d.test_fraction})")
    g.add_argument("--window-days", type=float, default=nd(d.window_days), help="co-occurrence window (default 7)")
    g.add_argument("--lower", type=float, default=None, help="drop neighbours scoring below this")
    g.add_argument("--upper", type=float, default=None, help="drop neighbours scoring above this")
    g.add_argument("--top-t", type=int, default=nd(d.top_t), help="neighbours kept per note (default 10)")
    g.add_argument("--max-train-notes", type=int, default=None,
                   help="restrict training pairs to a random set of this many notes (dense pairs, fewer notes)")
    g.add_argument("--max-train-pairs", type=int, default=None, help="random subsample of training pairs")
    g.add_argument("--max-test-notes", type=int, default=None, help="cap on the test candidate pool")
    g.add_argument("--split-seed", type=int, default=None if defaults_none else 0)
    g.add_argument("--cold-fraction", type=float, default=nd(d.cold_fraction),
                   help="share of notes held out of training entirely (cold-start evaluation), drawn with "
                        f"--split-seed (default {d.cold_fraction}: off)")


def split_config_from_args(args, base=None):
    from notellm.pairs import SplitConfig

    cfg = SplitConfig.from_dict(base.to_dict() if base is not None else {})
    for name, attr in [("test_fraction", "test_fraction"), ("window_days", "window_days"), ("lower", "lower"),
                       ("upper", "upper"), ("top_t", "top_t"), ("max_train_notes", "max_train_notes"), ("max_train_pairs", "max_train_pairs"),
                       ("max_test_notes", "max_test_notes"), ("split_seed", "seed"),
                       ("cold_fraction", "cold_fraction")]:
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, attr, v)
    return cfg


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (MIND, MovieLens or notes.jsonl + clicks.csv)")
    p.add_argument("--base", default="smollm2", help="smollm2 | tiny | a local Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (a NoteLLM directory, exportable)")
    p.add_argument("--dim", type=int, default=128, help="note vector size")
    p.add_argument("--alpha", type=float, default=0.01, help="CSFT weight; 0 = NoteLLM without CSFT")
    p.add_argument("--r-hashtags", type=float, default=0.4, help="share of notes trained on hashtags (r)")
    p.add_argument("--tau-init", type=float, default=TAU_INIT,
                   help="initial log temperature, scale = exp(tau) (default ln 5 = 1.609: scale 5; the paper's 3 "
                        "gives scale 20, far too sharp for anisotropic LLM states)")
    p.add_argument("--tau-lr", type=float, default=1e-2, help="learning rate of the temperature (default 1e-2)")
    p.add_argument("--logq", action=argparse.BooleanOptionalAction, default=True,
                   help="logQ correction: subtract log q(candidate) (its share of the training pairs) from each "
                        "in-batch logit (default on; --no-logq turns it off)")
    p.add_argument("--mask-known", action=argparse.BooleanOptionalAction, default=True,
                   help="mask in-batch candidates that are known co-engaged training partners of the anchor "
                        "(never the target; default on; --no-mask-known turns it off)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (and save) after this many minutes of training; the warmup/decay schedule is "
                        "sized to the steps that fit, from the step time measured after a few steps")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (2x notes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--proj-lr", type=float, default=None, help="learning rate of the projection (default --lr)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--freeze-layers", type=int, default=0, help="freeze the lower K decoder layers")
    p.add_argument("--cache-frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="cache the frozen layers' outputs per note (default: on when --freeze-layers > 0)")
    p.add_argument("--proj-init", choices=["whiten", "random"], default="random",
                   help="projection init: random (the model's seeded init; default) or whiten (centre + whiten the "
                        "base's vectors of the training notes)")
    p.add_argument("--cache-path", default=None,
                   help="file to keep the frozen-layer cache in (reused when notes, base and K match)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the trainable layers (0 = full)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x r)")
    p.add_argument("--max-title-tokens", type=int, default=None)
    p.add_argument("--max-topic-tokens", type=int, default=None)
    p.add_argument("--max-content-tokens", type=int, default=None)
    p.add_argument("--num-topics", type=int, default=None, help="max j for the hashtags task")
    p.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=25,
                   help="held-out learning curve: GCL loss and Recall@k on a fixed held-out sample every N "
                        "optimizer steps, before the first and after the last (0 = off); OUT/curves.jsonl, curves.png")
    p.add_argument("--eval-notes", type=int, default=200, help="held-out pool size for the curve's Recall@k")
    p.add_argument("--eval-pairs", type=int, default=256, help="held-out pairs for the curve's GCL loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    add_split_args(p)


# ----------------------------------------------------------------------------------- model plumbing

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


@dataclass
class NoteRow:
    ids: list[int]
    labels: list[int]
    emb_pos: int
    task: str


def note_rows(model, notes: dict, note_ids, *, r_hashtags: float, num_topics: int,
              seed: int) -> dict[str, NoteRow]:
    """The fixed training sequence of each note (task drawn once, seeded; see module docstring).

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
    import hashlib

    h = hashlib.sha256(f"{base_id}|{k}".encode())
    for nid in sorted(rows):
        h.update(nid.encode() + b":" + ",".join(map(str, rows[nid].ids)).encode() + b";")
    return h.hexdigest()


def pad_rows(rows: list[NoteRow], pad_id: int, device):
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


def whitening_projection(hidden, dim: int, eps: float = 1e-6):
    """A bias-free [dim, hidden] projection that centres and whitens `hidden` (rows = notes).

    LLM last-token states are strongly anisotropic (cosine ~0.97 between unrelated notes for SmolLM2),
    which leaves InfoNCE near log(2B - 1) with a random projection. With mu the mean state and
    P = I - mu mu^T / |mu|^2, W = Lambda^-1/2 U^T P (U, Lambda: top-`dim` principal axes of the centred
    states with the mu direction removed) gives W h = W (h - mu) for every h: centring without a bias, so the model stays a plain
    Linear(hidden, d). (BERT-whitening, Su et al. 2021, as an initialisation.)
    """
    import torch

    h = hidden.double()
    mu = h.mean(0)
    mu_hat = mu / mu.norm().clamp(min=eps)
    proj_out = torch.eye(h.shape[1], dtype=h.dtype) - torch.outer(mu_hat, mu_hat)
    c = (h - mu) @ proj_out  # centred, mean direction removed: its principal axes are orthogonal to mu
    cov = c.T @ c / max(1, c.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    idx = torch.argsort(evals, descending=True)[:dim]
    u, lam = evecs[:, idx], evals[idx].clamp(min=eps)
    w = (u / lam.sqrt()).T @ proj_out
    if w.shape[0] < dim:  # fewer notes than dim: pad with small random rows
        extra = torch.randn(dim - w.shape[0], h.shape[1], dtype=h.dtype) * h.shape[1] ** -0.5
        w = torch.cat([w, extra @ proj_out])
    return w.float()


def setup_trainable(model, *, freeze_layers: int, lora_r: int, lora_alpha: float | None, seed: int):
    """Freeze embeddings (+ tied head) and the lower layers; LoRA or full training on the rest."""
    import torch

    lm = model.lm
    n_layers = len(lm.get_decoder().layers)
    if not 0 <= freeze_layers < n_layers:
        raise ValueError(f"--freeze-layers must be in [0, {n_layers - 1}]")
    for p in model.parameters():
        p.requires_grad_(False)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"],
                         layers_to_transform=list(range(freeze_layers, n_layers)), bias="none")
        model.lm = get_peft_model(lm, cfg)
        for n, p in model.lm.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        dec = lm.get_decoder()
        for layer in list(dec.layers)[freeze_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in dec.norm.parameters():
            p.requires_grad_(True)
    for p in model.proj.parameters():
        p.requires_grad_(True)


def merge_lora(model) -> None:
    """Fold LoRA adapters into the weights (in place) so `model.lm` is a plain HF model again."""
    if hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()


def trainable_state(model, loss_fn) -> dict:
    sd = {f"model.{n}": p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    sd.update({f"loss.{n}": p.detach().cpu().clone() for n, p in loss_fn.named_parameters()})
    return sd


def load_trainable_state(model, loss_fn, sd: dict) -> None:
    import torch

    params = {f"model.{n}": p for n, p in model.named_parameters()}
    params.update({f"loss.{n}": p for n, p in loss_fn.named_parameters()})
    missing = [k for k in sd if k not in params]
    if missing:
        raise ValueError(f"checkpoint does not fit this model/config: unknown parameters {missing[:3]}...")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


def lr_lambda_factory(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        return max(0.0, (total - step) / (total - warmup))
    return f


class LinearSchedule:
    """LR factor: linear warmup over `warmup_ratio` of the planned steps, then linear decay to 0 at the last.

    A callable object (not a function), so LambdaLR's state_dict carries the plan. A time-budgeted run
    re-plans (`replan`) when the measured step time says how many steps the budget holds.
    """

    def __init__(self, total: int, warmup_ratio: float, planned_by: str = "epochs"):
        self.warmup_ratio = float(warmup_ratio)
        self.reset(total, planned_by)

    def reset(self, total: int, planned_by: str = "epochs") -> None:
        self._set(total)
        self.planned_by = planned_by
        self.planned_at_step = 0
        self.replans = 0

    def _set(self, total: int) -> None:
        self.total = max(1, int(total))
        self.warmup = int(round(self.total * self.warmup_ratio))

    def replan(self, total: int, *, at_step: int, planned_by: str = "budget", keep_warmup: bool = False) -> None:
        """Plan for `total` steps from now on. With `keep_warmup`, a warmup already over stays as it was (a
        later re-plan only changes the decay)."""
        warmup = self.warmup
        self._set(total)
        if keep_warmup and at_step >= warmup:
            self.warmup = min(warmup, self.total)
        self.planned_by = planned_by
        self.planned_at_step = int(at_step)
        self.replans += 1

    def __call__(self, step: int) -> float:
        return lr_lambda_factory(self.total, self.warmup)(step)

    def to_dict(self) -> dict:
        return {"total_steps": self.total, "warmup_steps": self.warmup, "planned_by": self.planned_by,
                "planned_at_step": self.planned_at_step, "replans": self.replans}


def budget_steps(*, budget_s: float, elapsed_s: float, steps_done: int, step_s: float, eval_s: float = 0.0,
                 eval_every: int = 0) -> int:
    """Optimizer steps a time budget holds: those done plus what the remaining time fits at the measured
    seconds per step, each step carrying its share of the periodic held-out evaluation."""
    per_step = step_s + (eval_s / eval_every if eval_every and eval_every > 0 else 0.0)
    if per_step <= 0:
        raise ValueError("step time must be positive")
    return steps_done + max(0, int(max(0.0, budget_s - elapsed_s) // per_step))


def param_groups(model, loss_fn, *, lr: float, proj_lr: float | None = None,
                 tau_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups: the trainable body ("body": lr, weight decay), the projection ("proj":
    proj_lr, default lr; no decay) and the GCL temperature ("tau": tau_lr, default the projection's; no
    decay). The temperature has its own rate: on the projection's 1e-3 it barely moves in a short run."""
    proj = [p for p in model.proj.parameters() if p.requires_grad]
    tau = list(loss_fn.parameters())
    skip = {id(p) for p in proj + tau}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    p_lr = proj_lr or lr
    groups = [{"name": "body", "params": body, "lr": lr}] if body else []
    groups.append({"name": "proj", "params": proj, "lr": p_lr, "weight_decay": 0.0})
    groups.append({"name": "tau", "params": tau, "lr": tau_lr or p_lr, "weight_decay": 0.0})
    return groups


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


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out_dir, path=None) -> Path | None:
    """OUT/curves.png from OUT/train_log.jsonl and OUT/curves.jsonl: training GCL per step with the held-out
    GCL and chance; held-out Recall@k (two largest k) with random ranking; cold pairs dashed when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    train = _read_jsonl(out / TRAIN_LOG)
    curves = [c for c in _read_jsonl(out / CURVES_LOG) if c.get("heldout_gcl") is not None or c.get("heldout_recall")]
    if not train and not curves:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    if train:
        how = (["logQ"] if train[-1].get("logq") else []) + (
            ["known positives masked"] if any(r.get("masked") for r in train) else [])
        ax1.plot([r["step"] for r in train], [r["gcl"] for r in train], lw=0.8, alpha=0.6, color="tab:blue",
                 label="train GCL" + (f" ({', '.join(how)})" if how else ""))
    if curves:
        st = [c["step"] for c in curves]
        ax1.plot(st, [c["heldout_gcl"] for c in curves], marker="o", color="tab:red", label="held-out GCL")
        ax1.plot(st, [c["heldout_chance"] for c in curves], ls="--", color="grey", label="chance (log(2B-1))")
        ks = sorted(curves[-1]["heldout_recall"], key=int)[-2:]
        pool = curves[-1]["pool"]
        for i, k in enumerate(ks):
            color = f"C{i + 2}"
            ax2.plot(st, [c["heldout_recall"][k] for c in curves], marker="o", color=color, label=f"R@{k}")
            if "heldout_recall_cold" in curves[-1]:
                ax2.plot(st, [c.get("heldout_recall_cold", {}).get(k, float("nan")) for c in curves], marker="x",
                         ls="--", color=color, label=f"R@{k} cold pairs")
            ax2.axhline(min(1.0, int(k) / max(1, pool - 1)), ls=":", color=color, alpha=0.7)
        ax2.set_title(f"held-out Recall@k (pool {pool} notes, {curves[-1]['heldout_pairs']} pairs; dotted: random)")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("InfoNCE")
    ax1.set_title("GCL loss")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("Recall@k")
    ax2.grid(alpha=0.3)
    if curves:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path) if path is not None else out / CURVES_PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- run

def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    from notellm.data import load_dataset
    from notellm.evaluate import scaled_ks
    from notellm.losses import BatchPrior, NoteLLMLoss
    from notellm.model import NoteLLM
    from notellm.pairs import batch_pairs, exposure_buckets, make_experiment
    from notellm.prompts import PromptConfig

    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR
    progress = not args.no_progress

    resume_state = None
    if args.resume:
        state_file = ckpt_dir / "trainer_state.pt"
        if not state_file.exists():
            print(f"notellm train: --resume but no checkpoint at {state_file}", file=sys.stderr)
            return 2
        resume_state = torch.load(state_file, map_location="cpu", weights_only=False)
        saved = resume_state["config"]
        # the run's shape comes from the checkpoint; only limits may change on resume
        keep = {"max_steps", "time_budget_min", "resume", "no_progress", "threads", "device", "checkpoint_every",
                "log_every", "eval_every"}
        for k, v in saved["args"].items():
            if k not in keep:
                setattr(args, k, v)

    set_seed(args.seed)
    split_cfg = split_config_from_args(args)
    ds = load_dataset(args.data)
    exp = make_experiment(ds, split_cfg)
    pairs = exp.train_pairs
    if not pairs:
        print("notellm train: no training pairs (check the data and the split options)", file=sys.stderr)
        return 2
    print(f"data: {json.dumps(ds.summary())}", file=sys.stderr)
    print(f"split: {json.dumps(exp.summary())}", file=sys.stderr)

    d = PromptConfig()
    pcfg = PromptConfig(
        max_title_tokens=args.max_title_tokens or d.max_title_tokens,
        max_topic_tokens=args.max_topic_tokens or d.max_topic_tokens,
        max_content_tokens=args.max_content_tokens or d.max_content_tokens,
        num_topics=args.num_topics or d.num_topics)
    t0 = time.time()
    model = NoteLLM.from_base(args.base, dim=args.dim, seed=args.seed, prompt_config=pcfg)
    print(f"base loaded in {time.time() - t0:.1f}s: {model.base_model_id}", file=sys.stderr)
    setup_trainable(model, freeze_layers=args.freeze_layers, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                    seed=args.seed)
    model.to(device)
    loss_fn = NoteLLMLoss(alpha=args.alpha, tau_init=args.tau_init).to(device)
    cache_frozen = args.cache_frozen if args.cache_frozen is not None else args.freeze_layers > 0
    if cache_frozen and args.freeze_layers <= 0:
        print("notellm train: --cache-frozen needs --freeze-layers > 0", file=sys.stderr)
        return 2

    note_ids = {x for p in pairs for x in p[:2]}
    rows = note_rows(model, ds.notes, note_ids, r_hashtags=args.r_hashtags, num_topics=pcfg.num_topics,
                     seed=args.seed)
    tasks = {t: sum(1 for r in rows.values() if r.task == t) for t in ("category", "hashtags", "none")}
    mean_len = sum(len(r.ids) for r in rows.values()) / len(rows)
    print(f"notes: {len(rows)} (tasks {tasks}), mean sequence {mean_len:.1f} tokens", file=sys.stderr)

    split = LayerSplit(model, args.freeze_layers)
    cache = None
    if cache_frozen:
        model.eval()
        t0 = time.time()
        fp = rows_fingerprint(rows, model.base_model_id, args.freeze_layers)
        cpath = Path(args.cache_path) if args.cache_path else None
        if cpath is not None and cpath.exists():
            saved = torch.load(cpath, map_location="cpu", weights_only=False)
            if saved.get("fingerprint") == fp:
                cache = saved["cache"]
                print(f"loaded the frozen-layer cache {cpath} ({len(cache)} notes)", file=sys.stderr)
            else:
                print(f"{cpath} was built for other notes/base/layers: recomputing", file=sys.stderr)
        if cache is None:
            cache = build_cache(split, rows, model.pad_token_id, device, progress=progress)
            print(f"cached layers 0..{args.freeze_layers - 1} for {len(cache)} notes in {time.time() - t0:.1f}s",
                  file=sys.stderr)
            if cpath is not None:
                cpath.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"fingerprint": fp, "cache": cache}, str(cpath) + ".tmp")
                os.replace(str(cpath) + ".tmp", cpath)

    if args.proj_init == "whiten" and resume_state is None:
        t0 = time.time()
        model.eval()
        keys = sorted(rows)
        if len(keys) > 1024:
            keys = sorted(random.Random(args.seed).sample(keys, 1024))
        hid = final_hidden_at_prefix_end(model, split, rows, keys, cache, device)
        with torch.no_grad():
            model.proj.weight.copy_(whitening_projection(hid, model.dim).to(model.proj.weight))
        print(f"projection initialised by whitening {len(keys)} training notes in {time.time() - t0:.1f}s",
              file=sys.stderr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, loss_fn, lr=args.lr, proj_lr=args.proj_lr, tau_lr=args.tau_lr),
                            lr=args.lr, weight_decay=args.weight_decay)
    n_train = sum(p.numel() for p in trainable) + sum(p.numel() for p in loss_fn.parameters())
    print(f"trainable parameters: {n_train:,}; lr body {args.lr}, projection {args.proj_lr or args.lr}, "
          f"temperature {args.tau_lr or args.proj_lr or args.lr} (scale starts at {math.exp(args.tau_init):.2f})",
          file=sys.stderr)
    # logQ and known positives: from the pairs that train (q) and every training-period pair (known)
    prior = BatchPrior(pairs, exp.split.train_pairs, logq=args.logq, mask_known=args.mask_known)
    print(f"GCL: logQ correction {'on' if args.logq else 'off'}, known-positive masking "
          f"{'on' if args.mask_known else 'off'}", file=sys.stderr)

    micro_per_epoch = len(batch_pairs(pairs, args.batch_size, args.seed, 0))
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    total_steps = max(1, int(math.ceil(steps_per_epoch * args.epochs)))
    planned_by = "epochs"
    if args.max_steps and args.max_steps < total_steps:
        total_steps, planned_by = args.max_steps, "max_steps"
    plan = LinearSchedule(total_steps, args.warmup_ratio, planned_by)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan)

    config = {"args": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "split": split_cfg.to_dict(), "prompt": pcfg.to_dict(), "total_steps": plan.total,
              "warmup_steps": plan.warmup, "schedule": plan.to_dict(), "cache_frozen": cache_frozen,
              "device": str(device), "data_summary": ds.summary(), "split_summary": exp.summary(), "tasks": tasks,
              "trainable_parameters": n_train, "command": "notellm train " + " ".join(sys.argv[2:])
              if len(sys.argv) > 1 and sys.argv[1] == "train" else None}

    step, epoch, micro_done = 0, 0, 0
    if resume_state is not None:
        load_trainable_state(model, loss_fn, resume_state["trainable"])
        try:
            opt.load_state_dict(resume_state["optimizer"])
        except ValueError as e:
            print(f"notellm train: the checkpoint's optimizer does not fit this version ({e}); start a new run",
                  file=sys.stderr)
            return 2
        sched.load_state_dict(resume_state["scheduler"])
        plan.reset(total_steps, planned_by)  # limits may change on resume: plan anew
        config.update({"total_steps": plan.total, "warmup_steps": plan.warmup, "schedule": plan.to_dict()})
        step, epoch, micro_done = resume_state["step"], resume_state["epoch"], resume_state["micro_done"]
        random.setstate(resume_state["rng_python"])
        torch.set_rng_state(resume_state["rng_torch"])
        print(f"resumed at step {step} (epoch {epoch}, micro-batch {micro_done})", file=sys.stderr)

    def save_checkpoint() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / "trainer_state.pt.tmp"
        torch.save({"config": config, "trainable": trainable_state(model, loss_fn), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "micro_done": micro_done,
                    "rng_python": random.getstate(), "rng_torch": torch.get_rng_state()}, tmp)
        os.replace(tmp, ckpt_dir / "trainer_state.pt")
        (ckpt_dir / "config.json").write_text(json.dumps({**config, "step": step}, indent=2, default=str) + "\n")

    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    def train_mode() -> None:
        model.train()
        if cache_frozen:
            model.lm.get_decoder().embed_tokens.eval()

    # held-out learning curve: a fixed sample of test pairs, its notes' lower layers computed once
    heldout = None
    if args.eval_every and args.eval_every > 0:
        if not exp.test_pairs:
            print("no test pairs: the held-out learning curve is off", file=sys.stderr)
        else:
            t0 = time.time()
            sample = heldout_sample(exp.test_pairs, max_notes=args.eval_notes, max_pairs=args.eval_pairs,
                                    batch_size=args.batch_size, seed=args.seed)
            eval_rows = eval_note_rows(model, ds.notes, sample.pool)
            model.eval()
            eval_cache = (build_cache(split, eval_rows, model.pad_token_id, device, progress=progress)
                          if cache_frozen else None)
            heldout = {"sample": sample, "rows": eval_rows, "cache": eval_cache,
                       "ks": scaled_ks(len(sample.pool) - 1),
                       "buckets": exposure_buckets(sample.pool, exp.split.train_counts)}
            config["heldout"] = {"pool": len(sample.pool), "recall_pairs": len(sample.recall_pairs),
                                 "loss_pairs": sample.loss_pairs, "ks": heldout["ks"], "every": args.eval_every}
            print(f"held-out curve: pool {len(sample.pool)} test notes, {len(sample.recall_pairs)} pairs for "
                  f"Recall@{heldout['ks']}, {sample.loss_pairs} pairs for the GCL loss, every {args.eval_every} "
                  f"steps (set up in {time.time() - t0:.1f}s)", file=sys.stderr)
    curves_f = open(out / CURVES_LOG, "a" if resume_state is not None else "w") if heldout else None
    since_eval: dict[str, list[float]] = {}
    last_eval = {"step": None, "seconds": 0.0}

    def heldout_eval() -> None:
        t0 = time.time()
        model.eval()
        with autocast:
            hid = final_hidden_at_prefix_end(model, split, heldout["rows"], heldout["sample"].pool,
                                             heldout["cache"], device)
        with torch.no_grad():
            emb = model.project(hid.to(device)).float()
        m = heldout_metrics(emb, heldout["sample"], loss_fn.gcl, ks=heldout["ks"], buckets=heldout["buckets"],
                            cold=exp.cold_notes)
        train_mode()
        mean = {k: sum(v) / len(v) for k, v in since_eval.items() if v}
        since_eval.clear()
        rec = {"step": step, "epoch": epoch, "train_gcl": mean.get("gcl"), "train_loss": mean.get("loss"),
               "train_acc": mean.get("gcl_acc"), **m, "scale": float(loss_fn.gcl.scale.detach()),
               "eval_s": round(time.time() - t0, 2)}
        curves_f.write(json.dumps(rec) + "\n")
        curves_f.flush()
        last_eval.update(step=step, seconds=time.time() - t0)
        kk = str(heldout["ks"][-1])
        cold_txt = (f", cold pairs {100 * m['heldout_recall_cold'][kk]:.1f}" if "heldout_recall_cold" in m else "")
        msg = (f"held-out at step {step}: GCL {m['heldout_gcl']:.3f} (chance {m['heldout_chance']:.3f})"
               if m["heldout_gcl"] is not None else f"held-out at step {step}:")
        print(f"{msg}, R@{kk} {100 * m['heldout_recall'][kk]:.1f}{cold_txt} "
              f"(random {100 * min(1.0, int(kk) / max(1, m['pool'] - 1)):.1f})", file=sys.stderr)

    if heldout is not None and resume_state is None:
        heldout_eval()  # step 0: where training starts from
    eval_s_est = last_eval["seconds"]

    log_f = open(out / TRAIN_LOG, "a" if resume_state is not None else "w")
    bar = tqdm(total=plan.total, initial=step, desc="train", unit="step", disable=not progress, file=sys.stderr,
               mininterval=2)
    train_mode()
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    t_train = time.time()
    steps_here, t_first_step, eval_in_window, planned_once = 0, None, 0.0, False
    replan_every = args.eval_every if heldout is not None else REPLAN_EVERY_STEPS
    stop = step >= plan.total
    acc = {}
    while not stop:
        batches = batch_pairs(pairs, args.batch_size, args.seed, epoch)
        for bi in range(micro_done, len(batches)):
            batch = batches[bi]
            a_ids = [p[0] for p in batch]
            b_ids = [p[1] for p in batch]
            keys = a_ids + b_ids
            ids, mask, labels, pos = pad_rows([rows[k] for k in keys], model.pad_token_id, device)
            corr = prior.for_batch(a_ids, b_ids, device)
            with autocast:
                if cache is not None:
                    hidden = split.upper(pad_cached(cache, keys, device), mask)
                else:
                    hidden = model.lm.get_decoder()(
                        input_ids=ids, attention_mask=mask,
                        position_ids=split._pos(mask), use_cache=False).last_hidden_state
                emb, csft = model.heads(hidden, pos, labels if args.alpha > 0 else None)
                parts = loss_fn(emb[: len(batch)], emb[len(batch):], csft, **corr)
            (parts["loss"] / args.grad_accum).backward()
            for k, v in parts.items():
                acc.setdefault(k, []).append(float(v.detach()))
            micro_done = bi + 1
            if micro_done % args.grad_accum != 0 and micro_done != len(batches):
                continue
            torch.nn.utils.clip_grad_norm_(trainable + list(loss_fn.parameters()), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_here += 1
            if steps_here == 1:
                t_first_step = time.time()  # the first step (allocations, lazy init) is not timed
            elif (budget_s and steps_here >= PLAN_AFTER_STEPS and step < plan.total
                    and (steps_here - PLAN_AFTER_STEPS) % replan_every == 0):
                # steps the budget holds at the step time measured so far (checkpoints included) plus each
                # step's share of the held-out evaluation; planned after a few steps, re-planned now and then
                # (a shared machine's speed drifts), the warmup kept once it is over
                step_s = (time.time() - t_first_step - eval_in_window) / (steps_here - 1)
                fit = budget_steps(budget_s=budget_s, elapsed_s=time.time() - t_train, steps_done=step,
                                   step_s=step_s, eval_s=eval_s_est if heldout else 0.0,
                                   eval_every=args.eval_every if heldout else 0)
                new_total = min(total_steps, max(fit, step))
                if new_total != plan.total and (not planned_once or
                                                abs(new_total - plan.total) > max(1, 0.02 * plan.total)):
                    before = plan.total
                    plan.replan(new_total, at_step=step, keep_warmup=planned_once)
                    for g, base in zip(opt.param_groups, sched.base_lrs):  # the next update follows the plan
                        g["lr"] = base * plan(step)
                    print(f"time budget: {step_s:.2f}s per step -> schedule planned for {plan.total} steps "
                          f"(warmup {plan.warmup}) instead of {before}", file=sys.stderr)
                    bar.total = plan.total
                    bar.refresh()
                planned_once = True
                config.update({"total_steps": plan.total, "warmup_steps": plan.warmup,
                               "schedule": {**plan.to_dict(), "step_s": round(step_s, 3),
                                            "eval_s": round(eval_s_est, 2), "budget_steps": fit}})
            rec = {k: sum(v) / len(v) for k, v in acc.items()}
            acc = {}
            rec.update({"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                        "elapsed_s": round(time.time() - t_train, 1)})
            for k in ("loss", "gcl", "gcl_acc"):
                since_eval.setdefault(k, []).append(rec[k])
            if step % args.log_every == 0 or step == plan.total:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", gcl=f"{rec['gcl']:.3f}", csft=f"{rec['csft']:.3f}",
                            acc=f"{rec['gcl_acc']:.2f}", scale=f"{rec['scale']:.1f}")
            bar.update(1)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint()
            over_budget = budget_s and (time.time() - t_train) > budget_s
            done = step >= plan.total or over_budget
            if not done and heldout is not None and step % args.eval_every == 0:
                heldout_eval()
                eval_in_window += last_eval["seconds"]
                eval_s_est = last_eval["seconds"]
            if done:
                if over_budget and step < plan.total:
                    print(f"time budget reached at step {step}/{plan.total}", file=sys.stderr)
                    config["stopped_early_at_step"] = step
                stop = True
                break
        else:
            epoch += 1
            micro_done = 0
    bar.close()
    log_f.close()
    train_s = time.time() - t_train
    if heldout is not None:
        if last_eval["step"] != step:
            heldout_eval()
        curves_f.close()
        try:
            plot_curves(out)
        except Exception as e:  # a plot must not lose a trained model
            print(f"could not draw {out / CURVES_PLOT}: {e}", file=sys.stderr)
    save_checkpoint()
    model.eval()
    merge_lora(model)
    model.to("cpu").save(out)
    config.update({"steps_done": step, "train_seconds": round(train_s, 1),
                   "total_seconds": round(time.time() - t_start, 1),
                   "final_scale": float(loss_fn.gcl.scale.detach())})
    (out / TRAIN_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    print(f"saved {out} ({step} steps, {train_s:.0f}s training)", file=sys.stderr)
    return 0


def load_train_config(model_dir) -> dict | None:
    p = Path(model_dir) / TRAIN_CONFIG
    return json.loads(p.read_text()) if p.exists() else None
