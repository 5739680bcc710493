"""NoteLLM training (GCL + CSFT) on co-occurrence pairs: `train(TrainConfig(...)) -> TrainResult`.

A library (no argument parsing; `notellm train` in `notellm.train` is its command line). `TrainConfig`'s
fields are the command's flags (`--max-steps` -> `max_steps`), with the same defaults.

- Pairs: `notellm.pairs.make_experiment` (time split; training pairs only from the earlier clicks).
- Each step takes B pairs = 2B notes (no note twice in a micro-batch), one forward pass gives the note
  vectors (GCL, in-batch negatives) and the CSFT loss on the output tokens. A note's CSFT task is drawn
  once per run (seeded): j hashtags with probability r (default 0.4) when it has hashtags, otherwise its
  category; a note with neither trains GCL only.
- L = (L_gcl + alpha * L_csft) / (1 + alpha); alpha = 0 trains "NoteLLM without CSFT" (and skips the
  output tokens entirely).
- The GCL corrects in-batch sampling (`notellm.losses.BatchPrior`, both on by default): logQ subtracts
  log q(candidate) (its share of the training pairs) from every logit (`logq`), and candidates that are
  known training partners of the anchor, other than its target, are masked (`mask_known`).
- The temperature starts at scale 5 (`tau_init` ln 5) and has its own learning rate (`tau_lr`); the
  projection trains at `proj_lr`, the rest at `lr`.
- AdamW with linear warmup then linear decay, gradient accumulation. `dtype` "bf16" runs the forward
  passes (the decoder, the projection, CSFT's logits) under bf16 autocast, on the GPU or the CPU; the GCL's
  similarity logits and the losses are computed in fp32, and the master weights, their gradients and the
  optimizer stay fp32. "fp32" uses no autocast; the default "auto" is bf16 on CUDA and fp32 on the CPU.
  The schedule ends at the run's last step: one of `epochs`, `max_steps` or, with `time_budget_min`, the
  steps the budget holds at the step time measured over the first few steps (held-out evaluations
  included); the budget still stops a run that slows down.
- Held-out learning curve (`eval_every` N, default 25, 0 = off): before the first step, every N steps and
  after the last, the GCL loss (plain InfoNCE: no logQ, no masking) on a fixed sample of test pairs and
  Recall@k on a fixed pool of test notes (warm / cold pairs too with `cold_fraction`), appended to
  OUT/curves.jsonl and drawn in OUT/curves.png. Judge learning by these, not by the training loss: with
  a few hundred training notes a falling training loss is mostly memorisation.
- CPU options: `freeze_layers` K freezes the embeddings + the lower K decoder layers; with `cache_frozen`
  (default when K > 0) their outputs are computed once per note and reused every epoch, so a step runs
  only the upper layers. `lora_r` R puts LoRA adapters (peft) on the unfrozen layers (0 = train those
  layers fully). The projection and the GCL temperature always train.
- Checkpoints every `checkpoint_every` optimizer steps under OUT/checkpoint/ carry the run config, the
  trainable parameters, optimizer/scheduler state and RNG state; `resume` continues from there.
- The output directory is written with `NoteLLM.save` (LoRA merged), so `notellm export OUT` works on it;
  it also holds `train_config.json` and `train_log.jsonl` (one line per logged step, with the loss parts).
- `cold_fraction` F holds a seeded share of the notes out of training entirely (`notellm.pairs`), so
  `notellm eval` can report cold-start recall apart (it reads the split from train_config.json).

The pieces: `notellm.train_data` (note rows, the layer split and its cache, the held-out sample) and
`notellm.train_setup` (the model, its trainable parameters, the optimizer's groups and the schedule).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from notellm.pairs import SplitConfig
from notellm.train_data import (HeldOutSample, LayerSplit, build_cache, eval_note_rows,
                                final_hidden_at_prefix_end, heldout_metrics, heldout_sample, load_or_build_cache,
                                note_rows, pad_cached, pad_rows, split_config)
from notellm.train_setup import (LinearSchedule, budget_steps, init_projection_by_whitening, load_base,
                                 load_trainable_state, merge_lora, param_groups, planned_steps, set_seed,
                                 setup_trainable, trainable_state)

TRAIN_CONFIG = "train_config.json"
TRAIN_LOG = "train_log.jsonl"
CURVES_LOG = "curves.jsonl"
CURVES_PLOT = "curves.png"
CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"  # a LoRA run's small artifact (notellm.adapter)
CHECKPOINT_STATE = "trainer_state.pt"
DTYPES = ("auto", "fp32", "bf16")
TAU_INIT = math.log(5.0)  # scale 5 at the start (see `notellm.train.configure`)
PLAN_AFTER_STEPS = 4  # a time-budgeted run sizes its schedule after this many steps (step 1 not timed)
REPLAN_EVERY_STEPS = 25  # ... and re-sizes it this often (at each held-out evaluation when those are on)
# options a resumed run takes from the command, not the checkpoint: limits and housekeeping
RESUME_KEEPS = frozenset({"max_steps", "time_budget_min", "resume", "no_progress", "threads", "device",
                          "checkpoint_every", "log_every", "eval_every", "command"})

_SPLIT = SplitConfig()


class TrainError(Exception):
    """A run that cannot start or go on (the command line reports it and exits with 2)."""


# ------------------------------------------------------------------------------------------ config

@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every option of a training run. Field names and defaults are `notellm train`'s flags; a run records
    them (without `command`, with the CLI's `no_progress`) under "args" in train_config.json."""

    data: str  # dataset directory (MIND, MovieLens or notes.jsonl + clicks.csv)
    base: str = "smollm2"  # smollm2 | tiny | a local Hugging Face model directory
    out: str  # output directory (a NoteLLM directory, exportable)
    dim: int = 128
    alpha: float = 0.01  # CSFT weight; 0 = NoteLLM without CSFT
    r_hashtags: float = 0.4
    tau_init: float = TAU_INIT
    tau_lr: float = 1e-2
    logq: bool = True
    mask_known: bool = True
    epochs: float = 1.0
    max_steps: int | None = None
    time_budget_min: float | None = None
    batch_size: int = 8  # pairs per micro-batch (2x notes)
    grad_accum: int = 1
    lr: float = 1e-4
    proj_lr: float | None = None  # default lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    freeze_layers: int = 0
    cache_frozen: bool | None = None  # default: freeze_layers > 0
    proj_init: str = "random"  # random | whiten
    cache_path: str | None = None
    lora_r: int = 0
    lora_alpha: float | None = None  # default 2 x lora_r
    max_title_tokens: int | None = None
    max_topic_tokens: int | None = None
    max_content_tokens: int | None = None
    num_topics: int | None = None
    checkpoint_every: int = 50
    resume: bool = False
    log_every: int = 1
    eval_every: int = 25
    eval_notes: int = 200
    eval_pairs: int = 256
    seed: int = 0
    device: str | None = None  # default cuda when available
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast of the forward passes)
    threads: int | None = None
    # the pair split (see `notellm.train_data.SPLIT_OPTIONS`)
    test_fraction: float = _SPLIT.test_fraction
    window_days: float = _SPLIT.window_days
    lower: float | None = None
    upper: float | None = None
    top_t: int = _SPLIT.top_t
    max_train_notes: int | None = None
    max_train_pairs: int | None = None
    max_test_notes: int | None = None
    split_seed: int = 0
    cold_fraction: float = _SPLIT.cold_fraction
    command: str | None = None  # the command line that started the run, recorded in train_config.json

    @property
    def use_cache(self) -> bool:
        """Whether the frozen layers' outputs are cached (`cache_frozen`, default on when K > 0)."""
        return self.cache_frozen if self.cache_frozen is not None else self.freeze_layers > 0

    def split_config(self) -> SplitConfig:
        """The pair split these options describe."""
        return split_config(self)

    def prompt_config(self):
        """The model's `PromptConfig`: the token limits and topic count given, PromptConfig's otherwise."""
        from notellm.prompts import PromptConfig

        d = PromptConfig()
        return PromptConfig(max_title_tokens=self.max_title_tokens or d.max_title_tokens,
                            max_topic_tokens=self.max_topic_tokens or d.max_topic_tokens,
                            max_content_tokens=self.max_content_tokens or d.max_content_tokens,
                            num_topics=self.num_topics or d.num_topics)

    def args_record(self, progress: bool) -> dict:
        """The options as train_config.json records them: the command's arguments, in its order."""
        rec = {}
        for f in fields(self):
            if f.name == "command":
                continue
            rec[f.name] = getattr(self, f.name)
            if f.name == "threads":
                rec["no_progress"] = not progress
        return rec

    def resumed_from(self, saved_args: dict) -> "TrainConfig":
        """This config with the run's shape taken from a checkpoint's recorded args: only the limits and
        housekeeping (`RESUME_KEEPS`) may change on resume."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in saved_args.items() if k in names and k not in RESUME_KEEPS})


@dataclass
class TrainResult:
    """What a run did: its output directory, optimizer steps, training seconds and train_config.json."""

    out: Path
    steps: int
    train_seconds: float
    config: dict

    @property
    def stopped_early(self) -> bool:
        return "stopped_early_at_step" in self.config


def load_train_config(model_dir) -> dict | None:
    """A trained model's train_config.json, or None when it has none."""
    p = Path(model_dir) / TRAIN_CONFIG
    return json.loads(p.read_text()) if p.exists() else None


