"""Issue 12 ("training that learns") on a tiny random Llama: the temperature's own param group, the
schedule sized to the steps that run (time budget / max steps), the held-out learning curve
(curves.jsonl + curves.png), the logQ / masking switches and the cold-start holdout through train and eval."""
from __future__ import annotations

import json
import math

import pytest

import torch  # noqa: E402 - the model tests need torch (the [model] extra); a missing one fails, never skips

from notellm.base_models import tiny_llama  # noqa: E402
from notellm.cli import main  # noqa: E402
from notellm.data import Click, Dataset, Note, write_generic  # noqa: E402
from notellm.losses import NoteLLMLoss  # noqa: E402
from notellm.model import NoteLLM  # noqa: E402
from notellm.train_data import heldout_sample  # noqa: E402
from notellm.train_setup import (LinearSchedule, budget_steps, lr_lambda_factory, param_groups,  # noqa: E402
                                 setup_trainable)

TOPICS = [("pasta", "food", ["italian", "dinner"]), ("hiking", "travel", ["alps"]),
          ("guitar", "music", ["rock", "live"]), ("python", "tech", ["coding"]),
          ("tennis", "sport", ["serve"]), ("garden", "home", ["plants", "spring"])]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """24 notes of 6 topics. Early users click (n_a, n_a+6), late users (n_a, n_a+12): same-topic pairs
    that never were training pairs, so the test period has pairs of its own."""
    notes = {}
    for i in range(24):
        t, cat, tags = TOPICS[i % 6]
        notes[f"n{i}"] = Note(f"n{i}", f"{t} note {i}", "", f"all about {t}, part {i}", cat, tuple(tags))
    clicks, t = [], 0.0
    for u in range(72):
        a = u % 18
        clicks += [Click(f"u{u}", f"n{a}", t), Click(f"u{u}", f"n{a + 6}", t + 60)]
        t += 3600
    for u in range(72, 108):
        a = u % 12
        clicks += [Click(f"u{u}", f"n{a}", t), Click(f"u{u}", f"n{a + 12}", t + 60)]
        t += 3600
    return write_generic(Dataset("toy", notes, clicks), tmp_path_factory.mktemp("levers") / "data")


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--base", "tiny", "--out", str(out), "--batch-size", "4",
                 "--lr", "3e-3", "--test-fraction", "0.33", "--no-progress", *extra])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- units

def test_temperature_has_its_own_param_group():
    lm, tok = tiny_llama(0, num_layers=3)
    model = NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id="tiny")
    setup_trainable(model, freeze_layers=1, lora_r=0, lora_alpha=None, seed=0)
    loss_fn = NoteLLMLoss(alpha=0.01, tau_init=math.log(5.0))
    groups = param_groups(model, loss_fn, lr=1e-4, proj_lr=1e-3, tau_lr=1e-2)
    by = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["body", "proj", "tau"]
    assert by["tau"]["params"] == [loss_fn.gcl.tau] and by["tau"]["lr"] == 1e-2
    assert by["proj"]["lr"] == 1e-3 and {id(p) for p in by["proj"]["params"]} == {id(p) for p in model.proj.parameters()}
    assert by["body"]["lr"] == 1e-4 and by["tau"]["weight_decay"] == by["proj"]["weight_decay"] == 0.0
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every))  # each parameter in exactly one group
    # a step moves tau at its own rate: Adam's first step is ~lr in size
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.01)
    before = loss_fn.gcl.tau.item()
    out = loss_fn(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True))
    out["loss"].backward()
    opt.step()
    assert abs(loss_fn.gcl.tau.item() - before) == pytest.approx(1e-2, rel=1e-3)
    # without --proj-lr / --tau-lr: the projection takes lr, the temperature the projection's
    g2 = {g["name"]: g["lr"] for g in param_groups(model, loss_fn, lr=2e-4)}
    assert g2 == {"body": 2e-4, "proj": 2e-4, "tau": 2e-4}


