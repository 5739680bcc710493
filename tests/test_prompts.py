"""Prompt building, truncation by tokens, token-id rules and output parsing (notellm.prompts; no torch)."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from notellm.prompts import (
    EMB_TOKEN,
    PROMPT_VERSION,
    NoteText,
    PromptConfig,
    PromptEncoder,
    as_text_tokenizer,
    build_prompt,
    note_json,
    parse_category,
    parse_hashtags,
    training_parts,
    truncate_columns_batch,
    truncate_tokens,
    truncate_tokens_batch,
)
from tests.tiny import tokenizer_json


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.from_file(str(tokenizer_json()))
    if t.token_to_id(EMB_TOKEN) is None:
        t.add_special_tokens([EMB_TOKEN])
    return t


TOY = NoteText("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", "Adventure")


def test_category_prompt_matches_the_paper_template(tok):
    p = build_prompt(tok, TOY, "category")
    assert p.text == (
        "Extract the note information in json format, compress it into one word for recommendation, "
        "and generate the category of the note. "
        '{"title": "Toy Story (1995)", "topic": "Adventure", '
        '"content": "Adventure|Animation|Children|Comedy|Fantasy"} '
        'The compression word is:"[EMB]". The category is:"'
    )
    assert p.prefix.endswith('The compression word is:"')
    assert p.continuation == '[EMB]". The category is:"'


def test_hashtag_prompt_has_j_topics_and_no_topic_field(tok):
    p = build_prompt(tok, TOY, "hashtags", j=4)
    assert p.instruction.endswith("and generate 4 topics of the note.")
    assert '"topic"' not in p.note_text
    assert p.continuation == '[EMB]". The 4 topics are:"'
    assert build_prompt(tok, TOY, "hashtags").continuation.endswith("The 3 topics are:\"")  # cfg default j
    with pytest.raises(ValueError):
        build_prompt(tok, TOY, "summary")


def test_batched_note_ids_equal_the_per_note_ids(tok):
    """note_ids_many (the worker's batched pass) builds the very ids of note_ids, for every task, on
    notes that hit every truncation branch: empty and missing fields, fields over their limit, multi-byte
    characters cut at the limit, quotes, backslashes and newlines that JSON escapes."""
    cfg = PromptConfig(max_title_tokens=4, max_topic_tokens=3, max_content_tokens=6)
    enc = PromptEncoder(tok, cfg)
    notes = [TOY, NoteText("", "", None), NoteText("t", "", ""), NoteText("a b c d e f g h", "x " * 40, "p q r s t"),
             NoteText("日本語のタイトルがとても長い場合", "émojis 🎉🎉🎉🎉🎉🎉🎉🎉 ça", "トピック長い長い"),
             NoteText('quote " back \\ slash', "line\nbreak\ttab", "\u0000 nul"),
             NoteText("🎉" * 10, "内容" * 20, None)]
    many = enc.note_ids_many(notes, ("category", "hashtags"))
    for task in ("category", "hashtags"):
        assert many[task] == [enc.note_ids(n, task) for n in notes], task
    assert enc.note_ids_many(notes, ("category",)) == {"category": many["category"]}
    assert enc.note_ids_many([], ("category",)) == {"category": []}
    with pytest.raises(ValueError):
        enc.note_ids_many(notes, ("summary",))


def test_the_batched_pass_skips_offsets_where_the_library_can(tok):
    """tokenizers >= 0.21 encodes a batch without offsets (encode_batch_fast, ~20 % less CPU on the
    polling thread's prompts): the adapter takes it when it is there, else encode_batch; the ids are equal."""
    calls = []

    class Spy:
        def __init__(self, fast: bool):
            if not fast:
                self.encode_batch_fast = None
        def __getattr__(self, name):
            fn = getattr(tok, name)
            return lambda *a, **kw: (calls.append(name), fn(*a, **kw))[1]

    texts = ["Toy Story (1995)", "", "日本語 🎉 \"quoted\"", "x " * 50]
    want = [list(tok.encode(t, add_special_tokens=False).ids) if t else [] for t in texts]
    assert as_text_tokenizer(Spy(fast=True)).encode_batch(texts) == want and calls == ["encode_batch_fast"]
    calls.clear()
    assert as_text_tokenizer(Spy(fast=False)).encode_batch(texts) == want and calls == ["encode_batch"]


def test_columns_truncate_like_one_text_at_a_time_in_one_encode(tok):
    """truncate_columns_batch (the batched pass's fields: title, content, topic, each with its limit) gives
    each text exactly truncate_tokens' string, through one batched encode and one batched decode for all
    columns, on both adapters; empty and missing texts never reach the tokenizer."""
    from notellm.base_models import smollm2_tokenizer

    titles = ["Toy Story (1995)", "", None, "日本語のタイトルがとても長い場合 " * 3, '"quoted" \\ back']
    contents = ["x " * 50, "émojis 🎉🎉🎉🎉🎉🎉🎉🎉 ça", "short", "", "内容" * 20]
    topics = ["p q r s t u", None, "", "a", "トピック長い長い"]
    columns = [(titles, 4), (contents, 6), (topics, 3)]
    want = [[truncate_tokens(tok, x, m) for x in texts] for texts, m in columns]
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(tok, name)
            return lambda *a, **kw: (calls.append((name, len(a[0]))), fn(*a, **kw))[1]

    assert truncate_columns_batch(Spy(), columns) == want
    assert calls == [("encode_batch_fast", 10), ("decode_batch", 8)]  # 10 texts not empty, 8 over their limit
    assert truncate_columns_batch(tok, [(titles, 4)]) == [truncate_tokens_batch(tok, titles, 4)] == want[:1]
    hf = smollm2_tokenizer()
    assert truncate_columns_batch(hf, columns) == want
    long = as_text_tokenizer(tok).long_prefixes(["x " * 50, "short", "x " * 50], [6, 6, 100])
    assert long[0] == as_text_tokenizer(tok).encode("x " * 50)[:6] and long[1] is None and long[2] is None
    assert as_text_tokenizer(hf).long_prefixes(["x " * 50, "short"], [6, 6]) == long[:2]


def test_truncation_by_tokens_keeps_json_well_formed(tok):
    t = as_text_tokenizer(tok)
    nasty = 'He said "stop" {now} \\ back\\slash, 東京 ☕️ ' * 30
    note = NoteText(title=nasty, content=nasty * 3, topic=nasty)
    cfg = PromptConfig(max_title_tokens=7, max_topic_tokens=5, max_content_tokens=11)
    d = json.loads(note_json(tok, note, "category", cfg))
    assert len(t.encode(d["title"])) <= 7
    assert len(t.encode(d["topic"])) <= 5
    assert len(t.encode(d["content"])) <= 11
    assert nasty.startswith(d["title"]) and d["title"]
    # defaults: 20 / 80 tokens; short fields untouched
    d = json.loads(note_json(tok, NoteText("short", "x " * 500, None), "category"))
    assert d["title"] == "short" and d["topic"] == ""
    assert len(t.encode(d["content"])) <= 80
    assert truncate_tokens(tok, "", 5) == "" and truncate_tokens(tok, None, 5) == ""


def test_token_ids_are_the_natural_tokenisation_and_emb_position(tok):
    enc = PromptEncoder(tok, eos_token_id=2)
    e = enc.encode(TOY, "category")
    assert e.input_ids[e.emb_position] == tok.token_to_id(EMB_TOKEN)
    assert tok.decode(e.prefix_ids, skip_special_tokens=False).endswith('The compression word is:"')
    full = tok.encode(build_prompt(tok, TOY, "category").text, add_special_tokens=False).ids
    assert e.input_ids == full
    assert e.input_ids[:e.instruction_len] == enc.instruction_ids("category")
    # the instruction segment is identical for every note
    e2 = enc.encode(NoteText("Heat", "Action|Crime", None), "category")
    assert e2.prefix_ids[:e2.instruction_len] == e.prefix_ids[:e.instruction_len]
    assert e2.continuation_ids == e.continuation_ids


def test_hf_and_tokenizers_adapters_agree(tok):
    from notellm.base_models import smollm2_tokenizer

    hf = smollm2_tokenizer()
    hf.add_tokens([EMB_TOKEN], special_tokens=True)
    a = PromptEncoder(tok, eos_token_id=2).encode(TOY, "hashtags", target="animation, pixar")
    b = PromptEncoder(hf, eos_token_id=2).encode(TOY, "hashtags", target="animation, pixar")
    assert a == b


def test_training_parts_and_targets(tok):
    p = training_parts(tok, TOY, "category", category="Adventure")
    assert p.target == 'Adventure"'
    assert p.text.endswith('The category is:"Adventure"')
    p = training_parts(tok, TOY, "hashtags", hashtags=["#pixar", "Pixar", "toys", "buddy", "90s"])
    assert p.continuation.endswith('The 3 topics are:"')
    assert p.target == 'pixar, toys, buddy"'
    p = training_parts(tok, TOY, "hashtags", hashtags=["pixar"])
    assert p.continuation.endswith('The 1 topics are:"')
    with pytest.raises(ValueError):
        training_parts(tok, TOY, "hashtags", hashtags=[])
    with pytest.raises(ValueError):
        training_parts(tok, TOY, "category", category=None)
    enc = PromptEncoder(tok, eos_token_id=2)
    e = enc.encode_parts(training_parts(tok, TOY, "category", category="Adventure"))
    assert e.target_ids[-1] == 2 and tok.decode(e.target_ids[:-1]) == 'Adventure"'
    assert e == enc.encode(TOY, "category", target="Adventure")


def test_output_parsing():
    assert parse_category(' Comedy "  trailing') == "Comedy"
    assert parse_category('  Science  fiction.') == "Science fiction"
    assert parse_category('"') is None and parse_category("") is None
    assert parse_hashtags('#pixar, Pixar ,toys; #buddy "rest') == ["pixar", "toys", "buddy"]
    assert parse_hashtags("a, b, c, d", limit=2) == ["a", "b"]
    assert parse_hashtags(" , ,") == []


def test_prompt_config_round_trip():
    cfg = PromptConfig(max_title_tokens=10, num_topics=5)
    assert PromptConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.version == PROMPT_VERSION
    with pytest.raises(ValueError):
        PromptConfig.from_dict({"version": "other"})


def test_label_trie_spells_each_label_as_csft_trained_it(tok):
    from notellm.prompts import LabelTrie, category_target

    labels = ["Sports", "Sports news", "Science & Tech", 'Say "hi"', ""]
    trie = LabelTrie.for_labels(tok, labels)
    assert trie.size == 4  # the empty label is no label
    enc = PromptEncoder(tok, PromptConfig(), eos_token_id=0)
    for label in labels[:4]:
        # the CSFT target of that category, without its EOS: a path of the trie from the root to a leaf
        target = enc.encode(NoteText("t", "c"), "category", target=category_target(label)).target_ids[:-1]
        for i, t in enumerate(target):
            assert t in trie.allowed(target[:i]), (label, i)
        assert trie.allowed(target) == []
    assert trie.allowed([10**6]) == []  # off the set
    first = trie.allowed([])
    assert first == sorted(first) and len(first) <= 3  # "S..." shared where the tokens are
