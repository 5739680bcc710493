"""The NoteLLM note-compression prompt (light: imports only the standard library; the worker uses it).

Prompt shape, as in the NoteLLM paper (Zhang et al., 2024):

    <Instruction> <Input Note> The compression word is:"[EMB]". <Output Guidance>"<Output>"

- category task:  instruction "Extract the note information in json format, compress it into one word for
  recommendation, and generate the category of the note.", input {"title", "topic", "content"},
  guidance "The category is:".
- hashtags task:  "... and generate <j> topics of the note.", input {"title", "content"},
  guidance "The <j> topics are:".

The output is written between double quotes, like the compression word: ``The category is:"Movies"``
then EOS; hashtags as ``The 3 topics are:"comedy, romance, paris"``. Generation stops at EOS or at the
closing quote, whichever comes first.

Token ids are built segment by segment and concatenated (this module owns the rule, so the torch model,
the exporter's validation and the ONNX worker produce identical ids):

    instruction_ids = encode(instruction)
    note_ids        = encode(" " + input_json + ' The compression word is:"')
    prefix_ids      = instruction_ids + note_ids          # the note vector is read at its LAST token
    continuation    = [EMB id] + encode('". ' + guidance + '"')
    target_ids      = encode(output + '"') + [EOS]        # training only

The instruction segment is identical for every note of a task, so its key/value cache can be shared.
Title, topic and content are truncated by tokens (defaults 20 / 16 / 80) *before* the JSON is built, so
the JSON stays well formed. ``PROMPT_VERSION`` names this whole rule and goes into every manifest.

Tokenizers: anything with ``encode``/``decode`` works (a ``tokenizers.Tokenizer`` or a Hugging Face
tokenizer) through :func:`as_text_tokenizer`; special tokens are never added implicitly.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

PROMPT_VERSION = "notellm-prompt-v1"
EMB_TOKEN = "[EMB]"
COMPRESSION_LEAD = ' The compression word is:"'
OUTPUT_QUOTE = '"'

Task = Literal["category", "hashtags"]
TASKS: tuple[str, ...] = ("category", "hashtags")

_INSTRUCTION_HEAD = "Extract the note information in json format, compress it into one word for recommendation"
CATEGORY_INSTRUCTION = f"{_INSTRUCTION_HEAD}, and generate the category of the note."
CATEGORY_GUIDANCE = "The category is:"


def hashtag_instruction(j: int) -> str:
    return f"{_INSTRUCTION_HEAD}, and generate {j} topics of the note."


def hashtag_guidance(j: int) -> str:
    return f"The {j} topics are:"


@dataclass(frozen=True)
class NoteText:
    """The text of one note. Any object with these attributes is accepted wherever a note is expected."""

    title: str
    content: str
    topic: str | None = None


class NoteLike(Protocol):
    title: str
    content: str
    topic: str | None


@dataclass(frozen=True)
class PromptConfig:
    """Everything that shapes a prompt; stored in the model's ``notellm.json`` and the ONNX manifest."""

    max_title_tokens: int = 20
    max_topic_tokens: int = 16
    max_content_tokens: int = 80
    num_topics: int = 3  # j used at inference for the hashtags task
    version: str = PROMPT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PromptConfig":
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**known)
        if cfg.version != PROMPT_VERSION:
            raise ValueError(f"prompt version {cfg.version!r} is not supported by this code ({PROMPT_VERSION!r})")
        return cfg


