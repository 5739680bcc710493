"""worker.encoder.OnnxNoteEncoder on the tiny exported package — including in a process without torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from notellm.prompts import NoteText
from tests.tiny import NOTES, tiny_package
from worker.encoder import EncoderError, OnnxNoteEncoder, package_advice
from worker.encoding import (Encoder, EngineError, NoteError, batches_cost, full_batches, length_batches,
                             padded_tokens)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkg() -> Path:
    return tiny_package("fp32")[0]


@pytest.fixture(scope="module")
def enc(pkg) -> OnnxNoteEncoder:
    e = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=4, max_batch_tokens=600, max_new_tokens=6)
    e.warmup()
    return e


def test_interface(enc, pkg):
    assert isinstance(enc, Encoder)
    assert enc.dim == 128 and enc.manifest["dim"] == 128
    assert enc.model_version == json.loads((pkg / "notellm.json").read_text())["model_version"]
    assert enc.providers == ["CPUExecutionProvider"]
    n = enc.prompt_tokens(NOTES[0])
    assert n == len(enc.prompts.encode(NOTES[0], "category").input_ids) and n > 40
    # truncation bounds every prompt
    assert enc.prompt_tokens(NOTES[-1]) <= enc.max_prompt_tokens


def test_embed_shapes_norms_order(enc):
    v = enc.embed(NOTES)
    assert v.dtype == np.float32 and v.shape == (len(NOTES), enc.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    rev = enc.embed(list(reversed(NOTES)))
    np.testing.assert_allclose(rev[::-1], v, atol=1e-5)
    one = np.stack([enc.embed([n])[0] for n in NOTES])
    np.testing.assert_allclose(one, v, atol=1e-5)
    assert enc.embed([]).shape == (0, enc.dim)


def test_shared_instruction_prefix_is_exact(pkg, enc):
    """The instruction's KV computed once and shared (default) == prefilling every full prompt."""
    plain = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=4, max_batch_tokens=600, max_new_tokens=6,
                            share_prefix=False)
    assert enc.share_prefix and not plain.share_prefix
    for task in ("category", "hashtags"):
        va, ia = enc._run_task_ids(NOTES, task, generate=True)
        vb, ib = plain._run_task_ids(NOTES, task, generate=True)
        np.testing.assert_allclose(va, vb, atol=1e-5)
        assert ia == ib


def test_batches_respect_count_and_token_budget(enc):
    lengths = [enc.prompt_tokens(n) for n in NOTES] * 3
    batches = enc._batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= enc.max_batch_notes
        assert len(b) == 1 or padded_tokens([lengths[i] for i in b]) <= enc.max_batch_tokens
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat), "notes are sorted by length before batching"


def test_batches_are_maximal_under_both_budgets(pkg):
    """Each sub-batch closes only when the next (longer) prompt would break a budget: random lengths,
    checked against padded_tokens recomputed over the whole sub-batch."""
    rng = np.random.default_rng(0)
    for notes_cap, token_cap in ((4, 600), (64, 3000), (512, 10**9), (8, 50)):
        e = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=notes_cap, max_batch_tokens=token_cap)
        lengths = rng.integers(5, 120, size=300).tolist()
        batches = e._batches(lengths, by_padding=False)
        assert batches == e._full_batches(lengths)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b, nxt in zip(batches, batches[1:]):
            assert len(b) == 1 or padded_tokens([lengths[i] for i in b]) <= token_cap
            grown = [lengths[i] for i in b] + [lengths[nxt[0]]]
            assert len(b) == notes_cap or padded_tokens(grown) > token_cap


