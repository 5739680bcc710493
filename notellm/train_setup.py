"""Model set-up of `notellm train` (library: no argument parsing).

- Loading the base (`load_base`), freezing the lower layers and LoRA or full training on the rest
  (`setup_trainable`, `merge_lora`), the trainable state of a checkpoint (`trainable_state`,
  `load_trainable_state`).
- The projection's whitening initialisation (`whitening_projection`, `init_projection_by_whitening`).
- The optimizer's parameter groups (`param_groups`) and the LR schedule: linear warmup then decay to the
  run's last step (`LinearSchedule`, `lr_lambda_factory`), sized by epochs / max steps (`planned_steps`)
  or by a time budget (`budget_steps`).
- `set_seed`.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ the model

def load_base(base: str, *, dim: int, seed: int, prompt_config=None, log: Callable[[str], None] = print):
    """A fresh NoteLLM on the base LLM `base` (smollm2 | tiny | a local HF directory) with a seeded
    `dim`-sized projection."""
    from notellm.model import NoteLLM

    t0 = time.time()
    model = NoteLLM.from_base(base, dim=dim, seed=seed, prompt_config=prompt_config)
    log(f"base loaded in {time.time() - t0:.1f}s: {model.base_model_id}")
    return model


def init_projection_by_whitening(model, split, rows: dict, cache: dict | None, device, *, seed: int,
                                 max_notes: int = 1024, log: Callable[[str], None] = print) -> int:
    """Set the projection to `whitening_projection` of the final hidden states of (a seeded sample of at
    most `max_notes` of) the training notes `rows`; returns how many notes it used."""
    import torch

    from notellm.train_data import final_hidden_at_prefix_end

    t0 = time.time()
    model.eval()
    keys = sorted(rows)
    if len(keys) > max_notes:
        keys = sorted(random.Random(seed).sample(keys, max_notes))
    hid = final_hidden_at_prefix_end(model, split, rows, keys, cache, device)
    with torch.no_grad():
        model.proj.weight.copy_(whitening_projection(hid, model.dim).to(model.proj.weight))
    log(f"projection initialised by whitening {len(keys)} training notes in {time.time() - t0:.1f}s")
    return len(keys)


def whitening_projection(hidden, dim: int, eps: float = 1e-6):
    """A bias-free [dim, hidden] projection that centres and whitens `hidden` (rows = notes).

    LLM last-token states are strongly anisotropic (cosine ~0.97 between unrelated notes for SmolLM2),
    which leaves InfoNCE near log(2B - 1) with a random projection. With mu the mean state and
    P = I - mu mu^T / |mu|^2, W = Lambda^-1/2 U^T P (U, Lambda: top-`dim` principal axes of the centred
    states with the mu direction removed) gives W h = W (h - mu) for every h: centring without a bias, so the
    model stays a plain Linear(hidden, d). (BERT-whitening, Su et al. 2021, as an initialisation.)
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
    """The parameters a run trains ("model.<name>" with requires_grad, "loss.<name>"), on the CPU."""
    sd = {f"model.{n}": p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    sd.update({f"loss.{n}": p.detach().cpu().clone() for n, p in loss_fn.named_parameters()})
    return sd


def load_trainable_state(model, loss_fn, sd: dict) -> None:
    """Copy a `trainable_state` back into `model` and `loss_fn` (ValueError on a parameter they lack)."""
    import torch

    params = {f"model.{n}": p for n, p in model.named_parameters()}
    params.update({f"loss.{n}": p for n, p in loss_fn.named_parameters()})
    missing = [k for k in sd if k not in params]
    if missing:
        raise ValueError(f"checkpoint does not fit this model/config: unknown parameters {missing[:3]}...")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


# ------------------------------------------------------------------------------ optimizer and schedule

def lr_lambda_factory(total: int, warmup: int):
    """LR factor of step `step`: linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
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


def planned_steps(micro_batches_per_epoch: int, *, grad_accum: int, epochs: float,
                  max_steps: int | None = None) -> tuple[int, str]:
    """(optimizer steps, what planned them): the steps of `epochs` epochs, or `max_steps` when fewer."""
    steps_per_epoch = max(1, micro_batches_per_epoch // grad_accum)
    total = max(1, int(math.ceil(steps_per_epoch * epochs)))
    if max_steps and max_steps < total:
        return max_steps, "max_steps"
    return total, "epochs"


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


