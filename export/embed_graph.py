"""The embed graph: a hand-built ONNX graph of a Llama-family NoteLLM for embed-only encoding, made of
ONNX Runtime's fused contrib ops, written beside the step graph when a package asks for it.

    inputs   input_ids [B, S] int64: whole prompts (instruction + note segment), RIGHT-padded
             lengths   [B] int64: each row's real tokens (1..S)
             ("mha-prefix" only: input_ids/lengths are the note segments alone, and
             prefix.{i}.key / prefix.{i}.value [1, kv_heads, P, head_dim] are the instruction's KV per layer)
    outputs  note_vector [B, d] float32: L2-normalised projection of the hidden state at lengths - 1

Why it exists (docs/results/gpu/README.md, run 4): the exported step graph, even after onnxscript's
fusions, spends its GPU time on what a hand-built graph does not need: an `Expand` of every K/V to the 9
query heads (GQA's repeat_kv), rotary as Mul/Neg/Split/Concat, SiLU and x up as separate kernels, the
transposes around attention, and a 4-D additive mask built per call. Here each layer is

    SkipSimplifiedLayerNorm -> MatMul (packed QKV) -> GroupQueryAttention (rotary inside, K/V heads read
    in place) -> MatMul -> SkipSimplifiedLayerNorm -> MatMul x2 -> QuickGelu(alpha=1) = SiLU -> Mul -> MatMul

about 10 nodes a layer (the "gqa" variant). Two variants measure other attention forms (``rotary``,
:data:`ROTARY`): "op" (Q/K/V MatMuls, rotary as com.microsoft.RotaryEmbedding, GroupQueryAttention without
rotary) and "mha" (no GroupQueryAttention: RotaryEmbedding in onnxscript's fused form, K/V expanded to the
query heads, causal MultiHeadAttention without mask or past; 27 nodes a layer, 825 for SmolLM2). The price:
ORT's GroupQueryAttention takes a batch with padding only on the right and, for a batch of more than one
row, no past (a "first prompt"), so the task's instruction is computed for every row instead of once (the
step graph's shared prefix): ~24 of SmolLM2's ~110 prompt tokens; "mha" has no past either. "mha-prefix"
takes the instruction's KV as inputs (MultiHeadAttention's past) and computes only the note segments;
"mha-prefix-fold" is that with rotary as a second Q/K projection (rotate-half folded into the weights) and
q * cos + q_rot * sin as elementwise ops, instead of RotaryEmbedding between two transposes.
Causal attention makes right padding exact: no real token sees a pad.

The graph is built from the torch module's own weights (packed QKV and the rotary tables computed by the
model's rotary module), and the package is validated against torch like the step graph (the encoder's
embed-only path runs this graph on CUDA when the package has one). GroupQueryAttention runs on CUDA in
fp16/bf16 and on the CPU in fp32/fp16.

Measured (H200, fp16, run 7): 6,358 notes/s at batch 2048 against 6,304 for the fused step graph and 4,372
for torch eager, with 313 nodes against 1,502; on 2 CPU cores it is 0.85x the step graph, whose shared
prefix saves more there, so the encoder uses it on CUDA only. "mha-prefix" on 2 CPU cores (SmolLM2 fp32):
1.26-1.27x "mha", 0.99-1.11x the step graph; on the H200 (run 9, batch 2048) 8,792 notes/s against 8,451
for "gqa" and 8,054 for "mha". "mha-prefix-fold" on 2 CPU cores (SmolLM2 fp32, 64 MIND notes, interleaved
beside "mha-prefix"): 0.86x at batch 8, 0.98x at 32 (the CPU's RotaryEmbedding is not the bottleneck the
CUDA kernel is, and the second projection is more matmul work); not yet measured on a GPU.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

EMBED_GRAPH_FILE = "embed.onnx"
EMBED_INPUTS = ["input_ids", "lengths"]
EMBED_OUTPUTS = ["note_vector"]
OPSET = 20
# Pinned, not the installed onnx's newest: onnx 1.2x writes IR 14 by default, which ONNX Runtime 1.31 (the
# device image's onnxruntime-gpu) refuses to load ("max supported IR version: 13"). 10 is what the step
# graph's exporter writes for opset 20.
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"


def unsupported(model) -> str | None:
    """Why ``model`` cannot have an embed graph, or None. The graph is the Llama block (RMS norms, SiLU
    gated MLP without biases, rotary over the whole head in rotate-half layout)."""
    cfg = model.lm.config
    if getattr(cfg, "model_type", None) not in ("llama",):
        return f"model_type {getattr(cfg, 'model_type', None)!r} (the embed graph is built for llama)"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if heads % kv or head_dim % 16:
        return f"heads {heads}/{kv} with head_dim {head_dim} (GroupQueryAttention's rotary needs head_dim % 16 == 0)"
    if model.proj.bias is not None:
        return "a projection with a bias"
    return None


def rotary_tables(model, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [positions, head_dim / 2] float32 from the model's own rotary module (its scaling and
    attention factor included). Raises if the tables are not the rotate-half layout (two equal halves)."""
    rot = model.lm.get_decoder().rotary_emb
    ref = next(model.parameters())
    x = torch.zeros(1, dtype=torch.float32, device=ref.device)
    pos = torch.arange(positions, device=ref.device)[None, :]
    with torch.no_grad():
        cos, sin = rot(x, pos)
    cos, sin = cos[0].float().cpu().numpy(), sin[0].float().cpu().numpy()
    half = cos.shape[-1] // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise ValueError("the model's rotary tables are not in rotate-half layout")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