# ---------------------------------------------------------------------------------------- set-up

@dataclass
class TrainData:
    """The dataset, its pair split and the pairs that train."""

    ds: Any
    exp: Any
    split_config: SplitConfig

    @property
    def pairs(self) -> list:
        return self.exp.train_pairs


def prepare_data(cfg: TrainConfig, log: Callable[[str], None]) -> TrainData:
    """Load the dataset and split its pairs by time (TrainError when no pair is left to train on)."""
    from notellm.data import load_dataset
    from notellm.pairs import make_experiment

    split_cfg = cfg.split_config()
    ds = load_dataset(cfg.data)
    exp = make_experiment(ds, split_cfg)
    if not exp.train_pairs:
        raise TrainError("no training pairs (check the data and the split options)")
    log(f"data: {json.dumps(ds.summary())}")
    log(f"split: {json.dumps(exp.summary())}")
    return TrainData(ds, exp, split_cfg)


def setup_model(cfg: TrainConfig, device, log: Callable[[str], None]):
    """(model, loss) on `device`: the base with a seeded projection, its lower `freeze_layers` layers frozen,
    LoRA or full training on the rest, and the GCL + CSFT loss with its temperature."""
    from notellm.losses import NoteLLMLoss

    model = load_base(cfg.base, dim=cfg.dim, seed=cfg.seed, prompt_config=cfg.prompt_config(), log=log)
    setup_trainable(model, freeze_layers=cfg.freeze_layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                    seed=cfg.seed)
    model.to(device)
    loss_fn = NoteLLMLoss(alpha=cfg.alpha, tau_init=cfg.tau_init).to(device)
    return model, loss_fn