# --------------------------------------------------------------------------------------------- tokenizers
class TextTokenizer:
    """Uniform adapter: ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids) -> str``,
    ``token_id(token) -> int | None``. Wraps a ``tokenizers.Tokenizer`` or a Hugging Face tokenizer."""

    def __init__(self, tok: Any):
        self.raw = tok
        # A tokenizers.Tokenizer returns an Encoding (with .ids); a HF tokenizer returns a list.
        self._hf = hasattr(tok, "convert_tokens_to_ids")
        # tokenizers >= 0.21 encodes a batch without the offsets nobody here reads: the same ids, ~15-20 %
        # less time (bench/tokenizing.py's offsets_cost). Public so that a benchmark can turn it off.
        self.fast_batches = not self._hf and callable(getattr(tok, "encode_batch_fast", None))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        out = self.raw.encode(text, add_special_tokens=False)
        return list(out.ids) if hasattr(out, "ids") else list(out)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not self._hf and hasattr(self.raw, "encode_batch"):
            encode = self.raw.encode_batch_fast if self.fast_batches else self.raw.encode_batch
            encs = encode(list(texts), add_special_tokens=False)
            return [e.ids if t else [] for e, t in zip(encs, texts)]  # .ids is a new list each time
        return [self.encode(t) for t in texts]

    def long_prefixes(self, texts: Sequence[str], max_tokens: Sequence[int]) -> list[list[int] | None]:
        """One batched encode: for each text, None when it has at most ``max_tokens[i]`` tokens, else
        its first ``max_tokens[i]`` ids. Only the long texts' ids become Python lists (a length check
        needs none: the polling thread's truncation pass builds ~3x fewer ints)."""
        if not self._hf and hasattr(self.raw, "encode_batch"):
            encode = self.raw.encode_batch_fast if self.fast_batches else self.raw.encode_batch
            encs = encode(list(texts), add_special_tokens=False)
            return [None if not t or len(e) <= m else e.ids[:m] for e, t, m in zip(encs, texts, max_tokens)]
        out: list[list[int] | None] = []
        for t, m in zip(texts, max_tokens):
            ids = self.encode(t)
            out.append(None if len(ids) <= m else ids[:m])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        if not self._hf and hasattr(self.raw, "decode_batch"):
            return list(self.raw.decode_batch([list(x) for x in seqs], skip_special_tokens=False))
        return [self.decode(x) for x in seqs]

    def token_id(self, token: str) -> int | None:
        if self._hf:
            i = self.raw.convert_tokens_to_ids(token)
            unk = getattr(self.raw, "unk_token_id", None)
            return None if i is None or (i == unk and token != getattr(self.raw, "unk_token", None)) else int(i)
        i = self.raw.token_to_id(token)
        return None if i is None else int(i)


def as_text_tokenizer(tok: Any) -> TextTokenizer:
    return tok if isinstance(tok, TextTokenizer) else TextTokenizer(tok)


def truncate_tokens(tok: Any, text: str | None, max_tokens: int) -> str:
    """The longest token prefix of ``text`` with at most ``max_tokens`` tokens, decoded back to text
    (a multi-byte character cut in half is dropped)."""
    if not text:
        return ""
    t = as_text_tokenizer(tok)
    ids = t.encode(text)
    if len(ids) <= max_tokens:
        return text
    return t.decode(ids[:max_tokens]).rstrip("\ufffd")


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptParts:
    """The text pieces of one prompt.

    ``instruction + note_text`` is the prefix ending in ``The compression word is:"``; ``continuation``
    starts with ``[EMB]`` and ends with the opening quote of the output; ``target`` (training only) is the
    output followed by its closing quote (EOS is appended as a token id, not text)."""

    task: str
    instruction: str
    note_text: str
    continuation: str
    target: str | None = None

    @property
    def prefix(self) -> str:
        return self.instruction + self.note_text

    @property
    def text(self) -> str:
        return self.prefix + self.continuation + (self.target or "")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def instruction_for(task: str, j: int) -> str:
    _check_task(task)
    return CATEGORY_INSTRUCTION if task == "category" else hashtag_instruction(j)


def continuation_for(task: str, j: int) -> str:
    _check_task(task)
    guidance = CATEGORY_GUIDANCE if task == "category" else hashtag_guidance(j)
    return f'{EMB_TOKEN}". {guidance}{OUTPUT_QUOTE}'


def truncate_tokens_batch(tok: Any, texts: Sequence[str | None], max_tokens: int) -> list[str]:
    """:func:`truncate_tokens` for many texts with one batched encode and one batched decode (the
    tokenizers library runs a batch on all cores); the same strings as one call per text."""
    return truncate_columns_batch(tok, [(texts, max_tokens)])[0]


