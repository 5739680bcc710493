"""notellm.adapter: a LoRA run's small artifact, merged onto its base (tiny random Llama)."""
from __future__ import annotations

import json

import pytest
import torch

from notellm.adapter import (AdapterError, CONFIG_FILE, WEIGHTS_FILE, is_adapter_dir, load_adapter,
                             save_adapter)
from notellm.model import NoteLLM
from notellm.train_setup import merge_lora, setup_trainable
from tests.tiny import NOTES


def _adapted(seed: int = 0) -> NoteLLM:
    """A tiny NoteLLM with LoRA on its top layer, factors random (and exact in fp16), projection moved."""
    m = NoteLLM.from_base("tiny")
    setup_trainable(m, freeze_layers=1, lora_r=4, lora_alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).half().float())
        m.proj.weight.add_(torch.randn(m.proj.weight.shape, generator=g) * 0.1)
    return m.eval()


def test_round_trip_is_the_merged_model(tmp_path):
    m = _adapted()
    m.set_categories(["Sports", "Movies"])
    d = save_adapter(m, tmp_path / "adapter", lora_r=4, lora_alpha=8, base="tiny", extra={"steps": 7})
    assert is_adapter_dir(d) and not is_adapter_dir(tmp_path)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["scale"] == 2.0 and cfg["layers"] == [1] and cfg["modules"] == 7 and cfg["steps"] == 7
    merge_lora(m)
    loaded = load_adapter(d)
    assert loaded.categories == ("Movies", "Sports")  # the set CSFT taught travels with the adapter
    notes = list(NOTES)
    assert torch.allclose(m.embed_notes(notes), loaded.embed_notes(notes), atol=1e-5)
    base = NoteLLM.from_base("tiny").embed_notes(notes)
    assert not torch.allclose(base, loaded.embed_notes(notes), atol=1e-2)  # it did change the model
    _, t1 = m.generate_notes(notes[:2], max_new_tokens=4)
    _, t2 = loaded.generate_notes(notes[:2], max_new_tokens=4)
    assert t1 == t2


def test_another_base_or_a_broken_file_is_refused(tmp_path):
    d = save_adapter(_adapted(), tmp_path / "a", lora_r=4, lora_alpha=8, base="tiny")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "base_fingerprint": "0" * 64}))
    with pytest.raises(AdapterError, match="not the same model"):
        load_adapter(d)
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(AdapterError, match="format"):
        load_adapter(d)
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / WEIGHTS_FILE))
    t.pop(next(k for k in t if k.endswith(".lora_B")))
    save_file(t, str(d / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="without its pair"):
        load_adapter(d)


def test_a_model_without_lora_has_no_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA"):
        save_adapter(NoteLLM.from_base("tiny"), tmp_path / "a", lora_r=4, lora_alpha=8, base="tiny")