def training_rows(model, data: TrainData, cfg: TrainConfig, log: Callable[[str], None]) -> tuple[dict, dict]:
    """(note id -> its fixed training sequence, notes per CSFT task) for every note of a training pair."""
    note_ids = {x for p in data.pairs for x in p[:2]}
    rows = note_rows(model, data.ds.notes, note_ids, r_hashtags=cfg.r_hashtags,
                     num_topics=model.prompt_config.num_topics, seed=cfg.seed)
    tasks = {t: sum(1 for r in rows.values() if r.task == t) for t in ("category", "hashtags", "none")}
    mean_len = sum(len(r.ids) for r in rows.values()) / len(rows)
    log(f"notes: {len(rows)} (tasks {tasks}), mean sequence {mean_len:.1f} tokens")
    return rows, tasks


def frozen_layers(model, rows: dict, cfg: TrainConfig, device, *, progress: bool,
                  log: Callable[[str], None]) -> tuple[LayerSplit, dict | None]:
    """The layer split at `freeze_layers` and, when those layers are cached, their outputs for `rows`."""
    split = LayerSplit(model, cfg.freeze_layers)
    if not cfg.use_cache:
        return split, None
    model.eval()
    return split, load_or_build_cache(split, rows, model.pad_token_id, device, base_id=model.base_model_id,
                                      cache_path=cfg.cache_path, progress=progress, log=log)


def setup_optimizer(model, loss_fn, data: TrainData, cfg: TrainConfig, log: Callable[[str], None]):
    """(optimizer, trainable parameters, their count with the loss's, in-batch prior): AdamW over the body /
    projection / temperature groups (`param_groups`), and the GCL's logQ / known-positive prior from the
    pairs that train (q) and every training-period pair (known)."""
    import torch

    from notellm.losses import BatchPrior

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, loss_fn, lr=cfg.lr, proj_lr=cfg.proj_lr, tau_lr=cfg.tau_lr),
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = sum(p.numel() for p in trainable) + sum(p.numel() for p in loss_fn.parameters())
    log(f"trainable parameters: {n_train:,}; lr body {cfg.lr}, projection {cfg.proj_lr or cfg.lr}, "
        f"temperature {cfg.tau_lr or cfg.proj_lr or cfg.lr} (scale starts at {math.exp(cfg.tau_init):.2f})")
    prior = BatchPrior(data.pairs, data.exp.split.train_pairs, logq=cfg.logq, mask_known=cfg.mask_known)
    log(f"GCL: logQ correction {'on' if cfg.logq else 'off'}, known-positive masking "
        f"{'on' if cfg.mask_known else 'off'}")
    return opt, trainable, n_train, prior


