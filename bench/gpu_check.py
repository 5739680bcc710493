"""The GPU path in one run: CUDA-EP parity, encoder throughput, the worker's encode -> sink path, fusions.

    python bench/gpu_check.py --out DIR [--notes notes.jsonl] [--cpu] [--budget-s 420]

Run on the device machine by ``scripts/gpu-check`` (which first installs the carried wheels); ``--cpu`` is
the rehearsal here: the same code path on the CPU provider with a tiny model and a tiny budget.

Phases (each one's result is written to ``DIR/gpu-check.json`` as soon as it ends, so a run cut short
still reports what it measured; a phase that fails is recorded with its error and the run goes on):

1. environment   versions, the device, ONNX Runtime's providers.
2. export        a NoteLLM on SmolLM2-135M's exact architecture (random weights; ``--arch tiny`` for the
                 rehearsal) exported as fp32 and fp16 packages with the project's exporter, each validated
                 on the run's execution provider against torch on the same device (fp32: max |diff| with
                 TF32 off on both sides; fp16: min cosine vs torch fp32; greedy generation agreement).
2b. fuse         each ``--fuse-dtypes`` package (fp16 by default) rewritten as ``notellm export --fuse``
                 would (:func:`export.onnx_export.fuse_for_ort`, onnxscript's ORT fusions: attention as
                 MultiHeadAttention, (skip) RMS norm, rotary), in a child process with ``--fuse-site`` (the
                 pack's onnxscript, the version this project is tested with) first on its path; validated
                 against torch like the plain packages and measured as one more engine, ``ort-fp16-fused``.
2c. embed graph  each ``--embed-graph-dtypes`` package (fp16 by default) with the hand-built embed-only
                 graph added (``notellm export --embed-graph``, :mod:`export.embed_graph`: GroupQueryAttention,
                 skip RMS norms, SiLU as one kernel; whole prompts right-padded), one package per
                 ``--embed-graph-rotary`` variant (rotary inside GroupQueryAttention: ``ort-fp16-embedgraph``;
                 no GroupQueryAttention, causal MultiHeadAttention: ``ort-fp16-embedgraph-mha``; that with the
                 instruction's KV as a past, only the note segments computed: ``ort-fp16-embedgraph-mha-prefix``;
                 that with rotary as a second Q/K projection and elementwise ops instead of RotaryEmbedding:
                 ``ort-fp16-embedgraph-mha-prefix-fold``; ``op``, on request: ``ort-fp16-embedgraph-ropeop``),
                 each first loaded and run in a child process (a native crash fails that phase alone),
                 validated against torch like the others and measured embed-only.
3. encoder       notes/s and prompt tokens/s, embed-only and embed + category generation, per batch size,
                 for torch eager (fp16, bf16; fp32 on the CPU) and ORT (fp32, fp16, with and without I/O
                 binding; the fused package with it; generation also reading the full logits every step,
                 ``-hostlogits``, beside the default top-k; the embed graphs also without the cut by
                 padding, ``-fullbatch``), on real note texts. Prompts are tokenised before timing on both
                 sides (the worker tokenises on its polling thread); torch's calls are cut like the
                 encoder's, and each row reports its padded-over-real token factor.
4. worker        the worker's own path (decode -> prepare_many, one batched tokenizer pass per poll ->
                 Batcher -> Pipeline(EncodeStage -> Milvus sink) on milvus-lite; no Kafka on that
                 machine), once per measured mode (phase ``worker/embed``: no generation, with the fastest
                 fp16 package embed-only, embed graphs included; ``worker/embed+category``: with the
                 fastest at generating): pipeline notes/s against the same encoder alone on the batches the
                 batcher formed, the busy time of each stage, and the worker process's CPU time (with
                 the encoder in its own process, the polling thread, the sink and milvus-lite's
                 in-process server share this process and its GIL). ``--worker-lite thread,process``
                 runs each also with milvus-lite served from a child process (``.../lite-process``);
                 ``writer`` with that child and the sink's writes made by a writer process too
                 (NOTELLM_MILVUS__WRITE_PROCESS, ``.../writer``). ``--worker-milvus-server`` starts a
                 Milvus server of the check's own (phase ``milvus_server``; the pack carries it) and
                 writes to it instead (``--worker-milvus-uri``: a running one): the production store,
                 ``thread`` and ``writer`` only.
3b. polling      the worker's polling thread alone on this machine's cores (bench/polling.py: decode, the
                 batched tokenizer pass, batching, µs per note; prompts composed from their fields' ids vs
                 encoded whole, each with and without a thread of pure Python holding the GIL beside it).
4b. calibration  the worker's start-up batch calibration (worker/calibrate.py) on this device, for the first
                 worker mode, its package in a child process as in a pod: the defaults for the device
                 (CUDA: up to 2048 notes in 60 s), the curve and the batch it chose.
5. fusions       the two fusion recipes side by side on each plain package (``--skip fusions`` once the
                 fused engine answers the question): onnxruntime.transformers.optimizer's decoder fusions
                 (ORT's Llama recipe, model_type gpt2) and onnxscript's; fused-op counts, parity with the
                 plain graph, embed throughput beside it.
6. profile       where the time goes, embed-only at the best ORT batch: every CUDA kernel of three batches
                 under torch.profiler (CUPTI sees ONNX Runtime's kernels too), per engine (ORT fp16 plain
                 and fused, torch eager fp16): GPU busy share of the wall time, time per kernel class
                 (matmul, attention, norm, rotary, copy, other) and the top kernels.

Goals checked (issue 13): ORT CUDA fp16 >= 2x torch eager at the best batch; >= 1M prompt tokens/s
embed-only; worker pipeline >= 0.9x the encoder alone (each worker mode measured).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_BATCHES = (1, 8, 32, 128, 512)
WARM_BATCHES = 4
WARM_ROUNDS = 2  # warm-up passes over those batches before timing (measure())
CPU_BATCHES = (1, 4)
# Without I/O binding every step copies the whole KV cache to the host and back: measured up to these sizes.
NO_BINDING_MAX_BATCH = {"embed": 128, "embed+category": 32}
EMBED_KIND = "-embedgraph"  # in the kinds of packages with the hand-built embed graph (embed-only engines)


def embed_kind(kind: str, rotary: str) -> str:
    """fp16 + "gqa" -> fp16-embedgraph; "op" -> fp16-embedgraph-ropeop; "mha" -> fp16-embedgraph-mha;
    "mha-prefix" -> fp16-embedgraph-mha-prefix; "mha-prefix-fold" -> fp16-embedgraph-mha-prefix-fold."""
    return f"{kind}{EMBED_KIND}" + {"gqa": "", "op": "-ropeop"}.get(rotary, f"-{rotary}")


def is_embed_kind(kind: str) -> bool:
    return EMBED_KIND in kind


def progress(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Report:
    """The JSON document and its markdown table, rewritten after every phase."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out = out
        self.deadline = deadline
        self.doc: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "phases": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, fn: Callable[[], Any], *, need_s: float = 0.0) -> Any:
        if self.left() < need_s:
            self.doc["phases"][name] = {"status": "skipped", "why": f"time budget: {self.left():.0f} s left"}
            progress(f"{name}: skipped (budget)")
            self.save()
            return None
        progress(f"{name} ...")
        t0 = time.perf_counter()
        try:
            result = fn()
            self.doc["phases"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
            self.doc[name] = result
            progress(f"{name}: ok in {time.perf_counter() - t0:.1f} s")
            return result
        except Exception as e:  # noqa: BLE001 - record it and go on with the next phase
            self.doc["phases"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                                        "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
            progress(f"{name}: FAILED {type(e).__name__}: {e}")
            return None
        finally:
            self.save()

    def save(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(self.doc))


# --------------------------------------------------------------------------------------------- inputs
def load_notes(path: str | None, n: int):
    from notellm.prompts import NoteText

    notes = []
    if path:
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                notes.append(NoteText(title=d["title"], content=d.get("content") or "", topic=d.get("topic")))
    else:
        from bench.encoder import load_notes as shared_notes

        notes = shared_notes("mind", n)
    if not notes:
        raise SystemExit("no notes")
    return (notes * (n // len(notes) + 1))[:n]


def environment(device: str) -> dict[str, Any]:
    import numpy
    import onnxruntime as ort
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
        "onnxruntime": ort.__version__, "onnxruntime_package": Path(ort.__file__).parent.as_posix(),
        "ort_available_providers": ort.get_available_providers(), "device": device,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        if "CUDAExecutionProvider" not in env["ort_available_providers"]:
            raise RuntimeError(f"onnxruntime at {env['onnxruntime_package']} offers no CUDAExecutionProvider: "
                               f"{env['ort_available_providers']}")
    return env


def preload_cuda() -> None:
    """ORT's CUDA provider dlopens libcublas/libcudnn/... by soname: load the ones torch's nvidia wheels
    carry (the device image has no system CUDA libraries on the loader path)."""
    import torch  # noqa: F401 - torch first: its CUDA libraries are then in the process

    from worker.encoder import preload_cuda_libraries

    preload_cuda_libraries()


# --------------------------------------------------------------------------------------------- phase 2
def build_model(arch: str, seed: int = 0):
    from notellm.base_models import smollm2_architecture, tiny_llama
    from notellm.model import NoteLLM

    lm, tok = smollm2_architecture(seed) if arch == "smollm2" else tiny_llama(seed)
    return NoteLLM.from_base(model=lm, tokenizer=tok, base_model_id=lm.config._name_or_path, seed=seed).eval()


def export_and_validate(model, dtype: str, work: Path, device: str, grouped: bool = True) -> dict[str, Any]:
    """Export on the CPU with the project's exporter (validation off there), then validate the package on
    the run's device against torch on that device. ``grouped=False``: the step graph with K/V expanded to
    every query head (the export before session 20), package kind ``<dtype>-expanded``."""
    from export.onnx_export import export_package

    out = work / f"pkg-{dtype}{'' if grouped else '-expanded'}"
    t0 = time.perf_counter()
    export_package(model, out, dtype=dtype, validate=False, grouped=grouped)
    export_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = validate_on_device(model, out, device)
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"package": str(out), "export_s": round(export_s, 1), "validate_s": round(time.perf_counter() - t1, 1),
            "bytes": size, "validation": report}


def validate_on_device(model, pkg: Path, device: str) -> dict[str, Any]:
    """The export's validation of ``pkg`` on the run's execution provider against the fp32 torch model on
    the same device (fp16 packages are compared with it; TF32 off on the CUDA side)."""
    from export.validate import validate_package

    ref = copy.deepcopy(model).to(device)
    opts = {"use_tf32": 0} if device == "cuda" else None
    try:
        return validate_package(ref, pkg, device=device, provider_options=opts)
    finally:
        del ref
        _empty_cache()


def _empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


FUSE_CHILD = """
import json, sys
from pathlib import Path
import onnx_ir, onnxscript
from export.onnx_export import fuse_for_ort
counts = fuse_for_ort(Path(sys.argv[1]))
print(json.dumps({"fusions": counts, "onnxscript": onnxscript.__version__, "onnx_ir": onnx_ir.__version__}))
"""


def fuse_and_validate(model, kind: str, src: str, work: Path, device: str, fuse_site: str | None,
                      timeout_s: float = 240.0) -> dict[str, Any]:
    """The package `notellm export --fuse` would write, built from the exported one: a copy whose graph
    :func:`export.onnx_export.fuse_for_ort` rewrites in a child process - with ``fuse_site`` (the
    onnxscript/onnx-ir this project's venv has, carried by the pack) first on its path, because the device
    image's onnxscript may not know the attention patterns - then re-hashed and validated against torch on
    the run's device like the plain packages."""
    import subprocess

    from export.onnx_export import rehash_package

    out = work / f"pkg-{kind}-fused"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    env = dict(os.environ)
    if fuse_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (fuse_site, str(REPO), env.get("PYTHONPATH"))))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", FUSE_CHILD, str(out / "model.onnx")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"fuse_for_ort failed (exit {p.returncode}): {p.stderr[-1500:]}")
    fused = json.loads(p.stdout.strip().splitlines()[-1])
    fuse_s = time.perf_counter() - t0
    rehash_package(out, fusions=fused["fusions"])
    t1 = time.perf_counter()
    report = validate_on_device(model, out, device)
    return {"package": str(out), "fuse_s": round(fuse_s, 1), "validate_s": round(time.perf_counter() - t1, 1),
            "fused_with": {"onnxscript": fused["onnxscript"], "onnx_ir": fused["onnx_ir"],
                           "site": fuse_site or "this environment"},
            "fusions": fused["fusions"], "ops": op_counts(out / "model.onnx"), "validation": report}


EMBED_PROBE_CHILD = """
import sys
from bench.gpu_check import preload_cuda
from notellm.prompts import NoteText
if sys.argv[2] == "cuda":
    preload_cuda()
from worker.encoder import OnnxNoteEncoder
enc = OnnxNoteEncoder(sys.argv[1], device=sys.argv[2], embed_graph=True, max_batch_notes=8)
assert enc.embed_session is not None, "the embed graph was not loaded"
notes = [NoteText(title=f"probe {i}", content="word " * (5 * i), topic="news") for i in range(8)]
print(enc.embed(notes).shape)
"""


def probe_embed_graph(pkg: Path, device: str, timeout_s: float = 180.0) -> list[str]:
    """Load and run ``pkg``'s embed graph once in a child process first: an ONNX Runtime build can crash
    the process on a graph it accepts (run 8: the ``op`` variant, RotaryEmbedding + GroupQueryAttention
    without rotary, died of SIGSEGV on ORT 1.31.1's CUDA provider and took the whole check with it). A crash
    fails this phase alone, with the signal named. Returns the attention kernels ONNX Runtime reports it
    chose (``ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO``: flash, memory-efficient, unfused; CUDA only)."""
    import signal
    import subprocess

    env = dict(os.environ, ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO="1")
    p = subprocess.run([sys.executable, "-c", EMBED_PROBE_CHILD, str(pkg), device], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit {p.returncode}")
        raise RuntimeError(f"the embed graph's probe run on {device} failed ({how}): {p.stderr[-1200:]}")
    lines = (p.stdout + "\n" + p.stderr).splitlines()
    return sorted({ln.strip()[:300] for ln in lines if "Operator=" in ln})


def embed_graph_and_validate(model, kind: str, src: str, work: Path, device: str, rotary: str = "gqa"
                             ) -> dict[str, Any]:
    """A copy of the ``kind`` package with the hand-built embed graph added (export.embed_graph: fused
    norms, GroupQueryAttention or MultiHeadAttention, SiLU as one kernel; see ``ROTARY`` for the variants),
    re-hashed and validated against torch on the run's device (both of its vector paths). Its encoder
    embeds through that graph."""
    from export.embed_graph import EMBED_GRAPH_FILE, build_embed_graph
    from export.onnx_export import embed_graph_spec, rehash_package

    out = work / f"pkg-{embed_kind(kind, rotary)}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    t0 = time.perf_counter()
    files = build_embed_graph(model, out / EMBED_GRAPH_FILE, dtype=kind, rotary=rotary)
    build_s = time.perf_counter() - t0
    rehash_package(out, embed_graph=embed_graph_spec(files, rotary, model.lm.config.num_hidden_layers))
    kernels = probe_embed_graph(out, device)
    t1 = time.perf_counter()
    report = validate_on_device(model, out, device)
    return {"package": str(out), "rotary": rotary, "build_s": round(build_s, 1), "attention_kernels": kernels,
            "validate_s": round(time.perf_counter() - t1, 1), "ops": op_counts(out / EMBED_GRAPH_FILE),
            "validation": report}


# --------------------------------------------------------------------------------------------- phase 3
def measure(run: Callable[[Any], int], batches: list[Any], notes_per: Callable[[Any], int], point_s: float,
            sync: Callable[[], None]) -> dict[str, Any]:
    """Warm up on every distinct batch (up to WARM_BATCHES: each padded length is a new shape, and an
    engine's first call on a shape - kernel choice, allocator growth - is not its speed), twice: in runs
    10-11 one warm-up call was not enough (three timed calls of one 2,048-note batch took 0.52 s each, the
    same batches 0.24 s each once warm), then run batches round-robin until `point_s` has passed (at
    least two). `run(batch)` returns the prompt tokens."""
    for _ in range(WARM_ROUNDS):
        for b in batches[:WARM_BATCHES]:
            run(b)
    sync()
    n = tokens = calls = 0
    t0 = time.perf_counter()
    while True:
        b = batches[calls % len(batches)]
        tokens += run(b)
        n += notes_per(b)
        calls += 1
        if calls >= 2 and time.perf_counter() - t0 >= point_s:
            break
    sync()
    dt = time.perf_counter() - t0
    return {"notes_per_s": round(n / dt, 1), "prompt_tokens_per_s": round(tokens / dt, 1), "notes": n,
            "batches": calls, "seconds": round(dt, 3)}


def chunks(items: list, size: int) -> list[list]:
    full = [items[i:i + size] for i in range(0, len(items) - size + 1, size)]
    return full or [items[:size]]


def padding_ratio(calls: list[list[int]], cut: Callable[[list[int]], list[list[int]]], shared: int = 0) -> float:
    """Tokens computed over real prompt tokens of `calls` (each a list of prompt lengths) as `cut` splits them,
    each row padded to its sub-batch's longest; `shared`: leading tokens of every prompt computed once, not per
    row (the instruction an embed graph takes as a past), so the factor can fall below 1."""
    from worker.encoding import batches_cost

    real = sum(sum(lengths) for lengths in calls)
    padded = sum(batches_cost(cut(lengths), [n - shared for n in lengths], 0) for lengths in calls)
    return round(padded / max(real, 1), 3)


def ort_engine(pkg: str, device: str, *, io_binding: bool, batch: int, tf32: bool = True,
               device_topk: bool = True, call_tokens: int | None = None):
    from worker.encoder import OnnxNoteEncoder

    opts = None if device != "cuda" else {"use_tf32": int(tf32)}
    # embed_graph=True: a package that has one embeds through it on the CPU rehearsal too
    return OnnxNoteEncoder(pkg, device=device, max_batch_notes=batch, max_batch_tokens=10**9,
                           io_binding=io_binding, provider_options=opts, device_topk=device_topk,
                           embed_graph=True, call_tokens=call_tokens)


def bench_ort(pkg: str, device: str, notes, batches_sizes, mode: str, *, io_binding: bool, point_s: float,
              deadline: float, tf32: bool = True, device_topk: bool = True,
              call_tokens: int | None = None) -> dict[str, Any]:
    generate = "category" if mode == "embed+category" else "none"
    enc = ort_engine(pkg, device, io_binding=io_binding, batch=max(batches_sizes), tf32=tf32,
                     device_topk=device_topk, call_tokens=call_tokens)
    prompts = [enc.tokenize(n, "category") for n in notes]
    out: dict[str, Any] = {"providers": enc.providers}
    for b in batches_sizes:
        if not io_binding and b > NO_BINDING_MAX_BATCH[mode]:
            out[str(b)] = {"skipped": f"no I/O binding above batch {NO_BINDING_MAX_BATCH[mode]} (KV round-trips)"}
            continue
        if time.monotonic() > deadline:
            out[str(b)] = {"skipped": "time budget"}
            continue
        enc.max_batch_notes = b
        try:
            out[str(b)] = measure(lambda ps: (enc.encode(ps, generate), sum(p.tokens for p in ps))[1],
                                  chunks(prompts, b), len, point_s, lambda: None)
            # an embed graph that takes the instruction as a past computes it once, not per row
            shared = (len(enc.prompts.instruction_ids("category"))
                      if generate == "none" and enc.embed_graph_takes_prefix else 0)
            out[str(b)]["padded_over_real"] = padding_ratio(
                [[p.tokens for p in c] for c in chunks(prompts, b)],
                lambda lengths: enc.sub_batches(lengths, generate=generate != "none"), shared)
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory at a large batch: record, go on
            out[str(b)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    enc.close()
    _empty_cache()
    return out


def bench_torch(model, dtype_name: str, device: str, notes, batch_sizes, mode: str, *, point_s: float,
                deadline: float, max_new_tokens: int = 16) -> dict[str, Any]:
    import torch
    from transformers import StoppingCriteriaList

    from bench.encoder import _QuoteStop

    from worker.encoder import CALL_TOKENS_CPU, CALL_TOKENS_CUDA
    from worker.encoding import call_batches

    call_tokens = CALL_TOKENS_CUDA if device == "cuda" else CALL_TOKENS_CPU
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, Any] = {}
    for b in batch_sizes:
        if time.monotonic() > deadline:
            out[str(b)] = {"skipped": "time budget"}
            continue
        # each call's notes cut by length as the ORT encoder cuts them (embed-only: by padding, at the same
        # per-run cost; generating: full batches), so both engines compute the same padded tokens
        def cut(lengths: list[int], b: int = b) -> list[list[int]]:
            return call_batches(lengths, b, 10**9, call_tokens, by_padding=mode == "embed")

        batches, lengths_per_call = [], []
        for c in chunks(notes, b):
            lengths = [int(n) for n in m.tokenize_notes(c, "category", include_continuation=mode != "embed")
                       .attention_mask.sum(dim=1).tolist()]
            lengths_per_call.append(lengths)
            batches.append([m.tokenize_notes([c[i] for i in idx], "category", padding_side="left",
                                             include_continuation=mode != "embed", device=device)
                            for idx in cut(lengths)])

        def run(call) -> int:
            return sum(run_one(nb) for nb in call)

        def run_one(nb) -> int:
            with torch.no_grad():
                if mode == "embed":
                    m.embed_batch(nb.input_ids, nb.attention_mask, nb.emb_positions)
                else:
                    T = nb.input_ids.shape[1]
                    g = m.lm.generate(input_ids=nb.input_ids, attention_mask=nb.attention_mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=m.eos_token_id,
                                      pad_token_id=m.pad_token_id, return_dict_in_generate=True,
                                      output_hidden_states=True,
                                      stopping_criteria=StoppingCriteriaList([_QuoteStop(m.tokenizer, T)]))
                    hidden = g.hidden_states[0][-1]
                    m.project(hidden[torch.arange(hidden.shape[0], device=hidden.device), nb.emb_positions - 1])
            return int(nb.attention_mask.sum())

        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = measure(run, batches, lambda call: sum(int(nb.input_ids.shape[0]) for nb in call), point_s, sync)
            r["padded_over_real"] = padding_ratio(lengths_per_call, cut)
            if device == "cuda":
                r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out[str(b)] = r
        except Exception as e:  # noqa: BLE001
            out[str(b)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _empty_cache()
    m = None  # free the copy before the next engine
    _empty_cache()
    return out


WORKER_GENERATE = {"embed": "none", "embed+category": "category"}  # encoder mode -> the worker's generation


MILVUS_VERSION = "2.3.5"  # scripts/milvus's


def _free_port(avoid: set[int] = frozenset()) -> int:
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid and port + 1 not in avoid:
            return port


def start_milvus_server(work: Path) -> dict[str, Any]:
    """A Milvus standalone server of this check's own (``scripts/milvus start`` on free ports, data under
    ``work``), for the worker phases on the production store: the topology a GPU worker writes to.

    The server is the ``milvus`` package: on the device the pack carries it in ``site/`` (it is pure Python
    around its own lzma'd binaries), and a venv of two files points ``scripts/milvus`` at this Python;
    elsewhere ``scripts/milvus``'s own venv. Stop it with :func:`stop_milvus_server`."""
    import importlib.util
    import subprocess

    env = dict(os.environ)
    own_venv = REPO / ".local" / "milvus-server" / "venv"
    if importlib.util.find_spec("milvus") is not None:
        venv = work / "milvus-venv"
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        py = venv / "bin" / "python"
        py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        py.chmod(0o755)
        entry = venv / "bin" / "milvus-server"
        entry.write_text("import sys\nfrom milvus import main\nsys.exit(main())\n")
        entry.chmod(0o755)
        (venv / f".notellm-milvus-{MILVUS_VERSION}").touch()
    elif (own_venv / f".notellm-milvus-{MILVUS_VERSION}").exists():
        venv = own_venv
    else:
        raise RuntimeError(f"no Milvus server package: the device pack carries milvus=={MILVUS_VERSION} in site/; "
                           "here `scripts/milvus start` installs it once")
    port = _free_port()
    etcd = _free_port({port})
    env.update(NOTELLM_MILVUS_DIR=str(work / "milvus-server"), NOTELLM_MILVUS_PORT=str(port),
               NOTELLM_MILVUS_ETCD_PORT=str(etcd), NOTELLM_MILVUS_VENV=str(venv), NOTELLM_PYTHON=sys.executable)
    t0 = time.perf_counter()
    p = subprocess.run([str(REPO / "scripts" / "milvus"), "start"], env=env, capture_output=True, text=True,
                       timeout=300)
    server = {"version": MILVUS_VERSION, "venv": str(venv), "start_s": round(time.perf_counter() - t0, 1),
              "env": {k: env[k] for k in env if k.startswith("NOTELLM_MILVUS")}}
    if p.returncode != 0:
        stop_milvus_server(server)
        raise RuntimeError(f"scripts/milvus start failed: {p.stderr[-2000:]}")
    return {"uri": p.stdout.strip().splitlines()[-1], **server}


def stop_milvus_server(server: dict[str, Any]) -> None:
    import subprocess

    subprocess.run([str(REPO / "scripts" / "milvus"), "stop"], env={**os.environ, **server["env"]},
                   capture_output=True, timeout=120)


def worker_phase_name(mode: str, lite: str, replicas: int = 1) -> str:
    """worker/embed, worker/embed+category; with milvus-lite in a child process: worker/embed/lite-process;
    with that child and a writer process: worker/embed/writer; with several worker processes sharing the
    device: worker/embed/x2, worker/embed/x2/lite-process."""
    return (f"worker/{mode}" + (f"/x{replicas}" if replicas > 1 else "")
            + {"thread": "", "process": "/lite-process", "writer": "/writer"}[lite])


def _replica_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct counts >= 1 such as 1,2,3; got {text!r}")
    return counts


def _lite_modes(text: str) -> str:
    parts = text.split(",")
    if not text or set(parts) - {"thread", "process", "writer"} or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"expected some of thread,process,writer; got {text!r}")
    return text


def worker_package(enc: dict[str, Any] | None, packages: dict[str, str], device: str,
                   mode: str = "embed+category") -> tuple[str, int | None]:
    """The package the worker phase runs in `mode` and that engine's best batch: on CUDA the fastest fp16
    ORT engine in that mode (plain or fused; embed-only, the embed graphs too: the encoder serves its
    embed-only calls with the package's embed graph); on the CPU the first package."""
    kinds = [k for k in packages if k.startswith("fp16") and (mode == "embed" or not is_embed_kind(k))
             ] if device == "cuda" else []
    kinds = kinds or [next(iter(packages))]
    rows = (enc or {}).get(f"best_{mode}") or {}
    scored = [((rows.get(f"ort-{k}") or {}).get("notes_per_s") or 0.0, k) for k in kinds]
    kind = max(scored)[1] if any(v for v, _ in scored) else kinds[0]
    return kind, (rows.get(f"ort-{kind}") or {}).get("batch")


def best(points: dict[str, Any], key: str = "notes_per_s") -> tuple[int | None, float]:
    vals = [(int(b), r[key]) for b, r in points.items() if isinstance(r, dict) and key in r]
    if not vals:
        return None, 0.0
    return max(vals, key=lambda x: x[1])


def encoder_phase(model, packages: dict[str, str], device: str, notes, batch_sizes, point_s: float,
                  deadline: float, *, modes=("embed", "embed+category"), engines: set[str] | None = None
                  ) -> dict[str, Any]:
    res: dict[str, Any] = {"batch_sizes": list(batch_sizes), "point_s": point_s}
    torch_dtypes = ("fp16", "bf16") if device == "cuda" else ("fp32", "bf16")
    for mode in modes:
        rows: dict[str, Any] = {}
        for kind, pkg in packages.items():
            if is_embed_kind(kind) and mode != "embed":
                continue  # it generates with the step graph it shares with its source package
            for binding in ((True,) if kind.endswith("-fused") or is_embed_kind(kind) else (True, False)):
                name = f"ort-{kind}{'' if binding else '-nobinding'}"
                if engines and name not in engines:
                    continue
                progress(f"  {mode}: {name}")
                rows[name] = bench_ort(pkg, device, notes, batch_sizes, mode, io_binding=binding,
                                       point_s=point_s, deadline=deadline, tf32=False)
            # generation reading the full [B, vocab] logits every step (what runs 1-4 measured) beside the
            # default, which reads the graph's top-k and leaves the logits on the device
            name = f"ort-{kind}-hostlogits"
            default_off = kind.endswith("-fused") or is_embed_kind(kind)
            if mode == "embed+category" and (name in engines if engines else not default_off):
                progress(f"  {mode}: {name}")
                rows[name] = bench_ort(pkg, device, notes, batch_sizes, mode, io_binding=True, point_s=point_s,
                                       deadline=deadline, tf32=False, device_topk=False)
            # embed-only without the cut by padding (every call one batch padded to its longest prompt), beside
            # the default: by default for the embed graphs, whose calls the cut applies to on CUDA
            name = f"ort-{kind}-fullbatch"
            if mode == "embed" and (name in engines if engines else is_embed_kind(kind)):
                progress(f"  {mode}: {name}")
                rows[name] = bench_ort(pkg, device, notes, batch_sizes, mode, io_binding=True, point_s=point_s,
                                       deadline=deadline, tf32=False, call_tokens=10**12)
        for dt in torch_dtypes:
            if engines and f"torch-{dt}" not in engines:
                continue
            progress(f"  {mode}: torch-{dt}")
            rows[f"torch-{dt}"] = bench_torch(model, dt, device, notes, batch_sizes,
                                              "embed" if mode == "embed" else "generate",
                                              point_s=point_s, deadline=deadline)
        res[mode] = rows
        res[f"best_{mode}"] = {name: dict(zip(("batch", "notes_per_s"), best(pts))) for name, pts in rows.items()}
    return res


# --------------------------------------------------------------------------------------------- phase 4
class _Msg:
    """A consumed record's interface (confluent_kafka.Message's getters) for notes fed without a broker."""

    __slots__ = ("_k", "_v", "_p", "_o")

    def __init__(self, key: bytes, value: bytes, partition: int, offset: int) -> None:
        self._k, self._v, self._p, self._o = key, value, partition, offset

    def key(self): return self._k
    def value(self): return self._v
    def topic(self): return "notes"
    def partition(self): return self._p
    def offset(self): return self._o
    def timestamp(self): return (1, int(time.time() * 1000))
    def headers(self): return None


WORKER_MIN_BATCHES = 6  # the worker phase feeds at least this many full batches


def thread_cpu() -> dict[str, tuple[str, float]]:
    """CPU seconds of every live thread of this process (Linux: /proc/self/task), keyed by native id, each
    with its Python thread's name, or "native" for a thread Python did not start (the tokenizer's, gRPC's
    and ONNX Runtime's pools). The name's trailing counters are dropped so that pools group."""
    import re
    import threading

    names = {t.native_id: re.sub(r"(?:[-_]\d+)+$", "", t.name) for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (names.get(int(tid), "native"), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def thread_cpu_delta(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per thread group between two `thread_cpu()` snapshots, largest first."""
    sums: dict[str, float] = {}
    for tid, (name, t) in after.items():
        sums[name] = sums.get(name, 0.0) + t - before.get(tid, (name, 0.0))[1]
    return {k: round(v, 3) for k, v in sorted(sums.items(), key=lambda kv: -kv[1]) if v > 0}


def worker_phase(pkg: str, device: str, notes, batch: int, generate: str, work: Path,
                 isolation: str, lite_process: bool = False, barrier: Any = None,
                 measure_alone: bool = True, gpu_mem_limit_mib: int | None = None,
                 write_process: bool = False, milvus_uri: str | None = None) -> dict[str, Any]:
    """The worker's polling-thread work (decode, prepare) and its two stage threads on real notes, against
    the same encoder alone on the very batches the batcher closed. The note texts are cycled (each record
    its own note id) to at least ``WORKER_MIN_BATCHES`` batches: with one batch (run 6: batch 2048 on
    2,048 notes) nothing overlaps and the ratio only says the stages ran in series.

    One of several replicas (:func:`replicas_phase`): ``barrier`` (a multiprocessing Barrier) lines up the
    replicas' measured passes and then their encoder-alone passes, which only the replica with
    ``measure_alone`` makes, alone on the device; the result has the measured pass's ``span`` (monotonic
    clock, the same for every process of the machine).

    ``milvus_uri``: write to that Milvus server (a collection of this phase's own, dropped at the end)
    instead of a milvus-lite db; ``lite_process`` then has no meaning."""
    from worker.batcher import Batcher
    from worker.decode import decode
    from worker.encoders import load_encoder
    from worker.encoding import EncodeStage, prepare_many
    from worker.pipeline import Pipeline
    from worker.records import Note
    from worker.sinks.milvus import MilvusSink, MilvusStore

    enc = load_encoder(pkg, device=device, max_batch_notes=batch, max_batch_tokens=10**9, isolation=isolation,
                       gpu_mem_limit_mib=gpu_mem_limit_mib)
    enc.warmup(generate)
    # one collection per phase; a db of its own for the child (pymilvus's in-process server keeps its db's
    # LOCK until this process exits)
    if milvus_uri:
        lite_process = False
        store = MilvusStore(milvus_uri, alias=f"gpu_check_{generate}_{uuid.uuid4().hex[:8]}",
                            write_process=write_process)
    else:
        lite_process = lite_process or write_process  # the writer needs the db served by a child
        db = work / "milvus" / ("gpu-check-w.db" if write_process else "gpu-check-lp.db" if lite_process
                                else "gpu-check.db")
        store = MilvusStore(str(db), alias=f"gpu_check_{generate}", lite_process=lite_process,
                            write_process=write_process)
    coll = store.ensure(enc.dim, enc.model_version)
    sink = MilvusSink(store, coll)
    stage = EncodeStage(enc, topic="notes")
    msgs = []
    cycled = [notes[i % len(notes)] for i in range(max(len(notes), WORKER_MIN_BATCHES * batch))]
    for i, n in enumerate(cycled):
        doc = {"schema_version": "note.v1", "note_id": f"g{i:06d}", "title": n.title, "content": n.content,
               "topic": n.topic, "author_id": "gpu-check", "published_at": int(time.time() * 1000)}
        msgs.append(_Msg(doc["note_id"].encode(), json.dumps(doc).encode(), i % 3, i // 3))
    sink_s = [0.0, 0, 0.0]  # wall, flushes, the sink thread's own CPU

    def flush(encoded) -> None:
        t, c = time.perf_counter(), time.thread_time()
        sink.add(encoded)
        rejected = sink.flush()
        if rejected:
            raise RuntimeError(f"{len(rejected)} rows rejected: {rejected[0]}")
        sink_s[0] += time.perf_counter() - t
        sink_s[1] += 1
        sink_s[2] += time.thread_time() - c

    def run_pipeline(batches_out: list | None) -> tuple[float, float, dict, dict]:
        batcher = Batcher(max_notes=batch, max_tokens=10**9, linger_s=0.05)
        pipe = Pipeline(lambda b, idle=False, early=None: stage(b, generate), flush)
        poll_s = 0.0
        t0, cpu0, poll_cpu0 = time.perf_counter(), time.process_time(), time.thread_time()
        threads0 = thread_cpu()
        for i in range(0, len(msgs), batch):  # one poll = up to `batch` messages, as the worker polls
            tp = time.perf_counter()
            recs = [decode(m, 1 << 20) for m in msgs[i:i + batch]]
            prepared = iter(prepare_many(enc, [r for r in recs if isinstance(r, Note)], generate, "notes"))
            recs = [next(prepared) if isinstance(r, Note) else r for r in recs]
            poll_s += time.perf_counter() - tp
            for r in recs:
                tp = time.perf_counter()
                closed = batcher.add(r, time.monotonic(), pipe.slot_free())
                poll_s += time.perf_counter() - tp
                for b in closed:
                    if batches_out is not None:
                        batches_out.append(b)
                    if not pipe.submit(b, 600):
                        raise RuntimeError(f"pipeline failed: {pipe.error}")
        last = batcher.flush(time.monotonic())
        if last is not None:
            if batches_out is not None:
                batches_out.append(last)
            pipe.submit(last, 600)
        if not pipe.drain(600):
            raise RuntimeError(f"pipeline failed: {pipe.error}")
        dt = time.perf_counter() - t0
        # the polling loop ran on this thread (its waits on the pipeline take no CPU); the stage threads are
        # read before close() ends them
        cpu = {"process": time.process_time() - cpu0, "polling_thread": time.thread_time() - poll_cpu0,
               "threads": thread_cpu_delta(threads0, thread_cpu())}
        busy = dict(pipe.busy_s)
        pipe.close()
        return dt, poll_s, busy, cpu

    run_pipeline(None)  # warm-up pass (shapes, Milvus segments); every note is written once here
    formed: list = []
    sink_s[:] = [0.0, 0, 0.0]
    if barrier is not None:
        barrier.wait(600)
    begin = time.monotonic()
    dt, poll_s, busy, cpu = run_pipeline(formed)  # the same ids again: idempotent upserts
    span = (begin, begin + dt)
    if barrier is not None:
        barrier.wait(600)  # every replica's measured pass has ended: the encoder alone has the device
    sizes = [len(b.notes) for b in formed]
    alone = None
    if measure_alone:
        t0 = time.perf_counter()
        for b in formed:
            enc.encode([n.prompt for n in b.notes], generate)
        alone = time.perf_counter() - t0
    if barrier is not None:
        barrier.wait(600)
    count = store.count(coll)
    enc.close()
    if milvus_uri:  # the server outlives the check: leave nothing behind
        with store.locked() as c:
            c.drop_alias(store.alias)
            c.drop_collection(coll)
    store.close()
    n = len(msgs)
    return {
        "isolation": isolation, "lite_process": lite_process, "write_process": write_process, "generate": generate,
        "milvus": "server" if milvus_uri else "milvus-lite", "milvus_collection": coll, "max_batch_notes": batch,
        "notes": n,
        "batches": len(formed), "mean_batch": round(sum(sizes) / max(len(sizes), 1), 1),
        "pipeline_notes_per_s": round(n / dt, 1),
        "encoder_alone_notes_per_s": round(n / alone, 1) if alone else None,
        "ratio": round(alone / dt, 3) if alone else None, **({"span": span} if barrier is not None else {}),
        "gpu_mem_limit_mib": gpu_mem_limit_mib,
        "time_s": {"pipeline_wall": round(dt, 3), "encoder_alone": round(alone, 3) if alone else None,
                   "polling_thread_decode_prepare_batch": round(poll_s, 3),
                   "encode_stage_busy": round(busy["encode"], 3), "sink_stage_busy": round(busy["sink"], 3),
                   "milvus_flush": round(sink_s[0], 3)},
        # CPU seconds of this process (the encoder's own process excluded with isolation="process"): the
        # polling thread, the sink thread's client work, milvus-lite's in-process server threads; by_thread
        # per thread group (MainThread = polling, notellm-encode / notellm-sink = the stages, native = the
        # tokenizer's and gRPC's pools). Python work in them shares one GIL: process CPU near the wall time
        # means the worker process is the limit.
        "cpu_s": {"worker_process": round(cpu["process"], 3), "polling_thread": round(cpu["polling_thread"], 3),
                  "sink_thread": round(sink_s[2], 3), "by_thread": cpu["threads"]},
        "cpus": len(os.sched_getaffinity(0)),
        "milvus_rows_per_s": round(n / sink_s[0], 1) if sink_s[0] else None,
        "milvus_rows": count,
    }


def _replica_main(results: Any, index: int, barrier: Any, device: str, kwargs: dict[str, Any]) -> None:
    """One replica of :func:`replicas_phase`, in its own process: the worker phase, its result (or its
    error) put on ``results``. A failure breaks the barrier, so that no other replica waits for it."""
    try:
        if device == "cuda":
            preload_cuda()
        r = worker_phase(device=device, barrier=barrier, measure_alone=index == 0, **kwargs)
        results.put((index, r))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, whatever it was
        barrier.abort()
        results.put((index, {"error": f"{type(e).__name__}: {str(e)[:500]}"}))


def replicas_phase(pkg: str, device: str, notes, batch: int, generate: str, work: Path, isolation: str,
                   lite_process: bool, replicas: int, timeout_s: float = 600.0,
                   write_process: bool = False, milvus_uri: str | None = None) -> dict[str, Any]:
    """``replicas`` worker processes sharing the device, as several worker replicas on one GPU would: each
    runs :func:`worker_phase` (its own encoder child, tokenizer, pipeline and milvus-lite db: milvus-lite
    serves one process, so each replica writes a db of its own where production replicas share a Milvus
    server), their measured passes started together. The aggregate notes/s (every replica's notes over the
    time from the first start to the last end) is compared with one encoder alone on the whole device
    (replica 0's, measured after every replica's pass). On CUDA each replica's encoder sessions are bounded
    to a share of the device's memory (``NOTELLM_MODEL__GPU_MEM_LIMIT_MIB``): unbounded, ONNX Runtime's arena
    doubles and keeps what it took, and in run 10 the second replica could not allocate 1.3 GB."""
    import multiprocessing as mp
    import queue

    limit = None
    if device == "cuda":  # 80 % of the device, shared by the replicas' two sessions (step and embed graph)
        import torch

        limit = int(0.8 * torch.cuda.get_device_properties(0).total_memory / 2**20 / (2 * replicas))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(replicas)
    results = ctx.Queue()
    procs = []
    for i in range(replicas):
        kwargs = {"pkg": pkg, "notes": notes, "batch": batch, "generate": generate,
                  "work": work / f"replica-{i}", "isolation": isolation, "lite_process": lite_process,
                  "write_process": write_process, "milvus_uri": milvus_uri, "gpu_mem_limit_mib": limit}
        (work / f"replica-{i}").mkdir(parents=True, exist_ok=True)
        procs.append(ctx.Process(target=_replica_main, args=(results, i, barrier, device, kwargs),
                                 name=f"gpu-check-replica-{i}"))
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < replicas:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{replicas - len(got)} of {replicas} replicas did not report in {timeout_s:.0f} s")
            try:
                i, r = results.get(timeout=min(left, 5.0))
            except queue.Empty:  # check that every replica still lives
                dead = [p.name for k, p in enumerate(procs) if k not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"replica process(es) died without a result: {dead}") from None
                continue
            got[i] = r
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = {i: r["error"] for i, r in got.items() if "error" in r}
    if errors:
        raise RuntimeError(f"replica errors: {errors}")
    rows = [got[i] for i in range(replicas)]
    begin = min(r["span"][0] for r in rows)
    end = max(r["span"][1] for r in rows)
    total = sum(r["notes"] for r in rows)
    alone = rows[0]["encoder_alone_notes_per_s"]
    agg = total / (end - begin)
    keep = ("pipeline_notes_per_s", "milvus_rows_per_s", "time_s", "cpu_s", "batches", "mean_batch", "milvus_rows")
    return {
        "replicas": replicas, "isolation": isolation, "lite_process": rows[0]["lite_process"],
        "write_process": write_process, "milvus": rows[0]["milvus"], "generate": generate, "max_batch_notes": batch,
        "gpu_mem_limit_mib": limit, "notes": total, "pipeline_notes_per_s": round(agg, 1),
        "encoder_alone_notes_per_s": alone, "ratio": round(agg / alone, 3),
        # how far apart the measured passes started and ended (s): overlap, not a staggered run
        "start_spread_s": round(max(r["span"][0] for r in rows) - begin, 3),
        "end_spread_s": round(end - min(r["span"][1] for r in rows), 3),
        "milvus_rows_per_s": round(sum(r["milvus_rows_per_s"] or 0.0 for r in rows), 1),
        "cpus": rows[0]["cpus"],
        "per_replica": [{k: r[k] for k in keep} for r in rows],
    }


# --------------------------------------------------------------------------------------------- phase 5
FUSED_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
             "FastGelu", "BiasGelu", "MatMul", "Softmax")


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(g) -> None:
        for node in g.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for a in node.attribute:
                if a.g is not None and a.g.node:
                    walk(a.g)

    walk(m.graph)
    return {k: counts.get(k, 0) for k in FUSED_OPS} | {"total_nodes": sum(counts.values())}


def _fuse_ort_transformers(src: Path, dst: Path, model, device: str) -> dict[str, Any]:
    """onnxruntime.transformers.optimizer with ORT's Llama recipe (models/llama/convert_to_onnx.py)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.lm.config
    opt = optimize_model(str(src / "model.onnx"), model_type="gpt2", num_heads=int(cfg.num_attention_heads),
                         hidden_size=int(cfg.hidden_size), opt_level=0, optimization_options=FusionOptions("gpt2"),
                         only_onnxruntime=False, use_gpu=device == "cuda")
    opt.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=True, all_tensors_to_one_file=True)
    return {}


def _fuse_onnxscript(src: Path, dst: Path, model, device: str) -> dict[str, Any]:
    """onnxscript's rewriter for ORT (made for torch.onnx dynamo exports): SDPA/MHA/GQA, rotary
    embedding, (skip) RMS normalisation; the very rewrite `notellm export --fuse` applies."""
    from export.onnx_export import fuse_for_ort

    for f in ("model.onnx", "model.onnx.data"):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)
    return {"fusion_counts": fuse_for_ort(dst / "model.onnx")}


FUSIONS = {"ort_transformers_gpt2": _fuse_ort_transformers, "onnxscript_ort_fusions": _fuse_onnxscript}


def fusion_phase(packages: dict[str, str], model, device: str, notes, batch: int, point_s: float,
                 work: Path, deadline: float) -> dict[str, Any]:
    import numpy as np

    res: dict[str, Any] = {}
    sample = notes[:64]
    for kind, pkg in packages.items():
        if kind.endswith("-fused"):
            continue  # already fused: measured as its own engine
        src = Path(pkg)
        res[f"{kind}/plain"] = {"ops": op_counts(src / "model.onnx")}
        for fname, fuse in FUSIONS.items():
            if time.monotonic() > deadline:
                res[f"{kind}/{fname}"] = {"skipped": "time budget"}
                continue
            row: dict[str, Any] = {}
            dst = work / f"pkg-{kind}-{fname}"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
            try:
                t0 = time.perf_counter()
                row.update(fuse(src, dst, model, device))
                row["optimize_s"] = round(time.perf_counter() - t0, 1)
                row["ops"] = op_counts(dst / "model.onnx")
                plain = ort_engine(pkg, device, io_binding=True, batch=batch, tf32=False)
                fused = ort_engine(str(dst), device, io_binding=True, batch=batch, tf32=False)
                a, b = plain.embed(sample), fused.embed(sample)
                row["parity_min_cosine"] = round(float((a * b).sum(1).min()), 6)
                row["parity_max_abs"] = float(np.abs(a - b).max())
                plain.close()
                fused.close()
                row["embed"] = {
                    "plain": bench_ort(pkg, device, notes, [batch], "embed", io_binding=True, point_s=point_s,
                                       deadline=deadline + 60, tf32=False).get(str(batch)),
                    "fused": bench_ort(str(dst), device, notes, [batch], "embed", io_binding=True,
                                       point_s=point_s, deadline=deadline + 60, tf32=False).get(str(batch)),
                }
            except Exception as e:  # noqa: BLE001 - a fusion that breaks the graph is a finding, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            shutil.rmtree(dst, ignore_errors=True)
            res[f"{kind}/{fname}"] = row
    return res


# --------------------------------------------------------------------------------------------- phase 6
KERNEL_CLASSES = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("fmha", "flash", "attention", "mha", "softmax")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "matmul", "sm90_", "sm80_", "ampere_", "hopper", "aten::linear",
                "aten::mm", "aten::addmm", "aten::bmm")),
    ("norm", ("layernorm", "layer_norm", "rmsnorm", "rms_norm", "skiplayernorm")),
    ("rotary", ("rotary",)),
    ("copy", ("memcpy", "memset", "copy", "transpose", "concat", "cat_", "aten::cat", "gather", "slice", "expand")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "elementwise/other"


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy


def profile_engine(run: Callable[[], Any], device: str, calls: int = 3, top: int = 12) -> dict[str, Any]:
    """Where one engine's time goes: ``calls`` warm calls under torch.profiler. On CUDA it records every
    kernel the process launches through CUPTI - ONNX Runtime's included, since both use the same device
    context - so the kernel time per class (matmul, attention, norm, copy, elementwise) and the GPU's busy
    share of the wall time are measured the same way for both engines. On the CPU it records torch's
    operators (ONNX Runtime's own work is invisible there: only the wall time is then meaningful)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()  # warm (shapes, allocator)
    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        wall = time.perf_counter() - t0
    per_name: dict[str, list[float]] = {}
    intervals: list[tuple[float, float]] = []
    want = "CUDA" if device == "cuda" else "CPU"
    for e in prof.events():
        kind = getattr(e.device_type, "name", str(e.device_type)).split(".")[-1].upper()
        if kind != want or (device != "cuda" and e.cpu_parent is not None):
            continue  # on the CPU: top-level operators only, no double counting
        tr = e.time_range
        dur = float(tr.end - tr.start)  # us
        intervals.append((float(tr.start), float(tr.end)))
        rec = per_name.setdefault(e.name, [0.0, 0])
        rec[0] += dur
        rec[1] += 1
    total_us = sum(v[0] for v in per_name.values())
    classes: dict[str, float] = {}
    for name, (us, _) in per_name.items():
        c = kernel_class(name)
        classes[c] = classes.get(c, 0.0) + us
    top_rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "calls": calls, "wall_ms": round(wall * 1e3, 2),
        "recorded": "cuda kernels" if device == "cuda" else "torch cpu operators",
        "events": sum(v[1] for v in per_name.values()),
        "busy_ms": round(_busy_union(intervals) / 1e3, 2), "summed_ms": round(total_us / 1e3, 2),
        "busy_share_of_wall": round(_busy_union(intervals) / 1e6 / wall, 3) if wall > 0 else None,
        "by_class_ms": {k: round(v / 1e3, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:160], "ms": round(us / 1e3, 2), "count": c, "class": kernel_class(n)}
                for n, (us, c) in top_rows],
    }


def profile_phase(model, packages: dict[str, str], device: str, notes, batch: int, *, generate: bool = False
                  ) -> dict[str, Any]:
    """Embed-only at one batch size, per engine: ORT on each fp16 package (plain, fused), torch eager fp16
    (bf16/fp32 on the CPU), each profiled over three batches of the same notes; with ``generate`` also ORT
    with category generation (one call)."""
    import torch

    res: dict[str, Any] = {"batch": batch}
    sample = notes[:batch]
    for kind, pkg in packages.items():
        if device == "cuda" and not kind.startswith("fp16"):
            continue
        enc = ort_engine(pkg, device, io_binding=True, batch=batch, tf32=False)
        try:
            prompts = [enc.tokenize(n, "category") for n in sample]
            res[f"ort-{kind}"] = profile_engine(lambda: enc.encode(prompts, "none"), device)
            res[f"ort-{kind}"]["prompt_tokens"] = sum(p.tokens for p in prompts)
            if generate and not is_embed_kind(kind):  # the same notes with category generation
                res[f"ort-{kind}/embed+category"] = profile_engine(lambda: enc.encode(prompts, "category"), device,
                                                                   calls=1)
                res[f"ort-{kind}/embed+category"]["prompt_tokens"] = res[f"ort-{kind}"]["prompt_tokens"]
        finally:
            enc.close()
            _empty_cache()
    dt = "fp16" if device == "cuda" else "fp32"
    m = copy.deepcopy(model).to(device=device, dtype={"fp16": torch.float16, "fp32": torch.float32}[dt]).eval()
    nb = m.tokenize_notes(sample, "category", padding_side="left", include_continuation=False, device=device)

    def run() -> None:
        with torch.no_grad():
            m.embed_batch(nb.input_ids, nb.attention_mask, nb.emb_positions)

    res[f"torch-{dt}"] = profile_engine(run, device)
    res[f"torch-{dt}"]["prompt_tokens"] = int(nb.attention_mask.sum())
    res[f"torch-{dt}"]["padded_tokens"] = int(nb.attention_mask.numel())
    del m
    _empty_cache()
    return res


def ort_profile(pkg: str, device: str, notes, batch: int, mode: str, work: Path, calls: int = 3) -> dict[str, Any]:
    """ONNX Runtime's own profiler on one encoder configuration: what the host does per graph call. On the
    CUDA provider a node's time is its host time (shape work, allocation, kernel launch; kernels run
    asynchronously), so beside the kernel profile this says where the GPU's idle gaps come from: the
    framework (model_run minus its nodes), nodes on the CPU provider, or host <-> device copies."""
    import onnxruntime as ort

    generate = "category" if mode == "embed+category" else "none"
    enc = ort_engine(pkg, device, io_binding=True, batch=batch, tf32=False)
    try:
        prompts = [enc.tokenize(n, "category") for n in notes[:batch]]
        enc.encode(prompts, generate)  # warm: the shared prefix, shapes, the allocator
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(work / f"ortprof-{Path(pkg).name}-{mode.replace('+', '_')}")
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        # embed-only on a package with an embed graph runs that graph (one run per sub-batch), else the step
        # graph (one run per step)
        embed = generate == "none" and enc.embed_session is not None
        graph = enc.manifest["embed_graph"]["graph"] if embed else enc.manifest["graph"]
        session = ort.InferenceSession(str(Path(pkg) / graph), sess_options=so, providers=providers)
        if embed:
            enc.embed_session = session
            enc._embed_prefix_kv = {}  # OrtValues of the first session's device allocator: rebuilt for this one
        else:
            enc.session = session
            enc._prefix_batch = {}  # its OrtValues belong to the first session's device allocator: rebuild them
        steps = [0]
        attr = "_embed_rows" if embed else "_step"
        call = getattr(enc, attr)

        def counted(*args, **kwargs):
            steps[0] += 1
            return call(*args, **kwargs)

        setattr(enc, attr, counted)  # one count per graph run: the warm runs below are dropped from the profile
        enc.encode(prompts, generate)
        warm_runs = steps[0]
        t0 = time.perf_counter()
        for _ in range(calls):
            enc.encode(prompts, generate)
        wall = time.perf_counter() - t0
        trace = json.loads(Path(session.end_profiling()).read_text())
    finally:
        enc.close()
        _empty_cache()
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[warm_runs:]
    if not runs:
        raise RuntimeError("the ORT profile holds no measured model_run")
    start = runs[0]["ts"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e["ts"] >= start and e.get("name", "").endswith("_kernel_time")]
    per_provider: dict[str, float] = {}
    per_op: dict[tuple[str, str], list[float]] = {}
    cpu_nodes: set[str] = set()
    for e in nodes:
        a = e.get("args") or {}
        prov = str(a.get("provider", "?")).replace("ExecutionProvider", "")
        op = str(a.get("op_name", "?"))
        per_provider[prov] = per_provider.get(prov, 0.0) + e["dur"]
        rec = per_op.setdefault((op, prov), [0.0, 0])
        rec[0] += e["dur"]
        rec[1] += 1
        if prov == "CPU" and device == "cuda":
            cpu_nodes.add(e["name"][: -len("_kernel_time")])
    n_runs = len(runs)
    run_us = sum(e["dur"] for e in runs)
    node_us = sum(per_provider.values())
    memcpy = sum(c for (op, _), (_, c) in per_op.items() if op.startswith("Memcpy"))
    top = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "mode": mode, "batch": batch, "calls": calls, "graph_runs": n_runs, "graph_runs_per_call": n_runs / calls,
        "wall_ms_per_call": round(wall * 1e3 / calls, 2),
        "model_run_ms_per_call": round(run_us / 1e3 / calls, 2),
        "nodes_host_ms_per_call": round(node_us / 1e3 / calls, 2),
        "framework_ms_per_call": round((run_us - node_us) / 1e3 / calls, 2),
        "outside_run_ms_per_call": round(wall * 1e3 / calls - run_us / 1e3 / calls, 2),
        "by_provider_ms_per_call": {k: round(v / 1e3 / calls, 2) for k, v in per_provider.items()},
        "node_calls_per_run": round(len(nodes) / n_runs, 1), "memcpy_per_run": round(memcpy / n_runs, 1),
        "cpu_provider_nodes": sorted(cpu_nodes)[:40], "cpu_provider_node_count": len(cpu_nodes),
        "top_ops": [{"op": op, "provider": prov, "ms_per_call": round(us / 1e3 / calls, 2), "count_per_run": round(c / n_runs, 1)}
                    for (op, prov), (us, c) in top],
    }


def ort_profile_phase(packages: dict[str, str], device: str, notes, batch: int, work: Path,
                      modes: tuple[str, ...]) -> dict[str, Any]:
    res: dict[str, Any] = {"batch": batch}
    for kind, pkg in packages.items():
        if device == "cuda" and not kind.startswith("fp16"):
            continue
        for mode in modes:
            if is_embed_kind(kind) and mode != "embed":
                continue
            progress(f"  ort profile: {kind} {mode}")
            res[f"ort-{kind}/{mode}"] = ort_profile(pkg, device, notes, batch, mode, work)
    return res


# --------------------------------------------------------------------------------------------- report
def goals(doc: dict[str, Any]) -> dict[str, Any]:
    enc = doc.get("encoder") or {}
    b = enc.get("best_embed") or {}
    ort16 = max([(v or {}).get("notes_per_s") or 0.0 for k, v in b.items() if k.startswith("ort-fp16")] or [0.0])
    torch_best = max([(b.get(k) or {}).get("notes_per_s") or 0.0 for k in ("torch-fp16", "torch-bf16")] or [0.0])
    tok = 0.0
    for name, pts in (enc.get("embed") or {}).items():
        if name.startswith("ort-"):
            tok = max(tok, best(pts, "prompt_tokens_per_s")[1])
    out = {
        "ort_fp16_vs_torch_eager_embed": {"value": round(ort16 / torch_best, 2) if torch_best else None,
                                          "goal": ">= 2"},
        "embed_prompt_tokens_per_s": {"value": tok, "goal": ">= 1e6 (135M, one H100)"},
    }
    for mode in WORKER_GENERATE:  # the worker at embed-only speed and with category generation
        out[f"pipeline_vs_encoder_alone/{mode}"] = {"value": (doc.get(f"worker/{mode}") or {}).get("ratio"),
                                                    "goal": ">= 0.9"}
    for name, w in doc.items():  # the same with milvus-lite in a child process, or several replicas, if measured
        if name.startswith("worker/") and isinstance(w, dict) and "ratio" in w:
            out[f"pipeline_vs_encoder_alone/{name[len('worker/'):]}"] = {"value": w["ratio"], "goal": ">= 0.9"}
    for g in out.values():
        v = g["value"]
        g["met"] = None if v is None else bool(v >= float(g["goal"].split()[1]))
    return out


def polling_phase(packages: dict[str, str], notes, *, poll: int = 512, repeats: int = 3) -> dict[str, Any]:
    """bench/polling.py on this machine's cores: the worker's polling thread (decode, the batched tokenizer
    pass, batching) per note, composed vs whole-encoded prompts, with and without a thread loading the GIL."""
    from bench.polling import measure, messages

    kind, pkg = next(iter(packages.items()))  # every package carries the same tokenizer
    return {"package": kind, **measure(pkg, messages(notes), poll=min(poll, len(notes)), repeats=repeats)}


def calibration_phase(pkg: str, device: str, generate: str, budget_s: float | None = None) -> dict[str, Any]:
    """The worker's start-up batch calibration (worker/calibrate.py) on this device, as a pod runs it: the
    encoder in its child process, the calibration's defaults for the device (CUDA: up to 2048 notes in
    60 s, every shape warmed up), unless ``budget_s`` is given (the CPU rehearsal)."""
    from worker.calibrate import calibrate
    from worker.encoders import load_encoder

    enc = load_encoder(pkg, device=device, max_batch_notes=32, max_batch_tokens=4096, isolation="process")
    try:
        return {**calibrate(enc, generate=generate, budget_s=budget_s).as_log(), "providers": list(enc.providers)}
    finally:
        enc.close()


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# GPU check", ""]
    env = doc.get("environment") or {}
    if env:
        lines.append(f"Device: {env.get('gpu', 'CPU (rehearsal)')}; torch {env.get('torch')}, onnxruntime "
                     f"{env.get('onnxruntime')}, providers {env.get('ort_available_providers')}; "
                     f"started {doc.get('started_at')}.")
        lines.append("")
    lines += ["| phase | status | seconds |", "| --- | --- | --- |"]
    for name, p in doc["phases"].items():
        lines.append(f"| {name} | {p['status']}{': ' + p.get('error', p.get('why', '')) if p['status'] != 'ok' else ''}"
                     f" | {p.get('seconds', '')} |")
    for name in [k for k in doc if k.startswith("export_")]:
        kind, e = name[len("export_"):].replace("_", " "), doc[name]
        if e:
            v = e["validation"]["metrics"]
            lines.append("")
            lines.append(f"Parity {kind} on {e['validation'].get('providers', ['?'])[0]}: "
                         f"{'passed' if e['validation']['passed'] else 'FAILED'}; max |diff| {v['max_abs_diff']:.2e}, "
                         f"min cosine {v['min_cosine']:.6f}, generation agreement {v['generation_agreement']:.2f}.")
    for name in [k for k in doc if k.startswith("fuse_")]:
        e = doc[name]
        v = e["validation"]["metrics"]
        lines += ["", f"Fused {name[5:]} package (onnxscript {e['fused_with']['onnxscript']}): "
                  f"{', '.join(f'{k} {n}' for k, n in e['fusions'].items())}; parity "
                  f"{'passed' if e['validation']['passed'] else 'FAILED'}: max |diff| {v['max_abs_diff']:.2e}, "
                  f"min cosine {v['min_cosine']:.6f}, generation agreement {v['generation_agreement']:.2f}."]
    for name in [k for k in doc if k.startswith("embed_graph_")]:
        e = doc[name]
        v = e["validation"]["metrics"]
        eg, sg = v.get("embed_graph") or v, v.get("step_graph") or v
        lines += ["", f"Embed graph on the {name[12:].rsplit('_', 1)[0]} package, rotary {e.get('rotary', 'gqa')} "
                  f"({e['ops'].get('GroupQueryAttention', 0)} GroupQueryAttention, "
                  f"{e['ops'].get('MultiHeadAttention', 0)} MultiHeadAttention, {e['ops'].get('total_nodes')} "
                  "nodes): parity "
                  f"{'passed' if e['validation']['passed'] else 'FAILED'}: embed graph max |diff| "
                  f"{eg['max_abs_diff']:.2e}, min cosine {eg['min_cosine']:.6f}; step graph min cosine "
                  f"{sg['min_cosine']:.6f}; generation agreement {v['generation_agreement']:.2f}."]
        if e.get("attention_kernels"):
            lines += ["", "ONNX Runtime's attention kernel choice: " + "; ".join(e["attention_kernels"][:4])]
    enc = doc.get("encoder")
    if enc:
        for mode in ("embed", "embed+category"):
            rows = enc.get(mode) or {}
            if not rows:
                continue  # a mode this run did not measure (--modes)
            sizes = [str(b) for b in enc["batch_sizes"]]
            lines += ["", f"**{mode}**: notes/s (prompt tokens/s, x tokens computed over real: padding, less an "
                          "instruction computed once) by batch size",
                      "",
                      "| engine | " + " | ".join(sizes) + " |", "| --- |" + " --- |" * len(sizes)]
            for name, pts in rows.items():
                cells = []
                for b in sizes:
                    r = pts.get(b) or {}
                    if "notes_per_s" in r:
                        pad = f", x{r['padded_over_real']}" if "padded_over_real" in r else ""
                        cells.append(f"{r['notes_per_s']:,.0f} ({r['prompt_tokens_per_s']:,.0f}{pad})")
                    else:
                        cells.append("skipped" if "skipped" in r else ("error" if "error" in r else ""))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pol = doc.get("polling")
    if pol:
        lines += ["", f"**Polling thread** ({pol['notes']} notes in polls of {pol['poll']}, {pol['cpus']} cores, "
                      f"generate={pol['generate']}; bench/polling.py): µs per note, thread CPU / wall",
                  "", "| path | GIL load | decode | tokenize | batch | total | ceiling notes/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in pol["rows"]:
            st = r["stages"]
            lines.append(f"| {r['path']} | {'yes' if r['gil_load'] else 'no'} | "
                         + " | ".join(f"{st[k]['thread_cpu_us']} / {st[k]['wall_us']}" for k in ("decode", "tokenize", "batch"))
                         + f" | {r['total']['thread_cpu_us']} / {r['total']['wall_us']} | {r['ceiling_notes_s']:,} |")
        if pol.get("whole_over_composed"):
            lines.append("")
            lines.append("Whole / composed wall: " + ", ".join(f"{k} {v}" for k, v in pol["whole_over_composed"].items()) + ".")
    cal = doc.get("calibration")
    if cal:
        rates = ", ".join(f"{n}: {r:,.0f}" for n, r in cal["notes_per_s"].items())
        lines += ["", f"**Start-up calibration** ({cal['package']} package, generate={cal['generate']}, device "
                      f"{cal['device']}: up to {cal['max_notes']} notes in {cal['budget_s']} s): chose "
                      f"{cal['batch_notes']} notes in {cal['seconds']} s ({cal['reason']}); notes/s by batch: {rates}."
                      + (f" Failures: {cal['failures']}." if cal.get("failures") else "")]
    for name in [k for k in doc if k.startswith("worker/") and isinstance(doc[k], dict) and "ratio" in doc[k]]:
        w = doc[name]
        server = w.get("milvus") == "server"
        where = "a child process" if w.get("lite_process") else "the worker's process"
        if w.get("write_process"):
            where += ", written from a writer process"
        store = ("a Milvus server, written from " + ("a writer process" if w.get("write_process") else
                                                     "the worker's process")) if server else None
        if w.get("replicas"):
            per = "; ".join(f"{r['pipeline_notes_per_s']:,.0f} notes/s, Milvus {r['milvus_rows_per_s'] or 0:,.0f} "
                            f"rows/s, process CPU {r['cpu_s']['worker_process']} s" for r in w["per_replica"])
            lines += ["", f"Worker path, {name[len('worker/'):]} ({w['replicas']} worker processes sharing the device, "
                      f"{w['package']} package, each with its encoder in a process of its own and "
                      + (f"a collection of its own on {store}" if server
                         else f"its own milvus-lite db served from {where}")
                      + f", generate={w['generate']}, batch {w['max_batch_notes']}): "
                      f"{w['pipeline_notes_per_s']:,.0f} notes/s together vs one encoder alone "
                      f"{w['encoder_alone_notes_per_s']:,.0f} (ratio {w['ratio']}); passes started within "
                      f"{w['start_spread_s']} s and ended within {w['end_spread_s']} s; per replica: {per}."]
        else:
            lines += ["", f"Worker path, {name[len('worker/'):]} ({w['package']} package, {w['isolation']} encoder, "
                      + (store if server else f"milvus-lite served from {where}") + ", generate="
                      f"{w['generate']}, batch {w['max_batch_notes']}): {w['pipeline_notes_per_s']:,.0f} notes/s vs "
                      f"encoder alone {w['encoder_alone_notes_per_s']:,.0f} (ratio {w['ratio']}); Milvus "
                      f"{w['milvus_rows_per_s'] or 0:,.0f} rows/s; time: {json.dumps(w['time_s'])}; CPU of the worker "
                      f"process ({w['cpus']} cores): {json.dumps(w['cpu_s'])}."]
    f = doc.get("fusions")
    if f:
        lines += ["", "| graph / fusions | fused ops | parity (min cos) | embed notes/s plain -> fused |",
                  "| --- | --- | --- | --- |"]
        for name, r in f.items():
            if not isinstance(r, dict) or name.endswith("/plain"):
                continue
            ops = {k: v for k, v in (r.get("ops") or {}).items() if v and k not in ("MatMul", "Softmax", "total_nodes")}
            e = r.get("embed") or {}
            speed = ""
            if isinstance(e.get("plain"), dict) and isinstance(e.get("fused"), dict):
                speed = f"{e['plain'].get('notes_per_s')} -> {e['fused'].get('notes_per_s')}"
            what = ops or r.get("error") or r.get("skipped") or "none"
            lines.append(f"| {name} | {what} | {r.get('parity_min_cosine', '')} | {speed} |")
    pr = doc.get("profile")
    if pr:
        classes = ("matmul", "attention", "norm", "rotary", "copy", "elementwise/other")
        lines += ["", f"Kernel profile, embed only unless the row says so, batch {pr['batch']} ({next((r['recorded'] for r in pr.values() if isinstance(r, dict)), '')}; "
                  "ms per batch):", "",
                  "| engine | wall | busy (share) | " + " | ".join(classes) + " | top |",
                  "| --- |" + " --- |" * (len(classes) + 3)]
        for name, r in pr.items():
            if not isinstance(r, dict):
                continue
            n = r["calls"]
            cells = [f"{r['by_class_ms'].get(c, 0.0) / n:.1f}" for c in classes]
            top = r["top"][0] if r["top"] else {}
            lines.append(f"| {name} | {r['wall_ms'] / n:.1f} | {r['busy_ms'] / n:.1f} ({r['busy_share_of_wall']}) | "
                         + " | ".join(cells) + f" | {top.get('name', '')[:60]} {top.get('ms', 0) / n:.1f} |")
    op = doc.get("ort_profile")
    if op:
        lines += ["", f"ONNX Runtime's profiler, batch {op['batch']} (ms per encode call; host time: on CUDA a node's "
                  "time is its launch, not its kernel):", "",
                  "| package / mode | graph runs | wall | model_run | nodes | framework | outside runs | by provider "
                  "| memcpy per run | CPU-provider nodes | top op (host ms) |", "| --- |" + " --- |" * 10]
        for name, r in op.items():
            if not isinstance(r, dict):
                continue
            t = r["top_ops"][0] if r["top_ops"] else {}
            lines.append(f"| {name} | {r['graph_runs_per_call']:.0f} | {r['wall_ms_per_call']} | {r['model_run_ms_per_call']} "
                         f"| {r['nodes_host_ms_per_call']} | {r['framework_ms_per_call']} | {r['outside_run_ms_per_call']} "
                         f"| {json.dumps(r['by_provider_ms_per_call'])} | {r['memcpy_per_run']} | "
                         f"{r['cpu_provider_node_count']} | {t.get('op', '')}/{t.get('provider', '')} {t.get('ms_per_call', '')} |")
    g = doc.get("goals")
    if g:
        lines += ["", "| goal | value | target | met |", "| --- | --- | --- | --- |"]
        for k, v in g.items():
            lines.append(f"| {k} | {v['value']} | {v['goal']} | {v['met']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu-check.json and gpu-check.md")
    ap.add_argument("--notes", help="notes.jsonl (title, content, topic); default: MIND from ../shared/data")
    ap.add_argument("--cpu", action="store_true", help="rehearsal: CPU provider, tiny model, tiny budget")
    ap.add_argument("--arch", choices=("smollm2", "tiny"), help="default: smollm2 on CUDA, tiny with --cpu")
    ap.add_argument("--budget-s", type=float, help="whole-run budget (default 420 on CUDA, 240 with --cpu)")
    ap.add_argument("--point-s", type=float, help="seconds per measured point (default 0.75 / 0.2 with --cpu)")
    ap.add_argument("--batches", help="comma-separated batch sizes")
    ap.add_argument("--n-notes", type=int, help="notes used (default 2048 / 24 with --cpu)")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--dtypes", default="fp32,fp16", help="packages to export (default fp32,fp16)")
    ap.add_argument("--modes", default="embed,embed+category", help="encoder modes measured")
    ap.add_argument("--engines", help="only these engines, e.g. ort-fp16,torch-fp16 (default: all)")
    ap.add_argument("--skip", default="", help="phases to skip: polling,worker,calibration,fusions,profile,ort_profile")
    ap.add_argument("--worker-lite", default="thread", type=_lite_modes,
                    help="where the worker phase's milvus-lite serves its db: thread (pymilvus's server in the "
                         "worker's process, the default), process (NOTELLM_MILVUS__LITE_PROCESS: a child), writer "
                         "(that child, and the sink's writes from a writer process: NOTELLM_MILVUS__WRITE_PROCESS); "
                         "several side by side, e.g. thread,process,writer")
    ap.add_argument("--worker-milvus-uri", help="the worker phases write to this Milvus server (a collection of "
                    "their own, dropped after) instead of milvus-lite dbs; --worker-lite then takes thread (the "
                    "worker's own client) and writer")
    ap.add_argument("--worker-milvus-server", action="store_true",
                    help=f"start a Milvus {MILVUS_VERSION} server of the check's own (phase milvus_server; the pack "
                         "carries it) and write the worker phases to it, as --worker-milvus-uri; if it cannot "
                         "start, the worker phases write to milvus-lite")
    ap.add_argument("--worker-replicas", default=(1,), type=_replica_counts,
                    help="worker processes sharing the device in the worker phase, e.g. 1,2,3: each count > 1 "
                         "is its own phase (worker/<mode>/x<count>), its replicas' passes started together "
                         "and their notes/s summed (default 1)")
    ap.add_argument("--fuse-dtypes", default="fp16",
                    help="packages also measured fused (`notellm export --fuse`), as engine ort-<dtype>-fused; '' for none")
    ap.add_argument("--expanded-dtypes", default="",
                    help="also export these with the step graph's K/V expanded to every query head (the form "
                         "before grouped attention), measured as ort-<dtype>-expanded beside it (default: none)")
    ap.add_argument("--embed-graph-dtypes", default="fp16",
                    help="packages that also get the hand-built embed graph, measured as ort-<dtype>-embedgraph "
                         "(default fp16; empty: none)")
    ap.add_argument("--embed-graph-rotary", default="gqa,mha,mha-prefix,mha-prefix-fold",
                    help="embed graph variants (export.embed_graph.ROTARY): gqa (rotary inside "
                         "GroupQueryAttention: ort-fp16-embedgraph), mha (RotaryEmbedding, K/V expanded, causal "
                         "MultiHeadAttention: ort-fp16-embedgraph-mha), mha-prefix (that with the instruction's KV "
                         "as a past: ort-fp16-embedgraph-mha-prefix), mha-prefix-fold (that with rotary as a second "
                         "Q/K projection and elementwise ops: ort-fp16-embedgraph-mha-prefix-fold), op "
                         "(RotaryEmbedding + GroupQueryAttention: ort-fp16-embedgraph-ropeop; crashed ORT 1.31.1 on "
                         "CUDA); default gqa,mha,mha-prefix,mha-prefix-fold")
    ap.add_argument("--fuse-site", help="folder put first on the fusing child's path (the pack's onnxscript)")
    a = ap.parse_args(argv)
    if a.worker_milvus_uri and a.worker_milvus_server:
        ap.error("--worker-milvus-uri or --worker-milvus-server, not both")
    if (a.worker_milvus_uri or a.worker_milvus_server) and "process" in a.worker_lite.split(","):
        ap.error("--worker-lite process serves a milvus-lite db; with --worker-milvus-uri use thread and/or writer")
    device = "cpu" if a.cpu else "cuda"
    arch = a.arch or ("tiny" if a.cpu else "smollm2")
    budget = a.budget_s or (240.0 if a.cpu else 420.0)
    point_s = a.point_s or (0.2 if a.cpu else 0.75)
    sizes = tuple(int(x) for x in a.batches.split(",")) if a.batches else (CPU_BATCHES if a.cpu else GPU_BATCHES)
    n_notes = a.n_notes or (24 if a.cpu else 2048)
    t_start = time.monotonic()
    rep = Report(Path(a.out), t_start + budget)
    rep.doc["args"] = {"device": device, "arch": arch, "budget_s": budget, "point_s": point_s,
                       "batches": list(sizes), "notes": n_notes}
    if device == "cuda":
        preload_cuda()
    if rep.phase("environment", lambda: environment(device)) is None:
        return 1
    notes = load_notes(a.notes, n_notes)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model = rep.phase("model", lambda: build_model(arch))
    if model is None:
        return 1
    rep.doc["model"] = {"arch": arch, "base_model_id": model.base_model_id,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "layers": model.lm.config.num_hidden_layers, "hidden": model.lm.config.hidden_size}
    packages: dict[str, str] = {}
    for kind in a.dtypes.split(","):
        r = rep.phase(f"export_{kind}", lambda kind=kind: export_and_validate(model, kind, work, device))
        if r is not None:
            packages[kind] = r["package"]
    for kind in filter(None, a.expanded_dtypes.split(",")):
        r = rep.phase(f"export_{kind}_expanded", lambda kind=kind: export_and_validate(model, kind, work, device,
                                                                                      grouped=False))
        if r is not None:
            packages[f"{kind}-expanded"] = r["package"]
    if not packages:
        return 1
    for kind in filter(None, a.fuse_dtypes.split(",")):
        if kind in packages:
            r = rep.phase(f"fuse_{kind}", lambda kind=kind: fuse_and_validate(model, kind, packages[kind], work, device,
                                                                              a.fuse_site), need_s=60)
            if r is not None and r["validation"]["passed"]:
                packages[f"{kind}-fused"] = r["package"]
    for kind in filter(None, a.embed_graph_dtypes.split(",")):
        for rotary in filter(None, a.embed_graph_rotary.split(",")):
            if kind in packages:
                name = embed_kind(kind, rotary)
                r = rep.phase(f"embed_graph_{kind}_{rotary}", lambda kind=kind, rotary=rotary: embed_graph_and_validate(
                    model, kind, packages[kind], work, device, rotary), need_s=30)
                if r is not None and r["validation"]["passed"]:
                    packages[name] = r["package"]
    # encoder benchmarks get what is left minus the worker and fusion phases' share
    reserve = 0.3 * rep.left()
    engines = set(a.engines.split(",")) if a.engines else None
    enc = rep.phase("encoder", lambda: encoder_phase(model, packages, device, notes, sizes, point_s,
                                                     time.monotonic() + rep.left() - reserve,
                                                     modes=tuple(a.modes.split(",")), engines=engines))
    skip = set(filter(None, a.skip.split(",")))
    if "polling" not in skip:
        rep.phase("polling", lambda: polling_phase(packages, notes, repeats=1 if a.cpu else 3), need_s=20)
    worker_modes = [m for m in a.modes.split(",") if m in WORKER_GENERATE] if "worker" not in skip else []
    milvus_uri, server = a.worker_milvus_uri, None
    if a.worker_milvus_server and worker_modes:
        server = rep.phase("milvus_server", lambda: start_milvus_server(work), need_s=60)
        milvus_uri = server["uri"] if server else None
    try:
        for mode in worker_modes:
            wkind, best_batch = worker_package(enc, packages, device, mode)
            for replicas in a.worker_replicas:
                for lite in a.worker_lite.split(","):
                    if replicas == 1:
                        run = (lambda mode=mode, lite=lite, batch=int(best_batch or max(sizes)), wkind=wkind:
                               worker_phase(packages[wkind], device, notes, batch, WORKER_GENERATE[mode], work,
                                            "process", lite_process=lite == "process", write_process=lite == "writer",
                                            milvus_uri=milvus_uri))
                    else:
                        run = (lambda mode=mode, lite=lite, batch=int(best_batch or max(sizes)), wkind=wkind,
                               replicas=replicas: replicas_phase(packages[wkind], device, notes, batch,
                                                                 WORKER_GENERATE[mode],
                                                                 work / worker_phase_name(mode, lite, replicas),
                                                                 "process", lite == "process", replicas,
                                                                 write_process=lite == "writer",
                                                                 milvus_uri=milvus_uri))
                    rep.phase(worker_phase_name(mode, lite, replicas),
                              lambda run=run, wkind=wkind: {"package": wkind, **run()}, need_s=20 * replicas)
    finally:
        if server:
            stop_milvus_server(server)
    if worker_modes and "calibration" not in skip:
        cmode = worker_modes[0]
        ckind, _ = worker_package(enc, packages, device, cmode)
        rep.phase("calibration", lambda: {"package": ckind, **calibration_phase(
            packages[ckind], device, WORKER_GENERATE[cmode], budget_s=3.0 if a.cpu else None)}, need_s=70)
    kind, best_batch = worker_package(enc, packages, device)
    batch = int(best_batch or max(sizes))
    if "fusions" not in skip:
        rep.phase("fusions", lambda: fusion_phase(packages, model, device, notes, batch, point_s, work,
                                                  time.monotonic() + rep.left()), need_s=20)
    embed_batch = int(((enc or {}).get("best_embed") or {}).get(f"ort-{kind}", {}).get("batch") or max(sizes))
    if "profile" not in skip:
        rep.phase("profile", lambda: profile_phase(model, packages, device, notes, embed_batch,
                                                   generate="embed+category" in a.modes.split(",")), need_s=15)
    if "ort_profile" not in skip:
        rep.phase("ort_profile", lambda: ort_profile_phase(packages, device, notes, embed_batch, work,
                                                           tuple(a.modes.split(","))), need_s=20)
    rep.doc["goals"] = goals(rep.doc)
    rep.doc["total_s"] = round(time.monotonic() - t_start, 1)
    rep.save()
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, p in rep.doc["phases"].items() if p["status"] == "failed"]
    progress(f"done in {rep.doc['total_s']} s; failed phases: {failed or 'none'}; "
             f"report: {Path(a.out) / 'gpu-check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
