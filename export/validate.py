"""Validate an exported package against the torch model it came from.

ONNX Runtime runs the package exactly as the worker does (:class:`worker.encoder.OnnxNoteEncoder`, CPU,
left padding, notes sorted into batches by length); torch runs right-padded batches (embeddings) and
Hugging Face ``generate`` (greedy, left padding). A fixed set of real notes of mixed lengths is used
(MovieLens titles/genres, MIND news, a long note that hits truncation, non-ASCII text, empty fields).
A package with an embed graph has both of its vector paths checked: the embed graph's (embed-only) and
the step graph's (the prefill before generation); the reported max |diff| and cosines are the worse of
the two, and each path's are reported beside them.

Thresholds:
- fp32:  embeddings max |ORT - torch| <= 1e-4, and greedy category + hashtag outputs identical;
- fp16:  min cosine(ORT, torch fp32) >= 0.999;
- int8:  min cosine(ORT, torch fp32) >= 0.995.
Generation agreement is always reported; it only gates fp32.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from notellm.prompts import NoteText

THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4},
    "fp16": {"min_cosine": 0.999},
    "int8": {"min_cosine": 0.995},
}

VALIDATION_NOTES: tuple[NoteText, ...] = (
    NoteText("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", "Adventure"),
    NoteText("Heat (1995)", "Action|Crime|Thriller", None),
    NoteText("Silver Spring Man Nabs Title At Soggy Marine Corps Marathon",
             "The rain didn't stop Silver Spring's Jordan Tropf from winning the 44th Marine Corps "
             "Marathon on Sunday.", "sports"),
    NoteText("New Florida Majority celebrates grand opening of Fort Lauderdale office | PHOTOS",
             "As music blasted through the Fort Lauderdale plaza and children ran, played, danced and ate "
             "ice cream, the smell of Caribbean food whirled through the air. What may have appeared like a "
             "party to bypassers was actually the grand opening of a local organization's new headquarters. "
             "And over the music, canvassers registered new voters and community activists, organizers and "
             "elected officials spoke about the year ahead, the census, and the campaigns to come.",
             "newspolitics"),
    NoteText("Ryan: Dega spectacularly showcased what we've learned in a post-plate era",
             "This year returned to the glory days on NASCAR's biggest, fastest tracks; also why the "
             "yellow-line non-call didn't feel right; the good, bad and ugly of manufacturer ties.", "racing"),
    NoteText("Amélie (Le fabuleux destin d'Amélie Poulain) (2001)", "Comedy|Romance", "Comedy"),
    NoteText("周末去西湖边喝咖啡 ☕️", "秋天的杭州很美，推荐几家安静的咖啡店和一条适合散步的路线。", "旅行"),
    NoteText("Quick tip", "", None),
    NoteText("", "A note with no title: \"quotes\", {braces}, back\\slashes and a tab\there.", "misc"),
    NoteText("Grumpier Old Men (1995)", "Comedy|Romance", "Comedy"),
    NoteText("The 10 best budget travel hacks I learned after a year on the road " * 3,
             "Book flights on Tuesdays, carry a reusable bottle, learn ten words of the local language, "
             "and always keep a paper copy of your passport. " * 4, "travel"),
    NoteText("Jumanji (1995)", "Adventure|Children|Fantasy", "Children"),
)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _vector_metrics(vec: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = _cos(vec, ref)
    return {"max_abs_diff": float(np.abs(vec - ref).max()), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}


def validate_package(model, package_dir, *, notes: Sequence[Any] | None = None,
                     max_new_tokens: int = 16, batch_notes: int = 5, device: str = "cpu",
                     provider_options: dict | None = None) -> dict[str, Any]:
    """Compare the package in ``package_dir`` with ``model`` (a torch NoteLLM, on whatever device it is).
    ``device`` is the ONNX Runtime side's ("cpu" or "cuda"; with "cuda", pass
    ``provider_options={"use_tf32": 0}`` to compare fp32 with torch's default full-precision matmuls).
    Returns a report with ``passed``, ``metrics``, ``failures`` and per-note generation mismatches."""
    from worker.encoder import OnnxNoteEncoder

    import json
    from pathlib import Path

    notes = list(notes or VALIDATION_NOTES)
    manifest = json.loads((Path(package_dir) / "notellm.json").read_text())
    kind = "int8" if manifest.get("quantization") == "int8" else manifest.get("dtype", "fp32")
    t0 = time.perf_counter()
    enc = OnnxNoteEncoder(package_dir, device=device, max_batch_notes=batch_notes,
                          max_batch_tokens=100_000, max_new_tokens=max_new_tokens,
                          provider_options=provider_options, embed_graph=True)
    ort_vec = enc.embed(notes)
    ref_vec = model.embed_notes(notes, "category", batch_size=len(notes)).numpy()
    metrics: dict[str, Any] = {"notes": len(notes), **_vector_metrics(ort_vec, ref_vec)}
    mismatches: list[dict[str, Any]] = []
    agree = total = 0
    for task in ("category", "hashtags"):
        step_vec, ort_texts = enc.generate_raw(notes, task)
        if task == "category" and enc.embed_session is not None:
            # embed-only ran the package's embed graph; the step graph's prefill vectors are held to the
            # same thresholds (the worker reads them whenever it generates)
            metrics["embed_graph"] = _vector_metrics(ort_vec, ref_vec)
            metrics["step_graph"] = _vector_metrics(step_vec, ref_vec)
            for k, worst in (("max_abs_diff", max), ("min_cosine", min), ("mean_cosine", min)):
                metrics[k] = worst(metrics["embed_graph"][k], metrics["step_graph"][k])
        _, ref_texts = model.generate_notes(notes, task, max_new_tokens=max_new_tokens, batch_size=len(notes))
        for i, (a, b) in enumerate(zip(ort_texts, ref_texts)):
            total += 1
            if a == b:
                agree += 1
            else:
                mismatches.append({"task": task, "note": i, "onnx": a, "torch": b})
    metrics["generation_agreement"] = agree / max(total, 1)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    failures: list[str] = []
    th = THRESHOLDS[kind]
    if "max_abs_diff" in th and not metrics["max_abs_diff"] <= th["max_abs_diff"]:
        failures.append(f"max_abs_diff {metrics['max_abs_diff']:.3g} > {th['max_abs_diff']}")
    if "min_cosine" in th and not metrics["min_cosine"] >= th["min_cosine"]:
        failures.append(f"min_cosine {metrics['min_cosine']:.5f} < {th['min_cosine']}")
    if kind == "fp32" and mismatches:
        failures.append(f"greedy outputs differ on {len(mismatches)}/{total} (note, task) pairs")
    return {
        "passed": not failures,
        "kind": kind,
        "device": device,
        "providers": list(enc.providers),
        "thresholds": th,
        "metrics": metrics,
        "failures": failures,
        "mismatches": mismatches[:10],
    }