def setup_schedule(opt, data: TrainData, cfg: TrainConfig):
    """(LambdaLR scheduler, its `LinearSchedule` plan): warmup then decay over the steps of `epochs` epochs,
    or `max_steps` when fewer (a time budget re-plans it once the step time is known)."""
    import torch

    from notellm.pairs import batch_pairs

    micro_per_epoch = len(batch_pairs(data.pairs, cfg.batch_size, cfg.seed, 0))
    total, planned_by = planned_steps(micro_per_epoch, grad_accum=cfg.grad_accum, epochs=cfg.epochs,
                                      max_steps=cfg.max_steps)
    plan = LinearSchedule(total, cfg.warmup_ratio, planned_by)
    return torch.optim.lr_scheduler.LambdaLR(opt, plan), plan


@dataclass
class HeldOut:
    """The held-out learning curve's fixed sample, its notes' evaluation rows (and their cached lower
    layers), the k of its Recall@k and the pool's exposure buckets and cold notes."""

    sample: HeldOutSample
    rows: dict
    cache: dict | None
    ks: list[int]
    buckets: dict
    cold: frozenset

    def summary(self) -> dict:
        return {"pool": len(self.sample.pool), "recall_pairs": len(self.sample.recall_pairs),
                "loss_pairs": self.sample.loss_pairs, "ks": self.ks}


