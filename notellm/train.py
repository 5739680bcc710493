"""`notellm train`: NoteLLM training (GCL + CSFT) on co-occurrence pairs.

    notellm train --data ../shared/data/movielens-latest-small --base smollm2 --out runs/notellm

- Pairs: `notellm.pairs.make_experiment` (time split; training pairs only from the earlier clicks).
- Each step takes B pairs = 2B notes (no note twice in a micro-batch), one forward pass gives the note
  vectors (GCL, in-batch negatives) and the CSFT loss on the output tokens. A note's CSFT task is drawn
  once per run (seeded): j hashtags with probability r (default 0.4) when it has hashtags, otherwise its
  category; a note with neither trains GCL only.
- L = (L_gcl + alpha * L_csft) / (1 + alpha); alpha = 0 trains "NoteLLM without CSFT" (and skips the
  output tokens entirely).
- AdamW with linear warmup then linear decay, gradient accumulation, bf16 autocast on GPU (fp32 on CPU).
- CPU options: `--freeze-layers K` freezes the embeddings + the lower K decoder layers; with
  `--cache-frozen` (default when K > 0) their outputs are computed once per note and reused every epoch,
  so a step runs only the upper layers. `--lora-r R` puts LoRA adapters (peft) on the unfrozen layers
  (0 = train those layers fully). The projection and the GCL temperature always train.
- Checkpoints every `--checkpoint-every` optimizer steps under OUT/checkpoint/ carry the run config, the
  trainable parameters, optimizer/scheduler state and RNG state; `--resume` continues from there.
- The output directory is written with `NoteLLM.save` (LoRA merged), so `notellm export OUT` works on it;
  it also holds `train_config.json` and `train_log.jsonl` (one line per logged step, with the loss parts).
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
CHECKPOINT_DIR = "checkpoint"


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


def split_config_from_args(args, base=None):
    from notellm.pairs import SplitConfig

    cfg = SplitConfig.from_dict(base.to_dict() if base is not None else {})
    for name, attr in [("test_fraction", "test_fraction"), ("window_days", "window_days"), ("lower", "lower"),
                       ("upper", "upper"), ("top_t", "top_t"), ("max_train_notes", "max_train_notes"), ("max_train_pairs", "max_train_pairs"),
                       ("max_test_notes", "max_test_notes"), ("split_seed", "seed")]:
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
    p.add_argument("--tau-init", type=float, default=3.0, help="initial log temperature (scale = exp(tau))")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (and save) after this many minutes of training")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (2x notes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--proj-lr", type=float, default=None, help="learning rate of projection + temperature")
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
    from notellm.losses import NoteLLMLoss
    from notellm.model import NoteLLM
    from notellm.pairs import batch_pairs, make_experiment
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
                "log_every"}
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
    proj_params = list(model.proj.parameters()) + list(loss_fn.parameters())
    proj_ids = {id(p) for p in proj_params}
    body = [p for p in trainable if id(p) not in proj_ids]
    groups = [{"params": body, "lr": args.lr}] if body else []
    groups.append({"params": proj_params, "lr": args.proj_lr or args.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    n_train = sum(p.numel() for p in trainable) + sum(p.numel() for p in loss_fn.parameters())
    print(f"trainable parameters: {n_train:,}", file=sys.stderr)

    micro_per_epoch = len(batch_pairs(pairs, args.batch_size, args.seed, 0))
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    total_steps = max(1, int(math.ceil(steps_per_epoch * args.epochs)))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = int(round(total_steps * args.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total_steps, warmup))

    config = {"args": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "split": split_cfg.to_dict(), "prompt": pcfg.to_dict(), "total_steps": total_steps,
              "warmup_steps": warmup, "cache_frozen": cache_frozen, "device": str(device),
              "data_summary": ds.summary(), "split_summary": exp.summary(), "tasks": tasks,
              "trainable_parameters": n_train, "command": "notellm train " + " ".join(sys.argv[2:])
              if len(sys.argv) > 1 and sys.argv[1] == "train" else None}

    step, epoch, micro_done = 0, 0, 0
    if resume_state is not None:
        load_trainable_state(model, loss_fn, resume_state["trainable"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
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
    log_f = open(out / TRAIN_LOG, "a" if resume_state is not None else "w")
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, file=sys.stderr,
               mininterval=2)
    model.train()
    if cache_frozen:
        model.lm.get_decoder().embed_tokens.eval()
    t_train = time.time()
    stop = step >= total_steps
    acc = {}
    while not stop:
        batches = batch_pairs(pairs, args.batch_size, args.seed, epoch)
        for bi in range(micro_done, len(batches)):
            batch = batches[bi]
            a_ids = [p[0] for p in batch]
            b_ids = [p[1] for p in batch]
            keys = a_ids + b_ids
            ids, mask, labels, pos = pad_rows([rows[k] for k in keys], model.pad_token_id, device)
            with autocast:
                if cache is not None:
                    hidden = split.upper(pad_cached(cache, keys, device), mask)
                else:
                    hidden = model.lm.get_decoder()(
                        input_ids=ids, attention_mask=mask,
                        position_ids=split._pos(mask), use_cache=False).last_hidden_state
                emb, csft = model.heads(hidden, pos, labels if args.alpha > 0 else None)
                parts = loss_fn(emb[: len(batch)], emb[len(batch):], csft)
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
            rec = {k: sum(v) / len(v) for k, v in acc.items()}
            acc = {}
            rec.update({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                        "elapsed_s": round(time.time() - t_train, 1)})
            if step % args.log_every == 0 or step == total_steps:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", gcl=f"{rec['gcl']:.3f}", csft=f"{rec['csft']:.3f}",
                            acc=f"{rec['gcl_acc']:.2f}", scale=f"{rec['scale']:.1f}")
            bar.update(1)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint()
            over_budget = args.time_budget_min and (time.time() - t_train) > args.time_budget_min * 60
            if step >= total_steps or over_budget:
                if over_budget and step < total_steps:
                    print(f"time budget reached at step {step}/{total_steps}", file=sys.stderr)
                    config["stopped_early_at_step"] = step
                stop = True
                break
        else:
            epoch += 1
            micro_done = 0
    bar.close()
    log_f.close()
    train_s = time.time() - t_train
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
