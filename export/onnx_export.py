"""NoteLLM (torch) -> ONNX model package, validated before it reports success.

The package (a directory):

- ``model.onnx`` (+ ``model.onnx.data``): ONE "step" graph serving prefill and greedy decode with one copy
  of the weights.
    inputs   input_ids [B, S] int64, attention_mask [B, P+S] int64 (1 = real token, over past + new),
             past_key_values.{i}.key / .value [B, kv_heads, P, head_dim] (P = 0: prefill)
    outputs  note_vector [B, d] float32 (L2-normalised projection of the LAST position's hidden state),
             logits [B, V] (last position), top_logits / top_ids [B, K] (the K best of those logits,
             K = ``TOP_K`` or V if smaller: greedy decoding reads these and leaves the full logits on the
             device), present.{i}.key / .value [B, kv_heads, P+S, head_dim]
  The 4-D additive attention mask (causal + padding, filled with the dtype's finfo.min) and the position
  ids (cumsum(mask) - 1, the rule Hugging Face generate uses) are computed inside the graph, so left
  padding — or padding in the middle, after a shared cached prefix — just works.
- ``tokenizer.json`` (``tokenizers`` format, [EMB] included)
- ``notellm.json``: the manifest (see :func:`build_manifest`), written only once validation passed.

Export runs torch.onnx.export(dynamo=True) on an unmodified Hugging Face model under a small wrapper.
``dtype="fp16"`` exports the half-precision module; ``quantize="int8"`` rewrites the fp32 graph's MatMuls
with weight-only 8-bit MatMulNBits (block 128), activations stay float.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from export.embed_graph import DEFAULT_ROTARY, EMBED_GRAPH_FILE, EMBED_OUTPUTS, build_embed_graph, embed_inputs
from notellm.model import NoteLLM
from notellm.prompts import EMB_TOKEN, OUTPUT_QUOTE, PROMPT_VERSION

log = logging.getLogger("notellm.export")

MANIFEST_FILE = "notellm.json"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CATEGORIES_FILE = "categories.json"  # the closed category set, when the model has one (part of model_version)
PACKAGE_FORMAT = "notellm-onnx/1"
OPSET = 20
INT8_BLOCK_SIZE = 128
# The next-token candidates the graph returns beside the full logits. Greedy decoding needs one token per
# row: with the K best on the host, a decode step copies B x K values instead of the [B, vocab] fp32 logits
# (100 MB at batch 512 for SmolLM2: 6.6 ms per step on an H200, plus the argmax in numpy). The encoder
# falls back to the full logits for the rare row the K cannot decide (worker.encoder.StepLogits).
TOP_K = 32


GROUPED_ATTENTION = "notellm_grouped_sdpa"


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention the step graph is exported with (a Hugging Face attention implementation): the query
    heads that share a K/V head are stacked along the query axis, [B, H, S, D] -> [B, KV, G*S, D], so the
    graph reads K and V (and the whole past) as they are. Hugging Face's sdpa path expands them to H heads
    first (repeat_kv): on an H200 that `Expand` of the past was the largest generation kernel, 376 ms of a
    call's ~1.4 s of GPU at batch 2048 (docs/results/gpu/README.md, run 6). Same math: query head
    h = kv * G + g reads K/V head kv, as repeat_kv pairs them. The additive mask [B, 1, S, L] is repeated
    for the G rows of each position. Returns ([B, S, H, D], None) like the library's implementations."""
    B, H, S, D = query.shape
    KV, L = key.shape[1], key.shape[2]
    G = H // KV
    q = query.reshape(B, KV, G * S, D)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, None].expand(B, 1, G, S, L).reshape(B, 1, G * S, L)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa)


@contextlib.contextmanager
def grouped_attention(lm: nn.Module):
    """``lm`` runs :func:`grouped_sdpa` inside the block (its own implementation again after it)."""
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(GROUPED_ATTENTION)
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