def truncate_columns_batch(tok: Any, columns: Sequence[tuple[Sequence[str | None], int]]) -> list[list[str]]:
    """:func:`truncate_tokens_batch` for several columns of texts, each with its own limit (a note's
    title, content and topic), in one batched encode and one batched decode for all of them: the same
    strings, with fewer calls into the tokenizer (each releases and re-takes the GIL)."""
    t = as_text_tokenizer(tok)
    flat, limits = _flatten(columns)
    live = [i for i, x in enumerate(flat) if x]  # an empty field needs no tokenizer
    prefixes = t.long_prefixes([flat[i] for i in live], [limits[i] for i in live])
    long = [(i, p) for i, p in zip(live, prefixes) if p is not None]
    if long:
        for (i, _), text in zip(long, t.decode_batch([p for _, p in long])):
            flat[i] = text.rstrip("\ufffd")
    return _unflatten(flat, columns)


def _flatten(columns: Sequence[tuple[Sequence[str | None], int]]) -> tuple[list[str], list[int]]:
    """Columns of texts with a token limit each, as one list of texts ("" for None) and their limits."""
    return [x or "" for texts, _ in columns for x in texts], [m for texts, m in columns for _ in texts]


def _unflatten(flat: list, columns: Sequence[tuple[Sequence[Any], int]]) -> list[list]:
    """`flat` cut back into `columns`' lengths."""
    out, k = [], 0
    for texts, _ in columns:
        out.append(flat[k:k + len(texts)])
        k += len(texts)
    return out


def _note_dict(task: str, title: str, topic: str, content: str) -> str:
    d: dict[str, str] = {"title": title}
    if task == "category":
        d["topic"] = topic
    d["content"] = content
    return json.dumps(d, ensure_ascii=False)


def note_json(tok: Any, note: NoteLike, task: str, cfg: PromptConfig = PromptConfig()) -> str:
    """The note as JSON, fields truncated by tokens first (hashtags task: no topic field)."""
    _check_task(task)
    t = as_text_tokenizer(tok)
    topic = truncate_tokens(t, getattr(note, "topic", None) or "", cfg.max_topic_tokens) if task == "category" else ""
    return _note_dict(task, truncate_tokens(t, note.title, cfg.max_title_tokens), topic,
                      truncate_tokens(t, note.content, cfg.max_content_tokens))


def build_prompt(tok: Any, note: NoteLike, task: str = "category", cfg: PromptConfig = PromptConfig(),
                 *, j: int | None = None, target: str | None = None) -> PromptParts:
    """The prompt text pieces for one note. ``j`` = number of topics (hashtags task; default
    ``cfg.num_topics``); ``target`` = the output text (without quotes), for training."""
    j = cfg.num_topics if j is None else j
    return PromptParts(
        task=task,
        instruction=instruction_for(task, j),
        note_text=" " + note_json(tok, note, task, cfg) + COMPRESSION_LEAD,
        continuation=continuation_for(task, j),
        target=None if target is None else target + OUTPUT_QUOTE,
    )


def category_target(category: str) -> str:
    return " ".join(str(category).replace('"', "'").split())


def hashtags_target(hashtags: Iterable[str], j: int) -> str:
    tags = dedupe_tags(hashtags)[:j]
    return ", ".join(tags)


