"""Prompt building, truncation by tokens, token-id rules and output parsing (notellm.prompts; no torch)."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


def _data_notes(root) -> list[NoteText]:
    from notellm.data import load_dataset

    out = []
    for name in ("mind-small-sample", "amazon-scientific"):
        for x in load_dataset(root / name).notes.values():
            out.append(NoteText(x.title, x.content, x.topic or x.category))  # MIND's category as a topic
    return out


def test_composed_ids_are_the_whole_encode_on_every_note_of_both_data_sets(tok, monkeypatch, shared_data):
    """The worker's batched pass composes most notes' ids from their fields' ids (notellm.prompts._Composer)
    instead of encoding each note's text again: on every MIND and Amazon note, for both tasks, at the
    default limits and at small ones (most fields truncated), the ids are note_ids' own, and at most one
    note in five was encoded whole."""
    import notellm.prompts as prompts

    notes = _data_notes(shared_data)
    assert len(notes) > 6000
    for cfg in (PromptConfig(), PromptConfig(max_title_tokens=6, max_topic_tokens=2, max_content_tokens=17)):
        enc = PromptEncoder(tok, cfg)
        assert enc.composer is not None
        whole = []
        real = prompts._note_dict
        monkeypatch.setattr(prompts, "_note_dict", lambda *a: (whole.append(a), real(*a))[1])
        many = {"category": [], "hashtags": []}
        for i in range(0, len(notes), 500):
            got = enc.note_ids_many(notes[i:i + 500], ("category", "hashtags"))
            for task in many:
                many[task] += got[task]
        monkeypatch.setattr(prompts, "_note_dict", real)
        assert len(whole) < 0.2 * 2 * len(notes), len(whole)
        for task in ("category", "hashtags"):
            ref = [enc.note_ids(n, task) for n in notes]
            bad = [i for i, (a, b) in enumerate(zip(many[task], ref)) if a != b]
            assert not bad, (task, cfg, notes[bad[0]])


EDGES = ["'", '"', "\\", " ", "  ", "\u3000", "\u00a0", "\n", "\t", ".", ",", "!", "?", "(", ")", "-", "#", "$",
         "€", "'s", "'ll", "’", "é", "e\u0301", "\u0301", "日本語", "東京", "🎉", "\u200b", "\ufeff", "\u2028",
         "[EMB]", "<|im_start|>", "<|endoftext|>", "a", "Zebra", "hello", "world", "don't", "42", "3.14", "x1", "ß",
         "İ", "\U00010400", "\ue000", "}", "{", ":", '":"', "_", "\x00", "\x7f", "\u0085"]
_piece = st.one_of(st.sampled_from(EDGES), st.characters(codec="utf-8", exclude_categories=["Cs"]))
_field = st.one_of(st.lists(_piece, max_size=14).map("".join),
                   st.builds(lambda p, n: p * n, st.sampled_from(["word ", "ab", "a.", "日本", "x'", " ", "🎉 "]),
                             st.integers(0, 120)),
                   # long enough to be encoded in part, an added token's text where the part may end
                   st.builds(lambda w, k, a: (w * 200)[:k] + a + " more words" * 12,
                             st.sampled_from([" computer", " national", "ab", "日本", "x_y"]), st.integers(1, 90),
                             st.sampled_from(["<issue_start>", "<repo_name>", "<file_sep>", "[EMB]", "<|im_start|>"])))


_ENCODERS: dict[tuple[int, int], PromptEncoder] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_field, _field, st.one_of(st.none(), _field)), min_size=1, max_size=6),
       st.integers(1, 9), st.integers(1, 9))
def test_composed_ids_are_the_whole_encode_on_hostile_fields(tok, fields, title_max, content_max):
    """Generated fields full of what could move a piece boundary (quotes, apostrophes and contractions,
    every kind of space, combining marks, added tokens' text, JSON escapes, private-use characters,
    fields long enough to be encoded in part) at small limits: note_ids_many gives note_ids' ids."""
    key = (title_max, content_max)
    if key not in _ENCODERS:
        _ENCODERS[key] = PromptEncoder(tok, PromptConfig(max_title_tokens=title_max, max_topic_tokens=3,
                                                         max_content_tokens=content_max))
    enc = _ENCODERS[key]
    assert enc.composer is not None
    notes = [NoteText(t, c, p) for t, c, p in fields]
    many = enc.note_ids_many(notes, ("category", "hashtags"))
    for task in ("category", "hashtags"):
        assert many[task] == [enc.note_ids(n, task) for n in notes], task


def test_isalnum_is_exactly_the_letters_and_digits_of_the_pattern():
    """_Composer finds a field's core with str.isalnum(), standing for the pattern's \\p{L} and \\p{N}: in this
    Python's Unicode database the two are the same set of code points."""
    import sys
    import unicodedata

    differ = [hex(i) for i in range(sys.maxunicode + 1)
              if chr(i).isalnum() != (unicodedata.category(chr(i))[0] in "LN")]
    assert differ == []