def _cheapest_cut(lengths: list[int], max_notes: int, max_tokens: int, call: float) -> float:
    """Every cut of the sorted lengths into contiguous sub-batches within the budgets: the least cost."""
    s = sorted(lengths)
    best = float("inf")
    for mask in range(1 << (len(s) - 1)):
        cuts = [0] + [i + 1 for i in range(len(s) - 1) if mask >> i & 1] + [len(s)]
        groups = [s[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(g) <= max_notes and (len(g) == 1 or len(g) * g[-1] <= max_tokens) for g in groups):
            best = min(best, sum(call + len(g) * g[-1] for g in groups))
    return best


def test_length_batches_cut_by_padding_exactly_and_never_worse_than_full_batches():
    """Without binding budgets the cut is the cheapest of all (checked exhaustively); with them it keeps
    the budgets and never costs more than full batches; at no call cost nothing is padded."""
    rng = np.random.default_rng(3)
    for _ in range(150):
        lengths = rng.integers(1, 12, size=int(rng.integers(1, 10))).tolist()
        call = float(rng.choice([0, 1, 3, 10, 100]))
        got = length_batches(lengths, 10**6, 10**9, call)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        assert batches_cost(got, lengths, call) == _cheapest_cut(lengths, 10**6, 10**9, call)
        notes_cap, token_cap = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        got = length_batches(lengths, notes_cap, token_cap, call)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        for b in got:
            assert len(b) <= notes_cap and (len(b) == 1 or padded_tokens([lengths[i] for i in b]) <= token_cap)
        full = full_batches(lengths, notes_cap, token_cap)
        assert batches_cost(got, lengths, call) <= batches_cost(full, lengths, call)
        flat = [lengths[i] for b in got for i in b]
        assert flat == sorted(flat)
    lengths = rng.integers(1, 30, size=200).tolist()
    assert all(len({lengths[i] for i in b}) == 1 for b in length_batches(lengths, 10**6, 10**9, 0))


def test_length_batches_on_a_long_tailed_batch():
    """2,048 prompts, most near 90 tokens and a quarter near 140 (the shape of MIND's): one padded batch
    computes ~1.4x the real tokens; cut at 8,192 tokens a call, a few sub-batches compute < 1.15x."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.normal(90, 10, 1536), rng.normal(140, 5, 512)]).clip(40, 153).astype(int).tolist()
    real = sum(lengths)
    one = len(lengths) * max(lengths)
    cut = length_batches(lengths, 4096, 10**9, 8192)
    padded = batches_cost(cut, lengths, 0)
    assert one / real > 1.35 and padded / real < 1.15 and 2 <= len(cut) <= 6


def test_the_encoder_cuts_by_padding_on_the_cpu_and_keeps_outputs(pkg, enc):
    """Sub-batches by padding (the CPU's call cost) give the same vectors and tags as one full batch."""
    assert enc.call_tokens == 64
    long = NOTES * 2
    lengths = [enc.prompt_tokens(n) for n in long]
    assert enc._batches(lengths) == length_batches(lengths, 4, 600, 64)
    whole = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=64, max_batch_tokens=10**6, max_new_tokens=6,
                            call_tokens=10**9)
    split = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=64, max_batch_tokens=10**6, max_new_tokens=6,
                            call_tokens=0)
    assert len(whole._batches(lengths)) == 1 and len(split._batches(lengths)) > 1
    runs: list[int] = []
    inner = split._run_batch
    split._run_batch = lambda prefixes, *a, **kw: (runs.append(len(prefixes)), inner(prefixes, *a, **kw))[1]
    for generate in (False, True):
        runs.clear()
        va, ia = whole._run_task_ids(long, "category", generate=generate)
        vb, ib = split._run_task_ids(long, "category", generate=generate)
        np.testing.assert_allclose(va, vb, atol=1e-5)
        assert ia == ib
        # embed-only calls are cut by padding; generating calls keep full batches (a decode step costs
        # about the same at any batch size)
        assert len(runs) == (len(split._batches(lengths)) if not generate else 1), (generate, runs)
    with pytest.raises(ValueError):
        OnnxNoteEncoder(pkg, device="cpu", call_tokens=-1)


