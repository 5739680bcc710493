"""NoteLLM losses as small callables that return their named parts.

- `GCLLoss` (generative-contrastive learning): InfoNCE over the 2B notes of B related pairs with in-batch
  negatives. Similarity = cosine, scaled by a learnable temperature exp(tau), tau initialised to 3 as in
  the paper (scale ~20; `notellm train` starts at ln 5, see its `--tau-init`); a note's similarity with
  itself is masked out. Embeddings are laid out `[a_1..a_B, b_1..b_B]`: the positive of row i < B is row
  i + B and vice versa. Two optional per-batch inputs correct the in-batch sampling:
  - `log_q` [2B]: logQ correction. In-batch negatives are the other pairs' notes, so a note turns up as a
    candidate in proportion to its degree q (its share of the training pairs). Plain InfoNCE then learns
    sim ~ log p(b|a) - log q(b) only up to that popularity bias; subtracting log q(candidate) from every
    logit (column j gets -log_q[j], the target column too) corrects it (Yi et al., RecSys'19).
  - `known` [2B, 2B] bool: known-positive masking. True where candidate j is a known co-engaged partner
    of anchor i (a training pair other than the batch's own): that logit is set to -inf, so a hub note is
    not pushed away from its other partners. The target (and only the target) is never masked.
- `BatchPrior`: the training pairs' note degrees and neighbour sets, computed once; `for_batch(a, b)`
  gives the `log_q` / `known` inputs above for one batch of note ids (None for a lever that is off).
- `csft_loss`: next-token cross-entropy on the output tokens only (labels = -100 on prompt and padding),
  logits at position t predict token t + 1.
- `NoteLLMLoss`: L = (L_gcl + alpha * L_csft) / (1 + alpha), alpha = 0.01 by default; alpha = 0 gives
  "NoteLLM without CSFT".

Every callable returns a dict of tensors: `loss` (what to backpropagate) plus its parts, so each is logged
(the GCL parts include `logq`, 1.0 when the correction was applied, and `masked`, the number of logits
masked as known positives).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GCLLoss", "BatchPrior", "csft_loss", "NoteLLMLoss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class GCLLoss(nn.Module):
    """InfoNCE with in-batch negatives and a learnable temperature (log-scale parameter `tau`)."""

    def __init__(self, tau_init: float = 3.0, max_tau: float = math.log(100.0)):
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))
        self.max_tau = max_tau

    @property
    def scale(self) -> torch.Tensor:
        return self.tau.clamp(max=self.max_tau).exp()

    def logits(self, emb_a: torch.Tensor, emb_b: torch.Tensor, *, log_q: torch.Tensor | None = None,
               known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [2B, 2B], target [2B], number of known positives masked)."""
        if emb_a.shape != emb_b.shape:
            raise ValueError(f"pair halves differ in shape: {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
        b = emb_a.shape[0]
        z = F.normalize(torch.cat([emb_a, emb_b], 0).float(), dim=-1)
        scale = self.scale.to(z.dtype)
        logits = z @ z.T * scale
        if log_q is not None:
            if log_q.shape != (2 * b,):
                raise ValueError(f"log_q must have shape ({2 * b},), got {tuple(log_q.shape)}")
            logits = logits - log_q.to(logits)[None, :]
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        drop = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        n_masked = torch.zeros((), device=z.device)
        if known is not None:
            if known.shape != (2 * b, 2 * b):
                raise ValueError(f"known must have shape ({2 * b}, {2 * b}), got {tuple(known.shape)}")
            k = known.to(device=z.device, dtype=torch.bool) & ~drop
            k[torch.arange(2 * b, device=z.device), target] = False  # never the target
            n_masked = k.sum().float()
            drop = drop | k
        return logits.masked_fill(drop, float("-inf")), target, n_masked

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, *, log_q: torch.Tensor | None = None,
                known: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, target, n_masked = self.logits(emb_a, emb_b, log_q=log_q, known=known)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "gcl": loss, "gcl_acc": acc, "scale": self.scale.detach().float(),
                "logq": torch.tensor(float(log_q is not None)), "masked": n_masked}