class StepGraph(nn.Module):
    """The exported wrapper: one decoding step over any number of new tokens with an optional past."""

    def __init__(self, model: NoteLLM):
        super().__init__()
        self.decoder = model.lm.get_decoder()
        self.head = model.lm.get_output_embeddings()
        self.proj = model.proj
        self.num_layers = int(model.lm.config.num_hidden_layers)
        self.cache_kwarg = cache_kwarg(self.decoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers.cache_utils import DynamicCache

        S = input_ids.shape[1]
        L = attention_mask.shape[1]
        P = L - S
        dtype = self.proj.weight.dtype
        mask = attention_mask.to(torch.int64)
        pos = mask.cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 1)
        position_ids = pos[:, P:]
        q_idx = torch.arange(S, device=input_ids.device) + P
        k_idx = torch.arange(L, device=input_ids.device)
        causal = k_idx[None, :] <= q_idx[:, None]  # [S, L]
        allowed = causal[None, None, :, :] & (mask[:, None, None, :] > 0)  # [B, 1, S, L]
        zero = torch.zeros((), dtype=dtype, device=input_ids.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=input_ids.device)
        mask4d = torch.where(allowed, zero, neg)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.decoder(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids,
                           use_cache=True, **{self.cache_kwarg: cache})
        last = out.last_hidden_state[:, -1, :]
        logits = self.head(last).float()
        top_logits, top_ids = torch.topk(logits, min(TOP_K, int(self.head.out_features)), dim=-1)
        vec = F.normalize(self.proj(last).float(), dim=-1)
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (vec, logits, top_logits, top_ids, *presents)


def cache_kwarg(decoder: nn.Module) -> str:
    """The decoder's keyword for a KV cache: ``cache`` (transformers >= 5.2x, where ``past_key_values`` is a
    deprecated alias) or ``past_key_values`` (earlier 5.x, which silently ignores an unknown ``cache=``
    and would start from an empty cache)."""
    import inspect

    params = inspect.signature(decoder.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(decoder).__name__}.forward takes neither cache nor past_key_values")


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["note_vector", "logits", "top_logits", "top_ids"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _kv_geometry(model: NoteLLM) -> tuple[int, int, int]:
    cfg = model.lm.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers), kv, head_dim


def export_step_graph(model: NoteLLM, path: Path, *, dtype: str = "fp32", grouped: bool = True) -> list[str]:
    """Export the step graph of ``model`` to ``path`` (external weight data next to it). ``grouped``: with
    :func:`grouped_sdpa`, K/V heads read in place (the default); False: Hugging Face's sdpa (K/V expanded
    to every query head), kept to measure one against the other."""
    from torch.export import Dim

    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    layers, kv_heads, head_dim = _kv_geometry(model)
    m = model
    if tdtype != next(model.parameters()).dtype:
        import copy

        m = copy.deepcopy(model).to(tdtype)
    wrapper = StepGraph(m).eval()
    # Example sizes that are neither 0 nor 1, so the exporter keeps every axis symbolic.
    B, S, P = 3, 5, 7
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.lm.config.vocab_size, (B, S), generator=gen)
    attention_mask = torch.ones((B, P + S), dtype=torch.int64)
    attention_mask[0, :2] = 0
    past = [torch.randn(B, kv_heads, P, head_dim, generator=gen).to(tdtype) for _ in range(2 * layers)]
    # Named dims, one per axis meaning, shared by every tensor that has it: with Dim.DYNAMIC on each past
    # tensor, torch 2.11's export gave each layer's past key and past value its own length symbol; the
    # attention's key and value then differ in the graph's shapes and onnxscript's attention fusion
    # (fuse_for_ort) refuses to match. `past` may be 0 (the prefill); 0 is not an example size here.
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    kv_shape = {0: batch, 2: past_len}
    # *past is one varargs group for torch.export.
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, tuple(kv_shape for _ in past))
    in_names, out_names = io_names(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention = grouped_attention(m.lm) if grouped else contextlib.nullcontext()
    with torch.no_grad(), attention, _heartbeat(f"exporting {dtype} step graph"), warnings.catch_warnings():
        # the exporter notes that a named dim shared by several inputs keeps one name: that is the intent
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        program = torch.onnx.export(
            wrapper, (input_ids, attention_mask, *past), dynamo=True, input_names=in_names,
            output_names=out_names, dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True,
            external_data=True, verbose=False,
        )
    with _heartbeat("saving graph"):
        program.save(str(path), external_data=True)
    return _graph_files(path)


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float = 20.0):
    """Log '<what>: still running (Ns)' every ``every_s`` seconds while the block runs."""
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            log.info("%s: still running (%.0fs)", what, time.perf_counter() - t0)

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        log.info("%s: done in %.1fs", what, time.perf_counter() - t0)