def test_tokenize_once_then_encode_from_ids(enc):
    """tokenize gives the note segments (and the budget unit); encode runs from those ids alone."""
    for n in NOTES:
        p = enc.tokenize(n, "both")
        assert list(p.category) == enc.prompts.note_ids(n, "category")
        assert list(p.hashtags) == enc.prompts.note_ids(n, "hashtags")
        assert p.tokens == enc.prompt_tokens(n) == len(enc.prompts.encode(n, "category").input_ids)
        assert enc.tokenize(n, "none").hashtags is None and enc.tokenize(n, "category").hashtags is None
        assert enc.tokenize(n, "hashtags").hashtags == p.hashtags
    prompts = [enc.tokenize(n, "both") for n in NOTES]
    v, cats, tags = enc.encode(prompts, "both")
    ref = enc.embed_and_generate(NOTES, "both")
    np.testing.assert_allclose(v, ref[0], atol=1e-6)
    assert (cats, tags) == (ref[1], ref[2])
    v0, cats0, tags0 = enc.encode(prompts, "none")
    np.testing.assert_allclose(v0, v, atol=1e-6)
    assert cats0 == [None] * len(NOTES) and tags0 == [[] for _ in NOTES]
    with pytest.raises(EngineError, match="hashtag segment"):
        enc.encode([enc.tokenize(n, "category") for n in NOTES], "both")


def test_tokenize_rejects_what_cannot_be_encoded(pkg):
    enc = OnnxNoteEncoder(pkg, device="cpu")
    for bad in (NoteText("lone \ud800 surrogate", "x"), NoteText("t", "x", "\udfff"), NoteText(["not", "text"], "x")):
        with pytest.raises(NoteError, match="cannot tokenise") as e:
            enc.tokenize(bad, "none")
        assert e.value.index is None
    n = NOTES[2]
    enc.prompt_tokenizer.max_tokens = enc.prompt_tokens(n) - 1
    with pytest.raises(NoteError, match="exceeds"):
        enc.tokenize(n, "none")


def test_tokenize_many_matches_tokenize_and_keeps_a_bad_note_to_itself(pkg):
    """The polling thread's batched pass gives each note exactly what `tokenize` gives it, and a note that
    cannot be tokenised (which breaks the batched call itself) or is too long becomes its own NoteError."""
    enc = OnnxNoteEncoder(pkg, device="cpu")
    for gen in ("none", "category", "hashtags", "both"):
        assert enc.tokenize_many(NOTES, gen) == [enc.tokenize(n, gen) for n in NOTES]
    assert enc.tokenize_many([], "both") == []
    bad = NoteText("lone \ud800 surrogate", "x")
    out = enc.tokenize_many([NOTES[0], bad, NOTES[1], NoteText(["not", "text"], "x")], "both")
    assert out[0] == enc.tokenize(NOTES[0], "both") and out[2] == enc.tokenize(NOTES[1], "both")
    for e in (out[1], out[3]):
        assert isinstance(e, NoteError) and "cannot tokenise" in str(e) and e.index is None
    enc.prompt_tokenizer.max_tokens = enc.prompt_tokens(NOTES[2]) - 1
    out = enc.tokenize_many(NOTES[:3], "none")
    assert isinstance(out[2], NoteError) and "exceeds" in str(out[2])
    assert out[:2] == [enc.tokenize(n, "none") for n in NOTES[:2]]
    with pytest.raises(ValueError, match="generate must be one of"):
        enc.tokenize_many(NOTES, "summary")


def test_engine_faults_are_engine_errors_and_restart_recovers(pkg):
    enc = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=4, max_batch_tokens=600)
    prompts = [enc.tokenize(n, "none") for n in NOTES]
    good = enc.encode(prompts, "none")[0]
    assert enc.health().ok

    class Boom:
        def io_binding(self):
            raise MemoryError("device out of memory")

    enc.session = Boom()
    with pytest.raises(EngineError, match="MemoryError: device out of memory"):
        enc.encode(prompts, "none")
    enc.close()
    assert not enc.health().ok
    with pytest.raises(EngineError, match="closed"):
        enc.encode(prompts, "none")
    enc.restart()
    assert enc.health().ok
    np.testing.assert_allclose(enc.encode(prompts, "none")[0], good, atol=1e-6)