def training_parts(tok: Any, note: NoteLike, task: str, cfg: PromptConfig = PromptConfig(), *,
                   category: str | None = None, hashtags: Sequence[str] | None = None,
                   j: int | None = None) -> PromptParts:
    """Full CSFT training text pieces: prefix, ``[EMB]". <guidance>"`` continuation and the target
    (the category, or the note's first ``j`` distinct hashtags; ``j`` defaults to
    ``min(len(hashtags), cfg.num_topics)``). Raises ValueError when the note has no such label."""
    if task == "category":
        if not category or not category_target(category):
            raise ValueError("category task needs a non-empty category")
        return build_prompt(tok, note, task, cfg, target=category_target(category))
    _check_task(task)
    tags = dedupe_tags(hashtags or [])
    if not tags:
        raise ValueError("hashtags task needs at least one hashtag")
    j = min(len(tags), cfg.num_topics) if j is None else min(j, len(tags))
    return build_prompt(tok, note, task, cfg, j=j, target=hashtags_target(tags, j))


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt. The note vector is read at ``len(prefix_ids) - 1``; the [EMB] token sits
    at ``len(prefix_ids)`` of ``prefix_ids + continuation_ids``."""

    instruction_len: int
    prefix_ids: list[int]
    continuation_ids: list[int]
    target_ids: list[int] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:
        return self.prefix_ids + self.continuation_ids + self.target_ids

    @property
    def emb_position(self) -> int:
        return len(self.prefix_ids)


def _category_class(c: str) -> str:
    return unicodedata.category(c)[0]


def _piece_edge(text: str, start: int, span: int, added: Sequence[str] = (), added_first: Any = None,
                longest: int = 0) -> int | None:
    """The first index p in [start, start + span) with a letter or digit before it and punctuation, a
    symbol or a space at it, inside no occurrence of an `added` token's text (the tokenizer cuts those
    out before its pattern runs, e.g. ``<file_sep>`` across ``e|_``): no piece spans p (see `_Composer`).
    `added_first`: a compiled character class of the added tokens' first characters, `longest`: the longest
    added token's length (a fast pre-check together)."""
    for p in range(max(start, 1), min(start + span, len(text))):
        if text[p].isalnum() or not text[p - 1].isalnum():  # cheap rejections first
            continue
        if _category_class(text[p - 1]) not in "LN" or _category_class(text[p]) not in "PSZ":
            continue
        near = max(0, p - (longest or len(text)) + 1)  # where an added token spanning p would start
        if added and (added_first is None or added_first.search(text, near, p)) and any(
                0 <= text.find(a, max(0, p - len(a) + 1), p + len(a) - 1) < p for a in added):
            continue
        return p
    return None


