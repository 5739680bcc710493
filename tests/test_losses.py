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


def _plain_logits(a, b, scale):
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=-1)
    return (z @ z.T * scale).fill_diagonal_(float("-inf"))


def test_logq_shifts_each_candidate_logit_by_minus_log_q():
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    g = GCLLoss(tau_init=math.log(5.0))
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.05, 0.2, 0.25, 0.1]))
    plain, target, _ = g.logits(a, b)
    corrected, _, _ = g.logits(a, b, log_q=log_q)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose((corrected - plain)[off], (-log_q[None, :]).expand(6, 6)[off], atol=1e-5)
    assert torch.isinf(corrected.diagonal()).all()
    out = g(a, b, log_q=log_q)
    want = torch.nn.functional.cross_entropy(_plain_logits(a, b, 5.0) - log_q[None, :], target)
    assert out["gcl"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["gcl"].item() != pytest.approx(g(a, b)["gcl"].item(), rel=1e-3)
    assert out["logq"].item() == 1.0 and g(a, b)["logq"].item() == 0.0
    # a uniform q is a constant per row: the softmax (so the loss) does not change
    flat = g(a, b, log_q=torch.full((6,), math.log(1 / 6)))["gcl"]
    assert flat.item() == pytest.approx(g(a, b)["gcl"].item(), rel=1e-5)


def test_masking_excludes_known_positives_but_never_the_target():
    torch.manual_seed(1)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    g = GCLLoss(tau_init=math.log(5.0))
    known = torch.zeros(6, 6, dtype=torch.bool)
    known[0, 4] = True   # a1's known partner b2: a false negative -> masked
    known[0, 3] = True   # a1's own target b1: never masked
    known[1, 1] = True   # the diagonal is masked anyway; not counted
    known[5, 0] = True   # b3 knows a1 -> masked
    logits, target, n = g.logits(a, b, known=known)
    assert torch.isinf(logits[0, 4]) and torch.isinf(logits[5, 0])
    assert torch.isfinite(logits[0, 3]) and torch.isfinite(logits[torch.arange(6), target]).all()
    assert n.item() == 2
    out = g(a, b, known=known)
    assert out["masked"].item() == 2
    want = _plain_logits(a, b, 5.0)
    want[0, 4] = want[5, 0] = float("-inf")
    assert out["gcl"].item() == pytest.approx(torch.nn.functional.cross_entropy(want, target).item(), rel=1e-5)
    # every candidate known: only the target is left, the loss is 0 and still finite
    allk = g(a, b, known=torch.ones(6, 6, dtype=torch.bool))
    assert allk["gcl"].item() == pytest.approx(0.0, abs=1e-6) and allk["masked"].item() == 6 * 4


def test_batch_prior_log_q_and_known_partners():
    from notellm.losses import BatchPrior

    pairs = [("x", "y", 1.0), ("x", "z", 1.0), ("z", "w", 1.0)]
    prior = BatchPrior(pairs, [("y", "v", 1.0)])
    # degrees x 2, y 1, z 2, w 1 (of 6 ends); v is not in the training pairs: the smallest degree
    assert prior.log_q["x"] == pytest.approx(math.log(2 / 6)) and prior.log_q["w"] == pytest.approx(math.log(1 / 6))
    got = prior.for_batch(["x", "z"], ["y", "w"])  # layout x, z, y, w; targets 0<->2, 1<->3
    assert torch.allclose(got["log_q"], torch.log(torch.tensor([2, 2, 1, 1]) / 6.0))
    k = got["known"]
    assert k[0, 1] and k[1, 0]  # x and z are a training pair, in different batch pairs
    assert k[0, 2] and k[1, 3]  # the targets are known too; the loss never masks them
    assert not k.diagonal().any() and int(k.sum()) == 6
    out = NoteLLMLoss(alpha=0.0)(torch.randn(2, 8), torch.randn(2, 8), **got)
    assert out["masked"].item() == 2 and out["logq"].item() == 1.0
    assert prior.q_of(["v"]) == [pytest.approx(math.log(1 / 6))]
    assert prior.for_batch(["y"], ["v"])["known"][0, 1]  # from known_pairs
    off = BatchPrior(pairs, logq=False, mask_known=False).for_batch(["x"], ["y"])
    assert off == {"log_q": None, "known": None}
