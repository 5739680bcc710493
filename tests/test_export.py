"""Export of the tiny NoteLLM to an ONNX package, validated against torch (fp32 and int8)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import MANIFEST_FILE, content_hash
from export.validate import VALIDATION_NOTES, validate_package
from notellm.prompts import PROMPT_VERSION
from tests.tiny import NOTES, tiny_notellm, tiny_package
from worker.encoder import OnnxNoteEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package():
    return tiny_package("fp32")


def test_package_layout_and_manifest(package):
    out, manifest = package
    assert not out.with_name(out.name + ".partial").exists()
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    model = tiny_notellm()
    assert manifest["dim"] == 128 and manifest["prompt_version"] == PROMPT_VERSION
    assert manifest["dtype"] == "fp32" and manifest["quantization"] is None
    assert manifest["special_tokens"]["emb"]["id"] == model.emb_token_id
    assert manifest["special_tokens"]["eos"]["id"] == model.eos_token_id
    assert manifest["max_lengths"]["title_tokens"] == 20 and manifest["max_lengths"]["content_tokens"] == 80
    assert manifest["validation"]["passed"] is True
    assert manifest["model_version"] == content_hash(out, manifest["graph_files"] + ["tokenizer.json"])
    assert (out / "tokenizer.json").exists()
    g = onnx.load(str(out / manifest["graph"]), load_external_data=False)
    assert [i.name for i in g.graph.input] == manifest["inputs"]
    assert [o.name for o in g.graph.output] == manifest["outputs"]
    assert "embedding" not in manifest["outputs"]
    assert manifest["outputs"][:2] == ["note_vector", "logits"]
    assert len(manifest["inputs"]) == 2 + 2 * manifest["num_layers"]


def test_validation_numbers_fp32(package):
    _, manifest = package
    m = manifest["validation"]["metrics"]
    assert m["max_abs_diff"] <= 1e-4
    assert m["generation_agreement"] == 1.0
    assert m["notes"] == len(VALIDATION_NOTES)


@torch.no_grad()
def test_ort_embeddings_match_torch(package):
    out, _ = package
    model = tiny_notellm()
    ref = model.embed_notes(NOTES, batch_size=1).numpy()  # unpadded singles
    for notes_per_batch in (1, 2, 32):  # several batchings; the order must come back unchanged
        enc = OnnxNoteEncoder(out, device="cpu", max_batch_notes=notes_per_batch)
        got = enc.embed(NOTES)
        assert got.dtype == np.float32 and got.shape == (len(NOTES), 128)
        assert np.abs(got - ref).max() <= 1e-5


@torch.no_grad()
def test_ort_greedy_matches_torch_generate(package):
    out, _ = package
    model = tiny_notellm()
    enc = OnnxNoteEncoder(out, device="cpu", max_batch_notes=4, max_new_tokens=12)
    for task in ("category", "hashtags"):
        _, ref = model.generate_notes(NOTES, task, max_new_tokens=12, batch_size=len(NOTES))
        _, got = enc.generate_raw(NOTES, task)
        assert got == ref
        assert all(t for t in got), "random tiny model should produce some text"


@torch.no_grad()
def test_validation_fails_against_a_different_model(package):
    """The package of model A checked against model B (another seed) must fail, with numbers."""
    out, _ = package
    report = validate_package(tiny_notellm(seed=1), out, notes=NOTES, max_new_tokens=4)
    assert report["passed"] is False
    assert any("max_abs_diff" in f for f in report["failures"])
    assert report["metrics"]["max_abs_diff"] > 1e-2


def test_int8_package_passes_its_threshold():
    out, manifest = tiny_package("int8")
    assert manifest["quantization"] == "int8"
    g = onnx.load(str(out / manifest["graph"]), load_external_data=False)
    ops = {n.op_type for n in g.graph.node}
    assert "MatMulNBits" in ops
    v = manifest["validation"]
    assert v["passed"] and v["kind"] == "int8" and v["metrics"]["min_cosine"] >= 0.995
    assert manifest["model_version"] != tiny_package("fp32")[1]["model_version"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fused_package_validates_and_serves_like_the_plain_one(dtype, tmp_path):
    """--fuse: ONNX Runtime's contrib ops replace the norms, rotary and attention; the package passes the
    same validation against torch, hashes to another model_version, and the worker serves the same vectors
    and categories as from the plain graph."""
    from export.onnx_export import export_package

    plain_dir, plain = tiny_package(dtype)
    manifest = export_package(tiny_notellm(), tmp_path / "fused", dtype=dtype, fuse=True)
    fusions = manifest["fusions"]
    assert {"skip_rms_normalization", "rotary_embedding"} <= set(fusions) and all(v > 0 for v in fusions.values())
    g = onnx.load(str(tmp_path / "fused" / manifest["graph"]), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in g.graph.node}
    # onnxscript 0.7: the norms as SkipSimplifiedLayerNormalization, attention as MultiHeadAttention
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    assert ("com.microsoft", "MultiHeadAttention") in ops
    assert not (tmp_path / "fused" / "_fused").exists() and sorted(manifest["graph_files"]) == sorted(
        plain["graph_files"])
    v = manifest["validation"]
    assert v["passed"] and v["metrics"]["min_cosine"] >= 0.999
    assert manifest["model_version"] != plain["model_version"] and plain["fusions"] is None
    a, b = OnnxNoteEncoder(plain_dir, device="cpu"), OnnxNoteEncoder(tmp_path / "fused", device="cpu")
    va, ca, _ = a.encode([a.tokenize(n, "category") for n in NOTES], "category")
    vb, cb, _ = b.encode([b.tokenize(n, "category") for n in NOTES], "category")
    assert np.abs(va - vb).max() < (1e-5 if dtype == "fp32" else 2e-2) and ca == cb


def test_fusions_are_refused_on_an_int8_graph(tmp_path):
    from export.onnx_export import export_package

    with pytest.raises(ValueError, match="not to an int8"):
        export_package(tiny_notellm(), tmp_path / "x", quantize="int8", fuse=True)


@pytest.mark.slow
def test_trained_default_exports_and_writes_real_categories(tmp_path):
    """The trained default (models/notellm-default: a LoRA adapter merged onto the real SmolLM2-135M)
    exports and validates (~5 min), and the worker's ONNX encoder then writes categories from the data's
    taxonomy for notes the model never trained on, not copies of their titles, with neighbour scores
    that spread (the untrained base scored unrelated notes ~0.97)."""
    from notellm.adapter import read_adapter_config
    from notellm.cli import main
    from notellm.data import load_amazon

    default = REPO / "models" / "notellm-default"
    out = tmp_path / "notellm-default-onnx"
    assert main(["export", "--model", str(default), "--out", str(out)]) == 0
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["validation"]["passed"] and m["num_layers"] == 30 and m["dim"] == 128
    assert m["validation"]["metrics"]["max_abs_diff"] <= 1e-4
    assert m["validation"]["metrics"]["generation_agreement"] == 1.0
    cfg = read_adapter_config(default)
    data = load_amazon(REPO.parent / "shared" / "data" / "amazon-scientific")
    taxonomy = {n.category for n in data.notes.values() if n.category}
    held = [data.notes[i] for i in cfg["held_out_notes"][:24] if data.notes[i].category]
    enc = OnnxNoteEncoder(str(out), device="cpu", max_new_tokens=16)
    vec, cats, tags = enc.embed_and_generate(held, "both")
    assert set(cats) <= set(cfg["categories"]) <= taxonomy, cats  # decoded within the set it was taught
    right = sum(c == n.category for c, n in zip(cats, held))
    assert right >= 0.25 * len(held), list(zip(cats, (n.category for n in held)))  # measured ~50 %; chance 4 %
    _, free, _ = OnnxNoteEncoder(str(out), device="cpu", constrain_categories=False).embed_and_generate(
        held, "category")
    assert sum(c in taxonomy for c in free) >= 0.7 * len(held), free  # free text: the format is learned too
    assert sum(bool(t) for t in tags) >= 0.8 * len(held), tags
    sims = vec @ vec.T
    off = sims[~np.eye(len(held), dtype=bool)]
    assert off.mean() < 0.5 and off.max() - off.min() > 0.5, (off.mean(), off.min(), off.max())

def test_a_closed_category_set_travels_with_the_package(tmp_path):
    """A model that knows its category set: the package carries it (categories.json, part of
    model_version), torch and the worker's ONNX encoder both decode the category within it (the export's
    validation compares the two), and `constrain_categories=False` gives free text again."""
    from export.onnx_export import CATEGORIES_FILE, TOKENIZER_FILE, export_package
    from notellm.model import NoteLLM
    from worker.encoder import EncoderError

    cats = ["Movies", "Science & Tech", "Sports news"]
    m = NoteLLM.from_base("tiny").eval()
    m.set_categories(cats + ["Movies", " "])
    assert m.categories == tuple(cats)
    m.save(tmp_path / "saved")
    assert NoteLLM.load(tmp_path / "saved").categories == tuple(cats)
    pkg = tmp_path / "pkg"
    man = export_package(m, pkg)
    assert man["categories"] == CATEGORIES_FILE and json.loads((pkg / CATEGORIES_FILE).read_text()) == cats
    assert man["validation"]["passed"] and man["validation"]["metrics"]["generation_agreement"] == 1.0
    assert man["model_version"] != content_hash(pkg, man["graph_files"] + [TOKENIZER_FILE])
    notes = list(NOTES)
    _, got, _ = OnnxNoteEncoder(pkg, device="cpu").embed_and_generate(notes, "category")
    assert all(c in cats for c in got), got
    _, ref = m.generate_notes(notes, "category")
    assert [r.strip() for r in ref] == got
    _, free, _ = OnnxNoteEncoder(pkg, device="cpu", constrain_categories=False).embed_and_generate(notes, "category")
    assert any(c not in cats for c in free), free  # a random tiny model writes anything when let
    (pkg / CATEGORIES_FILE).write_text('["Movies", 3]')
    with pytest.raises(EncoderError, match="category names"):
        OnnxNoteEncoder(pkg, device="cpu")
    man["categories"] = "../../etc/passwd"
    (pkg / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(EncoderError, match="not a file name"):
        OnnxNoteEncoder(pkg, device="cpu")


@pytest.mark.parametrize("kv_heads", [1, 3, 9])
def test_grouped_attention_is_huggingface_sdpa_without_the_expand(kv_heads):
    """The step graph's attention (K/V heads read in place, query heads stacked per K/V head) against
    Hugging Face's sdpa implementation (repeat_kv to every query head), with an additive mask that has
    left padding, a padded middle and causality, for prefill (S > 1) and a decode step (S = 1)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from export.onnx_export import grouped_sdpa

    g = torch.Generator().manual_seed(kv_heads)
    B, H, D, P = 3, 9, 16, 5

    class Module(torch.nn.Module):
        num_key_value_groups = H // kv_heads
        is_causal = True

    for S in (7, 1):
        L = P + S
        q = torch.randn(B, H, S, D, generator=g)
        k, v = (torch.randn(B, kv_heads, L, D, generator=g) for _ in range(2))
        allowed = torch.ones(B, L, dtype=torch.bool)
        allowed[0, :2] = False  # left padding
        allowed[1, P:P + 1] = False  # padding after a shared prefix
        causal = torch.arange(L)[None, :] <= (torch.arange(S) + P)[:, None]
        mask = torch.where(causal[None, None] & allowed[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
        ref, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=D ** -0.5)
        out, _ = grouped_sdpa(Module(), q, k, v, mask, scaling=D ** -0.5)
        assert out.shape == ref.shape == (B, S, H, D)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_step_graph_reads_kv_heads_in_place(package, tmp_path):
    """The default export has no K/V `Expand` (the fused graph's attention runs on the K/V heads); the
    expanded form stays exportable for side-by-side measurement and serves the same outputs."""
    from export.onnx_export import export_package, fuse_for_ort

    out, manifest = package
    assert manifest["step_attention"] == "grouped_sdpa"
    model = tiny_notellm()
    expanded = export_package(model, tmp_path / "expanded", grouped=False)
    assert expanded["step_attention"] == "sdpa" and expanded["validation"]["passed"]
    assert model.lm.config._attn_implementation != "notellm_grouped_sdpa"  # the export restored it

    def expands(path):
        g = onnx.load(str(path), load_external_data=False)
        return sum(n.op_type == "Expand" for n in g.graph.node)

    layers = model.lm.config.num_hidden_layers
    # each layer loses its K and V expands and gains at most the mask's (shared by the layers where the
    # exporter's optimizer merges them)
    assert expands(tmp_path / "expanded" / "model.onnx") - expands(out / "model.onnx") >= layers
    fused = tmp_path / "fused"
    import shutil

    shutil.copytree(out, fused)
    fuse_for_ort(fused / "model.onnx")
    g = onnx.load(str(fused / "model.onnx"), load_external_data=False)
    mha = [n for n in g.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == layers
    kv = model.lm.config.num_key_value_heads
    assert all(a.i == kv for n in mha for a in n.attribute if a.name == "num_heads")
    a = OnnxNoteEncoder(out, device="cpu")
    b = OnnxNoteEncoder(tmp_path / "expanded", device="cpu")
    va, ca, _ = a.encode([a.tokenize(n, "category") for n in NOTES], "category")
    vb, cb, _ = b.encode([b.tokenize(n, "category") for n in NOTES], "category")
    assert np.abs(va - vb).max() < 1e-5 and ca == cb
