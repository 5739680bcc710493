"""NoteLLM: a causal LM that compresses a note into one vector (and generates its category / hashtags).

The model wraps any Hugging Face causal LM (``self.lm``), adds the special ``[EMB]`` token (resizing the
embeddings; the new row starts at the mean of the old rows) and a bias-free projection
``Linear(hidden, d)`` (``d`` default 128). The note vector is the L2-normalised projection of the final
(normed) hidden state at the position *just before* ``[EMB]``, i.e. the last token of the prompt prefix
that ends in ``The compression word is:"`` (see :mod:`notellm.prompts` for the prompt and its ids).
Position ids are always ``cumsum(attention_mask) - 1``, so left and right padding give the same vectors.

API for training / evaluation (names are stable):

    model = NoteLLM.from_base("smollm2", dim=128, seed=0)      # or a local HF dir, or "tiny"
    model = NoteLLM.from_base(model=hf_lm, tokenizer=hf_tok, base_model_id="...")   # any HF causal LM
    model.tokenizer            # the HF tokenizer, [EMB] included
    model.prompts              # notellm.prompts.PromptEncoder bound to that tokenizer
    model.emb_token_id, model.eos_token_id, model.pad_token_id, model.dim, model.prompt_config

    # Tokenise a batch of notes (any objects with .title/.content/.topic), task per batch or per note:
    batch = model.tokenize_notes(notes, task="category")                    # prompt + [EMB]". guidance"
    batch = model.tokenize_notes(notes, task="category", include_continuation=False)  # prefix only
    batch = model.tokenize_notes(notes, task=["category", "hashtags", ...],            # CSFT
                                 categories=[...], hashtags=[[...], ...])
    # -> NoteBatch(input_ids [B,T], attention_mask [B,T], emb_positions [B], labels [B,T] | None)
    #    emb_positions = index of [EMB] in each row (== prefix length; may equal T for prefix-only rows);
    #    the vector is read at emb_positions - 1. labels are -100 everywhere except the target output
    #    tokens (output text, closing quote, EOS). batch.to(device) moves every tensor.

    emb = model.embed_batch(batch.input_ids, batch.attention_mask, batch.emb_positions)   # [B, d], float32
    out = model(batch.input_ids, batch.attention_mask, batch.emb_positions, batch.labels)
    out.embeddings  # [B, d] float32 L2-normalised     (GCL)
    out.loss        # mean next-token cross-entropy over label tokens only (CSFT), None without labels
    out.logits      # [B, T, V] only with return_logits=True (the loss itself only projects label positions)
    # ONE forward pass over prefix + [EMB]". guidance" + target gives both.

    model.embed_notes(notes, task="category", batch_size=16)          # no-grad convenience, [n, d]
    model.generate_notes(notes, task="category", max_new_tokens=16)   # (embeddings, raw output texts)
    model.save(dir); NoteLLM.load(dir)

The saved directory holds the base weights + config (``save_pretrained``), the tokenizer, the projection
(``projection.safetensors``) and ``notellm.json`` (d, prompt config + version, base model id, max lengths,
special token ids). A PEFT-wrapped ``lm`` is saved merged (a merged copy; the live model is untouched).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from notellm.prompts import (
    EMB_TOKEN,
    PROMPT_VERSION,
    EncodedPrompt,
    LabelTrie,
    NoteLike,
    PromptConfig,
    PromptEncoder,
    category_target,
    cut_output,
    dedupe_tags,
)

FORMAT = "notellm/1"
CONFIG_FILE = "notellm.json"
PROJECTION_FILE = "projection.safetensors"


@dataclass
class NoteBatch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    emb_positions: torch.Tensor  # [B] long: index of [EMB]; the vector is read at emb_positions - 1
    labels: torch.Tensor | None = None  # [B, T] long, -100 outside the target output
    tasks: tuple[str, ...] = ()

    def to(self, device) -> "NoteBatch":
        return NoteBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.emb_positions.to(device),
            None if self.labels is None else self.labels.to(device), self.tasks,
        )


@dataclass
class NoteLLMOutput:
    embeddings: torch.Tensor  # [B, d] float32, L2-normalised
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position rule of Hugging Face generate: cumsum(mask) - 1, padding positions set to 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _unwrap_peft(lm: nn.Module) -> nn.Module:
    return copy.deepcopy(lm).merge_and_unload() if hasattr(lm, "merge_and_unload") else lm


class NoteLLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer: Any, *, dim: int = 128,
                 prompt_config: PromptConfig | None = None, base_model_id: str = "",
                 max_length: int = 512, projection: nn.Linear | None = None, seed: int = 0,
                 categories: Sequence[str] = ()):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.prompt_config = prompt_config or PromptConfig()
        self.base_model_id = base_model_id
        self.max_length = int(max_length)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._ensure_emb_token()
        hidden = int(lm.config.hidden_size)
        if projection is None:
            projection = nn.Linear(hidden, dim, bias=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.normal_(projection.weight, std=hidden ** -0.5)
            projection.to(dtype=next(lm.parameters()).dtype)
        self.proj = projection
        self.prompts = PromptEncoder(tokenizer, self.prompt_config, eos_token_id=self.eos_token_id)
        self.set_categories(categories)

    # ----------------------------------------------------------------------------------- construction
    def _ensure_emb_token(self) -> None:
        tok = self.tokenizer
        if EMB_TOKEN not in tok.get_vocab():
            tok.add_tokens([EMB_TOKEN], special_tokens=True)
        n = len(tok)
        emb = self.lm.get_input_embeddings()
        old = emb.weight.shape[0]
        if old < n:
            self.lm.resize_token_embeddings(n, mean_resizing=False)
            with torch.no_grad():
                w = self.lm.get_input_embeddings().weight
                w[old:] = w[:old].mean(0, keepdim=True)
                out = self.lm.get_output_embeddings()
                if out is not None and out.weight.data_ptr() != w.data_ptr():
                    out.weight[old:] = out.weight[:old].mean(0, keepdim=True)

    @classmethod
    def from_base(cls, base: str | os.PathLike | None = "smollm2", *, dim: int = 128, seed: int = 0,
                  prompt_config: PromptConfig | None = None, max_length: int = 512, cache_dir=None,
                  dtype: torch.dtype | None = None, model: nn.Module | None = None, tokenizer: Any = None,
                  base_model_id: str | None = None) -> "NoteLLM":
        """A fresh NoteLLM (seeded projection) on ``base`` ("smollm2", "tiny" or a local HF dir), or on
        an already loaded ``model`` + ``tokenizer``."""
        if model is None:
            from notellm.base_models import load_base

            model, tok, bid = load_base(base, cache_dir=cache_dir, dtype=dtype)
            tokenizer = tokenizer or tok
            base_model_id = base_model_id or bid
        elif tokenizer is None:
            raise ValueError("from_base(model=...) needs tokenizer=")
        model.eval()
        return cls(model, tokenizer, dim=dim, prompt_config=prompt_config,
                   base_model_id=base_model_id or str(getattr(model.config, "_name_or_path", "")),
                   max_length=max_length, seed=seed)

    def set_categories(self, categories: Sequence[str]) -> None:
        """The closed category set the model was trained on (empty: open). When set, the category task is
        decoded within it (`LabelTrie`), here and in the exported package."""
        self.categories: tuple[str, ...] = tuple(sorted({c for c in categories if c and c.strip()}))
        self.category_trie = LabelTrie.for_labels(self.tokenizer, self.categories) if self.categories else None

    # ------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self.proj.out_features)

    @property
    def hidden_size(self) -> int:
        return int(self.proj.in_features)

    @property
    def emb_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(EMB_TOKEN))

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------ tokenising
    def tokenize_notes(self, notes: Sequence[NoteLike], task: str | Sequence[str] = "category", *,
                       padding_side: str = "right", include_continuation: bool = True,
                       categories: Sequence[str | None] | None = None,
                       hashtags: Sequence[Sequence[str] | None] | None = None,
                       j: int | None = None, device=None) -> NoteBatch:
        """Token ids of a batch of prompts (see module docstring). With ``categories``/``hashtags`` the
        rows also carry the target output and ``labels`` (CSFT); a row's task then needs its label."""
        n = len(notes)
        tasks = [task] * n if isinstance(task, str) else list(task)
        if len(tasks) != n:
            raise ValueError("one task per note")
        with_targets = categories is not None or hashtags is not None
        encoded: list[EncodedPrompt] = []
        for i, (note, t) in enumerate(zip(notes, tasks)):
            if not with_targets:
                encoded.append(self.prompts.encode(note, t, j=j))
            elif t == "category":
                cat = categories[i] if categories is not None else None
                if not cat or not category_target(cat):
                    raise ValueError(f"note {i}: category task without a category")
                encoded.append(self.prompts.encode(note, t, target=category_target(cat)))
            else:
                tags = dedupe_tags((hashtags[i] or []) if hashtags is not None else [])
                if not tags:
                    raise ValueError(f"note {i}: hashtags task without hashtags")
                jj = min(len(tags), self.prompt_config.num_topics if j is None else j)
                encoded.append(self.prompts.encode(note, t, j=jj, target=", ".join(tags[:jj])))
        rows, lab_rows = [], []
        for e in encoded:
            ids = e.prefix_ids + (e.continuation_ids + e.target_ids if include_continuation else [])
            if len(ids) > self.max_length:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_length={self.max_length}")
            rows.append(ids)
            lab = [-100] * (len(e.prefix_ids) + len(e.continuation_ids)) + list(e.target_ids)
            lab_rows.append(lab if include_continuation else [-100] * len(ids))
        T = max(len(r) for r in rows)
        ids_t = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((n, T), dtype=torch.long)
        lab_t = torch.full((n, T), -100, dtype=torch.long)
        pos_t = torch.zeros(n, dtype=torch.long)
        for i, (r, lab, e) in enumerate(zip(rows, lab_rows, encoded)):
            off = T - len(r) if padding_side == "left" else 0
            ids_t[i, off:off + len(r)] = torch.tensor(r)
            mask_t[i, off:off + len(r)] = 1
            lab_t[i, off:off + len(r)] = torch.tensor(lab)
            pos_t[i] = off + e.emb_position
        batch = NoteBatch(ids_t, mask_t, pos_t, lab_t if with_targets else None, tuple(tasks))
        return batch.to(device) if device is not None else batch

    # --------------------------------------------------------------------------------------- forward
    def _hidden(self, input_ids, attention_mask) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def project(self, hidden_at_prefix_end: torch.Tensor) -> torch.Tensor:
        """[B, hidden] -> [B, d] float32, L2-normalised."""
        z = self.proj(hidden_at_prefix_end.to(self.proj.weight.dtype))
        return F.normalize(z.float(), dim=-1)

    def _gather(self, hidden: torch.Tensor, emb_positions: torch.Tensor) -> torch.Tensor:
        idx = (emb_positions.to(hidden.device) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    emb_positions: torch.Tensor) -> torch.Tensor:
        """[B, d] note vectors (the prefix is all that matters; later tokens are ignored by causality)."""
        hidden = self._hidden(input_ids, attention_mask)
        return self.project(self._gather(hidden, emb_positions))

    def heads(self, hidden: torch.Tensor, emb_positions: torch.Tensor,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(note vectors, CSFT loss or None) from final hidden states: the vector at the position before
        `[EMB]`, and next-token cross-entropy on the label tokens only (-100 elsewhere). Training with
        cached lower layers calls this directly on the hidden states it computed."""
        emb = self.project(self._gather(hidden, emb_positions))
        loss = None
        if labels is not None:
            tgt = labels[:, 1:]
            sel = tgt != -100
            if sel.any():
                h = hidden[:, :-1][sel]
                loss = F.cross_entropy(self.lm.get_output_embeddings()(h).float(), tgt[sel])
            else:
                loss = hidden.sum() * 0.0
        return emb, loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, emb_positions: torch.Tensor,
                labels: torch.Tensor | None = None, *, return_logits: bool = False) -> NoteLLMOutput:
        hidden = self._hidden(input_ids, attention_mask)
        emb, loss = self.heads(hidden, emb_positions, labels)
        logits = self.lm.get_output_embeddings()(hidden) if return_logits else None
        return NoteLLMOutput(emb, loss, logits)

    # ----------------------------------------------------------------------------------- convenience
    @torch.no_grad()
    def embed_notes(self, notes: Sequence[NoteLike], task: str = "category", *, batch_size: int = 16) -> torch.Tensor:
        out = []
        for s in range(0, len(notes), batch_size):
            b = self.tokenize_notes(notes[s:s + batch_size], task, include_continuation=False,
                                    device=self.device)
            out.append(self.embed_batch(b.input_ids, b.attention_mask, b.emb_positions).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    @torch.no_grad()
    def generate_notes(self, notes: Sequence[NoteLike], task: str = "category", *, max_new_tokens: int = 16,
                       batch_size: int = 16, constrain: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Reference greedy decoding with Hugging Face ``generate`` (left padding). Returns the note
        vectors (read from generate's own prefill, so each note is prefilled once) and each note's raw
        output text cut at the closing quote (EOS removed). The category task is decoded within
        ``categories`` when the model has them (and ``constrain``)."""
        embs, texts = [], []
        decoder = self.lm.get_decoder()
        trie = self.category_trie if constrain and task == "category" else None
        for s in range(0, len(notes), batch_size):
            b = self.tokenize_notes(notes[s:s + batch_size], task, padding_side="left", device=self.device)
            captured: list[torch.Tensor] = []
            start = b.input_ids.shape[1]

            def allowed(_row, ids, trie=trie, start=start):
                return trie.allowed(ids[start:].tolist()) or [self.eos_token_id]

            def grab(_module, _args, output, b=b, captured=captured):
                if not captured:  # the first decoder call is the prefill over the whole prompt
                    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                    captured.append(self._gather(hidden, b.emb_positions))

            handle = decoder.register_forward_hook(grab)
            try:
                gen = self.lm.generate(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id, prefix_allowed_tokens_fn=allowed if trie is not None else None,
                )[:, b.input_ids.shape[1]:]
            finally:
                handle.remove()
            embs.append(self.project(captured[0]).cpu())
            for row in gen.tolist():
                if self.eos_token_id in row:
                    row = row[:row.index(self.eos_token_id)]
                texts.append(cut_output(self.tokenizer.decode(row, skip_special_tokens=False)))
        return (torch.cat(embs) if embs else torch.zeros((0, self.dim))), texts

    # ----------------------------------------------------------------------------------- persistence
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dim": self.dim,
            "hidden_size": self.hidden_size,
            "prompt_version": PROMPT_VERSION,
            "prompt": self.prompt_config.to_dict(),
            "base_model_id": self.base_model_id,
            "max_length": self.max_length,
            "emb_token": EMB_TOKEN,
            "emb_token_id": self.emb_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "categories": list(self.categories),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _unwrap_peft(self.lm).save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        save_file({"weight": self.proj.weight.detach().cpu().contiguous()}, str(d / PROJECTION_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
             device=None) -> "NoteLLM":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{d} is not a NoteLLM directory (no {CONFIG_FILE})")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: unsupported format {cfg.get('format')!r}")
        lm = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32)
        tok = AutoTokenizer.from_pretrained(d)
        w = load_file(str(d / PROJECTION_FILE))["weight"]
        proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            proj.weight.copy_(w)
        proj.to(dtype=next(lm.parameters()).dtype)
        m = cls(lm, tok, dim=w.shape[0], prompt_config=PromptConfig.from_dict(cfg.get("prompt")),
                base_model_id=cfg.get("base_model_id", ""), max_length=cfg.get("max_length", 512),
                projection=proj, categories=cfg.get("categories") or ())
        m.eval()
        return m.to(device) if device is not None else m