def _graph_files(path: Path) -> list[str]:
    files = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data.name)
    return files


def quantize_int8(src: Path, dst: Path, *, block_size: int = INT8_BLOCK_SIZE) -> list[str]:
    """Weight-only 8-bit MatMulNBits (symmetric, per block of ``block_size`` input rows)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src), load_external_data=True)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    with _heartbeat("int8 quantisation"):
        q.process()
    out = q.model.model
    n = sum(1 for node in out.graph.node if node.op_type == "MatMulNBits")
    log.info("int8: %d MatMul nodes now MatMulNBits (bits=8, block=%d)", n, block_size)
    if n == 0:
        raise RuntimeError("int8 quantisation rewrote no MatMul")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return _graph_files(dst)


def fuse_for_ort(path: Path) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxscript's fusions for ONNX Runtime (made for dynamo
    exports): (skip) RMS normalisation, rotary embedding and attention as com.microsoft contrib ops, which
    both the CPU and the CUDA execution providers run. Returns {fusion: count} of those applied; raises
    RuntimeError when nothing fused (the export's patterns changed: a fused package would be the plain one).
    Measured: ~1.0x on 2 CPU cores; on an H200 (fp16, batch 512, runs 3-4 in docs/results/gpu/README.md)
    1.5x the plain graph's embed-only notes/s (30 MultiHeadAttention + the norms), but 0.5-1.06x with
    generation (cuDNN attention per decode shape): use it for embed-only deployments."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _heartbeat("fusing for ONNX Runtime"):
        model = ir.load(str(path))
        model, counts = optimize_for_ort(model)
    applied = {k: int(v) for k, v in counts.items() if v}
    if not applied:
        raise RuntimeError("onnxscript's ORT fusions matched nothing in this graph")
    # Written beside, under the same file names (the graph names its weight file), then moved over the
    # originals: the loaded model may still read weights from the original data file while it saves.
    tmp = path.parent / "_fused"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ir.save(model, str(tmp / path.name), external_data=path.name + ".data")
    del model
    for f in tmp.iterdir():
        os.replace(f, path.parent / f.name)
    tmp.rmdir()
    log.info("fused for ONNX Runtime: %s", applied)
    return applied


def hashed_files(graph_files: list[str], *, categories: bool, embed_files: Sequence[str] = ()) -> list[str]:
    """The package files its model_version is the content hash of: the graph, the embed graph when the
    package has one, the tokenizer, the category set when the model has one."""
    return [*graph_files, *embed_files, TOKENIZER_FILE] + ([CATEGORIES_FILE] if categories else [])


def embed_graph_spec(embed_files: Sequence[str], rotary: str, layers: int) -> dict[str, Any] | None:
    """The manifest's ``embed_graph`` entry for the embed-only graph's files (export.embed_graph), or None.
    ``layers``: the model's, for a variant that takes the instruction's KV per layer (export.embed_graph.
    embed_inputs)."""
    if not embed_files:
        return None
    return {"graph": embed_files[0], "files": list(embed_files), "inputs": embed_inputs(rotary, layers),
            "outputs": EMBED_OUTPUTS, "rotary": rotary}


def manifest_hashed_files(manifest: dict[str, Any]) -> list[str]:
    """:func:`hashed_files` of a written package, from its manifest."""
    return hashed_files(list(manifest["graph_files"]), categories=bool(manifest.get("categories")),
                        embed_files=list((manifest.get("embed_graph") or {}).get("files") or ()))


def content_hash(directory: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256-" + h.hexdigest()[:16]


def rehash_package(directory: Path, **changes: Any) -> dict[str, Any]:
    """Apply ``changes`` to the manifest of the package in ``directory`` after its files were changed in
    place (a fused graph, an added embed graph), recompute its model_version over
    :func:`manifest_hashed_files` and drop its validation (the caller validates again). Returns the manifest."""
    path = Path(directory) / MANIFEST_FILE
    manifest = {**json.loads(path.read_text()), **changes}
    manifest.update(model_version=content_hash(Path(directory), manifest_hashed_files(manifest)), validation=None)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def max_prompt_tokens(model: NoteLLM) -> int:
    """A prompt's length with every field at its token cap (+16 margin): the shape the encoder warms up
    with. Not a hard limit: JSON escaping of quote-heavy text can make a truncated field re-tokenise to
    more tokens; the graph accepts any length."""
    from notellm.prompts import NoteText

    cfg = model.prompt_config
    word = " note"  # one token that never merges with its neighbours
    note = NoteText(title=word * cfg.max_title_tokens, content=word * cfg.max_content_tokens,
                    topic=word * cfg.max_topic_tokens)
    n = max(len(model.prompts.encode(note, t).input_ids) for t in ("category", "hashtags"))
    return n + 16


def build_manifest(model: NoteLLM, *, dtype: str, quantization: str | None, graph_files: list[str],
                   model_version: str, validation: dict[str, Any] | None = None,
                   fusions: dict[str, int] | None = None, embed_files: Sequence[str] = (),
                   embed_rotary: str = "gqa", grouped: bool = True) -> dict[str, Any]:
    layers, kv_heads, head_dim = _kv_geometry(model)
    in_names, out_names = io_names(layers)
    tok = model.tokenizer
    quote_ids = sorted(i for t, i in tok.get_vocab().items() if OUTPUT_QUOTE in t)
    return {
        "format": PACKAGE_FORMAT,
        "model_version": model_version,
        "dim": model.dim,
        "prompt_version": PROMPT_VERSION,
        "prompt": model.prompt_config.to_dict(),
        "base_model_id": model.base_model_id,
        "graph": graph_files[0],
        "graph_files": graph_files,
        "step_attention": "grouped_sdpa" if grouped else "sdpa",  # K/V heads read in place, or expanded
        "embed_graph": embed_graph_spec(embed_files, embed_rotary, layers),
        "tokenizer": TOKENIZER_FILE,
        "categories": CATEGORIES_FILE if model.categories else None,
        "dtype": dtype,
        "kv_dtype": "float16" if dtype == "fp16" else "float32",
        "quantization": quantization,
        "fusions": fusions,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(model.lm.config.vocab_size),
        "top_k": min(TOP_K, int(model.lm.get_output_embeddings().out_features)),
        "special_tokens": {
            "emb": {"token": EMB_TOKEN, "id": model.emb_token_id},
            "eos": {"token": tok.eos_token, "id": model.eos_token_id},
            "pad": {"token": tok.pad_token, "id": model.pad_token_id},
        },
        "stop_token_ids": [model.eos_token_id],
        "quote_token_count": len(quote_ids),
        "max_lengths": {
            "title_tokens": model.prompt_config.max_title_tokens,
            "topic_tokens": model.prompt_config.max_topic_tokens,
            "content_tokens": model.prompt_config.max_content_tokens,
            "prompt_tokens": max_prompt_tokens(model),
            "model_tokens": model.max_length,
        },
        "inputs": in_names,
        "outputs": out_names,
        "exported_with": {"torch": torch.__version__, "opset": OPSET},
        "validation": validation,
    }


def load_for_export(model_arg: str, *, cache_dir=None, seed: int = 0, dim: int = 128) -> NoteLLM:
    """A saved NoteLLM directory; an adapter directory (``notellm.adapter``: merged onto the base it names);
    or a base model name ("smollm2", "tiny") / HF dir -> untrained NoteLLM with a seeded projection."""
    from notellm.adapter import is_adapter_dir, load_adapter

    p = Path(model_arg)
    if (p / "notellm.json").exists() and (p / "projection.safetensors").exists():
        return NoteLLM.load(p).eval()
    if is_adapter_dir(p):
        return load_adapter(p, cache_dir=cache_dir)
    return NoteLLM.from_base(model_arg, dim=dim, seed=seed, cache_dir=cache_dir).eval()


class ValidationFailed(RuntimeError):
    def __init__(self, report: dict[str, Any]):
        super().__init__("validation failed: " + json.dumps(report.get("failures")))
        self.report = report


def export_package(model: NoteLLM, out_dir: str | os.PathLike, *, dtype: str = "fp32",
                   quantize: str | None = None, fuse: bool = False, embed_graph: bool | str = False,
                   validate: bool = True, notes=None, grouped: bool = True) -> dict[str, Any]:
    """Write a validated package to ``out_dir``. Builds in ``<out>.partial``; on success that folder
    replaces ``out_dir``; on a failed validation it stays for inspection and ValidationFailed is raised.
    ``fuse``: apply ONNX Runtime's fusions to the graph (:func:`fuse_for_ort`) before it is hashed and
    validated. ``embed_graph``: add the hand-built embed-only graph (:mod:`export.embed_graph`; True or
    "gqa": rotary inside GroupQueryAttention, "op": as RotaryEmbedding ops, "mha": causal MultiHeadAttention
    over K/V expanded to the query heads, "mha-prefix": that with the instruction's KV as inputs;
    export.embed_graph.ROTARY), which the encoder's embed-only
    path runs on CUDA (and validation checks). ``grouped``: see :func:`export_step_graph`. Returns the
    manifest."""
    if dtype not in ("fp32", "fp16"):
        raise ValueError("dtype must be fp32 or fp16")
    if quantize not in (None, "int8"):
        raise ValueError("quantize must be None or 'int8'")
    if quantize and dtype != "fp32":
        raise ValueError("int8 quantisation starts from the fp32 graph (use --dtype fp32)")
    if fuse and quantize:
        raise ValueError("fusions apply to fp32 and fp16 graphs, not to an int8-quantised one")
    if embed_graph and quantize:
        raise ValueError("the embed graph is built in fp32 or fp16, not int8")
    out = Path(out_dir)
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    model = model.eval()
    t0 = time.perf_counter()
    if quantize:
        fp32_dir = stage / "_fp32"
        log.info("exporting fp32 step graph (dynamo) ...")
        export_step_graph(model, fp32_dir / GRAPH_FILE, dtype="fp32", grouped=grouped)
        log.info("fp32 graph exported in %.1fs; quantising", time.perf_counter() - t0)
        files = quantize_int8(fp32_dir / GRAPH_FILE, stage / GRAPH_FILE)
        shutil.rmtree(fp32_dir)
    else:
        log.info("exporting %s step graph (dynamo) ...", dtype)
        files = export_step_graph(model, stage / GRAPH_FILE, dtype=dtype, grouped=grouped)
    log.info("graph written in %.1fs: %s", time.perf_counter() - t0, files)
    fusions = fuse_for_ort(stage / GRAPH_FILE) if fuse else None
    rotary = embed_graph if isinstance(embed_graph, str) else DEFAULT_ROTARY
    embed_files = build_embed_graph(model, stage / EMBED_GRAPH_FILE, dtype=dtype, rotary=rotary) if embed_graph else []
    model.tokenizer.backend_tokenizer.save(str(stage / TOKENIZER_FILE))
    if model.categories:
        (stage / CATEGORIES_FILE).write_text(json.dumps(list(model.categories), ensure_ascii=False, indent=1) + "\n")
    version = content_hash(stage, hashed_files(files, categories=bool(model.categories), embed_files=embed_files))
    manifest = build_manifest(model, dtype=dtype, quantization=quantize, graph_files=files,
                              model_version=version, fusions=fusions, embed_files=embed_files,
                              embed_rotary=rotary, grouped=grouped)
    (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if validate:
        from export.validate import validate_package

        log.info("validating against torch ...")
        t1 = time.perf_counter()
        report = validate_package(model, stage, notes=notes)
        log.info("validation %s in %.1fs: %s", "passed" if report["passed"] else "FAILED",
                 time.perf_counter() - t1, json.dumps(report["metrics"]))
        manifest["validation"] = report
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if not report["passed"]:
            raise ValidationFailed(report)
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    log.info("package ready at %s (model_version %s, %.1fs total)", out, version, time.perf_counter() - t0)
    return manifest