def test_schedule_planned_for_the_budgeted_steps():
    # 60 s budget, 10 s used, 0.5 s a step, an evaluation of 5 s every 10 steps: 0.5 + 0.5 s a step
    assert budget_steps(budget_s=60, elapsed_s=10, steps_done=4, step_s=0.5, eval_s=5, eval_every=10) == 54
    assert budget_steps(budget_s=60, elapsed_s=10, steps_done=4, step_s=0.5) == 104
    assert budget_steps(budget_s=60, elapsed_s=70, steps_done=4, step_s=0.5) == 4  # budget spent
    plan = LinearSchedule(169, 0.1)
    assert (plan.total, plan.warmup, plan.planned_by) == (169, 17, "epochs")
    plan.replan(45, at_step=4)
    assert (plan.total, plan.warmup, plan.planned_by, plan.planned_at_step) == (45, 4, "budget", 4)
    assert plan(3) == pytest.approx(1.0) and plan(44) == pytest.approx(1 / 41) and plan(45) == 0.0
    later = LinearSchedule(169, 0.1)
    later.replan(45, at_step=4)
    later.replan(60, at_step=25, keep_warmup=True)  # a later re-plan keeps the warmup that is over
    assert (later.total, later.warmup, later.replans) == (60, 4, 2)
    # LambdaLR keeps the plan in its state (a resumed run sees it)
    p = torch.nn.Parameter(torch.zeros(1))
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=1.0), plan)
    other = LinearSchedule(999, 0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=1.0), other)
    sched2.load_state_dict(sched.state_dict())
    assert (other.total, other.warmup, other.planned_by) == (45, 4, "budget")


def test_heldout_sample_is_fixed_and_bounded():
    pairs = [(f"a{i}", f"b{i % 7}", 1.0) for i in range(40)] + [(f"b{i % 7}", f"a{i}", 1.0) for i in range(40)]
    s1 = heldout_sample(pairs, max_notes=20, max_pairs=10, batch_size=4, seed=3)
    s2 = heldout_sample(pairs, max_notes=20, max_pairs=10, batch_size=4, seed=3)
    assert s1 == s2 and len(s1.pool) <= 20 and s1.loss_pairs <= 10
    assert all(p[0] in s1.pool and p[1] in s1.pool for p in s1.recall_pairs)
    for b in s1.loss_batches:
        notes = [x for p in b for x in p[:2]]
        assert 2 <= len(b) <= 4 and len(notes) == len(set(notes))  # no note twice: no false negative


# ------------------------------------------------------------------------------ tiny training runs

