"""NoteLLM (torch) on a tiny random Llama with SmolLM2's real tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from notellm.model import NoteLLM, position_ids_from_mask
from notellm.prompts import EMB_TOKEN, PROMPT_VERSION, PromptConfig
from tests.tiny import NOTES, tiny_notellm


@pytest.fixture(scope="module")
def model() -> NoteLLM:
    return tiny_notellm()


def _single(model, note, task="category"):
    b = model.tokenize_notes([note], task)
    return model.embed_batch(b.input_ids, b.attention_mask, b.emb_positions)


def test_emb_token_added_and_embeddings_resized(model):
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(EMB_TOKEN) == model.emb_token_id == len(tok) - 1
    w = model.lm.get_input_embeddings().weight
    assert w.shape[0] == len(tok)
    torch.testing.assert_close(w[-1], w[:-1].mean(0), atol=1e-6, rtol=0)
    assert model.proj.weight.shape == (128, model.lm.config.hidden_size) and model.proj.bias is None


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_single_with_padding(model, side):
    b = model.tokenize_notes(NOTES, "category", padding_side=side)
    assert (b.attention_mask == 0).any(), "the batch must actually be padded"
    # emb_positions point at [EMB] in every row
    assert (b.input_ids[torch.arange(len(NOTES)), b.emb_positions] == model.emb_token_id).all()
    batched = model.embed_batch(b.input_ids, b.attention_mask, b.emb_positions)
    single = torch.cat([_single(model, n) for n in NOTES])
    torch.testing.assert_close(batched, single, atol=2e-6, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(NOTES)), atol=1e-5, rtol=0)


@torch.no_grad()
def test_vector_is_read_just_before_emb(model):
    """Prefix-only rows give the same vector as full prompts; the vector equals the projected final
    hidden state of the last prefix token (`...is:"`)."""
    full = model.tokenize_notes(NOTES, "category")
    prefix = model.tokenize_notes(NOTES, "category", include_continuation=False, padding_side="left")
    assert (prefix.emb_positions == prefix.input_ids.shape[1]).all()
    a = model.embed_batch(full.input_ids, full.attention_mask, full.emb_positions)
    b = model.embed_batch(prefix.input_ids, prefix.attention_mask, prefix.emb_positions)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    e = model.prompts.encode(NOTES[0], "category")
    assert model.tokenizer.decode(e.prefix_ids[-1:]) == ':"'
    ids = torch.tensor([e.prefix_ids])
    h = model.lm(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(a[0], F.normalize(model.proj(h), dim=-1), atol=2e-6, rtol=0)


def test_position_ids_rule():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(m).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 1]]


def test_csft_forward_one_pass_embeddings_and_loss(model):
    cats = ["Adventure", "Action", "sports", "tips", "Comedy", "misc"]
    tags = [["pixar", "toys"], ["heist"], ["marathon", "rain", "dc", "running"], ["tip"], ["paris"], ["long"]]
    tasks = ["category", "hashtags", "hashtags", "category", "category", "hashtags"]
    b = model.tokenize_notes(NOTES, tasks, categories=cats, hashtags=tags)
    assert b.labels is not None and b.tasks == tuple(tasks)
    out = model(b.input_ids, b.attention_mask, b.emb_positions, b.labels, return_logits=True)
    # labels cover only the target output (+ closing quote + EOS)
    row = b.labels[0][b.labels[0] != -100].tolist()
    assert row[-1] == model.eos_token_id and model.tokenizer.decode(row[:-1]) == 'Adventure"'
    row = b.labels[2][b.labels[2] != -100].tolist()
    assert model.tokenizer.decode(row[:-1]) == 'marathon, rain, dc"'
    assert (b.labels[b.attention_mask == 0] == -100).all()
    # the loss equals HF-style shifted cross-entropy over label tokens computed from full logits
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                          b.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    # embeddings from the same pass equal the embedding-only path
    with torch.no_grad():
        e = model.embed_batch(b.input_ids, b.attention_mask, b.emb_positions)
    torch.testing.assert_close(out.embeddings.detach(), e, atol=2e-6, rtol=0)
    # gradients reach the projection and the LM
    model.zero_grad()
    (out.loss + out.embeddings.sum()).backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    assert model.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError):
        model.tokenize_notes(NOTES[:1], "hashtags", hashtags=[[]])


def test_save_load_round_trip(tmp_path):
    from notellm.base_models import tiny_llama

    lm, tok = tiny_llama(seed=1)
    m = NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id="tiny-llama-seed1", dim=32, seed=3,
                          prompt_config=PromptConfig(max_title_tokens=12, num_topics=4)).eval()
    with torch.no_grad():
        before = m.embed_notes(NOTES, batch_size=4)
    m.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "notellm.json").read_text())
    assert cfg["dim"] == 32 and cfg["prompt_version"] == PROMPT_VERSION
    assert cfg["base_model_id"] == "tiny-llama-seed1" and cfg["prompt"]["max_title_tokens"] == 12
    assert cfg["emb_token_id"] == m.emb_token_id
    loaded = NoteLLM.load(tmp_path / "m")
    assert loaded.dim == 32 and loaded.prompt_config == m.prompt_config
    assert loaded.emb_token_id == m.emb_token_id and len(loaded.tokenizer) == len(m.tokenizer)
    with torch.no_grad():
        after = loaded.embed_notes(NOTES, batch_size=3)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