def test_embed_and_generate_tasks(enc):
    v, cats, tags = enc.embed_and_generate(NOTES, "both")
    np.testing.assert_allclose(v, enc.embed(NOTES), atol=1e-5)
    assert len(cats) == len(tags) == len(NOTES)
    assert all(c is None or (isinstance(c, str) and c == c.strip() and '"' not in c) for c in cats)
    for t in tags:
        assert len(t) <= enc.prompt_config.num_topics
        assert len({x.lower() for x in t}) == len(t)
    _, raw_cat = enc.generate_raw(NOTES, "category")
    from notellm.prompts import parse_category, parse_hashtags

    assert cats == [parse_category(t) for t in raw_cat]
    _, raw_tags = enc.generate_raw(NOTES, "hashtags")
    assert tags == [parse_hashtags(t, enc.prompt_config.num_topics) for t in raw_tags]
    v2, cats2, tags2 = enc.embed_and_generate(NOTES, "category")
    assert cats2 == cats and tags2 == [[] for _ in NOTES]
    v3, cats3, tags3 = enc.embed_and_generate(NOTES, "hashtags")
    assert cats3 == [None] * len(NOTES) and tags3 == tags
    np.testing.assert_allclose(v3, v, atol=1e-5)
    with pytest.raises(ValueError):
        enc.embed_and_generate(NOTES, "summary")
    assert enc.embed_and_generate([], "both")[0].shape == (0, enc.dim)


def test_generation_is_bounded_and_stops_per_row(pkg):
    """max_new_tokens bounds the output; a stop token ends its row only; quote tokens and EOS stop."""
    enc = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=32, max_new_tokens=6)
    _, ids = enc._run_task_ids(NOTES, "category", generate=True)
    assert all(1 <= len(g) <= 6 for g in ids)
    # every token holding a double quote stops generation, and so does EOS
    quote_ids = np.flatnonzero(enc._quote_mask)
    assert len(quote_ids) > 10
    assert all('"' in enc.tokenizer.id_to_token(int(i)) for i in quote_ids[:50])
    assert enc._stop_mask[quote_ids].all() and enc._stop_mask[enc.eos_id]
    # make the third token generated for note 0 a stop token: note 0 stops there, the others go on
    full = [g for g in ids if len(g) == 6]
    assert ids[0] in full
    stop = ids[0][2]
    enc._stop_mask = enc._stop_mask.copy()
    enc._stop_mask[stop] = True
    _, ids2 = enc._run_task_ids(NOTES, "category", generate=True)
    assert ids2[0] == ids[0][:3]
    for a, b in zip(ids, ids2):
        cut = next((k + 1 for k, t in enumerate(a) if t == stop), len(a))
        assert b == a[:cut]