class BatchPrior:
    """What the GCL corrections need, computed once from the training pairs.

    - log q(n) = log(deg(n) / sum of degrees), deg = the number of training pairs `n` is in: the share of
      the pairs that brings `n` into a batch (the constant denominator cancels in the softmax). A note
      outside the training pairs gets the smallest degree seen (it is never sampled in training anyway).
    - neighbours: every known co-engaged partner of a note, from `pairs` plus `known_pairs` (e.g. the
      whole training period's pairs when the training set is a subsample).
    """

    def __init__(self, pairs: Sequence[tuple], known_pairs: Iterable[tuple] = (), *, logq: bool = True,
                 mask_known: bool = True):
        self.use_logq = bool(logq)
        self.use_mask = bool(mask_known)
        deg: Counter = Counter()
        for p in pairs:
            deg[p[0]] += 1
            deg[p[1]] += 1
        total = sum(deg.values())
        self.log_q = {n: math.log(c / total) for n, c in deg.items()} if total else {}
        self._floor = math.log(min(deg.values()) / total) if total else 0.0
        self.neighbours: dict[str, set] = {}
        for p in list(pairs) + list(known_pairs):
            if p[0] != p[1]:
                self.neighbours.setdefault(p[0], set()).add(p[1])
                self.neighbours.setdefault(p[1], set()).add(p[0])

    def q_of(self, notes: Sequence[str]) -> list[float]:
        return [self.log_q.get(n, self._floor) for n in notes]

    def for_batch(self, a_ids: Sequence[str], b_ids: Sequence[str], device=None) -> dict:
        """{"log_q": [2B] or None, "known": [2B, 2B] bool or None} for notes laid out a_ids + b_ids."""
        keys = list(a_ids) + list(b_ids)
        out: dict = {"log_q": None, "known": None}
        if self.use_logq:
            out["log_q"] = torch.tensor(self.q_of(keys), dtype=torch.float32, device=device)
        if self.use_mask:
            n = len(keys)
            known = torch.zeros((n, n), dtype=torch.bool)
            where: dict[str, list[int]] = {}
            for j, c in enumerate(keys):
                where.setdefault(c, []).append(j)
            for i, k in enumerate(keys):
                nb = self.neighbours.get(k)
                if not nb:
                    continue
                for c in (nb if len(nb) < len(where) else where):
                    if c in where and c in nb:
                        for j in where[c]:
                            known[i, j] = j != i
            out["known"] = known.to(device) if device is not None else known
        return out


def csft_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token CE over positions whose label is not IGNORE_INDEX (the output tokens only).

    `logits` (N, T, V) and `labels` (N, T) aligned with the input ids; logits[:, t] predicts labels[:, t+1].
    Returns zero (with a graph) when no output token is present.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = (shift_labels != IGNORE_INDEX).sum()
    if int(n) == 0:
        z = shift_logits.sum() * 0.0
        return {"loss": z, "csft": z, "csft_tokens": n}
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / n
    return {"loss": loss, "csft": loss, "csft_tokens": n}


class NoteLLMLoss(nn.Module):
    """L = (L_gcl + alpha * L_csft) / (1 + alpha). `log_q` / `known` go to the GCL (see `GCLLoss`)."""

    def __init__(self, alpha: float = 0.01, tau_init: float = 3.0):
        super().__init__()
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        self.alpha = float(alpha)
        self.gcl = GCLLoss(tau_init)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, csft: torch.Tensor | None = None, *,
                log_q: torch.Tensor | None = None, known: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        g = self.gcl(emb_a, emb_b, log_q=log_q, known=known)
        c = torch.zeros((), device=emb_a.device) if csft is None else csft.float()
        loss = (g["gcl"] + self.alpha * c) / (1.0 + self.alpha) if self.alpha else g["gcl"]
        return {"loss": loss, "gcl": g["gcl"], "csft": c, "gcl_acc": g["gcl_acc"], "scale": g["scale"],
                "logq": g["logq"], "masked": g["masked"]}
