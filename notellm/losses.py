"""NoteLLM losses as small callables that return their named parts.

- `GCLLoss` (generative-contrastive learning): InfoNCE over the 2B notes of B related pairs with in-batch
  negatives. Similarity = cosine, scaled by a learnable temperature exp(tau), tau initialised to 3 as in
  the paper (scale ~20); a note's similarity with itself is masked out. Embeddings are laid out
  `[a_1..a_B, b_1..b_B]`: the positive of row i < B is row i + B and vice versa.
- `csft_loss`: next-token cross-entropy on the output tokens only (labels = -100 on prompt and padding),
  logits at position t predict token t + 1.
- `NoteLLMLoss`: L = (L_gcl + alpha * L_csft) / (1 + alpha), alpha = 0.01 by default; alpha = 0 gives
  "NoteLLM without CSFT".

Every callable returns a dict of tensors: `loss` (what to backpropagate) plus its parts, so each is logged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GCLLoss", "csft_loss", "NoteLLMLoss", "IGNORE_INDEX"]

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

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> dict[str, torch.Tensor]:
        if emb_a.shape != emb_b.shape:
            raise ValueError(f"pair halves differ in shape: {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
        b = emb_a.shape[0]
        z = F.normalize(torch.cat([emb_a, emb_b], 0).float(), dim=-1)
        scale = self.scale.to(z.dtype)
        logits = z @ z.T * scale
        eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "gcl": loss, "gcl_acc": acc, "scale": scale.detach()}


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
    """L = (L_gcl + alpha * L_csft) / (1 + alpha)."""

    def __init__(self, alpha: float = 0.01, tau_init: float = 3.0):
        super().__init__()
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        self.alpha = float(alpha)
        self.gcl = GCLLoss(tau_init)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor,
                csft: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        g = self.gcl(emb_a, emb_b)
        c = torch.zeros((), device=emb_a.device) if csft is None else csft.float()
        loss = (g["gcl"] + self.alpha * c) / (1.0 + self.alpha) if self.alpha else g["gcl"]
        return {"loss": loss, "gcl": g["gcl"], "csft": c, "gcl_acc": g["gcl_acc"], "scale": g["scale"]}