ROTARY = ("gqa", "op", "mha", "mha-prefix", "mha-prefix-fold")
# `notellm export --embed-graph` without a variant: the fastest measured, embed-only on an H200 (run 9, batch
# 2048: 8,792 notes/s against 8,451 for gqa and 8,054 for mha) and on the CPU (10.3 vs 8.3 notes/s, batch 8).
DEFAULT_ROTARY = "mha-prefix"
# Variants that take the task instruction's KV cache as inputs (``prefix.{i}.key`` / ``.value``) instead of
# computing the instruction for every row: input_ids then hold only the note segments.
PREFIX_VARIANTS = ("mha-prefix", "mha-prefix-fold")
# Variants that rotate Q and K without RotaryEmbedding: rotate-half folded into a second projection's weights,
# then q * cos + q_rotated * sin as three elementwise ops over the [B, S, heads * head_dim] layout.
FOLD_VARIANTS = ("mha-prefix-fold",)
assert set(FOLD_VARIANTS) <= set(PREFIX_VARIANTS)  # the folded tables are sliced from the prefix's length


def rotate_half_columns(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """``w`` [in, heads * head_dim] (a projection as MatMul(x, w)) -> the weights whose output is HF's
    rotate_half of that projection's, head by head: (x @ w') = concat(-q[half:], q[:half]) per head. A
    negation and a permutation of columns, so exact in any dtype."""
    half = head_dim // 2
    r = w.reshape(w.shape[0], heads, 2, half)
    return np.ascontiguousarray(np.concatenate([-r[:, :, 1], r[:, :, 0]], axis=2).reshape(w.shape))


def rotary_rows(cos: np.ndarray, sin: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The half tables [positions, head_dim / 2] -> [positions, heads * head_dim]: each position's row as the
    rotate-half layout wants it (both halves the same), repeated for every head, to multiply a projection's
    [B, S, heads * head_dim] output position by position."""
    return tuple(np.ascontiguousarray(np.tile(np.concatenate([t, t], axis=1), (1, heads))) for t in (cos, sin))


def embed_inputs(rotary: str, layers: int) -> list[str]:
    """The embed graph's input names: ``EMBED_INPUTS``, then for a prefix variant the instruction's KV per
    layer, [1, kv_heads, P, head_dim] in the package's KV dtype (the step graph's present for the instruction
    alone, as the encoder's shared prefix keeps it)."""
    names = list(EMBED_INPUTS)
    if rotary in PREFIX_VARIANTS:
        for i in range(layers):
            names += [f"prefix.{i}.key", f"prefix.{i}.value"]
    return names


def build_embed_graph(model, path: Path, *, dtype: str = "fp32", rotary: str = "gqa") -> list[str]:
    """Write the embed graph of ``model`` to ``path`` (weights in ``<path>.data``); returns its files.

    ``rotary``: "gqa" - one packed QKV MatMul, rotary applied inside GroupQueryAttention (do_rotary=1);
    "op" - Q, K and V MatMuls, rotary as com.microsoft.RotaryEmbedding on Q and K, GroupQueryAttention
    with do_rotary=0. On an H200 (run 7) the "gqa" form spends 84 of its 295 GPU ms per 2,048 notes in ORT's
    GQA prologue (UnpackRoPEAppend: unpack, rotate and append every head of every token, one small block
    each); "op" is the variant to measure against it (the prologue then has no Q to unpack or rotate). On ORT
    1.31.1's CUDA provider "op" crashed the process (SIGSEGV, run 8; RotaryEmbedding with a [1] position or GQA
    with separate Q/K/V and no past).

    "mha" - no GroupQueryAttention: Q, K and V MatMuls; rotary as com.microsoft.RotaryEmbedding in the form
    onnxscript's ORT fusion (cos_sin_cache.py) writes: input 4-D [B, heads, S, head_dim] (a Transpose each
    side), position_ids [B, S] int64 (here Range(0, S) expanded to every row), cos/sin [positions,
    head_dim / 2], interleaved=0, num_heads (the form run 1's fused fp32 step graph ran, 60 of them, on ORT
    1.31.1's CUDA provider; the later fp16 fusions matched no cos/sin cache and kept rotary unfused); K and V expanded from the KV heads to the query heads (HF's
    repeat_kv order: query head j reads KV head j // group) as [B, S, heads * head_dim]; then
    com.microsoft.MultiHeadAttention(q, k, v) with unidirectional=1 and no mask: causal attention makes the
    right padding exact, and the pads' rows are never read. ORT's CUDA MultiHeadAttention
    (contrib_ops/cuda/bert/multihead_attention.cc, main) accepts unidirectional and hands it to flash
    attention as is_causal: in fp16 with head_dim 64, no mask, attention bias or past, on sm >= 80 (H100/H200)
    it picks flash attention (checked first; cuDNN SDPA only when enabled by ORT_ENABLE_CUDNN_FLASH_ATTENTION
    or sdpa_kernel, and the TensorRT fused runner is skipped when unidirectional); fp32 gets no flash: the
    cutlass memory-efficient kernel from 256 tokens (ORT_MIN_SEQ_LEN_EFFICIENT_ATTENTION_FP32), else unfused.
    ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 prints the kernel chosen.

    "mha-prefix" - "mha" without the instruction: the task's instruction (~24 of SmolLM2's ~110 prompt tokens,
    the same for every note) comes in as its KV cache (``prefix.{i}.key`` / ``.value`` [1, kv, P, head_dim],
    :func:`embed_inputs`), broadcast to the batch and the query heads in the graph and given to
    MultiHeadAttention as past_key / past_value (with present_key / present_value outputs, which ORT's CUDA
    kernel requires beside a past); input_ids and lengths are the note segments alone, at positions P... Causal
    attention with a past is aligned to the end (query i sees keys 0..P+i), which keeps right padding exact.
    ORT's CUDA MultiHeadAttention still picks flash attention with a past (only past_sequence_length, cache
    indirection, a mask or attention bias rule it out); the concatenation of past and new K/V is one copy per
    layer, against ~20 % fewer tokens through every MatMul, norm and activation.

    "mha-prefix-fold" - "mha-prefix" without RotaryEmbedding and the transposes around it. On the H200 (run
    9, per 2,048 notes) that op took 41 of the graph's 212 kernel ms and the transposes 12: its CUDA kernel
    gives every (row, position, head) a block of 64 threads, one element each, so it runs at a small part
    of the memory bandwidth. Here rotate_half(x @ W) = x @ rotate_half_columns(W) is a second projection
    (Q: 576 x 576, K: 576 x 192, about 13 % more matmul work), and q * cos + q_rot * sin three broadcast
    elementwise ops over [B, S, heads * head_dim] with the tables' rows for positions P..P+S-1 (every row's
    positions are the same: right padding). Estimated from run 9's kernel rates (its matmuls ~290 TFLOP/s,
    its elementwise ops ~1.5 TB/s), not measured: ~25 ms instead of ~53 per 2,048 notes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    why = unsupported(model)
    if why:
        raise ValueError(f"no embed graph for this model: {why}")
    if dtype not in ("fp32", "fp16"):
        raise ValueError("dtype must be fp32 or fp16")
    if rotary not in ROTARY:
        raise ValueError(f"rotary must be one of {ROTARY}")
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    cfg = model.lm.config
    dec = model.lm.get_decoder()
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    eps = float(cfg.rms_norm_eps)
    scale = float(getattr(dec.layers[0].self_attn, "scaling", 1.0 / math.sqrt(head_dim)))

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, t) -> str:
        a = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a.astype(np_dtype)), name))
        return name

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def node(op: str, ins: list[str], outs: list[str], *, domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outs

    def linear_t(layer) -> np.ndarray:  # [out, in] -> [in, out] for MatMul(x, W)
        return layer.weight.detach().float().cpu().numpy().T

    prefix = rotary in PREFIX_VARIANTS
    fold = rotary in FOLD_VARIANTS
    mha = rotary.startswith("mha")
    one = const("one_i64", np.array(1, dtype=np.int64))
    (last,) = node("Sub", ["lengths", one], ["last_index"])
    if not mha:
        # per-row lengths -> GroupQueryAttention's seqlens_k (total length - 1, int32); S as its total length
        (seqlens_k,) = node("Cast", [last], ["seqlens_k"], to=TensorProto.INT32)
        (seq_len,) = node("Shape", ["input_ids"], ["seq_len"], start=1, end=2)
        (total,) = node("Cast", [seq_len], ["total_seq_len"], to=TensorProto.INT32)
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or model.max_length)
    cos, sin = rotary_tables(model, max_pos)
    if not fold:
        cos_name, sin_name = weight("rotary_cos", cos), weight("rotary_sin", sin)
    if rotary == "op":  # RotaryEmbedding's position_ids as one start position: every row starts at 0
        start_pos = const("rotary_start", np.array([0], dtype=np.int64))
    if mha:
        # position_ids [B, S] as onnxscript's fused graphs pass them: 0..S-1 in every row (right padding), or
        # P..P+S-1 after a prefix of P tokens
        if not fold:
            (ids_shape,) = node("Shape", ["input_ids"], ["ids_shape"])
            (s_scalar,) = node("Gather", [ids_shape, one], ["seq_len_scalar"], axis=0)
        if not prefix:
            start = const("zero_i64", np.array(0, dtype=np.int64))
        else:
            (p_1d,) = node("Shape", ["prefix.0.key"], ["prefix_len_1d"], start=2, end=3)
            if not fold:
                (start,) = node("Squeeze", [p_1d, const("axis0_sq", np.array([0], dtype=np.int64))], ["prefix_len"])
                (s_scalar,) = node("Add", [start, s_scalar], ["positions_end"])
            (batch_1d,) = node("Shape", ["input_ids"], ["batch_1d"], start=0, end=1)
            # [1, kv, P, H] -> [1, kv, 1, P, H] -> [B, kv, group, P, H] -> [B, heads, P, H] (HF's repeat_kv order)
            prefix_shape = const("shape_1n1ph", np.array([1, kv, 1, -1, head_dim], dtype=np.int64))
            (prefix_rep,) = node("Concat", [batch_1d, const("prefix_rep_tail", np.array(
                [kv, heads // kv, 1, 1], dtype=np.int64))], ["prefix_rep"], axis=0)
            (prefix_bnph,) = node("Concat", [batch_1d, const("prefix_bnph_tail", np.array(
                [heads, -1, head_dim], dtype=np.int64))], ["prefix_bnph"], axis=0)
        if fold:
            # the rows of positions P..P+S-1 of the [positions, heads * head_dim] tables, the same for every
            # batch row (right padding); K's are the first kv * head_dim columns (every head's row is the same)
            (s_1d,) = node("Shape", ["input_ids"], ["seq_len_1d"], start=1, end=2)
            (end_1d,) = node("Add", [p_1d, s_1d], ["positions_end_1d"])
            zero_1d = const("zero_1d", np.array([0], dtype=np.int64))
            one_1d = const("one_1d", np.array([1], dtype=np.int64))
            kv_cols = const("kv_cols", np.array([kv * head_dim], dtype=np.int64))
            q_rows, k_rows = [], []  # (cos, sin) for Q's heads and K's
            for t, table in zip(("cos", "sin"), rotary_rows(cos, sin, heads)):
                (q_row,) = node("Slice", [weight(f"rotary_{t}_rows", table), p_1d, end_1d, zero_1d], [f"rotary_{t}_q"])
                q_rows.append(q_row)
                k_rows.append(node("Slice", [q_row, zero_1d, kv_cols, one_1d], [f"rotary_{t}_k"])[0])
        else:
            (pos_1d,) = node("Range", [start, s_scalar, one], ["positions"])
            (pos_row,) = node("Unsqueeze", [pos_1d, const("axis0", np.array([0], dtype=np.int64))], ["positions_row"])
            (position_ids,) = node("Expand", [pos_row, ids_shape], ["position_ids"])
        group = heads // kv
        if not fold:
            bsnh_q = const("shape_bsnh_q", np.array([0, 0, heads, head_dim], dtype=np.int64))
            bsnh_kv = const("shape_bsnh_kv", np.array([0, 0, kv, head_dim], dtype=np.int64))
        bsn1h_kv = const("shape_bsn1h_kv", np.array([0, 0, kv, 1, head_dim], dtype=np.int64))
        rep_kv = const("repeat_kv", np.array([1, 1, 1, group, 1], dtype=np.int64))
        bsd = const("shape_bsd", np.array([0, 0, heads * head_dim], dtype=np.int64))

    def rope_bnsh(x: str, n: int, name: str) -> str:
        """[B, S, n * head_dim] -> RotaryEmbedding on [B, n, S, head_dim] -> [B, S, n, head_dim]."""
        (x,) = node("Reshape", [x, bsnh_q if n == heads else bsnh_kv], [f"{name}_bsnh"])
        (x,) = node("Transpose", [x], [f"{name}_bnsh"], perm=[0, 2, 1, 3])
        (x,) = node("RotaryEmbedding", [x, position_ids, cos_name, sin_name], [f"{name}_rot"], domain=MS_DOMAIN,
                    interleaved=0, num_heads=n)
        (x,) = node("Transpose", [x], [f"{name}_rot_bsnh"], perm=[0, 2, 1, 3])
        return x

    def rope_folded(x: str, w: np.ndarray, n: int, rows: list[str], name: str) -> str:
        """x @ w rotated as HF's apply_rotary_pos_emb does, without RotaryEmbedding: q * cos + rotate_half(q)
        * sin, with rotate_half(q) = x @ rotate_half_columns(w) (a second MatMul instead of a kernel that
        gives each (row, position, head) its own 64-thread block: ORT's RotaryEmbedding, 41 of 212 kernel ms
        per 2,048 notes on the H200, run 9) and no transposes around it. [B, S, n * head_dim] throughout;
        `rows` are the (cos, sin) rows of the call's positions for n heads."""
        (q,) = node("MatMul", [x, weight(name, w)], [f"{name}_out"])
        (qr,) = node("MatMul", [x, weight(f"{name}_rot", rotate_half_columns(w, n, head_dim))], [f"{name}_rot_out"])
        (qc,) = node("Mul", [q, rows[0]], [f"{name}_cos"])
        (qs,) = node("Mul", [qr, rows[1]], [f"{name}_sin"])
        (y,) = node("Add", [qc, qs], [f"{name}_roped"])
        return y

    def repeat_kv(x: str, name: str) -> str:
        """[B, S, kv, head_dim] (or [B, S, kv * head_dim]) -> [B, S, heads * head_dim], query head j reading KV
        head j // group (HF's repeat_kv)."""
        (x,) = node("Reshape", [x, bsn1h_kv], [f"{name}_bsn1h"])
        (x,) = node("Expand", [x, rep_kv], [f"{name}_bsngh"])
        (x,) = node("Reshape", [x, bsd], [f"{name}_rep"])
        return x

    def prefix_past(x: str) -> str:
        """prefix.{i}.key / .value [1, kv, P, head_dim] -> [B, heads, P, head_dim] (a past for every row)."""
        (y,) = node("Reshape", [x, prefix_shape], [f"{x}_1n1ph"])
        (y,) = node("Expand", [y, prefix_rep], [f"{x}_bngph"])
        (y,) = node("Reshape", [y, prefix_bnph], [f"{x}_past"])
        return y

    (h,) = node("Gather", [weight("embed_tokens", dec.embed_tokens.weight), "input_ids"], ["h0"], axis=0)
    residual = h
    delta: str | None = None
    for i, layer in enumerate(dec.layers):
        attn, mlp = layer.self_attn, layer.mlp
        g1 = weight(f"l{i}.input_norm", layer.input_layernorm.weight)
        if delta is None:
            (x,) = node("SimplifiedLayerNormalization", [residual, g1], [f"l{i}.x"], axis=-1, epsilon=eps,
                        stash_type=1)
        else:
            x, _, _, residual = node("SkipSimplifiedLayerNormalization", [delta, residual, g1],
                                     [f"l{i}.x", "", "", f"l{i}.resid"], domain=MS_DOMAIN, epsilon=eps)
        if rotary == "gqa":
            qkv_w = np.concatenate([linear_t(attn.q_proj), linear_t(attn.k_proj), linear_t(attn.v_proj)], axis=1)
            (qkv,) = node("MatMul", [x, weight(f"l{i}.qkv", qkv_w)], [f"l{i}.qkv_out"])
            gqa_in = [qkv, "", "", "", "", seqlens_k, total, cos_name, sin_name]
        elif fold:
            q = rope_folded(x, linear_t(attn.q_proj), heads, q_rows, f"l{i}.q")
            k = rope_folded(x, linear_t(attn.k_proj), kv, k_rows, f"l{i}.k")
            (v,) = node("MatMul", [x, weight(f"l{i}.v", linear_t(attn.v_proj))], [f"l{i}.v_out"])
        else:
            (q,) = node("MatMul", [x, weight(f"l{i}.q", linear_t(attn.q_proj))], [f"l{i}.q_out"])
            (k,) = node("MatMul", [x, weight(f"l{i}.k", linear_t(attn.k_proj))], [f"l{i}.k_out"])
            (v,) = node("MatMul", [x, weight(f"l{i}.v", linear_t(attn.v_proj))], [f"l{i}.v_out"])
        if mha:
            if not fold:
                (q,) = node("Reshape", [rope_bnsh(q, heads, f"l{i}.q"), bsd], [f"l{i}.q_bsd"])
                k = rope_bnsh(k, kv, f"l{i}.k")
            k = repeat_kv(k, f"l{i}.k")
            v = repeat_kv(v, f"l{i}.v")
            if prefix:
                a, _, _ = node("MultiHeadAttention", [q, k, v, "", "", "", prefix_past(f"prefix.{i}.key"),
                                                      prefix_past(f"prefix.{i}.value")],
                               [f"l{i}.attn", f"l{i}.present_key", f"l{i}.present_value"], domain=MS_DOMAIN,
                               num_heads=heads, unidirectional=1, scale=scale)
            else:
                (a,) = node("MultiHeadAttention", [q, k, v], [f"l{i}.attn"], domain=MS_DOMAIN, num_heads=heads,
                            unidirectional=1, scale=scale)
        else:
            if rotary == "op":
                (q,) = node("RotaryEmbedding", [q, start_pos, cos_name, sin_name], [f"l{i}.q_rot"],
                            domain=MS_DOMAIN, num_heads=heads, rotary_embedding_dim=head_dim, interleaved=0)
                (k,) = node("RotaryEmbedding", [k, start_pos, cos_name, sin_name], [f"l{i}.k_rot"],
                            domain=MS_DOMAIN, num_heads=kv, rotary_embedding_dim=head_dim, interleaved=0)
                gqa_in = [q, k, v, "", "", seqlens_k, total]
            a, _, _ = node("GroupQueryAttention", gqa_in,
                           [f"l{i}.attn", f"l{i}.present_key", f"l{i}.present_value"], domain=MS_DOMAIN,
                           num_heads=heads, kv_num_heads=kv, do_rotary=int(rotary == "gqa"), rotary_interleaved=0,
                           scale=scale)
        (o,) = node("MatMul", [a, weight(f"l{i}.o", linear_t(attn.o_proj))], [f"l{i}.o_out"])
        g2 = weight(f"l{i}.post_norm", layer.post_attention_layernorm.weight)
        x2, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, g2],
                                  [f"l{i}.x2", "", "", f"l{i}.resid2"], domain=MS_DOMAIN, epsilon=eps)
        (gate,) = node("MatMul", [x2, weight(f"l{i}.gate", linear_t(mlp.gate_proj))], [f"l{i}.gate_out"])
        (up,) = node("MatMul", [x2, weight(f"l{i}.up", linear_t(mlp.up_proj))], [f"l{i}.up_out"])
        (act,) = node("QuickGelu", [gate], [f"l{i}.silu"], domain=MS_DOMAIN, alpha=1.0)  # x * sigmoid(x)
        (m,) = node("Mul", [act, up], [f"l{i}.gated"])
        (delta,) = node("MatMul", [m, weight(f"l{i}.down", linear_t(mlp.down_proj))], [f"l{i}.mlp_out"])
    y, _, _, _ = node("SkipSimplifiedLayerNormalization", [delta, residual, weight("final_norm", dec.norm.weight)],
                      ["hidden", "", "", ""], domain=MS_DOMAIN, epsilon=eps)
    (idx,) = node("Unsqueeze", [last, const("axis1", np.array([1], dtype=np.int64))], ["last_index_2d"])
    (h_last,) = node("GatherND", [y, idx], ["hidden_last"], batch_dims=1)  # [B, hidden]
    (z,) = node("MatMul", [h_last, weight("projection", linear_t(model.proj))], ["projected"])
    (zf,) = node("Cast", [z], ["projected_f32"], to=TensorProto.FLOAT)
    (norm,) = node("ReduceL2", [zf, const("axis_last", np.array([-1], dtype=np.int64))], ["norm"], keepdims=1)
    (norm_c,) = node("Max", [norm, const("norm_eps", np.array(1e-12, dtype=np.float32))], ["norm_clamped"])
    node("Div", [zf, norm_c], ["note_vector"])

    kv_type = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    prefix_inputs = [helper.make_tensor_value_info(name, kv_type, [1, kv, "prefix", head_dim])
                     for name in embed_inputs(rotary, len(dec.layers))[len(EMBED_INPUTS):]]
    graph = helper.make_graph(
        nodes, "notellm_embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]), *prefix_inputs],
        [helper.make_tensor_value_info("note_vector", TensorProto.FLOAT, ["batch", int(model.dim)])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                          producer_name="notellm-stream export.embed_graph", ir_version=IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path.name, data.name]