def test_a_long_field_is_encoded_in_part(tok, monkeypatch):
    """A 64 KiB content costs the batched pass about what a short one does: only a prefix of it (up to a
    point no piece spans) reaches the tokenizer, and the ids are note_ids' own; a field whose prefix
    holds too few tokens (one long 'word') is encoded whole, and is still right."""
    import notellm.prompts as prompts

    enc = PromptEncoder(tok)
    long = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 1200)[:64 * 1024]
    dense = "x" * 5000 + " end"  # a prefix of 8 characters a token holds under 80 tokens
    notes = [NoteText("A title", long, None), NoteText("Dense", dense, None), NoteText("short", "body.", None)]
    sent = []
    real = enc.tok.encode_batch
    monkeypatch.setattr(enc.tok, "encode_batch", lambda texts: (sent.extend(texts), real(texts))[1])
    many = enc.note_ids_many(notes, ("category",))
    monkeypatch.undo()
    assert many["category"] == [enc.note_ids(n, "category") for n in notes]
    limit = PromptConfig().max_content_tokens * prompts._Composer.CUT_CHARS_PER_TOKEN + prompts._Composer.CUT_SEARCH
    assert long not in sent and max(len(t) for t in sent if t.startswith("Lorem")) <= limit
    assert dense in sent  # its part had too few tokens: encoded whole
    # no cut inside an added token's text: "<issue_start>" across "e|_" where the part would end (the
    # tokenizer cuts added tokens out first; cut there, the part's 5th token was "<issue" and not the token)
    enc = PromptEncoder(tok, PromptConfig(max_content_tokens=4))
    note = NoteText("T", (" computer" * 3)[:20] + "<issue_start>" + " tail words" * 20, None)
    assert enc.note_ids_many([note], ("category",))["category"] == [enc.note_ids(note, "category")]


def test_composing_is_only_for_tokenizers_it_is_proved_for(tok, monkeypatch):
    """No composing for a Hugging Face tokenizer, a normalizer, another pre-tokenizer pattern, BPE dropout
    or an added token that strips spaces: those notes are encoded whole, with the same ids. A tiny joint
    cache (cleared all the time) changes nothing either, and no joint longer than MAX_CACHED_CHARS is kept
    (a hostile stream cannot grow it past MAX_CACHED short strings)."""
    import notellm.prompts as prompts
    from notellm.base_models import smollm2_tokenizer

    base = json.loads(tok.to_str())
    variants = {"normalizer": {**base, "normalizer": {"type": "NFKC"}},
                "pattern": {**base, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"}, "behavior": "Isolated",
                     "invert": False}, {**base["pre_tokenizer"], "use_regex": False}]}},
                "prefix_space": {**base, "pre_tokenizer": {**base["pre_tokenizer"], "add_prefix_space": True}},
                "dropout": {**base, "model": {**base["model"], "dropout": 0.1}},
                "lstrip": {**base, "added_tokens": [{**a, "lstrip": True} for a in base["added_tokens"]]}}
    for name, cfg in variants.items():
        assert not prompts._Composer.supports(cfg), name
    assert prompts._Composer.supports(base)
    hf = smollm2_tokenizer()
    hf.add_tokens([EMB_TOKEN], special_tokens=True)
    assert PromptEncoder(hf).composer is None
    notes = [TOY, NoteText("Hello, world", "It's a \"quoted\" body.", "(topic)"), NoteText("", "", None)]
    normalized = Tokenizer.from_str(json.dumps(variants["normalizer"]))
    enc = PromptEncoder(normalized)
    assert enc.composer is None
    assert enc.note_ids_many(notes, ("category",))["category"] == [enc.note_ids(n, "category") for n in notes]
    monkeypatch.setattr(prompts._Composer, "MAX_CACHED", 2)
    monkeypatch.setattr(prompts._Composer, "MAX_CACHED_CHARS", 12)  # most joints encoded each time
    enc = PromptEncoder(tok)
    for _ in range(3):
        assert enc.note_ids_many(notes, ("category", "hashtags")) == {
            t: [enc.note_ids(n, t) for n in notes] for t in ("category", "hashtags")}
        assert len(enc.composer._ids) <= 2 and all(len(k) <= 12 for k in enc.composer._ids)
    # a field of punctuation alone (no core: all of it a joint) is never kept
    monkeypatch.undo()
    enc = PromptEncoder(tok)
    note = NoteText("!?" * 30 + ".", "body", None)
    assert enc.note_ids_many([note], ("category",))["category"] == [enc.note_ids(note, "category")]
    assert enc.composer._ids and all(len(k) <= prompts._Composer.MAX_CACHED_CHARS for k in enc.composer._ids)


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
