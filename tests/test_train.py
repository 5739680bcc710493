"""Training on a tiny random Llama: the layer split is exact, CSFT labels cover only the output, the loss
decreases, the output loads as a NoteLLM, and a run resumes from its checkpoint."""
from __future__ import annotations

import json

import pytest

import torch  # noqa: E402 - the model tests need torch (the [model] extra); a missing one fails, never skips

from notellm.base_models import tiny_llama  # noqa: E402
from notellm.cli import main  # noqa: E402
from notellm.data import Click, Dataset, Note, write_generic  # noqa: E402
from notellm.model import NoteLLM  # noqa: E402
from notellm.train_data import LayerSplit, note_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    lm, tok = tiny_llama(0, num_layers=3)
    return NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id="tiny")


def _notes():
    topics = [("pasta", "food", ["italian", "dinner"]), ("hiking", "travel", ["alps"]),
              ("guitar", "music", ["rock", "live"]), ("python", "tech", ["coding"])]
    notes = {}
    for i in range(16):
        t, cat, tags = topics[i % 4]
        notes[f"n{i}"] = Note(f"n{i}", f"{t} note {i}", "", f"all about {t}, part {i}", cat, tuple(tags))
    return notes


@pytest.fixture
def toy_data(tmp_path):
    notes = _notes()
    clicks = []
    t = 0.0
    # users click two notes of the same topic one after the other: pairs (n_i, n_{i+4})
    for u in range(40):
        a = u % 12
        clicks += [Click(f"u{u}", f"n{a}", t), Click(f"u{u}", f"n{a + 4}", t + 60)]
        t += 3600
    return write_generic(Dataset("toy", notes, clicks), tmp_path / "data")


def test_layer_split_is_exact(tiny):
    notes = list(_notes().values())[:3]
    b = tiny.tokenize_notes(notes, "category")
    full = tiny._hidden(b.input_ids, b.attention_mask)
    sp = LayerSplit(tiny, 2)
    with torch.no_grad():
        got = sp.upper(sp.lower(b.input_ids, b.attention_mask), b.attention_mask)
    valid = b.attention_mask.bool()
    assert torch.allclose(got[valid], full[valid], atol=1e-5)
    assert len(tiny.lm.get_decoder().layers) == 3  # restored


def test_csft_rows_label_only_the_output(tiny):
    notes = _notes()
    rows = note_rows(tiny, notes, list(notes), r_hashtags=0.5, num_topics=3, seed=0)
    assert {r.task for r in rows.values()} == {"category", "hashtags"}
    for nid, r in rows.items():
        out = [i for i, lab in enumerate(r.labels) if lab != -100]
        assert out and out == list(range(out[0], len(r.ids)))  # one contiguous tail
        assert out[0] > r.emb_pos  # after [EMB] and the guidance
        assert [r.ids[i] for i in out] == [r.labels[i] for i in out]
        assert r.ids[-1] == tiny.eos_token_id
        if r.task == "category":
            assert tiny.tokenizer.decode(r.ids[out[0]:-1]) == notes[nid].category + '"'


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--base", "tiny", "--out", str(out), "--batch-size", "4",
                 "--lr", "3e-3", "--warmup-ratio", "0", "--test-fraction", "0.1", "--no-progress", *extra])


@pytest.mark.slow
def test_loss_decreases_and_output_loads(toy_data, tmp_path):
    out = tmp_path / "run"
    assert _train(toy_data, out, "--epochs", "8", "--alpha", "0.5") == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) >= 8 and {"loss", "gcl", "csft", "gcl_acc", "scale"} <= set(log[0])
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.8, (first, last)
    m = NoteLLM.load(out)
    e = m.embed_notes(list(_notes().values())[:2])
    assert e.shape == (2, 128)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps_done"] == len(log) and cfg["split"]["top_t"] == 10


@pytest.mark.slow
def test_frozen_cache_lora_and_resume(toy_data, tmp_path):
    out = tmp_path / "run"
    common = ["--freeze-layers", "1", "--lora-r", "4", "--checkpoint-every", "2", "--epochs", "3"]
    assert _train(toy_data, out, *common, "--max-steps", "3") == 0
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["config"]["cache_frozen"] is True
    assert any("lora_" in k for k in state["trainable"])
    assert _train(toy_data, out, *common, "--max-steps", "5", "--resume") == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    m = NoteLLM.load(out)  # LoRA merged: a plain model
    assert not any("lora_" in n for n, _ in m.named_parameters())
    # ... and the small artifact beside it, merged onto the base it names, is the same model
    from notellm.adapter import load_adapter, read_adapter_config

    acfg = read_adapter_config(out / "adapter")
    assert acfg["base"] == "tiny" and acfg["steps"] == 5 and acfg["layers"] == [1] and acfg["lora_r"] == 4
    assert acfg["categories"] and list(m.categories) == acfg["categories"]  # the set CSFT taught, both places
    merged = load_adapter(out / "adapter")
    notes = list(_notes().values())[:4]
    a, b = m.embed_notes(notes), merged.embed_notes(notes)
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()  # fp16 factors


def test_whitening_projection_centres_without_a_bias():
    from notellm.train_setup import whitening_projection

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, generator=g) * torch.linspace(0.5, 3, 16) + 5.0  # big common offset
    w = whitening_projection(h, 8)
    z = h @ w.T
    mu = h.mean(0)
    assert torch.allclose(z, (h - mu) @ w.T, atol=1e-3)  # W mu = 0: centring for free
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(8), atol=0.05)


def test_cli_flags_are_the_train_config():
    """Every `notellm train` flag is a TrainConfig field with the same default, and back."""
    import argparse

    from notellm.train import config_from_args, configure
    from notellm.train_loop import TrainConfig

    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--data", "d", "--out", "o"])
    cfg = config_from_args(args)
    assert cfg == TrainConfig(data="d", out="o") and cfg.command is None
    assert cfg.args_record(progress=not args.no_progress) == vars(args)  # train_config.json's "args", in order


@pytest.mark.slow
def test_train_as_a_library(toy_data, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from notellm.train_loop import TrainConfig, TrainError, train

    msgs = []
    cfg = TrainConfig(data=str(toy_data), base="tiny", out=str(tmp_path / "run"), batch_size=4, max_steps=2,
                      test_fraction=0.1, eval_every=0, command="notellm train (test)")
    res = train(cfg, progress=False, log=msgs.append)
    assert res.steps == 2 and not res.stopped_early and res.out == tmp_path / "run"
    saved = json.loads((res.out / "train_config.json").read_text())
    assert saved["steps_done"] == 2 and saved["command"] == "notellm train (test)" and saved["args"]["no_progress"]
    assert any(m.startswith("saved ") for m in msgs)
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "saved " not in err  # messages went to `log`, no save bar
    assert hf_logging.is_progress_bar_enabled()  # transformers' bars are back on after the save
    with pytest.raises(TrainError, match="no checkpoint"):
        train(TrainConfig(data=str(toy_data), out=str(tmp_path / "none"), resume=True), log=msgs.append)
    # the command line reports a run that cannot start with exit status 2
    assert _train(toy_data, tmp_path / "x", "--cache-frozen") == 2
    assert "notellm train: --cache-frozen needs --freeze-layers > 0" in capfd.readouterr().err
