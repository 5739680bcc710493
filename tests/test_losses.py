"""GCL (InfoNCE) against a hand computation; CSFT masks prompt tokens; the combined loss."""
from __future__ import annotations

import math

import pytest
import torch

from notellm.losses import IGNORE_INDEX, GCLLoss, NoteLLMLoss, csft_loss


def test_infonce_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    loss = GCLLoss(tau_init=math.log(2.0))(a, b)  # scale 2
    # normalised rows: a1=(1,0) a2=(0,1) b1=(.7071,.7071) b2=(0,1)
    r = 1 / math.sqrt(2)
    z = [(1, 0), (0, 1), (r, r), (0, 1)]
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {j: 2 * (z[i][0] * z[j][0] + z[i][1] * z[j][1]) for j in range(4) if j != i}
        total += -(sims[pos[i]] - math.log(sum(math.exp(s) for s in sims.values())))
    assert loss["gcl"].item() == pytest.approx(total / 4, rel=1e-5)
    assert loss["scale"].item() == pytest.approx(2.0)


def test_temperature_init_and_learnable():
    g = GCLLoss()
    assert g.scale.item() == pytest.approx(math.exp(3.0))
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    g(a, b)["loss"].backward()
    assert g.tau.grad is not None


def test_csft_masks_prompt_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # prompt = first 3 tokens; outputs = tokens 3 and 4
    out = csft_loss(logits, labels)
    lp = torch.log_softmax(logits[0], -1)
    want = -(lp[2, 4] + lp[3, 5]) / 2
    assert out["csft"].item() == pytest.approx(want.item(), rel=1e-5)
    assert int(out["csft_tokens"]) == 2
    out["loss"].backward()
    # prompt-token predictions (positions 0, 1) and the last position get no gradient
    assert torch.all(logits.grad[0, :2] == 0) and torch.all(logits.grad[0, 4] == 0)
    assert logits.grad[0, 2].abs().sum() > 0


def test_total_is_weighted_mean():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    c = torch.tensor(2.5)
    out = NoteLLMLoss(alpha=0.5)(a, b, c)
    assert out["loss"].item() == pytest.approx((out["gcl"].item() + 0.5 * 2.5) / 1.5, rel=1e-6)
    out0 = NoteLLMLoss(alpha=0.0)(a, b, c)
    assert out0["loss"].item() == pytest.approx(out0["gcl"].item())
