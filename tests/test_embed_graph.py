"""The hand-built embed graph (export/embed_graph.py): exact against torch, exact under right padding, in
the package's hash and validation, run by the encoder's embed-only path, refused where it cannot apply."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export.embed_graph import (DEFAULT_ROTARY, EMBED_GRAPH_FILE, PREFIX_VARIANTS, build_embed_graph,
                                 rotate_half_columns, unsupported)
from export.onnx_export import MANIFEST_FILE, content_hash, export_package, manifest_hashed_files
from export.validate import VALIDATION_NOTES
from tests.tiny import NOTES, tiny_notellm, tiny_package
from worker.encoder import EncoderError, OnnxNoteEncoder, right_padded


@pytest.fixture(scope="module", params=[("fp32", "gqa"), ("fp16", "gqa"), ("fp32", "mha"), ("fp16", "mha"),
                                        ("fp32", "mha-prefix"), ("fp16", "mha-prefix"),
                                        ("fp32", "mha-prefix-fold"), ("fp16", "mha-prefix-fold")],
                ids=lambda p: "-".join(p))
def packages(request, tmp_path_factory):
    """(plain package, the same model exported with --embed-graph (gqa, or mha: RotaryEmbedding +
    MultiHeadAttention, no GroupQueryAttention, or the default mha-prefix: that with the instruction's KV as
    inputs, or mha-prefix-fold: that with rotary as a second Q/K projection and elementwise ops), its
    manifest, dtype)."""
    dtype, variant = request.param
    plain_dir, plain = tiny_package(dtype)
    out = tmp_path_factory.mktemp(f"eg-{dtype}-{variant}") / "pkg"
    manifest = export_package(tiny_notellm(), out, dtype=dtype,
                              embed_graph=True if variant == DEFAULT_ROTARY else variant)
    return plain_dir, plain, out, manifest, dtype


def test_package_carries_hashes_and_validates_both_vector_paths(packages):
    plain_dir, plain, out, manifest, dtype = packages
    spec = manifest["embed_graph"]
    variant = spec["rotary"]
    layers = tiny_notellm().lm.config.num_hidden_layers
    prefix_inputs = [f"prefix.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert spec == {"graph": EMBED_GRAPH_FILE, "files": [EMBED_GRAPH_FILE, EMBED_GRAPH_FILE + ".data"],
                    "inputs": ["input_ids", "lengths"] + (prefix_inputs if variant in PREFIX_VARIANTS else []),
                    "outputs": ["note_vector"], "rotary": variant}
    assert variant in ("gqa", "mha", "mha-prefix", "mha-prefix-fold")
    assert plain["embed_graph"] is None
    assert all((out / f).exists() for f in spec["files"])
    # the embed graph is part of what model_version hashes: same step graph, another version
    assert manifest["model_version"] == content_hash(out, manifest_hashed_files(manifest))
    assert set(spec["files"]) <= set(manifest_hashed_files(manifest))
    assert manifest["model_version"] != plain["model_version"]
    v = manifest["validation"]
    assert v["passed"], v
    threshold = 1e-4 if dtype == "fp32" else None
    for path in ("embed_graph", "step_graph"):
        m = v["metrics"][path]
        assert m["min_cosine"] >= 0.999
        if threshold:
            assert m["max_abs_diff"] <= threshold
    g = onnx.load(str(out / EMBED_GRAPH_FILE), load_external_data=False)
    assert g.ir_version == 10  # ONNX Runtime 1.31 (the device's) loads IR <= 13
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers and "Softmax" not in ops
    if variant == "gqa":
        assert ops.count("GroupQueryAttention") == layers
        assert not {"Expand", "Transpose", "MultiHeadAttention", "RotaryEmbedding"} & set(ops)
    else:  # causal MultiHeadAttention over K/V expanded to the query heads
        assert ops.count("MultiHeadAttention") == layers and "GroupQueryAttention" not in ops
        prefixed = variant in PREFIX_VARIANTS  # the instruction's K and V broadcast to the batch in every layer too
        if variant == "mha-prefix-fold":  # rotary as q * cos + (a second projection) * sin, no transposes
            assert not {"RotaryEmbedding", "Transpose"} & set(ops)
            assert ops.count("MatMul") == 9 * layers + 1 and ops.count("Expand") == 4 * layers
        else:  # rotary in onnxscript's form: 4-D [B, N, S, H], position_ids [B, S]
            assert ops.count("RotaryEmbedding") == 2 * layers
            assert ops.count("Expand") == (4 if prefixed else 2) * layers + 1
        mha = next(n for n in g.graph.node if n.op_type == "MultiHeadAttention")
        assert {a.name: a.i for a in mha.attribute if a.name != "scale"} == {
            "num_heads": tiny_notellm().lm.config.num_attention_heads, "unidirectional": 1}
        if prefixed:  # past_key / past_value given, and the presents ORT's CUDA kernel requires beside them
            assert len(mha.input) == 8 and mha.input[6] and mha.input[7] and len(mha.output) == 3
            kv_type = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT
            assert [i.type.tensor_type.elem_type for i in g.graph.input[2:]] == [kv_type] * 2 * layers
        else:
            assert len(mha.input) == 3


def test_encoder_embeds_through_it_with_the_step_graphs_vectors(packages):
    plain_dir, _, out, _, dtype = packages
    tol = 1e-5 if dtype == "fp32" else 2e-2
    with_graph = OnnxNoteEncoder(out, device="cpu", max_batch_notes=3, embed_graph=True)
    without = OnnxNoteEncoder(out, device="cpu", max_batch_notes=3, embed_graph=False)
    auto = OnnxNoteEncoder(out, device="cpu", max_batch_notes=3)  # the default: on CUDA only
    plain = OnnxNoteEncoder(plain_dir, device="cpu", max_batch_notes=3, embed_graph=True)
    assert with_graph.embed_session is not None
    assert without.embed_session is None and auto.embed_session is None and plain.embed_session is None
    calls = []
    run = with_graph._embed_rows
    with_graph._embed_rows = lambda task, segments: calls.append(len(segments)) or run(task, segments)
    notes = list(VALIDATION_NOTES)
    v = with_graph.embed(notes)
    assert sum(calls) == len(notes) and max(calls) <= 3  # every note, in the encoder's sub-batches
    assert np.abs(v - without.embed(notes)).max() < tol
    assert np.abs(v - plain.embed(notes)).max() < tol
    # generating, the vector comes from the step graph's prefill, as without the embed graph
    calls.clear()
    vg, cats, _ = with_graph.encode([with_graph.tokenize(n, "category") for n in NOTES], "category")
    vp, cats_p, _ = plain.encode([plain.tokenize(n, "category") for n in NOTES], "category")
    assert not calls and cats == cats_p and np.abs(vg - vp).max() < tol
    with_graph.warmup()
    with_graph.close()
    assert with_graph.embed_session is None


def test_an_embed_only_warmup_runs_only_what_embed_only_calls_run(packages):
    """warmup("none") with an embed graph runs it at the largest batch and the step graph only for the
    instruction's prefix (batch 1): on CUDA a generation warm-up at batch 2048 grew the step session's
    arena past 28 GB for a worker that never generates (run 11). Without an embed graph it runs the step
    graph's prefill alone; a generating warm-up runs prefill, continuation and a decode step."""
    plain_dir, _, out, _, _ = packages

    def traced(enc):
        steps, embeds = [], []
        step, rows = enc._step, enc._embed_rows
        enc._step = lambda ids, *a, **k: steps.append((ids.shape[0], k.get("want_logits", True))) or step(ids, *a, **k)
        enc._embed_rows = lambda task, segments: embeds.append(len(segments)) or rows(task, segments)
        return steps, embeds

    with_graph = OnnxNoteEncoder(out, device="cpu", max_batch_notes=3, embed_graph=True)
    steps, embeds = traced(with_graph)
    with_graph.warmup("none")
    assert all(b == 1 for b, _ in steps) and embeds == [3]
    steps.clear(), embeds.clear()
    with_graph.warmup("category")
    assert [b for b, _ in steps if b > 1] == [3, 3, 3] and embeds == [3]  # prefill, continuation, a step
    with_graph.close()
    plain = OnnxNoteEncoder(plain_dir, device="cpu", max_batch_notes=3)
    steps, embeds = traced(plain)
    plain.warmup("none")
    assert [s for s in steps if s[0] == 3] == [(3, False)] and not embeds  # the prefill, no logits
    with pytest.raises(ValueError):
        plain.warmup("all")
    plain.close()