class _Composer:
    """A note's prompt ids composed from its fields' own ids, for `PromptEncoder.note_ids_many`.

    The note text is ``" " + json + COMPRESSION_LEAD``; its fields are whole JSON strings inside it. A
    tokenizer that `supports` composing splits a text into pieces with GPT-2's pattern
    (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``), then
    byte-pair-encodes each piece alone. So where a text can be cut at a point no piece spans, whatever
    the text around it, its ids are the ids of the two sides encoded alone, concatenated. A point just
    after a letter or digit (Unicode L*/N*) and before a character that is not one is such a point (no
    alternative takes both); so is a point between a punctuation or symbol character (P*/S*, not ``'``,
    which starts contractions) and a letter or digit. A field is cut into head + core + tail: the core
    runs from its first to its last letter or digit. The core's ids are then the same inside the note
    text and in the field alone (where the truncation pass already computed them, less its head's and
    tail's), and the rest of the note text (the JSON between the cores, with the heads and tails: a
    "joint") is encoded alone, once per distinct joint (cached). A note is composed only when every
    field of it passes `plan`'s checks: the same text inside the JSON (nothing escaped);
    no added token's text in it (added tokens are cut out before the pattern runs); a head that ends
    in P*/S* other than ``'``; a tail that starts with P*/S*/Z*. Any other note is encoded whole.
    """

    MAX_CACHED = 8192  # distinct joints, heads and tails kept (cleared when full)
    MAX_CACHED_CHARS = 64  # longer ones (a field of punctuation alone) are encoded each time, never kept
    CUT_CHARS_PER_TOKEN = 8  # a field longer than this many characters per token kept is encoded in part
    CUT_SEARCH = 64  # characters searched for a point to cut it at (none found: encoded whole)
    _MARKS = ("\ue000", "\ue001", "\ue002")  # private-use stand-ins for title, topic, content

    def __init__(self, tok: TextTokenizer, cfg: dict) -> None:
        """`cfg`: the tokenizer's own JSON (`tok.raw.to_str()`), which `supports`."""
        self.tok = tok
        added = [a["content"] for a in cfg.get("added_tokens") or ()]
        self._added_texts = tuple(a for a in added if a)
        self._added_longest = max(map(len, self._added_texts), default=0)
        texts = self._added_texts
        self._added = re.compile("|".join(map(re.escape, texts))) if texts else None
        # a one-character-class scan before the search: most fields hold no added token's first character
        self._added_first = (re.compile("[" + "".join(sorted({re.escape(a[0]) for a in texts})) + "]")
                             if texts else None)
        self._ids: dict[str, list[int]] = {}
        self._skeleton: dict[str, tuple[list[str], list[int]]] = {}
        for task in TASKS:
            text = " " + _note_dict(task, *self._MARKS) + COMPRESSION_LEAD
            pieces = re.split("([" + "".join(self._MARKS) + "])", text)
            self._skeleton[task] = (pieces[0::2], [self._MARKS.index(m) for m in pieces[1::2]])

    @classmethod
    def of(cls, tok: TextTokenizer) -> _Composer | None:
        """A composer for `tok` if it `supports` composing, else None (its notes are encoded whole)."""
        if tok._hf or not hasattr(tok.raw, "to_str"):
            return None
        try:
            cfg = json.loads(tok.raw.to_str())
        except Exception:  # noqa: BLE001 - not a tokenizer this can read: encode whole
            return None
        return cls(tok, cfg) if cls.supports(cfg) else None

    @staticmethod
    def supports(cfg: dict) -> bool:
        """A tokenizers.Tokenizer (`cfg`: its JSON) whose text reaches the pattern unchanged and whose
        pieces are encoded alone: no normalizer, the ByteLevel pre-tokenizer with GPT-2's pattern and no
        prefix space, BPE without dropout, added tokens matched as plain text (no strip, no single-word
        rule) and none holding a quote (so none can span a field's edge: the JSON puts a quote on each
        side)."""
        pre, model = cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
        return (cfg.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) is True and pre.get("add_prefix_space") is False
                and model.get("type") == "BPE" and model.get("dropout") is None
                and all(not (a.get("lstrip") or a.get("rstrip") or a.get("single_word")) and '"' not in a["content"]
                        for a in cfg.get("added_tokens") or ()))

    def fields(self, columns: Sequence[tuple[Sequence[str | None], int]]
               ) -> tuple[list[list[str]], list[list[list[int] | str]]]:
        """`truncate_columns_batch`'s strings, and beside each its own ids (``[]`` when empty), from one
        batched encode and one batched decode. A truncated field's ids are its kept tokens when those are
        the cut text's own ids (the cut falls after a letter or digit, before punctuation, a symbol or a
        space); else the cut text itself, for `compose` to encode (a field's worth of tokens, not the
        note's)."""
        flat, limits = _flatten(columns)
        ids: list[list[int] | str] = [[] for _ in flat]
        live = [i for i, x in enumerate(flat) if x]
        # A long field is encoded only up to a point no piece spans, past CUT_CHARS_PER_TOKEN characters
        # per token kept: those ids are the first ids of the whole field, so when there are more of them
        # than the field keeps, they are all truncation needs (a 64 KiB note costs what a short one does).
        sent, cut_short = [], set()
        for i in live:
            x, lo = flat[i], limits[i] * self.CUT_CHARS_PER_TOKEN
            p = (_piece_edge(x, lo, self.CUT_SEARCH, self._added_texts, self._added_first, self._added_longest)
                 if len(x) > lo + self.CUT_SEARCH else None)
            if p is not None:
                cut_short.add(i)
            sent.append(x if p is None else x[:p])
        long, whole = [], []
        for i, x in zip(live, self.tok.encode_batch(sent)):
            if len(x) > limits[i]:
                long.append((i, x[:limits[i]]))
                ids[i] = None
            elif i in cut_short:
                whole.append(i)  # too few tokens in the part encoded: the field needs encoding whole
            else:
                ids[i] = x
        if whole:
            for i, x in zip(whole, self.tok.encode_batch([flat[i] for i in whole])):
                if len(x) > limits[i]:
                    long.append((i, x[:limits[i]]))
                    ids[i] = None
                else:
                    ids[i] = x
        if long:
            for (i, prefix), text in zip(long, self.tok.decode_batch([p for _, p in long])):
                cut = text.rstrip("\ufffd")
                # The kept tokens are the cut text's own ids when they end where no piece spans (a letter
                # or digit, then a character that is neither): the same rule as a core's edges in plan().
                p = len(cut)
                if cut and cut == text and p < len(flat[i]) and flat[i].startswith(cut) \
                        and _category_class(cut[-1]) in "LN" and _category_class(flat[i][p]) in "PSZ":
                    ids[i] = prefix
                else:
                    ids[i] = cut  # cut inside a piece: the cut text's own ids, from compose()'s one encode
                flat[i] = cut
        return _unflatten(flat, columns), _unflatten(ids, columns)

    def plan(self, task: str, fields: Sequence[tuple[str, list[int] | str]]
             ) -> tuple[list[str], list[tuple[list[int] | str, str, str]]] | None:
        """The note text of `fields` ((text, its ids alone or the text to encode for them) for title,
        topic, content) as its joints and its cores between them ([joint, ..., joint], [(field ids, head,
        tail), ...], one more joint than cores), or None when some field fails a check (see the class
        docstring)."""
        pieces, order = self._skeleton[task]
        joints: list[str] = []
        cores: list[tuple[list[int] | str, str, str]] = []
        joint = pieces[0]
        for k, f in enumerate(order):
            text, ids = fields[f]
            if text:
                if encode_basestring(text) != f'"{text}"' or (
                        self._added is not None and self._added_first.search(text) and self._added.search(text)):
                    return None
                # str.isalnum() finds the core fast: it is exactly Unicode's L* and N* in this Python
                # (tests/test_prompts.py checks every code point); the core's edges are checked by category
                i, n = 0, len(text)
                while i < n and not text[i].isalnum():
                    i += 1
                if i == n:  # no letter or digit: the whole field is part of the joint
                    joint += text
                else:
                    j = n
                    while not text[j - 1].isalnum():
                        j -= 1
                    if _category_class(text[i]) not in "LN" or _category_class(text[j - 1]) not in "LN":
                        return None
                    head, tail = text[:i], text[j:]
                    if head and (head[-1] == "'" or _category_class(head[-1]) not in "PS"):
                        return None
                    if tail and _category_class(tail[0]) not in "PSZ":
                        return None
                    joints.append(joint + head)
                    cores.append((ids, head, tail))
                    joint = tail
            joint += pieces[k + 1]
        joints.append(joint)
        return joints, cores

    def compose(self, tasks: Sequence[str], notes: Sequence[Sequence[tuple[str, list[int] | str]]],
                whole: Callable[[str, int], str]) -> dict[str, list[list[int]]]:
        """Each task's ids for each note: composed (see `plan`) or, for a note that fails a check, its
        text ``whole(task, i)`` encoded whole. One batched encode for all that is not known yet: the
        joints, heads and tails not cached, the cut texts of `fields`, the notes encoded whole (so a
        poll makes as many calls into the tokenizer as encoding every note whole does: three)."""
        plans = {task: [self.plan(task, f) for f in notes] for task in tasks}
        cache = self._ids
        missing: set[str] = set()
        local: set[str] = set()  # cut texts and long joints: this call's only, never cached
        for ps in plans.values():
            for p in ps:
                if p is None:
                    continue
                joints, fields = p
                for x in [*joints, *(x for _, head, tail in fields for x in (head, tail) if x)]:
                    if x not in cache:
                        (missing if len(x) <= self.MAX_CACHED_CHARS else local).add(x)
                local.update(ids for ids, _, _ in fields if isinstance(ids, str))
        wholes = [(task, i) for task, ps in plans.items() for i, p in enumerate(ps) if p is None]
        missing_list, local_list = sorted(missing), sorted(local)
        encoded = self.tok.encode_batch(missing_list + local_list + [whole(task, i) for task, i in wholes]) \
            if missing_list or local_list or wholes else []
        if missing_list:
            if len(cache) + len(missing_list) > self.MAX_CACHED:
                cache.clear()
            cache.update(zip(missing_list, encoded))
        known = dict(zip(missing_list, encoded))
        known.update(zip(local_list, encoded[len(missing_list):]))
        whole_ids = dict(zip(wholes, encoded[len(missing_list) + len(local_list):]))

        def ids_of(text: str) -> list[int]:  # this call's own, the cache's (another thread may clear it), or encode
            got = known.get(text)
            if got is None:
                got = cache.get(text)
            return got if got is not None else self.tok.encode(text)

        out: dict[str, list[list[int]]] = {}
        for task, ps in plans.items():
            res: list[list[int]] = []
            for i, p in enumerate(ps):
                if p is None:
                    res.append(whole_ids[task, i])
                    continue
                joints, cores = p
                ids = list(ids_of(joints[0]))
                for (field, head, tail), joint in zip(cores, joints[1:]):
                    if isinstance(field, str):
                        field = ids_of(field)
                    h = len(ids_of(head)) if head else 0
                    t = len(ids_of(tail)) if tail else 0
                    ids += field[h:len(field) - t]
                    ids += ids_of(joint)
                res.append(ids)
            out[task] = res
        return out