def prepare_heldout(model, split: LayerSplit, data: TrainData, cfg: TrainConfig, device, *, progress: bool,
                    log: Callable[[str], None]) -> HeldOut | None:
    """The held-out curve's sample of test pairs with its notes' rows (lower layers computed once when the
    frozen layers are cached); None when the curve is off or there is no test pair."""
    from notellm.evaluate import scaled_ks
    from notellm.pairs import exposure_buckets

    if not (cfg.eval_every and cfg.eval_every > 0):
        return None
    if not data.exp.test_pairs:
        log("no test pairs: the held-out learning curve is off")
        return None
    t0 = time.time()
    sample = heldout_sample(data.exp.test_pairs, max_notes=cfg.eval_notes, max_pairs=cfg.eval_pairs,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    eval_rows = eval_note_rows(model, data.ds.notes, sample.pool)
    model.eval()
    eval_cache = (build_cache(split, eval_rows, model.pad_token_id, device, progress=progress)
                  if cfg.use_cache else None)
    h = HeldOut(sample, eval_rows, eval_cache, scaled_ks(len(sample.pool) - 1),
                exposure_buckets(sample.pool, data.exp.split.train_counts), data.exp.cold_notes)
    log(f"held-out curve: pool {len(sample.pool)} test notes, {len(sample.recall_pairs)} pairs for "
        f"Recall@{h.ks}, {sample.loss_pairs} pairs for the GCL loss, every {cfg.eval_every} "
        f"steps (set up in {time.time() - t0:.1f}s)")
    return h


def load_checkpoint(out: Path) -> dict:
    """The trainer state under OUT/checkpoint (TrainError when there is none)."""
    import torch

    state_file = out / CHECKPOINT_DIR / CHECKPOINT_STATE
    if not state_file.exists():
        raise TrainError(f"--resume but no checkpoint at {state_file}")
    return torch.load(state_file, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class _Timing:
    """Where a run's time goes, for the time budget: the step time is measured from the end of this
    process's first step, held-out evaluations taken out."""

    budget_s: float | None
    t_train: float = 0.0
    steps_here: int = 0  # optimizer steps taken by this process (a resumed run counts anew)
    t_first_step: float | None = None
    eval_in_window: float = 0.0  # held-out evaluation seconds since the first step
    eval_s: float = 0.0  # the latest held-out evaluation's seconds
    planned_once: bool = False


@dataclass
class _Loop:
    """One run's training loop: what its steps share (model, optimisation, held-out curve, output files)
    and its counters (optimizer step, epoch, micro-batches done in the epoch)."""

    cfg: TrainConfig
    out: Path
    device: Any
    progress: bool
    log: Callable[[str], None]
    data: TrainData
    model: Any
    loss_fn: Any
    rows: dict
    split: LayerSplit
    cache: dict | None
    prior: Any
    opt: Any
    sched: Any
    plan: LinearSchedule
    trainable: list
    record: dict  # train_config.json (and each checkpoint's config)
    heldout: HeldOut | None = None
    step: int = 0
    epoch: int = 0
    micro_done: int = 0
    since_eval: dict = field(default_factory=dict)  # training loss parts since the last held-out evaluation
    last_eval_step: int | None = None
    last_heldout: dict = field(default_factory=dict)  # the latest point of the held-out curve
    curves_f: Any = None
    log_f: Any = None

    def __post_init__(self):
        import torch

        self.epoch_plan = (self.plan.total, self.plan.planned_by)  # what epochs / max_steps allow
        # bf16: the forward passes autocast; the losses, weights, gradients and AdamW's state stay fp32
        bf16 = self.cfg.dtype == "bf16" or (self.cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                         if bf16 else nullcontext())
        self.timing = _Timing(self.cfg.time_budget_min * 60 if self.cfg.time_budget_min else None)

    def train_mode(self) -> None:
        """Training mode, but the embeddings stay in eval mode when their layers are cached."""
        self.model.train()
        if self.cfg.use_cache:
            self.model.lm.get_decoder().embed_tokens.eval()

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint: trainable parameters, optimizer, counters and RNG states; the
        schedule is planned anew (the limits may have changed)."""
        import torch

        load_trainable_state(self.model, self.loss_fn, state["trainable"])
        try:
            self.opt.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise TrainError(f"the checkpoint's optimizer does not fit this version ({e}); start a new run")
        self.sched.load_state_dict(state["scheduler"])
        self.plan.reset(*self.epoch_plan)
        self.record.update({"total_steps": self.plan.total, "warmup_steps": self.plan.warmup,
                            "schedule": self.plan.to_dict()})
        self.step, self.epoch, self.micro_done = state["step"], state["epoch"], state["micro_done"]
        random.setstate(state["rng_python"])
        torch.set_rng_state(state["rng_torch"])
        self.log(f"resumed at step {self.step} (epoch {self.epoch}, micro-batch {self.micro_done})")

    def save_checkpoint(self) -> None:
        """OUT/checkpoint/trainer_state.pt (written atomically) and a readable config.json beside it."""
        import torch

        ckpt_dir = self.out / CHECKPOINT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / (CHECKPOINT_STATE + ".tmp")
        torch.save({"config": self.record, "trainable": trainable_state(self.model, self.loss_fn),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "step": self.step,
                    "epoch": self.epoch, "micro_done": self.micro_done, "rng_python": random.getstate(),
                    "rng_torch": torch.get_rng_state()}, tmp)
        os.replace(tmp, ckpt_dir / CHECKPOINT_STATE)
        (ckpt_dir / "config.json").write_text(json.dumps({**self.record, "step": self.step}, indent=2,
                                                         default=str) + "\n")

    def evaluate_heldout(self) -> None:
        """One point of the held-out curve: GCL loss and Recall@k of the held-out sample at this step, with
        the mean training loss since the previous point, appended to curves.jsonl."""
        import torch

        h = self.heldout
        t0 = time.time()
        self.model.eval()
        with self.autocast:
            hid = final_hidden_at_prefix_end(self.model, self.split, h.rows, h.sample.pool, h.cache, self.device)
        with torch.no_grad():
            emb = self.model.project(hid.to(self.device)).float()
        m = heldout_metrics(emb, h.sample, self.loss_fn.gcl, ks=h.ks, buckets=h.buckets, cold=h.cold)
        self.train_mode()
        mean = {k: sum(v) / len(v) for k, v in self.since_eval.items() if v}
        self.since_eval.clear()
        rec = {"step": self.step, "epoch": self.epoch, "train_gcl": mean.get("gcl"),
               "train_loss": mean.get("loss"), "train_acc": mean.get("gcl_acc"), **m,
               "scale": float(self.loss_fn.gcl.scale.detach()), "eval_s": round(time.time() - t0, 2)}
        self.curves_f.write(json.dumps(rec) + "\n")
        self.curves_f.flush()
        self.last_heldout = rec
        self.last_eval_step, self.timing.eval_s = self.step, time.time() - t0
        kk = str(h.ks[-1])
        cold_txt = (f", cold pairs {100 * m['heldout_recall_cold'][kk]:.1f}" if "heldout_recall_cold" in m else "")
        msg = (f"held-out at step {self.step}: GCL {m['heldout_gcl']:.3f} (chance {m['heldout_chance']:.3f})"
               if m["heldout_gcl"] is not None else f"held-out at step {self.step}:")
        self.log(f"{msg}, R@{kk} {100 * m['heldout_recall'][kk]:.1f}{cold_txt} "
                 f"(random {100 * min(1.0, int(kk) / max(1, m['pool'] - 1)):.1f})")

    def micro_step(self, batch: list[tuple]) -> dict:
        """Forward and backward on one micro-batch of pairs (the loss scaled for gradient accumulation);
        returns the loss parts."""
        model, device = self.model, self.device
        a_ids = [p[0] for p in batch]
        b_ids = [p[1] for p in batch]
        keys = a_ids + b_ids
        ids, mask, labels, pos = pad_rows([self.rows[k] for k in keys], model.pad_token_id, device)
        corr = self.prior.for_batch(a_ids, b_ids, device)
        with self.autocast:
            if self.cache is not None:
                hidden = self.split.upper(pad_cached(self.cache, keys, device), mask)
            else:
                hidden = model.lm.get_decoder()(
                    input_ids=ids, attention_mask=mask,
                    position_ids=self.split._pos(mask), use_cache=False).last_hidden_state
            emb, csft = model.heads(hidden, pos, labels if self.cfg.alpha > 0 else None)
        # the loss outside autocast: the GCL's cosine logits in fp32 (bf16 keeps ~3 significant digits)
        parts = self.loss_fn(emb[: len(batch)], emb[len(batch):], csft, **corr)
        (parts["loss"] / self.cfg.grad_accum).backward()
        return parts

    def optimizer_step(self) -> None:
        """Clip the gradients to norm 1, step the optimizer and the schedule, count the step."""
        import torch

        torch.nn.utils.clip_grad_norm_(self.trainable + list(self.loss_fn.parameters()), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.timing.steps_here += 1

    def plan_for_budget(self, bar) -> None:
        """With a time budget: after the first few steps and now and then, size the schedule to the steps
        the budget holds at the step time measured so far (checkpoints included) plus each step's share of
        the held-out evaluation (a shared machine's speed drifts); the warmup is kept once it is over."""
        t, plan = self.timing, self.plan
        if t.steps_here == 1:
            t.t_first_step = time.time()  # the first step (allocations, lazy init) is not timed
            return
        every = self.cfg.eval_every if self.heldout is not None else REPLAN_EVERY_STEPS
        if not (t.budget_s and t.steps_here >= PLAN_AFTER_STEPS and self.step < plan.total
                and (t.steps_here - PLAN_AFTER_STEPS) % every == 0):
            return
        step_s = (time.time() - t.t_first_step - t.eval_in_window) / (t.steps_here - 1)
        fit = budget_steps(budget_s=t.budget_s, elapsed_s=time.time() - t.t_train, steps_done=self.step,
                           step_s=step_s, eval_s=t.eval_s if self.heldout else 0.0,
                           eval_every=self.cfg.eval_every if self.heldout else 0)
        new_total = min(self.epoch_plan[0], max(fit, self.step))
        if new_total != plan.total and (not t.planned_once or
                                        abs(new_total - plan.total) > max(1, 0.02 * plan.total)):
            before = plan.total
            plan.replan(new_total, at_step=self.step, keep_warmup=t.planned_once)
            for g, base in zip(self.opt.param_groups, self.sched.base_lrs):  # the next update follows the plan
                g["lr"] = base * plan(self.step)
            self.log(f"time budget: {step_s:.2f}s per step -> schedule planned for {plan.total} steps "
                     f"(warmup {plan.warmup}) instead of {before}")
            bar.total = plan.total
            bar.refresh()
        t.planned_once = True
        self.record.update({"total_steps": plan.total, "warmup_steps": plan.warmup,
                            "schedule": {**plan.to_dict(), "step_s": round(step_s, 3),
                                         "eval_s": round(t.eval_s, 2), "budget_steps": fit}})

    def log_step(self, acc: dict, bar) -> None:
        """The step's mean loss parts (over its micro-batches) to train_log.jsonl (every `log_every`
        steps and the last) and the progress bar."""
        rec = {k: sum(v) / len(v) for k, v in acc.items()}
        rec.update({"step": self.step, "epoch": self.epoch, "lr": self.opt.param_groups[0]["lr"],
                    "elapsed_s": round(time.time() - self.timing.t_train, 1)})
        for k in ("loss", "gcl", "gcl_acc"):
            self.since_eval.setdefault(k, []).append(rec[k])
        if self.step % self.cfg.log_every == 0 or self.step == self.plan.total:
            self.log_f.write(json.dumps(rec) + "\n")
            self.log_f.flush()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", gcl=f"{rec['gcl']:.3f}", csft=f"{rec['csft']:.3f}",
                        acc=f"{rec['gcl_acc']:.2f}", scale=f"{rec['scale']:.1f}")
        bar.update(1)

    def after_step(self) -> bool:
        """Checkpoint and held-out evaluation when due; True when the run is done (the plan's last step,
        or the time budget spent)."""
        cfg, t = self.cfg, self.timing
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        over_budget = t.budget_s and (time.time() - t.t_train) > t.budget_s
        done = self.step >= self.plan.total or over_budget
        if not done and self.heldout is not None and self.step % cfg.eval_every == 0:
            self.evaluate_heldout()
            t.eval_in_window += t.eval_s
        if done and over_budget and self.step < self.plan.total:
            self.log(f"time budget reached at step {self.step}/{self.plan.total}")
            self.record["stopped_early_at_step"] = self.step
        return bool(done)

    def run(self) -> None:
        """Train from the current step to the plan's last (or the time budget): each epoch's micro-batches
        (`pairs.batch_pairs`, seeded by epoch), an optimizer step every `grad_accum` of them and at the
        epoch's end, then logging, checkpoints and held-out evaluations as they fall due."""
        from tqdm.auto import tqdm

        from notellm.pairs import batch_pairs

        cfg = self.cfg
        bar = tqdm(total=self.plan.total, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   file=sys.stderr, mininterval=2)
        self.train_mode()
        self.timing.t_train = time.time()
        stop = self.step >= self.plan.total
        acc: dict[str, list[float]] = {}
        while not stop:
            batches = batch_pairs(self.data.pairs, cfg.batch_size, cfg.seed, self.epoch)
            for bi in range(self.micro_done, len(batches)):
                for k, v in self.micro_step(batches[bi]).items():
                    acc.setdefault(k, []).append(float(v.detach()))
                self.micro_done = bi + 1
                if self.micro_done % cfg.grad_accum != 0 and self.micro_done != len(batches):
                    continue
                self.optimizer_step()
                self.plan_for_budget(bar)
                self.log_step(acc, bar)
                acc = {}
                if self.after_step():
                    stop = True
                    break
            else:
                self.epoch += 1
                self.micro_done = 0
        bar.close()

    def save_adapter(self) -> None:
        from notellm.adapter import save_adapter

        cfg = self.cfg
        extra = {"command": self.record.get("command"), "data": cfg.data, "steps": self.step,
                 "split": self.record.get("split"), "heldout_at_end": self.last_heldout,
                 "held_out_notes": sorted(self.data.exp.cold_notes)}
        d = save_adapter(self.model, self.out / ADAPTER_DIR, lora_r=cfg.lora_r,
                         lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, base=cfg.base, extra=extra)
        self.log(f"saved the adapter {d} ({sum(f.stat().st_size for f in d.iterdir()) / 1e6:.1f} MB)")

    def finish(self) -> float:
        """After the last step: the closing held-out point and the curves' plot, a last checkpoint, the
        model (LoRA merged) saved to OUT; returns the training seconds. train_config.json is the caller's."""
        self.log_f.close()
        train_s = time.time() - self.timing.t_train
        if self.heldout is not None:
            if self.last_eval_step != self.step:
                self.evaluate_heldout()
            self.curves_f.close()
            try:
                plot_curves(self.out)
            except Exception as e:  # a plot must not lose a trained model
                self.log(f"could not draw {self.out / CURVES_PLOT}: {e}")
        self.save_checkpoint()
        self.model.eval()
        if self.cfg.lora_r > 0:  # the small artifact `notellm export` merges onto the base (notellm.adapter)
            self.save_adapter()
        merge_lora(self.model)
        with _transformers_progress(self.progress):
            self.model.to("cpu").save(self.out)
        return train_s


# ------------------------------------------------------------------------------------------ train

def train(cfg: TrainConfig, *, progress: bool = True,
          log: Callable[[str], None] | logging.Logger | None = None) -> TrainResult:
    """Train NoteLLM as `cfg` says (see the module docstring) and save it to `cfg.out`, with
    train_config.json, train_log.jsonl and, with the held-out curve, curves.jsonl / curves.png.

    `progress`: tqdm bars on stderr; `log`: where the run's messages go (a print-like callable taking one
    string, or a `logging.Logger`; default: stderr). Raises TrainError for a run that cannot start.
    """
    log = _log_function(log)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_state = load_checkpoint(out) if cfg.resume else None
    if resume_state is not None:
        cfg = cfg.resumed_from(resume_state["config"]["args"])
    if cfg.use_cache and cfg.freeze_layers <= 0:
        raise TrainError("--cache-frozen needs --freeze-layers > 0")
    if cfg.dtype not in DTYPES:
        raise TrainError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")

    loop = set_up_run(cfg, out, device, fresh=resume_state is None, progress=progress, log=log)
    if resume_state is not None:
        loop.restore(resume_state)
    loop.heldout = prepare_heldout(loop.model, loop.split, loop.data, cfg, device, progress=progress, log=log)
    if loop.heldout is not None:
        loop.record["heldout"] = {**loop.heldout.summary(), "every": cfg.eval_every}
    mode = "a" if resume_state is not None else "w"
    try:
        if loop.heldout is not None:
            loop.curves_f = open(out / CURVES_LOG, mode)
            if resume_state is None:
                loop.evaluate_heldout()  # step 0: where training starts from
        loop.log_f = open(out / TRAIN_LOG, mode)
        loop.run()
        train_s = loop.finish()
    finally:  # closed already unless the run failed
        for f in (loop.log_f, loop.curves_f):
            if f is not None:
                f.close()
    loop.record.update({"steps_done": loop.step, "train_seconds": round(train_s, 1),
                        "total_seconds": round(time.time() - t_start, 1),
                        "final_scale": float(loop.loss_fn.gcl.scale.detach())})
    (out / TRAIN_CONFIG).write_text(json.dumps(loop.record, indent=2, default=str) + "\n")
    log(f"saved {out} ({loop.step} steps, {train_s:.0f}s training)")
    return TrainResult(out, loop.step, round(train_s, 1), loop.record)


def set_up_run(cfg: TrainConfig, out: Path, device, *, fresh: bool, progress: bool,
               log: Callable[[str], None]) -> _Loop:
    """Everything before the first step, in a fixed (seeded) order: data and split, model and loss, the
    note rows and the frozen-layer cache, the projection's whitening (`fresh` runs only: a resumed run
    loads its own), optimizer and schedule, and the run's record (train_config.json)."""
    set_seed(cfg.seed)
    data = prepare_data(cfg, log)
    model, loss_fn = setup_model(cfg, device, log)
    rows, tasks = training_rows(model, data, cfg, log)
    if cfg.alpha > 0:  # the closed category set CSFT teaches: the category task is decoded within it (LabelTrie)
        model.set_categories([data.ds.notes[n].category for n in rows if data.ds.notes[n].category])
    split, cache = frozen_layers(model, rows, cfg, device, progress=progress, log=log)
    if cfg.proj_init == "whiten" and fresh:
        init_projection_by_whitening(model, split, rows, cache, device, seed=cfg.seed, log=log)
    opt, trainable, n_train, prior = setup_optimizer(model, loss_fn, data, cfg, log)
    sched, plan = setup_schedule(opt, data, cfg)
    record = {"args": cfg.args_record(progress), "split": data.split_config.to_dict(),
              "prompt": model.prompt_config.to_dict(), "total_steps": plan.total, "warmup_steps": plan.warmup,
              "schedule": plan.to_dict(), "cache_frozen": cfg.use_cache, "device": str(device),
              "data_summary": data.ds.summary(), "split_summary": data.exp.summary(), "tasks": tasks,
              "trainable_parameters": n_train, "command": cfg.command}
    return _Loop(cfg=cfg, out=out, device=device, progress=progress, log=log, data=data, model=model,
                 loss_fn=loss_fn, rows=rows, split=split, cache=cache, prior=prior, opt=opt, sched=sched,
                 plan=plan, trainable=trainable, record=record)


def _log_function(log) -> Callable[[str], None]:
    if log is None:
        return lambda msg: print(msg, file=sys.stderr)
    if isinstance(log, logging.Logger):
        return log.info
    return log


@contextmanager
def _transformers_progress(enabled: bool):
    """transformers' own progress bars (a save's "Writing model shards") off for a while unless `enabled`;
    their state (and huggingface_hub's) is restored afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on, hub_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        # (with HF_HUB_DISABLE_PROGRESS_BARS=1 the bars stay off: huggingface_hub refuses to turn them on)
        if was_on and not constants.HF_HUB_DISABLE_PROGRESS_BARS:
            hf_logging.enable_progress_bar()
            if hub_off:
                disable_progress_bars()


# ---------------------------------------------------------------------------------------- the plot

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