def test_right_padding_is_exact_whatever_the_batch(packages):
    """A note's vector does not depend on the notes batched with it (causal attention never reaches the
    pads on the right) nor on how long the longest of them is."""
    _, _, out, _, dtype = packages
    enc = OnnxNoteEncoder(out, device="cpu", max_batch_notes=1, embed_graph=True)
    notes = list(VALIDATION_NOTES)
    alone = enc.embed(notes)
    enc.max_batch_notes = len(notes)
    together = enc.embed(notes)
    assert np.abs(alone - together).max() < (1e-6 if dtype == "fp32" else 2e-3)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_the_prefix_variant_computes_the_notes_alone(packages):
    """The instruction is in every row of the other variants; mha-prefix gets it once, as the task's shared
    KV (the step graph's, [1, kv_heads, P, head_dim] per layer), and computes only the note segments."""
    _, _, out, manifest, _ = packages
    prefixed = manifest["embed_graph"]["rotary"] in PREFIX_VARIANTS
    # without I/O binding the feeds are plain session.run arguments, to be read here
    enc = OnnxNoteEncoder(out, device="cpu", max_batch_notes=16, embed_graph=True, io_binding=False)
    bound = OnnxNoteEncoder(out, device="cpu", max_batch_notes=16, embed_graph=True)
    fed = []
    run = enc.embed_session.run
    enc.embed_session.run = lambda names, feeds: fed.append(feeds) or run(names, feeds)
    notes = list(VALIDATION_NOTES)[:4]
    v = enc.embed(notes)
    # with I/O binding (the default) the instruction's KV is bound once per task where the session runs
    assert np.array_equal(bound.embed(notes), v) and np.array_equal(bound.embed(notes), v)
    assert len(bound._embed_prefix_kv) == int(prefixed) and bound.embed_graph_takes_prefix == prefixed
    instruction = enc.prompts.instruction_ids("category")
    segments = [enc.prompts.note_ids(n, "category") for n in notes]
    assert sum(len(f["input_ids"]) for f in fed) == len(notes)
    assert max(f["input_ids"].shape[1] for f in fed) == max(map(len, segments)) + (0 if prefixed else len(instruction))
    assert sorted(int(x) for f in fed for x in f["lengths"]) == sorted(
        len(s) + (0 if prefixed else len(instruction)) for s in segments)
    kv = {k: v for k, v in fed[0].items() if k.startswith("prefix.")}
    assert len(kv) == (2 * enc.num_layers if prefixed else 0)
    assert all(v.shape == (1, enc.num_kv_heads, len(instruction), enc.head_dim) and v.dtype == enc.kv_dtype
               for v in kv.values())


