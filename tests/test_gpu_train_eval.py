"""`scripts/gpu-train-eval`, the full-scale training + evaluation in one device call, rehearsed on the CPU:
`--cpu --tiny` runs every step of the device run (base, NoteLLM, NoteLLM w/o CSFT, `notellm eval
--baselines`) on the tiny model and a data subset; plus `notellm train --dtype bf16` (autocast, fp32
master weights), the pack's unpacking and the budget's plan."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from notellm.prompts import NoteText

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-train-eval"
AMAZON = REPO.parent / "shared" / "data" / "amazon-scientific"


def _script():
    loader = importlib.machinery.SourceFileLoader("gpu_train_eval", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_train_eval", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ bf16

@pytest.fixture
def toy_data(tmp_path):
    from notellm.data import Click, Dataset, Note, write_generic

    topics = [("pasta", "food", ["italian"]), ("hiking", "travel", ["alps"]), ("guitar", "music", ["rock"]),
              ("python", "tech", ["coding"])]
    notes = {}
    for i in range(16):
        t, cat, tags = topics[i % 4]
        notes[f"n{i}"] = Note(f"n{i}", f"{t} note {i}", "", f"all about {t}, part {i}", cat, tuple(tags))
    clicks, t = [], 0.0
    for u in range(40):
        a = u % 12
        clicks += [Click(f"u{u}", f"n{a}", t), Click(f"u{u}", f"n{a + 4}", t + 60)]
        t += 3600
    return write_generic(Dataset("toy", notes, clicks), tmp_path / "data")


def test_bf16_autocast_trains_two_steps_with_fp32_weights(toy_data, tmp_path, monkeypatch):
    """--dtype bf16: the decoder's matrix products run in bf16 under autocast (here on the CPU), the loss is
    finite, the weights stay fp32 and train_config.json records the dtype; fp32 autocasts nothing."""
    import torch
    from safetensors.torch import load_file

    from notellm import train_loop
    from notellm.train_loop import TrainConfig, TrainError, train

    seen: dict[str, set] = {}
    orig = train_loop.setup_model

    def hooked(cfg, device, log):
        model, loss_fn = orig(cfg, device, log)
        model.lm.get_decoder().layers[0].mlp.register_forward_hook(
            lambda _m, _a, out: seen.setdefault(cfg.dtype, set()).add(out.dtype))
        return model, loss_fn

    monkeypatch.setattr(train_loop, "setup_model", hooked)
    for dtype in ("bf16", "fp32"):
        out = tmp_path / dtype
        res = train(TrainConfig(data=str(toy_data), base="tiny", out=str(out), batch_size=4, max_steps=2,
                                test_fraction=0.1, eval_every=0, threads=1, device="cpu", dtype=dtype),
                    progress=False, log=lambda _m: None)
        assert res.steps == 2
        cfg = json.loads((out / "train_config.json").read_text())
        assert cfg["args"]["dtype"] == dtype
        losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(x == x and abs(x) < 1e3 for x in losses)
        weights = load_file(str(next(out.glob("*.safetensors"))))
        assert {t.dtype for t in weights.values()} == {torch.float32}
    assert torch.bfloat16 in seen["bf16"]  # (the whitening-free init runs no forward; the steps do)
    assert seen["fp32"] == {torch.float32}
    with pytest.raises(TrainError, match="--dtype"):
        train(TrainConfig(data=str(toy_data), base="tiny", out=str(tmp_path / "x"), dtype="fp16"),
              progress=False, log=lambda _m: None)


# ------------------------------------------------------------------------------------------ the plan

def test_plan_fits_one_or_two_trainings_in_the_budget():
    m = _script()
    one = m.plan_trainings(8 * 60 - 60, 60, m.GPU, a0_mode="auto", train_cap_s=240, budget_min=8)
    assert one["trainings"] == 1 and 2.5 <= one["train_budget_min"] <= 4.0
    assert "--budget-min" in one["a0_skipped"]
    two = m.plan_trainings(11 * 60 - 60, 60, m.GPU, a0_mode="auto", train_cap_s=240, budget_min=11)
    assert two["trainings"] == 2 and two["train_budget_min"] >= 2.0 and "a0_skipped" not in two
    forced = m.plan_trainings(420, 60, m.GPU, a0_mode="on", train_cap_s=240, budget_min=8)
    assert forced["trainings"] == 2 and forced["train_budget_min"] < one["train_budget_min"]
    off = m.plan_trainings(3600, 60, m.GPU, a0_mode="off", train_cap_s=240, budget_min=60)
    assert off["trainings"] == 1 and off["train_budget_min"] == 4.0 and off["a0_skipped"].endswith("--a0 off")


# ------------------------------------------------------------------------------------------ the pack

def _fake_pack(tmp_path) -> Path:
    """A pack as scripts/device-pack --train lays it out: tar.xz of site/ + data/ cut into parts."""
    import hashlib

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("site/pkg/__init__.py", b"X = 1\n"), ("data/amazon-scientific/a.json", os.urandom(3000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = lzma.compress(buf.getvalue())
    pack = tmp_path / "pack"
    pack.mkdir()
    parts = []
    for i in range(0, len(blob), 1500):
        p = pack / f"part-{i // 1500:02d}"
        p.write_bytes(blob[i: i + 1500])
        parts.append({"name": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    assert len(parts) >= 2
    (pack / "MANIFEST.json").write_text(json.dumps({"what": "train", "wheels": [], "parts": parts}))
    return pack


def test_unpack_checks_every_part(tmp_path):
    m = _script()
    pack = _fake_pack(tmp_path)
    man = m.unpack(pack, tmp_path / "stage")
    assert man["what"] == "train"
    assert (tmp_path / "stage" / "site" / "pkg" / "__init__.py").read_text() == "X = 1\n"
    assert (tmp_path / "stage" / "data" / "amazon-scientific" / "a.json").stat().st_size == 3000
    (pack / "part-00").write_bytes(b"corrupt")
    (pack / "part-01").unlink()
    p = subprocess.run([sys.executable, str(SCRIPT), "--pack", str(pack), "--out", str(tmp_path / "o"),
                        "--work", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert p.returncode != 0
    assert "part-00: sha256 differs" in p.stderr and "part-01: missing" in p.stderr


# ------------------------------------------------------------------------------------------ rehearsal

@pytest.mark.slow
def test_cpu_tiny_rehearsal_writes_results_curves_and_run_json(tmp_path):
    assert (AMAZON / "Scientific.item.json").exists(), f"no Amazon data at {AMAZON} (tests read ../shared/data)"
    out = tmp_path / "out"
    env = dict(os.environ, NOTELLM_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "w"), "--budget-min", "4", "--epochs", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    # what comes back from the device: at most 8 plain files with plain names, no folder
    files = sorted(x.name for x in out.iterdir())
    assert files == sorted(["run.json", "run.log", "results.json", "results.md", "recall_at_k.png",
                            "curves_notellm.png", "curves_notellm_a0.png", "details.tar.gz"])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)

    run = json.loads((out / "run.json").read_text())
    steps = {s["name"]: s for s in run["steps"]}
    assert [s["name"] for s in run["steps"]] == ["base", "train", "train-a0", "eval"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in steps.values()), steps
    for name in ("train", "train-a0"):
        cmd = steps[name]["command"]
        assert "-m notellm.cli train" in cmd and "--freeze-layers 0" in cmd and "--lora-r 0" in cmd
        assert "--dtype bf16" in cmd and "--proj-init whiten" in cmd and "--time-budget-min" in cmd
        assert "--epochs 2 " in cmd  # the schedule is planned for --epochs; the time budget may stop it sooner
        assert steps[name]["train"]["steps_done"] == 6
    assert "--alpha 0.0" in steps["train-a0"]["command"] and "--alpha 1.0" in steps["train"]["command"]
    assert "--baselines" in steps["eval"]["command"] and "--gen-notes 5" in steps["eval"]["command"]
    assert run["env"]["torch"] and run["env"]["cuda_available"] in (True, False) and run["env"]["transformers"]
    assert run["plan"]["trainings"] == 2 and run["mode"] == "cpu-tiny"
    assert run["elapsed_s"] <= run["budget_s"]

    res = json.loads((out / "results.json").read_text())
    rows = ["Popularity (training clicks, text-free)", "SentenceBERT zero-shot", "SentenceBERT fine-tuned",
            "Base LLM zero-shot", "NoteLLM", "NoteLLM w/o CSFT"]
    assert list(res["models"]) == rows
    # each trained model against each baseline, paired, overall and on cold pairs
    assert {(d["model"], d["versus"]) for d in res["differences"]} == {
        (a, b) for a in rows[4:] for b in rows[:4]}
    assert all(set(d["groups"]) == {"all", "cold"} for d in res["differences"])
    ks = [str(k) for k in res["ks"]]
    for name, m in res["models"].items():
        for g in ("all", "warm", "cold"):
            assert set(m["recall"][g]) == set(ks) and all(0.0 <= m["recall"][g][k] <= 1.0 for k in ks), (name, g)
    assert res["models"]["NoteLLM"]["generation"]["category_notes"] > 0
    assert "generation" not in res["models"]["NoteLLM w/o CSFT"]  # alpha 0 trains no generation
    assert res["train_configs"]["NoteLLM"]["args"]["dtype"] == "bf16"
    assert set(run["summary"]["recall"]) == set(rows)
    md = (out / "results.md").read_text()
    assert all(r in md for r in rows)

    with tarfile.open(out / "details.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"notellm/train_config.json", "notellm/train_log.jsonl", "notellm/curves.jsonl",
                "notellm_a0/curves.jsonl", "logs/train.log", "logs/eval.log"} <= names
        curves = [json.loads(x) for x in tar.extractfile("notellm/curves.jsonl").read().decode().splitlines()]
    assert [c["step"] for c in curves][0] == 0 and curves[-1]["step"] == 6 and len(curves) >= 3
    assert all(c["heldout_recall"] for c in curves)
    assert (out / "curves_notellm.png").stat().st_size > 1000
    log = (out / "run.log").read_text()
    assert "Recall@k (%)" in log and "NoteLLM w/o CSFT" in p.stdout

@pytest.mark.slow
def test_cpu_tiny_lora_rehearsal_returns_the_adapter_within_eight_files(tmp_path):
    """--lora-r: NoteLLM trains LoRA on all layers and its adapter (what models/notellm-default holds) comes
    back as one tar that `notellm export` can merge; the a0 curves move into details.tar.gz (8 files)."""
    out = tmp_path / "out"
    env = dict(os.environ, NOTELLM_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "w"), "--budget-min", "4", "--lora-r", "4", "--lr", "1e-3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    files = sorted(x.name for x in out.iterdir())
    assert len(files) == 8 and "adapter_notellm.tar" in files and "curves_notellm_a0.png" not in files
    run = json.loads((out / "run.json").read_text())
    steps = {s["name"]: s for s in run["steps"]}
    assert "--lora-r 4 " in steps["train"]["command"] and "--lr 0.001 " in steps["train"]["command"]
    assert run["adapter"]["file"] == "adapter_notellm.tar" and 0 < run["adapter"]["bytes"] < 16 * 2**20
    with tarfile.open(out / "adapter_notellm.tar") as tar:
        assert sorted(tar.getnames()) == ["adapter/adapter.json", "adapter/adapter.safetensors"]
        tar.extractall(tmp_path / "x", filter="data")
    meta = json.loads((tmp_path / "x" / "adapter" / "adapter.json").read_text())
    assert meta["lora_r"] == 4 and meta["base"] == "tiny" and len(meta["layers"]) >= 2  # every layer, not the top 2
    from notellm.adapter import load_adapter

    merged = load_adapter(tmp_path / "x" / "adapter")  # what `notellm export --model adapter/` does first
    assert merged.embed_notes([NoteText("a probe", "some content", "topic")]).shape == (1, merged.dim)
    with tarfile.open(out / "details.tar.gz") as tar:
        assert "notellm_a0/curves.png" in tar.getnames()
