"""`notellm train`: the command line of NoteLLM training (GCL + CSFT) on co-occurrence pairs.

    notellm train --data ../shared/data/movielens-latest-small --base smollm2 --out runs/notellm

Argument parsing only: the flags become a `notellm.train_loop.TrainConfig` (same names, same defaults)
and `notellm.train_loop.train` runs it; see that module for what training does. The library is
`notellm.train_data` (note rows, the frozen-layer cache, the held-out sample), `notellm.train_setup` (the
model, its trainable parameters, optimizer groups and schedule) and `notellm.train_loop` (the loop).
`add_split_args` / `split_config_from_args` are shared with `notellm eval`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from notellm.train_data import LayerSplit, split_config
from notellm.train_loop import DTYPES, TRAIN_CONFIG, TrainConfig, TrainError, load_train_config, train

# LayerSplit, load_train_config and TRAIN_CONFIG are re-exported for `notellm eval` and older imports
__all__ = ["configure", "run", "add_split_args", "split_config_from_args", "config_from_args",
           "load_train_config", "LayerSplit", "TRAIN_CONFIG"]


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
    """The `pairs.SplitConfig` of parsed split options (`add_split_args`) on top of `base`: an option
    left None keeps the base's value."""
    return split_config(args, base)


def configure(p: argparse.ArgumentParser) -> None:
    """The flags of `notellm train`: one per `TrainConfig` field (its default), plus --no-progress."""
    d = {f.name: f.default for f in fields(TrainConfig)}
    p.add_argument("--data", required=True, help="dataset directory (MIND, MovieLens or notes.jsonl + clicks.csv)")
    p.add_argument("--base", default=d["base"], help="smollm2 | tiny | a local Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (a NoteLLM directory, exportable)")
    p.add_argument("--dim", type=int, default=d["dim"], help="note vector size")
    p.add_argument("--alpha", type=float, default=d["alpha"], help="CSFT weight; 0 = NoteLLM without CSFT")
    p.add_argument("--r-hashtags", type=float, default=d["r_hashtags"], help="share of notes trained on hashtags (r)")
    p.add_argument("--tau-init", type=float, default=d["tau_init"],
                   help="initial log temperature, scale = exp(tau) (default ln 5 = 1.609: scale 5; the paper's 3 "
                        "gives scale 20, far too sharp for anisotropic LLM states)")
    p.add_argument("--tau-lr", type=float, default=d["tau_lr"], help="learning rate of the temperature (default 1e-2)")
    p.add_argument("--logq", action=argparse.BooleanOptionalAction, default=d["logq"],
                   help="logQ correction: subtract log q(candidate) (its share of the training pairs) from each "
                        "in-batch logit (default on; --no-logq turns it off)")
    p.add_argument("--mask-known", action=argparse.BooleanOptionalAction, default=d["mask_known"],
                   help="mask in-batch candidates that are known co-engaged training partners of the anchor "
                        "(never the target; default on; --no-mask-known turns it off)")
    p.add_argument("--epochs", type=float, default=d["epochs"])
    p.add_argument("--max-steps", type=int, default=d["max_steps"], help="stop after this many optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=d["time_budget_min"],
                   help="stop (and save) after this many minutes of training; the warmup/decay schedule is "
                        "sized to the steps that fit, from the step time measured after a few steps")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="pairs per micro-batch (2x notes)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--proj-lr", type=float, default=d["proj_lr"], help="learning rate of the projection (default --lr)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    p.add_argument("--freeze-layers", type=int, default=d["freeze_layers"], help="freeze the lower K decoder layers")
    p.add_argument("--cache-frozen", action=argparse.BooleanOptionalAction, default=d["cache_frozen"],
                   help="cache the frozen layers' outputs per note (default: on when --freeze-layers > 0)")
    p.add_argument("--proj-init", choices=["whiten", "random"], default=d["proj_init"],
                   help="projection init: random (the model's seeded init; default) or whiten (centre + whiten the "
                        "base's vectors of the training notes)")
    p.add_argument("--cache-path", default=d["cache_path"],
                   help="file to keep the frozen-layer cache in (reused when notes, base and K match)")
    p.add_argument("--lora-r", type=int, default=d["lora_r"], help="LoRA rank on the trainable layers (0 = full)")
    p.add_argument("--lora-alpha", type=float, default=d["lora_alpha"], help="LoRA alpha (default 2 x r)")
    p.add_argument("--max-title-tokens", type=int, default=d["max_title_tokens"])
    p.add_argument("--max-topic-tokens", type=int, default=d["max_topic_tokens"])
    p.add_argument("--max-content-tokens", type=int, default=d["max_content_tokens"])
    p.add_argument("--num-topics", type=int, default=d["num_topics"], help="max j for the hashtags task")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="held-out learning curve: GCL loss and Recall@k on a fixed held-out sample every N "
                        "optimizer steps, before the first and after the last (0 = off); OUT/curves.jsonl, curves.png")
    p.add_argument("--eval-notes", type=int, default=d["eval_notes"],
                   help="held-out pool size for the curve's Recall@k")
    p.add_argument("--eval-pairs", type=int, default=d["eval_pairs"], help="held-out pairs for the curve's GCL loss")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=d["device"], help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=d["dtype"],
                   help="bf16: the forward passes under bf16 autocast (GPU or CPU); the losses, weights and "
                        "optimizer stay fp32. fp32: no autocast. auto (default): bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    add_split_args(p)


# ------------------------------------------------------------------------------------------------ run

def config_from_args(args, command: str | None = None) -> TrainConfig:
    """The `TrainConfig` of parsed `notellm train` arguments (every field is a flag of `configure`)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "command"},
                       command=command)


def _command_line() -> str | None:
    """How this process was asked to train, as train_config.json records it (None when not via the CLI)."""
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return "notellm train " + " ".join(sys.argv[2:])
    return None


def run(args) -> int:
    """`notellm train`: train as the arguments say; 2 when the run cannot start."""
    try:
        train(config_from_args(args, _command_line()), progress=not args.no_progress)
    except TrainError as e:
        print(f"notellm train: {e}", file=sys.stderr)
        return 2
    return 0