@pytest.fixture(scope="module")
def smollm2():
    """(SmolLM2-135M-shaped NoteLLM with random weights, the validation prompts' rows (whole prompts), their
    instruction's length, torch's vectors for them), built once for every variant."""
    from notellm.base_models import smollm2_architecture
    from notellm.model import NoteLLM

    lm, tok = smollm2_architecture(0)
    model = NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id="smollm2-arch", seed=0).eval()
    notes = list(VALIDATION_NOTES)
    rows = []
    for n in notes:
        e = model.prompts.encode(n, "category")
        rows.append(list(e.input_ids[:e.emb_position]))
    instruction = model.prompts.instruction_ids("category")
    assert all(r[:len(instruction)] == instruction for r in rows)
    return model, rows, len(instruction), model.embed_notes(notes, "category", batch_size=len(notes)).numpy()


def instruction_kv(model, ids: list[int]) -> list[np.ndarray]:
    """torch's KV cache of ``ids`` alone ([1, kv_heads, P, head_dim] per layer: key, value, ...)."""
    import torch

    with torch.no_grad():
        cache = model.lm(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("rotary", ["gqa", "op", "mha", "mha-prefix", "mha-prefix-fold"])
def test_smollm2_architecture_matches_torch(rotary, smollm2, tmp_path):
    """SmolLM2-135M's exact shape (9 query / 3 KV heads, head_dim 64, rope theta 1e5, tied embeddings),
    random weights: the embed graph (rotary inside GroupQueryAttention, as RotaryEmbedding ops before it, or
    RotaryEmbedding + MultiHeadAttention over K/V expanded to 9 heads, with or without the instruction as a
    past) against torch's embeddings on real note texts."""
    from export.embed_graph import embed_inputs

    model, rows, p, ref = smollm2
    assert unsupported(model) is None
    path = tmp_path / EMBED_GRAPH_FILE
    assert build_embed_graph(model, path, dtype="fp32", rotary=rotary) == [EMBED_GRAPH_FILE, EMBED_GRAPH_FILE + ".data"]
    g = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    layers = model.lm.config.num_hidden_layers
    assert ops.count("RotaryEmbedding") == (0 if rotary in ("gqa", "mha-prefix-fold") else 2 * layers)
    assert ops.count("GroupQueryAttention") == (0 if rotary.startswith("mha") else layers)
    assert ops.count("MultiHeadAttention") == (layers if rotary.startswith("mha") else 0)
    assert [i.name for i in g.input] == embed_inputs(rotary, layers)
    assert {t.name for t in g.initializer} <= {i for n in g.node for i in n.input}  # none left unused
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if rotary in PREFIX_VARIANTS:  # the note segments alone at positions P.., after the instruction's KV
        ids, lengths = right_padded([r[p:] for r in rows], model.pad_token_id)
        feeds = dict(zip(embed_inputs(rotary, layers)[2:], instruction_kv(model, rows[0][:p])))
    else:
        ids, lengths = right_padded(rows, model.pad_token_id)
        feeds = {}
    assert len(set(lengths.tolist())) > 1  # right padding in the batch
    (vec,) = session.run(None, {"input_ids": ids, "lengths": lengths, **feeds})
    assert np.abs(vec - ref).max() < 1e-4


def test_rotate_half_columns_is_hf_rotate_half_of_the_projection():
    """The fold variant's second projection: x @ rotate_half_columns(w) is HF's rotate_half of x @ w in every
    head. rotate_half is linear, so the weights are rotate_half of w's rows: a negation and a permutation of
    its columns, exact in any dtype."""
    import torch
    from transformers.models.llama.modeling_llama import rotate_half

    heads, head_dim = 3, 8
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal((16, heads * head_dim)).astype(np.float32)
    for dtype in (np.float32, np.float16):
        wd = w.astype(dtype)
        rows = rotate_half(torch.from_numpy(wd).view(16, heads, head_dim)).reshape(16, heads * head_dim).numpy()
        assert np.array_equal(rotate_half_columns(wd, heads, head_dim), rows)
    want = rotate_half(torch.from_numpy(x @ w).view(5, heads, head_dim)).reshape(5, heads * head_dim).numpy()
    assert np.allclose(x @ rotate_half_columns(w, heads, head_dim), want, atol=1e-5)


def test_export_cli_writes_the_chosen_variant(tmp_path, capsys):
    from notellm.cli import main

    out = tmp_path / "pkg"
    assert main(["export", "--model", "tiny", "--out", str(out), "--embed-graph", "op"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert printed["ok"] and printed["embed_graph"] and manifest["embed_graph"]["rotary"] == "op"
    assert manifest["validation"]["passed"] and "embed_graph" in manifest["validation"]["metrics"]
    # every variant is a choice (exported above: mha by the packages fixture)
    import argparse

    from export.cli import configure
    from export.embed_graph import ROTARY

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--model", "tiny", "--out", str(out)]
    assert [parser.parse_args([*base, "--embed-graph", v]).embed_graph for v in ROTARY] == list(ROTARY)
    assert parser.parse_args([*base, "--embed-graph"]).embed_graph == DEFAULT_ROTARY == "mha-prefix"


def test_refused_where_it_cannot_apply(tmp_path):
    model = tiny_notellm()
    with pytest.raises(ValueError, match="rotary"):
        build_embed_graph(model, tmp_path / EMBED_GRAPH_FILE, rotary="inside")
    with pytest.raises(ValueError, match="not int8"):
        export_package(model, tmp_path / "x", quantize="int8", embed_graph=True)
    model.lm.config.attention_bias = True
    try:
        assert "bias" in unsupported(model)
        with pytest.raises(ValueError, match="no embed graph for this model"):
            build_embed_graph(model, tmp_path / EMBED_GRAPH_FILE)
    finally:
        model.lm.config.attention_bias = False
    with pytest.raises(ValueError):
        right_padded([[1, 2], []], 0)
    ids, lengths = right_padded([[5], [6, 7, 8]], 0)
    assert ids.tolist() == [[5, 0, 0], [6, 7, 8]] and lengths.tolist() == [1, 3]
    ids, lengths = right_padded([[5], [], [6, 7, 8]], 0, prefix=(9, 9))  # the instruction, then each note
    assert ids.tolist() == [[9, 9, 5, 0, 0], [9, 9, 0, 0, 0], [9, 9, 6, 7, 8]] and lengths.tolist() == [3, 2, 5]


def test_a_manifest_that_does_not_match_the_graph_is_refused(packages, tmp_path):
    _, _, out, manifest, _ = packages
    for bad in ({**manifest["embed_graph"], "inputs": ["input_ids", "attention_mask"]},
                {**manifest["embed_graph"], "graph": "../embed.onnx"}):
        pkg = tmp_path / "pkg"
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.copytree(out, pkg)
        (pkg / MANIFEST_FILE).write_text(json.dumps({**manifest, "embed_graph": bad}))
        with pytest.raises(EncoderError, match="embed_graph"):
            OnnxNoteEncoder(pkg, device="cpu", embed_graph=True)