@pytest.mark.slow
def test_training_writes_the_heldout_curve_and_cold_rows(toy_data, tmp_path):
    out = tmp_path / "run"
    assert _train(toy_data, out, "--epochs", "3", "--eval-every", "3", "--cold-fraction", "0.25") == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["split"]["cold_fraction"] == 0.25 and cfg["split_summary"]["cold_notes"] == 6
    assert cfg["args"]["logq"] is True and cfg["args"]["mask_known"] is True
    assert cfg["schedule"]["planned_by"] == "epochs" and cfg["total_steps"] == cfg["steps_done"]
    log = _jsonl(out / "train_log.jsonl")
    assert {"logq", "masked"} <= set(log[0]) and all(r["logq"] == 1.0 for r in log)
    assert log[-1]["lr"] == 0.0  # the schedule ends where the run ends
    assert log[0]["scale"] == pytest.approx(5.0, rel=0.05)  # scale starts near 5
    curves = _jsonl(out / "curves.jsonl")
    steps = [c["step"] for c in curves]
    n = cfg["steps_done"]
    assert steps == sorted(set(list(range(0, n, 3)) + [n]))  # before the first step, every 3, after the last
    for c in curves:
        assert c["heldout_gcl"] > 0 and math.log(3) <= c["heldout_chance"] <= math.log(7)  # batches of 2-4 pairs
        assert set(c["heldout_recall"]) == {str(k) for k in cfg["heldout"]["ks"]}
        assert c["heldout_pairs_cold"] > 0 and set(c["heldout_recall_cold"]) == set(c["heldout_recall"])
    assert curves[0]["train_gcl"] is None and curves[-1]["train_gcl"] > 0
    assert (out / "curves.png").stat().st_size > 5000
    # eval reads the holdout from train_config.json and reports warm / cold pairs
    ev = tmp_path / "eval"
    assert main(["eval", "--data", str(toy_data), "--model", str(out), "--gen-notes", "0", "--no-progress",
                 "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["pairs"]["warm"] + res["pairs"]["cold"] == res["pairs"]["all"] and res["pairs"]["cold"] > 0
    assert {"warm", "cold"} <= set(res["models"]["NoteLLM"]["recall"])
    assert "warm R@" in (ev / "results.md").read_text()


@pytest.mark.slow
def test_levers_off_and_no_holdout(toy_data, tmp_path):
    out = tmp_path / "run"
    assert _train(toy_data, out, "--epochs", "5", "--max-steps", "7", "--eval-every", "0", "--no-logq",
                  "--no-mask-known", "--tau-init", "3", "--tau-lr", "0.05") == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["schedule"]["planned_by"] == "max_steps" and cfg["steps_done"] == 7
    log = _jsonl(out / "train_log.jsonl")
    assert all(r["logq"] == 0.0 and r["masked"] == 0.0 for r in log) and log[-1]["lr"] == 0.0
    assert not (out / "curves.jsonl").exists() and not (out / "curves.png").exists()
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    lrs = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs == {"body": 3e-3, "proj": 3e-3, "tau": 0.05}
    ev = tmp_path / "eval"
    assert main(["eval", "--data", str(toy_data), "--model", str(out), "--gen-notes", "0", "--no-progress",
                 "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert set(res["pairs"]) == {"all", "unseen", "low", "high"}
    assert set(res["models"]["NoteLLM"]["recall"]) == {"all", "unseen", "low", "high"}
    assert "warm" not in (ev / "results.md").read_text()


class _Clock:
    """A fake `time` for notellm.train_loop: every reading advances 0.1 s, so a budgeted run's step time (and
    with it the plan) does not depend on how loaded the machine is."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self):
        self.now += 0.1
        return self.now


@pytest.mark.slow
def test_time_budget_sizes_the_schedule(toy_data, tmp_path, monkeypatch):
    import notellm.train_loop

    monkeypatch.setattr(notellm.train_loop, "time", _Clock())
    out = tmp_path / "run"
    assert _train(toy_data, out, "--epochs", "400", "--time-budget-min", "0.1", "--eval-every", "5",
                  "--warmup-ratio", "0.2") == 0
    cfg = json.loads((out / "train_config.json").read_text())
    sch = cfg["schedule"]
    epoch_steps = 400 * 5  # 18 training pairs in batches of 4: 2,000 steps for the epochs asked
    assert sch["planned_by"] == "budget" and sch["planned_at_step"] >= 4 and sch["step_s"] > 0
    assert 4 < sch["total_steps"] < 100 and cfg["total_steps"] == sch["total_steps"]
    assert cfg["warmup_steps"] == sch["warmup_steps"] < 0.2 * epoch_steps  # not the epochs' 400
    log = _jsonl(out / "train_log.jsonl")
    # the plan is an estimate: the budget may stop the run a step before the decay's end
    assert sch["total_steps"] - 1 <= cfg["steps_done"] == len(log) <= sch["total_steps"]
    assert log[-1]["lr"] <= 3e-3 / (sch["total_steps"] - sch["warmup_steps"]) + 1e-12  # decayed to (about) 0
    # from the plan on, every step follows the planned warmup/decay (before it: the epochs' gentler ramp)
    planned = lr_lambda_factory(sch["total_steps"], sch["warmup_steps"])
    for r in log[sch["planned_at_step"]:]:
        assert r["lr"] == pytest.approx(3e-3 * planned(r["step"]))
    assert max(r["lr"] for r in log) == pytest.approx(3e-3)


def test_the_contrastive_objective_learns_on_held_out_pairs(toy_data, tmp_path):
    """Learning, not memorisation: a few epochs on the fixed toy set (6 topics; the test period's pairs are
    same-topic pairs that never were training pairs) bring the GCL loss on those held-out pairs below its
    chance level (log of the candidates per anchor) and below where it started."""
    out = tmp_path / "learn"
    assert _train(toy_data, out, "--epochs", "12", "--eval-every", "12", "--proj-init", "whiten",
                  "--proj-lr", "1e-2", "--seed", "0") == 0
    curves = _jsonl(out / "curves.jsonl")
    first, last = curves[0], curves[-1]
    assert first["train_gcl"] is None and last["step"] > first["step"]
    assert last["heldout_gcl"] < last["heldout_chance"], (first, last)
    assert last["heldout_gcl"] < first["heldout_gcl"] - 0.05, (first, last)
