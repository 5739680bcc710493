"""A trained NoteLLM as a small artifact that is merged onto its base model: `notellm export --model DIR`.

A LoRA run (``notellm train --lora-r R``) writes ``<out>/adapter/`` beside the merged model:

- ``adapter.safetensors``: for every adapted linear layer ``<module>`` of the causal LM (e.g.
  ``model.layers.28.self_attn.q_proj``), ``<module>.lora_A`` [r, in] and ``<module>.lora_B`` [out, r];
  ``projection.weight`` [dim, hidden]; ``emb_row`` [hidden], the ``[EMB]`` token's input-embedding row.
  fp16 for the LoRA factors (the merge multiplies them in fp32), fp32 for the projection and the row.
- ``adapter.json``: format, the base it was trained on (name and a fingerprint of its token embeddings, so
  an adapter is never merged onto another model), the LoRA scale, the prompt configuration, the closed
  category set CSFT taught (the category task is decoded within it), and whatever the run wants kept with
  it (its command, its metrics, the notes it held out).

Merging is plain arithmetic (``W += scale * B @ A``), with no PEFT dependency: the artifact's names are the
base model's own module names, so it does not depend on how a PEFT version spells its wrappers. The
``[EMB]`` row is a deterministic mean of the base's embeddings, frozen in training; it is still stored, and
loading checks that the merged model has the same row, so a base that differs would be caught there too.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from notellm.model import NoteLLM
from notellm.prompts import PromptConfig

FORMAT = "notellm-adapter-v1"
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
PROJECTION_KEY = "projection.weight"
EMB_ROW_KEY = "emb_row"
_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be merged onto the given base (wrong format, base or shapes)."""


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def base_fingerprint(model: NoteLLM) -> str:
    """sha256 of the base's token-embedding matrix without the ``[EMB]`` row NoteLLM adds (fp32 bytes):
    the same GGUF or checkpoint always gives the same value, any other base another."""
    w = model.lm.get_input_embeddings().weight.detach().float().cpu()
    i = model.emb_token_id
    keep = torch.cat([w[:i], w[i + 1:]]).contiguous()
    return hashlib.sha256(keep.numpy().tobytes()).hexdigest()


def lora_factors(lm) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": tensor, "B": tensor}} of a PEFT-wrapped model's LoRA weights."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in lm.named_parameters():
        m = _PEFT_NAME.match(name)
        if m:
            out.setdefault(m["module"], {})[m["ab"]] = p.detach().float().cpu()
    bad = [k for k, v in out.items() if set(v) != {"A", "B"}]
    if bad:
        raise AdapterError(f"LoRA factors without their pair: {bad[:3]}")
    return out


def save_adapter(model: NoteLLM, directory: str | os.PathLike, *, lora_alpha: float, lora_r: int,
                 base: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s LoRA factors (``model.lm`` still PEFT-wrapped), projection and ``[EMB]`` row."""
    from safetensors.torch import save_file

    factors = lora_factors(model.lm)
    if not factors:
        raise AdapterError("the model has no LoRA factors (train with --lora-r > 0)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, ab in sorted(factors.items()):
        tensors[f"{module}.lora_A"] = ab["A"].to(torch.float16).contiguous()
        tensors[f"{module}.lora_B"] = ab["B"].to(torch.float16).contiguous()
    tensors[PROJECTION_KEY] = model.proj.weight.detach().float().cpu().contiguous()
    tensors[EMB_ROW_KEY] = model.lm.get_input_embeddings().weight[model.emb_token_id].detach().float().cpu().clone()
    save_file(tensors, str(d / WEIGHTS_FILE))
    cfg = {
        "format": FORMAT,
        "base": base,
        "base_model_id": model.base_model_id,
        "base_fingerprint": base_fingerprint(model),
        "lora_r": int(lora_r),
        "lora_alpha": float(lora_alpha),
        "scale": float(lora_alpha) / float(lora_r),
        "modules": len(factors),
        "layers": sorted({int(m) for m in re.findall(r"\.layers\.(\d+)\.", " ".join(factors))}),
        "dim": model.dim,
        "prompt": model.prompt_config.to_dict(),
        "max_length": model.max_length,
        "categories": list(model.categories),
        **(extra or {}),
    }
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return d


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{p}: {e}") from e
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{p}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_adapter(directory: str | os.PathLike, *, cache_dir=None, dtype: torch.dtype | None = None) -> NoteLLM:
    """The base named in ``adapter.json`` with the adapter merged into its weights: a plain NoteLLM."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg = read_adapter_config(d)
    tensors = load_file(str(d / WEIGHTS_FILE))
    proj_w = tensors.pop(PROJECTION_KEY, None)
    emb_row = tensors.pop(EMB_ROW_KEY, None)
    if proj_w is None or emb_row is None:
        raise AdapterError(f"{d / WEIGHTS_FILE}: no {PROJECTION_KEY} or {EMB_ROW_KEY}")
    model = NoteLLM.from_base(cfg["base"], dim=int(proj_w.shape[0]), cache_dir=cache_dir,
                              prompt_config=PromptConfig.from_dict(cfg.get("prompt")),
                              max_length=int(cfg.get("max_length", 512)))
    fp = base_fingerprint(model)
    if fp != cfg.get("base_fingerprint"):
        raise AdapterError(f"{d}: trained on a base with fingerprint {cfg.get('base_fingerprint')}, "
                           f"but {cfg['base']!r} here has {fp}: not the same model")
    merge_factors(model.lm, tensors, float(cfg["scale"]))
    model.set_categories(cfg.get("categories") or ())
    with torch.no_grad():
        row = model.lm.get_input_embeddings().weight[model.emb_token_id]
        if row.shape != emb_row.shape or not torch.allclose(row.float(), emb_row, atol=1e-6):
            raise AdapterError(f"{d}: the [EMB] row differs from the one this base gives")
        if tuple(model.proj.weight.shape) != tuple(proj_w.shape):
            raise AdapterError(f"{d}: projection {tuple(proj_w.shape)} for hidden size {model.hidden_size}")
        model.proj.weight.copy_(proj_w.to(model.proj.weight.dtype))
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def merge_factors(lm, tensors: dict[str, torch.Tensor], scale: float) -> int:
    """W += scale * B @ A for every ``<module>.lora_A`` / ``.lora_B`` pair; returns the modules merged."""
    modules = dict(lm.named_modules())
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    for name in names:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        layer = modules.get(name)
        if a is None or b is None:
            raise AdapterError(f"{name}: LoRA factor without its pair")
        if layer is None or not hasattr(layer, "weight"):
            raise AdapterError(f"{name}: no such linear layer in the base model")
        w = layer.weight
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{name}: factors {tuple(b.shape)} @ {tuple(a.shape)} do not fit {tuple(w.shape)}")
        with torch.no_grad():
            w.add_((scale * (b.float() @ a.float())).to(w.dtype))
    return len(names)