class PromptEncoder:
    """Turns notes into token ids under one tokenizer + config. Caches the per-task constant segments."""

    def __init__(self, tok: Any, cfg: PromptConfig = PromptConfig(), *, eos_token_id: int | None = None):
        self.tok = as_text_tokenizer(tok)
        self.cfg = cfg
        emb = self.tok.token_id(EMB_TOKEN)
        if emb is None:
            raise ValueError(f"the tokenizer has no {EMB_TOKEN} token: add it first (NoteLLM.from_base does)")
        self.emb_token_id = emb
        self.eos_token_id = eos_token_id
        self._const: dict[tuple[str, str, int], list[int]] = {}
        # None: every note of note_ids_many encoded whole (public so that a benchmark can compare the two)
        self.composer = _Composer.of(self.tok)

    def _cached(self, kind: str, task: str, j: int) -> list[int]:
        key = (kind, task, j)
        if key not in self._const:
            if kind == "instruction":
                self._const[key] = self.tok.encode(instruction_for(task, j))
            else:
                cont = continuation_for(task, j)
                assert cont.startswith(EMB_TOKEN)
                self._const[key] = [self.emb_token_id] + self.tok.encode(cont[len(EMB_TOKEN):])
        return self._const[key]

    def instruction_ids(self, task: str, j: int | None = None) -> list[int]:
        return list(self._cached("instruction", task, self.cfg.num_topics if j is None else j))

    def continuation_ids(self, task: str, j: int | None = None) -> list[int]:
        return list(self._cached("continuation", task, self.cfg.num_topics if j is None else j))

    def note_ids(self, note: NoteLike, task: str) -> list[int]:
        return self.tok.encode(" " + note_json(self.tok, note, task, self.cfg) + COMPRESSION_LEAD)

    def note_ids_many(self, notes: Sequence[NoteLike], tasks: Sequence[str]) -> dict[str, list[list[int]]]:
        """``{task: [note_ids(note, task) for note in notes]}`` with every tokenizer call batched: each
        field is truncated once for all tasks (one batched encode of every title, content and topic, one
        batched decode of the fields over their limit), then one batched encode of every task's note
        text. The same ids as :meth:`note_ids`, at a fraction of its cost per note for a batch of notes.

        Where the tokenizer allows it (`_Composer.supports`), a note whose fields all pass
        `_Composer.plan` gets its ids composed from its fields' own ids (from the truncation pass) and
        the cached ids of the JSON between them, instead of encoding its whole text a second time: the
        same ids (proved there, checked on every note of both data sets and on hostile text by
        tests/test_prompts.py), about half the tokenizer's work per note."""
        for task in tasks:
            _check_task(task)
        cfg = self.cfg
        columns = [([n.title for n in notes], cfg.max_title_tokens),
                   ([n.content for n in notes], cfg.max_content_tokens)]
        if "category" in tasks:
            columns.append(([getattr(n, "topic", None) or "" for n in notes], cfg.max_topic_tokens))
        n = len(notes)
        if self.composer is None:
            titles, contents, *rest = truncate_columns_batch(self.tok, columns)
            topics = rest[0] if rest else [""] * n
            ids = self.tok.encode_batch([" " + _note_dict(task, a, b, c) + COMPRESSION_LEAD
                                         for task in tasks for a, b, c in zip(titles, topics, contents)])
            return {task: ids[k * n:(k + 1) * n] for k, task in enumerate(tasks)}
        (titles, contents, *rest), (t_ids, c_ids, *r_ids) = self.composer.fields(columns)
        topics, p_ids = (rest[0], r_ids[0]) if rest else ([""] * n, [[]] * n)
        return self.composer.compose(
            tasks, [[(titles[i], t_ids[i]), (topics[i], p_ids[i]), (contents[i], c_ids[i])] for i in range(n)],
            lambda task, i: " " + _note_dict(task, titles[i], topics[i], contents[i]) + COMPRESSION_LEAD)

    def encode(self, note: NoteLike, task: str = "category", *, j: int | None = None,
               target: str | None = None) -> EncodedPrompt:
        """Ids of one prompt; with ``target`` (output text without quotes) also the target ids + EOS."""
        j = self.cfg.num_topics if j is None else j
        instr = self._cached("instruction", task, j)
        prefix = instr + self.note_ids(note, task)
        target_ids: list[int] = []
        if target is not None:
            if self.eos_token_id is None:
                raise ValueError("encoding a target needs eos_token_id")
            target_ids = self.tok.encode(target + OUTPUT_QUOTE) + [self.eos_token_id]
        return EncodedPrompt(len(instr), prefix, list(self._cached("continuation", task, j)), target_ids)

    def encode_parts(self, parts: PromptParts) -> EncodedPrompt:
        """Ids of prompt pieces from :func:`build_prompt` / :func:`training_parts`."""
        instr = self.tok.encode(parts.instruction)
        prefix = instr + self.tok.encode(parts.note_text)
        cont = parts.continuation
        assert cont.startswith(EMB_TOKEN)
        cont_ids = [self.emb_token_id] + self.tok.encode(cont[len(EMB_TOKEN):])
        target_ids: list[int] = []
        if parts.target is not None:
            if self.eos_token_id is None:
                raise ValueError("encoding a target needs eos_token_id")
            target_ids = self.tok.encode(parts.target) + [self.eos_token_id]
        return EncodedPrompt(len(instr), prefix, cont_ids, target_ids)