def test_manifest_mismatch_is_refused(pkg, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    m = json.loads((bad / "notellm.json").read_text())
    m["prompt_version"] = "notellm-prompt-v0"
    (bad / "notellm.json").write_text(json.dumps(m))
    with pytest.raises(EncoderError, match="prompt version"):
        OnnxNoteEncoder(bad, device="cpu")
    with pytest.raises(EncoderError, match="notellm.json"):
        OnnxNoteEncoder(tmp_path, device="cpu")
    with pytest.raises(ValueError):
        OnnxNoteEncoder(pkg, device="tpu")


BLOCK_TORCH = textwrap.dedent(
    """
    import sys, importlib.abc
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "transformers") or name.startswith(("torch.", "transformers.")):
                raise ImportError(f"{name} is blocked: the worker must not import it")
    sys.meta_path.insert(0, _NoTorch())
    """
)


def test_encoder_runs_without_torch(pkg, enc):
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch import was not blocked")
        from worker.encoder import OnnxNoteEncoder
        from notellm.prompts import NoteText
        enc = OnnxNoteEncoder({str(pkg)!r}, device="auto", max_batch_notes=4, max_batch_tokens=600,
                              max_new_tokens=6)
        enc.warmup()
        notes = [NoteText(**n) for n in json.loads(sys.stdin.read())]
        v, cats, tags = enc.embed_and_generate(notes, "both")
        assert not any(m == "torch" or m.startswith(("torch.", "transformers")) for m in sys.modules)
        print(json.dumps({{"v": v.tolist(), "cats": cats, "tags": tags, "providers": enc.providers}}))
    """)
    notes = [{"title": n.title, "content": n.content, "topic": n.topic} for n in NOTES]
    p = subprocess.run([sys.executable, "-c", code], input=json.dumps(notes), cwd=REPO,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    v, cats, tags = enc.embed_and_generate(NOTES, "both")
    np.testing.assert_allclose(np.array(got["v"], dtype=np.float32), v, atol=1e-5)
    assert got["cats"] == cats and got["tags"] == tags
    assert got["providers"] == ["CPUExecutionProvider"]


def test_embed_cli(pkg, capsys):
    from notellm.cli import main

    assert main(["embed", "--model", str(pkg), "--device", "cpu", "--json", "Toy Story (1995)",
                 "Adventure|Animation|Children|Comedy|Fantasy", "--topic", "Adventure"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["vector"]) == 128 and isinstance(out["hashtags"], list)
    enc = OnnxNoteEncoder(pkg, device="cpu")
    ref = enc.embed([NoteText("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", "Adventure")])
    np.testing.assert_allclose(np.array(out["vector"], dtype=np.float32), ref[0], atol=1e-5)


def _reference(logits: np.ndarray, rows, allowed=None) -> list[int]:
    if allowed is None:
        return [int(np.argmax(logits[r])) for r in rows]
    return [allowed[int(np.argmax(logits[r, allowed]))] for r in rows]


@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_step_logits_top_k_decides_exactly_like_the_full_argmax(k):
    """StepLogits picks what numpy's argmax over the full logits picks (lowest id among ties), from the
    graph's top-k when that decides the row and from the full logits otherwise - including coarse fp16-like
    scores full of ties, ties across the k-th place, and label sets with no member among the k."""
    from worker.encoder import StepLogits

    rng = np.random.default_rng(k)
    for trial in range(40):
        V = 200
        logits = rng.normal(size=(16, V)).astype(np.float32)
        if trial % 2:
            logits = np.round(logits * 2) / 2  # few distinct values: many ties, often at the boundary
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # a top-k; tie order deliberately arbitrary
        order = np.array([rng.permutation(o) if trial % 3 == 0 else o for o in order])
        top_ids = order
        top_vals = np.take_along_axis(logits, order, axis=1)
        srt = np.argsort(-top_vals, axis=1, kind="stable")  # TopK returns values sorted, descending
        top_ids, top_vals = np.take_along_axis(top_ids, srt, 1), np.take_along_axis(top_vals, srt, 1)
        rows = np.arange(16)
        fetched = []
        sl = StepLogits(top_vals, top_ids, lambda: fetched.append(1) or logits)
        assert sl.argmax_rows(rows).tolist() == _reference(logits, rows)
        for allowed in (sorted(rng.choice(V, 7, replace=False).tolist()), [int(top_ids[0, 0])], list(range(V))):
            got = [sl.argmax_within(int(r), allowed) for r in rows]
            assert got == _reference(logits, rows, allowed), (k, trial, allowed)
        assert len(fetched) <= 1  # the full logits are fetched once per step at most
    # a clear winner never touches the full logits
    clear = np.arange(50, dtype=np.float32)[None, ::-1].repeat(3, 0)
    sl = StepLogits(clear[:, :4], np.tile(np.arange(4), (3, 1)), lambda: pytest.fail("fetched the full logits"))
    assert sl.argmax_rows(np.arange(3)).tolist() == [0, 0, 0]
    assert sl.argmax_within(1, [2, 30]) == 2 and sl.fallback_rows == 0
    # NaN scores (a numerically broken row) go to the full logits, like numpy's argmax
    bad = np.array([[np.nan, 1.0, 0.5]], dtype=np.float32)
    sl = StepLogits(bad[:, :2], np.array([[0, 1]]), lambda: bad)
    assert sl.argmax_rows(np.arange(1)).tolist() == [int(np.argmax(bad[0]))] and sl.fallback_rows == 1


def test_generation_from_the_graph_top_k_matches_the_full_logits(pkg):
    """The package's top_logits/top_ids outputs drive greedy decoding with the same outputs as the full
    logits, with and without I/O binding, constrained (category trie) or not (hashtags)."""
    m = json.loads((pkg / "notellm.json").read_text())
    assert m["top_k"] >= 1 and m["outputs"][:4] == ["note_vector", "logits", "top_logits", "top_ids"]
    ref = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=4, max_new_tokens=6, device_topk=False)
    assert not ref.device_topk
    want = {t: ref._run_task_ids(NOTES, t, generate=True) for t in ("category", "hashtags")}
    for binding in (True, False):
        e = OnnxNoteEncoder(pkg, device="cpu", max_batch_notes=4, max_new_tokens=6, io_binding=binding)
        assert e.device_topk
        for t, (v, ids) in want.items():
            v2, ids2 = e._run_task_ids(NOTES, t, generate=True)
            assert ids2 == ids, (binding, t)
            np.testing.assert_allclose(v2, v, atol=1e-6)


def test_vectorised_trie_choice_matches_the_per_row_rule():
    """StepLogits.argmax_allowed (every row at once, trie states as arrays) chooses what argmax_within
    chooses row by row from LabelTrie.allowed - with the graph's top-k and from the full logits alone."""
    from notellm.prompts import LabelTrie
    from worker.encoder import StepLogits, TrieTables

    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 300, size=rng.integers(1, 6)).tolist() for _ in range(40)]
    seqs += [[7, 8, 9], [7, 8], [7, 10]]  # shared prefixes, and a label that is a prefix of another
    trie = LabelTrie(seqs)
    tables = TrieTables(trie)
    states = trie.states()
    assert len(states) == tables.next.shape[0] and states[0] == {t: tables.next[0, c]
                                                                 for c, t in enumerate(tables.tokens)
                                                                 if tables.next[0, c] >= 0}
    paths = {0: []}  # state -> the tokens that lead there
    for s, row in enumerate(states):
        for t, child in row.items():
            paths[child] = paths[s] + [t]
    live = [s for s in paths if states[s]]
    for trial in range(30):
        B, V, k = 24, 320, (1, 4, 32)[trial % 3]
        logits = rng.normal(size=(B, V)).astype(np.float32)
        if trial % 2:
            logits = np.round(logits)  # ties everywhere
        row_states = np.array([live[i] for i in rng.integers(0, len(live), B)])
        for r, s in enumerate(row_states):  # often make an allowed token the winner
            if rng.random() < 0.5:
                logits[r, list(states[s])] += 3
        ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(logits, ids, 1)
        rows = np.arange(B)
        for top in ((vals, ids), (None, None)):
            want = [StepLogits(*top, lambda: logits).argmax_within(r, trie.allowed(paths[s]))
                    for r, s in zip(rows, row_states)]
            got = StepLogits(*top, lambda: logits).argmax_allowed(rows, row_states, tables)
            assert got.tolist() == want, (trial, k, top[0] is None)


def test_a_package_that_leaves_the_gpus_fast_paths_unused_is_named():
    """On CUDA an fp32 package runs the fp32 step graph and a package without an embed graph embeds with the
    step graph: the encoder says what to export instead (structlog event encoder.package_for_device). On the
    CPU every package is as exported."""
    fp16_full = {"dtype": "fp16", "embed_graph": {"graph": "embed.onnx"}}
    assert package_advice("cuda", fp16_full) is None
    assert "--dtype fp16 --embed-graph" in package_advice("cuda", {"dtype": "fp32", "embed_graph": None})
    assert "--dtype fp16" in package_advice("cuda", {"dtype": "fp32", "quantization": "int8"})
    assert "--embed-graph" in package_advice("cuda", {"dtype": "fp16", "embed_graph": None})
    for m in (fp16_full, {"dtype": "fp32", "embed_graph": None}, {"dtype": "fp16"}):
        assert package_advice("cpu", m) is None