# ------------------------------------------------------------------------------- closed category sets
class LabelTrie:
    """A closed category set as token sequences, for constrained greedy decoding of the category task.

    Each label's sequence is what CSFT trained the model to write after the opening quote:
    ``encode(category_target(label) + '"')`` (no EOS: the token holding the closing quote ends the output,
    as in unconstrained decoding). At every step the decoder takes the most likely token among
    ``allowed(generated so far)``, so the output is always one of the labels, spelled as in training.
    The torch reference (``NoteLLM.generate_notes``) and the ONNX worker use this same class."""

    def __init__(self, sequences: Iterable[Sequence[int]]):
        self._root: dict[int, dict] = {}
        self.size = 0
        for seq in sequences:
            if not seq:
                continue
            node = self._root
            for t in seq:
                node = node.setdefault(int(t), {})
            self.size += 1

    @classmethod
    def for_labels(cls, tok: Any, labels: Iterable[str]) -> "LabelTrie":
        t = as_text_tokenizer(tok)
        targets = {category_target(x) for x in labels if x and category_target(x)}
        return cls(t.encode(x + OUTPUT_QUOTE) for x in sorted(targets))

    def states(self) -> list[dict[int, int]]:
        """The trie as numbered states, breadth first from the root (state 0): ``states()[s]`` maps each
        token allowed in state ``s`` to the state it leads to (empty past a label's end). For decoders that
        keep one state per row instead of walking ``allowed`` from the root at every step."""
        nodes, table = [self._root], []
        for node in nodes:  # grows while it is walked: breadth first
            row = {}
            for t in sorted(node):
                row[t] = len(nodes)
                nodes.append(node[t])
            table.append(row)
        return table

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The tokens that continue some label after ``generated`` ([] past a label's end or off the set)."""
        node = self._root
        for t in generated:
            node = node.get(int(t))
            if node is None:
                return []
        return sorted(node)


# ------------------------------------------------------------------------------------------------ parsing
def cut_output(text: str) -> str:
    """The generated output up to (not including) the closing quote."""
    i = text.find(OUTPUT_QUOTE)
    return text if i < 0 else text[:i]


def parse_category(text: str) -> str | None:
    """A clean category string from generated text (None when empty)."""
    s = cut_output(text).replace("\n", " ")
    s = " ".join(s.split()).strip(" .,;:'`#")
    return s or None


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for t in tags:
        t = " ".join(str(t).replace('"', " ").split()).strip(" .,;:'`").lstrip("#").strip()
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def parse_hashtags(text: str, limit: int | None = None) -> list[str]:
    """A de-duplicated hashtag list from generated text (split on commas, semicolons, '#', newlines)."""
    parts = re.split(r"[,;\n#]|\s{2,}", cut_output(text))
    tags = dedupe_tags(parts)
    return tags if limit is None else tags[:limit]
