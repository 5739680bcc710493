"""ONNX Runtime note encoder: NoteLLM embeddings + greedy-generated category / hashtags. No torch.

Reads a package written by ``notellm export`` (``notellm.json`` manifest, ``tokenizer.json``, the step
graph). Only the manifest is trusted: dim, model_version, prompt config, special token ids, KV geometry.

How a batch runs (one ONNX session, one copy of the weights):

1. ``tokenize`` turns a note into its prompt ids once (:class:`worker.prompt_tokens.PromptTokenizer`:
   ``tokenizers`` through :mod:`notellm.prompts`, the same ids the torch model sees); ``encode`` takes
   those ids, sorts them by prompt length and cuts them into batches by ``max_batch_notes`` and
   ``max_batch_tokens`` (:func:`worker.encoding.padded_tokens`), and, embedding only, by padding where it
   saves more than the runs it adds (:func:`worker.encoding.length_batches`); results come back in input
   order;
2. prefill: the left-padded prefix (ending in ``The compression word is:"``) with an empty past; the
   graph returns the note vector at the last position plus the KV cache;
   With ``share_prefix`` (default) the instruction — identical for every note of a task — is prefilled
   once per task and its KV cache is copied into each batch, so only the note's own tokens are prefilled
   (the padding then sits between the shared instruction and the note; the in-graph mask and position
   ids make that exact — validation and the tests check it against torch);
3. generation only: the ``[EMB]". <guidance>"`` continuation (the same ids for every note) in one step,
   then one token per step, greedy, reusing the KV cache, until every row produced EOS or a token holding
   the closing quote, or ``max_new_tokens``.

Embed-only calls on CUDA run the package's embed graph instead when it has one (``notellm export
--embed-graph``, a second session): whole prompts, right-padded, no past, each vector read at its row's
last real token (the ``mha-prefix`` variant takes the shared prefix's KV as inputs instead and gets the
note segments alone); on the CPU only when asked (``embed_graph=True``), because there the shared prefix
of the step graph is as fast or faster.

Task ``"both"``: the vector and the category come from the category prompt (it includes the topic); the
hashtags come from a second prefill + decode of the hashtag prompt, because the model was trained to
generate topics after that prompt — appending a second guidance to the category prompt would be cheaper
but is not what the model learned. So "both" costs about two "category" calls.

All session calls use I/O binding, so on CUDA the KV cache stays on the device between steps; the same
code path runs (and is tested) on CPU.

Errors (the `Encoder` protocol, worker/encoding.py): ``tokenize`` raises NoteError; anything raised while
``encode`` runs the session is an EngineError, and ``restart`` opens a new session. ``encode`` cannot be
interrupted in process: its ``timeout_s`` is enforced by :class:`worker.encoder_process.ProcessEncoder`.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from notellm.prompts import (EMB_TOKEN, OUTPUT_QUOTE, PROMPT_VERSION, LabelTrie, NoteLike, NoteText, cut_output,
                             parse_category, parse_hashtags)
from worker.encoding import (GENERATE_TASKS, EncoderHealth, EngineError, GenerateTask, NoteError, call_batches,
                             full_batches)
from worker.logs import get_logger
from worker.prompt_tokens import PromptTokenizer
from worker.records import Prompt

PACKAGE_FORMAT = "notellm-onnx/1"
TASKS = ("category", "hashtags", "both")
# One graph run's fixed cost, in prompt tokens, for cutting a call's notes by length. CUDA: an H200 runs
# ~1.2M padded tokens/s through the embed graph, and a call costs ~5-7 ms beyond its tokens (the fused graph:
# 4,565 notes/s at batch 128 vs 5,711 at 512, run 3), so ~8k tokens. CPU: a run's overhead is a few ms
# against ~1k tokens/s, but smaller batches run faster there anyway (9.3 vs 6.7 notes/s at 8 vs 32).
CALL_TOKENS_CUDA = 8192
CALL_TOKENS_CPU = 64

log = get_logger("worker.encoder")


class EncoderError(RuntimeError):
    """The model package is missing, malformed or does not match this code."""


def _no_cuda_driver() -> str | None:
    """None when the NVIDIA driver's libcuda can be loaded, else why not. onnxruntime-gpu lists
    CUDAExecutionProvider whether or not the machine has a GPU; asking first keeps a GPU image on a CPU
    node from trying (and from ONNX Runtime's raw, non-JSON error lines on stderr)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return None
    except OSError as e:
        return str(e)


def preload_cuda_libraries() -> None:
    """onnxruntime-gpu with its `cuda`/`cudnn` extras (the GPU image) has CUDA and cuDNN in NVIDIA's
    wheels, which the dynamic loader does not search: load them first (ONNX Runtime >= 1.21). Skipped where
    those wheels are absent (system CUDA libraries on the loader path, or torch's already loaded)."""
    import importlib.util

    if hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False)


def _choose_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EncoderError(f"device='cuda' but ONNX Runtime offers only {available} "
                               "(install onnxruntime-gpu, see README)")
        why = _no_cuda_driver()
        if why is not None:
            raise EncoderError(f"device='cuda' but no NVIDIA driver can be loaded ({why}): is a GPU assigned to "
                               "this pod/container (nvidia.com/gpu, --gpus)?")
        preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if "CUDAExecutionProvider" in available:
        why = _no_cuda_driver()
        if why is None:
            preload_cuda_libraries()
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.info("encoder.no_gpu", reason=f"no NVIDIA driver ({why})", providers=["CPUExecutionProvider"])
    return ["CPUExecutionProvider"]


class StepLogits:
    """One decode step's next-token scores: the graph's top-k (host arrays) when the package has them, and
    the full [B, vocab] logits, fetched (from the device, on CUDA) only when a row needs them.

    The top-k decides a row exactly when its best candidate is strictly above the k-th value: every token
    with that score is then inside the top-k, so the lowest such id is numpy's argmax. Otherwise (a tie at
    the boundary, or, within a label trie, no allowed token among the k) the row is read from the full
    logits. ``fallback_rows`` counts those rows."""

    def __init__(self, top_values: np.ndarray | None, top_ids: np.ndarray | None, full):
        self.top_values = top_values
        self.top_ids = top_ids
        self._fetch = full
        self._full: np.ndarray | None = None
        self.fallback_rows = 0

    def full(self) -> np.ndarray:
        if self._full is None:
            self._full = np.asarray(self._fetch())
        return self._full

    def argmax_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.top_values is None:
            return self.full()[rows].argmax(-1).astype(np.int64)
        vals, ids = self.top_values[rows], self.top_ids[rows].astype(np.int64)
        best = vals[:, 0]
        picked = np.where(vals == best[:, None], ids, np.iinfo(np.int64).max).min(-1)
        # all k tied (an equal score may lie outside), or NaN scores: numpy's argmax over the full row decides
        undecided = np.flatnonzero((vals[:, -1] >= best) | np.isnan(best))
        if undecided.size:
            self.fallback_rows += int(undecided.size)
            picked[undecided] = self.full()[rows[undecided]].argmax(-1)
        return picked

    def argmax_allowed(self, rows: np.ndarray, states: np.ndarray, tables: TrieTables) -> np.ndarray:
        """For each of ``rows`` (in trie state ``states``, which allow at least one token): the best allowed
        token, as ``argmax_within(r, allowed)`` would choose it, for all rows at once."""
        picked = np.zeros(len(rows), dtype=np.int64)
        undecided = np.ones(len(rows), dtype=bool)
        if self.top_values is not None:
            vals, ids = self.top_values[rows], self.top_ids[rows].astype(np.int64)
            cols = tables.columns(ids)
            ok = (cols >= 0) & tables.allowed[states[:, None], np.maximum(cols, 0)]
            best = np.where(ok, vals, -np.inf).max(-1)
            undecided = ~(ok.any(-1) & (best > vals[:, -1]))
            picked = np.where(ok & (vals == best[:, None]), ids, np.iinfo(np.int64).max).min(-1)
        u = np.flatnonzero(undecided)
        if u.size:
            if self.top_values is not None:
                self.fallback_rows += int(u.size)
            allowed = tables.allowed[states[u]]
            scores = np.where(allowed, self.full()[rows[u]][:, tables.tokens], -np.inf)
            col = scores.argmax(-1)
            off = ~allowed[np.arange(u.size), col]  # every allowed score is -inf: the first allowed token
            col[off] = allowed[off].argmax(-1)
            picked[u] = tables.tokens[col]
        return picked

    def argmax_within(self, r: int, allowed: list[int]) -> int:
        """The best of ``allowed`` (sorted ids) in row ``r``: the per-row rule, which ``argmax_allowed``
        applies to every row at once (and is tested against)."""
        if self.top_values is not None:
            vals, ids = self.top_values[r], self.top_ids[r]
            ok = np.isin(ids, allowed)
            if ok.any():
                best = vals[ok].max()
                if best > vals[-1]:
                    return int(ids[ok & (vals == best)].min())
            self.fallback_rows += 1
        return allowed[int(np.argmax(self.full()[r, allowed]))]


class TrieTables:
    """A :class:`LabelTrie` as arrays, so a decode step chooses every row's token at once: the trie's
    tokens (sorted ids; a column each), ``next[state, column]`` (the state a token leads to, -1 where it is
    not allowed) and ``allowed`` (``next >= 0``). State 0 is the root (``LabelTrie.states``)."""

    def __init__(self, trie: LabelTrie):
        states = trie.states()
        self.tokens = np.array(sorted({t for row in states for t in row}), dtype=np.int64)
        column = {int(t): c for c, t in enumerate(self.tokens)}
        self.next = np.full((len(states), max(len(self.tokens), 1)), -1, dtype=np.int64)
        for s, row in enumerate(states):
            for t, child in row.items():
                self.next[s, column[t]] = child
        self.allowed = self.next >= 0
        self.any_allowed = self.allowed.any(1)
        self._column = np.full(int(self.tokens.max(initial=0)) + 1, -1, dtype=np.int64)
        self._column[self.tokens] = np.arange(len(self.tokens))

    def columns(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> their column (-1 for a token the trie never allows)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self._column.shape[0])
        return np.where(inside, self._column[np.where(inside, ids, 0)], -1)


class OnnxNoteEncoder:
    """The `worker.encoding.Encoder` protocol on one ONNX Runtime session, in this process."""

    def __init__(self, model_dir, *, device: str = "auto", intra_op_threads: int = 0,
                 max_batch_notes: int = 32, max_batch_tokens: int = 4096, max_new_tokens: int = 16,
                 share_prefix: bool = True, io_binding: bool = True, provider_options: dict | None = None,
                 constrain_categories: bool = True, device_topk: bool = True,
                 embed_graph: bool | None = None, call_tokens: int | None = None):
        self.model_dir = Path(model_dir)
        # The fixed cost of one graph run in prompt tokens: a call's notes are cut into sub-batches by
        # length where the padding saved is worth more than the runs added (worker.encoding.length_batches).
        # None: CALL_TOKENS_CUDA on CUDA, CALL_TOKENS_CPU on the CPU.
        self._call_tokens = call_tokens
        # Embed-only calls run the package's embed graph when it has one (export/embed_graph.py: fused
        # contrib ops, prompts right-padded, the instruction per row or, "mha-prefix", as its KV inputs);
        # generation always runs the step graph.
        # None: on CUDA (fp16) only; True: on the CPU too (validation); False: never.
        self._want_embed_graph = embed_graph
        self.embed_session: ort.InferenceSession | None = None
        self._embed_prefix_names: list[str] = []
        self._embed_prefix_kv: dict[str, list[Any]] = {}  # the instruction's KV where the embed graph reads it
        self.share_prefix = bool(share_prefix)
        # I/O binding keeps the KV cache on the device between steps and copies only what is read back;
        # without it every step round-trips the cache through host memory (kept for measurement).
        self.io_binding = bool(io_binding)
        # Greedy decoding from the graph's top-k (`top_logits`/`top_ids`; packages since 2026-11-27): the
        # [B, vocab] logits stay where the session ran and are copied only for a row the top-k cannot decide.
        self._want_device_topk = bool(device_topk)
        self._provider_options = dict(provider_options or {})
        self._prefix_kv: dict[str, list[np.ndarray]] = {}
        # The shared prefix's KV broadcast to a batch size, where the session reads it (the device for
        # CUDA): built once per (task, batch size), not copied from the host for every batch (at batch 512
        # of SmolLM2 in fp16 that copy is ~0.5 GB and took more time on an H200 than the prefill itself).
        self._prefix_batch: dict[tuple[str, int], list[Any]] = {}
        mpath = self.model_dir / "notellm.json"
        if not mpath.exists():
            raise EncoderError(f"{self.model_dir}: no notellm.json (not an exported NoteLLM package)")
        self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        m = self.manifest
        if m.get("format") != PACKAGE_FORMAT:
            raise EncoderError(f"{mpath}: format {m.get('format')!r}, this worker reads {PACKAGE_FORMAT!r}")
        if m.get("prompt_version") != PROMPT_VERSION:
            raise EncoderError(f"{mpath}: prompt version {m.get('prompt_version')!r}, "
                               f"this worker builds {PROMPT_VERSION!r}")
        self.model_version: str = str(m["model_version"])
        self.dim: int = int(m["dim"])
        if max_batch_notes < 1 or max_batch_tokens < 1 or max_new_tokens < 1:
            raise ValueError("max_batch_notes, max_batch_tokens and max_new_tokens must be >= 1")
        if call_tokens is not None and call_tokens < 0:
            raise ValueError("call_tokens must be >= 0")
        self.max_batch_notes = int(max_batch_notes)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_new_tokens = int(max_new_tokens)

        self.prompt_tokenizer = PromptTokenizer(self.model_dir, m)
        self.tokenizer = self.prompt_tokenizer.tokenizer
        self.prompt_config = self.prompt_tokenizer.config
        self.prompts = self.prompt_tokenizer.prompts
        special = m["special_tokens"]
        self.eos_id = int(special["eos"]["id"])
        self.pad_id = int(special["pad"]["id"])
        if self.prompts.emb_token_id != int(special["emb"]["id"]):
            raise EncoderError(f"tokenizer's {EMB_TOKEN} id {self.prompts.emb_token_id} != manifest "
                               f"{special['emb']['id']}")
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._quote_mask = np.zeros(max(int(m["vocab_size"]), max(vocab.values()) + 1), dtype=bool)
        for token, i in vocab.items():
            if OUTPUT_QUOTE in token:
                self._quote_mask[i] = True
        self._stop_mask = self._quote_mask.copy()
        for i in m.get("stop_token_ids", [self.eos_id]):
            self._stop_mask[int(i)] = True

        # The closed category set of the package (categories.json): the category task is decoded within it
        # (`LabelTrie`, the rule the torch reference and the export's validation use) unless turned off.
        self.categories: tuple[str, ...] = self._read_categories(m.get("categories"))
        self._category_trie = (LabelTrie.for_labels(self.tokenizer, self.categories)
                               if self.categories and constrain_categories else None)
        self._category_tables = TrieTables(self._category_trie) if self._category_trie is not None else None

        self.num_layers = int(m["num_layers"])
        self.num_kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.kv_dtype = np.float16 if m.get("kv_dtype") == "float16" else np.float32
        self.max_prompt_tokens = int(m["max_lengths"]["prompt_tokens"])

        self._device_choice = device
        self._intra_op_threads = int(intra_op_threads)
        self.session: ort.InferenceSession | None = None
        self._open_session()

    def _read_categories(self, name: Any) -> tuple[str, ...]:
        if not name:
            return ()
        if not isinstance(name, str) or Path(name).name != name:
            raise EncoderError(f"{self.model_dir}: manifest categories {name!r} is not a file name in the package")
        try:
            cats = json.loads((self.model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EncoderError(f"{self.model_dir / name}: {e}") from e
        if not isinstance(cats, list) or not cats or not all(isinstance(c, str) and c.strip() for c in cats):
            raise EncoderError(f"{self.model_dir / name}: not a non-empty list of category names")
        return tuple(cats)

    def _open_session(self) -> None:
        """(Re)create the ORT session; the encoder counts as closed until it succeeds."""
        m = self.manifest
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self._intra_op_threads:
            so.intra_op_num_threads = self._intra_op_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        device = self._device_choice
        wanted = _choose_providers(device)
        t0 = time.perf_counter()
        self.session = None
        self.embed_session = None
        self._embed_prefix_names = []
        self._embed_prefix_kv = {}
        self._prefix_kv = {}
        providers: list[Any] = list(wanted)
        if wanted[0] == "CUDAExecutionProvider" and self._provider_options:
            providers[0] = ("CUDAExecutionProvider", {k: str(v) for k, v in self._provider_options.items()})
        session = ort.InferenceSession(str(self.model_dir / m["graph"]), sess_options=so, providers=providers)
        self.providers: list[str] = list(session.get_providers())
        if wanted[0] == "CUDAExecutionProvider" and self.providers[0] != "CUDAExecutionProvider":
            if device == "cuda":
                raise EncoderError(f"CUDAExecutionProvider failed to initialise (got {self.providers})")
            log.warning("encoder.cuda_unavailable", requested=wanted, providers=self.providers)
        self._device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._in_names = [i.name for i in session.get_inputs()]
        self._out_names = [o.name for o in session.get_outputs()]
        expected_in, expected_out = m["inputs"], m["outputs"]
        if self._in_names != expected_in or self._out_names != expected_out:
            raise EncoderError("graph inputs/outputs differ from the manifest")
        self._past_names = self._in_names[2:]
        self._present_names = [n for n in self._out_names if n.startswith("present.")]
        self._top_k = int(m.get("top_k") or 0) if {"top_logits", "top_ids"} <= set(self._out_names) else 0
        self.device_topk = self._want_device_topk and self._top_k > 0
        self.embed_session = self._open_embed_session(so, providers)
        self.session = session
        log.info("encoder.loaded", model_dir=str(self.model_dir), model_version=self.model_version,
                 dim=self.dim, providers=self.providers, dtype=m.get("dtype"),
                 quantization=m.get("quantization"), embed_graph=self.embed_session is not None,
                 load_s=round(time.perf_counter() - t0, 2))
        advice = package_advice(self._device, m)
        if advice:
            log.warning("encoder.package_for_device", device=self._device, dtype=m.get("dtype"),
                        model_dir=str(self.model_dir), advice=advice)

    def _open_embed_session(self, so: "ort.SessionOptions", providers: list[Any]) -> "ort.InferenceSession | None":
        """The package's embed graph in a second session on the same providers, or None: not in the
        package, turned off, an fp32 package on CUDA (ONNX Runtime's GroupQueryAttention runs fp16/bf16
        there; fp32 would fall back to the CPU node by node), or the CPU unless asked for: there the step
        graph's shared instruction prefix wins (SmolLM2 fp32 on 2 cores: 8.5 vs 9.9 notes/s at batch 8,
        7.1 vs 8.5 at 32), on an H200 the embed graph does (docs/results/gpu/README.md, run 7). The
        ``mha-prefix`` graph, which shares the prefix too, is level with the step graph there (0.99-1.11x)."""
        spec = self.manifest.get("embed_graph")
        if not spec or self._want_embed_graph is False:
            return None
        if self._device == "cuda" and self.manifest.get("dtype") != "fp16":
            log.info("encoder.embed_graph_unused", reason="fp32 package on CUDA: the step graph embeds")
            return None
        if self._device == "cpu" and self._want_embed_graph is None:
            log.info("encoder.embed_graph_unused", reason="on the CPU the step graph's shared prefix is faster")
            return None
        name = spec.get("graph")
        if not isinstance(name, str) or Path(name).name != name:
            raise EncoderError(f"{self.model_dir}: manifest embed_graph {name!r} is not a file name in the package")
        session = ort.InferenceSession(str(self.model_dir / name), sess_options=so, providers=providers)
        ins, outs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if ins != spec.get("inputs") or outs != spec.get("outputs"):
            raise EncoderError(f"{name}: inputs/outputs {ins}/{outs} differ from the manifest's embed_graph")
        if ins[:2] != ["input_ids", "lengths"] or len(ins) not in (2, 2 + 2 * self.num_layers):
            raise EncoderError(f"{name}: inputs {ins} are neither (input_ids, lengths) nor those and the "
                               f"instruction's KV of {self.num_layers} layers")
        # an embed graph with the instruction's KV as inputs ("mha-prefix"): rows hold the note segments only
        self._embed_prefix_names = ins[2:]
        return session

    # ------------------------------------------------------------------------------------------ public
    def warmup(self, generate: GenerateTask = "both") -> None:
        """Run the largest batch shape once on the paths calls with `generate` take: generating, the step
        graph's prefill, continuation and one decode step (and the embed graph); embed-only, the embed graph
        when the package has one (the step graph then only computes the instruction's prefix), else the
        step graph's prefill. An embed-only worker never sends generation through the step graph at its
        largest batch, which on CUDA would grow the session's memory arena for nothing (run 11: over 28 GB
        at batch 2048)."""
        if generate not in GENERATE_TASKS:
            raise ValueError(f"generate must be one of {GENERATE_TASKS}, got {generate!r}")
        embed_only = generate == "none"
        if self.share_prefix:
            for task in ("category",) if embed_only else ("category", "hashtags"):
                self._shared_prefix(task)
        n = self.max_batch_notes
        seq = max(8, min(self.max_prompt_tokens, self.max_batch_tokens // n))
        t0 = time.perf_counter()
        if not (embed_only and self.embed_session is not None):
            ids = np.full((n, seq), self.pad_id, dtype=np.int64)
            mask = np.ones((n, seq), dtype=np.int64)
            _, _, past = self._step(ids, mask, self._empty_past(n), want_vec=True, want_logits=False)
            if not embed_only:
                cont = np.array([self.prompts.continuation_ids("category")] * n, dtype=np.int64)
                mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
                _, logits, past = self._step(cont, mask, past)
                nxt = self._choose(logits, np.zeros(n, dtype=bool))[:, None]
                mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
                self._step(nxt, mask, past)
        if self.embed_session is not None:
            self._embed_rows("category", [[self.pad_id] * seq] * n)
        log.info("encoder.warmup", batch=n, seq=seq, generate=generate, seconds=round(time.perf_counter() - t0, 3))

    def tokenize(self, note: NoteLike, generate: GenerateTask) -> Prompt:
        """The note's prompt ids (see PromptTokenizer); raises NoteError."""
        return self.prompt_tokenizer.tokenize(note, generate)

    def tokenize_many(self, notes: Sequence[NoteLike], generate: GenerateTask) -> list[Prompt | NoteError]:
        """`tokenize` for many notes in one batched tokenizer pass (PromptTokenizer.tokenize_many)."""
        return self.prompt_tokenizer.tokenize_many(notes, generate)

    def encode(self, prompts: Sequence[Prompt], generate: GenerateTask, *, timeout_s: float | None = None
               ) -> tuple[np.ndarray, list[str | None], list[list[str]]]:
        """(vectors, categories, hashtags) from prompt ids (no tokenisation here). The vector always comes
        from the category prompt, so it never depends on `generate`; categories are None unless generated,
        hashtags empty unless generated ("both": see the module docstring). `timeout_s` is not enforced in
        process. Any failure of the engine is raised as EngineError."""
        if generate not in GENERATE_TASKS:
            raise EngineError(f"generate must be one of {GENERATE_TASKS}, got {generate!r}")
        n = len(prompts)
        want_cat, want_tags = generate in ("category", "both"), generate in ("hashtags", "both")
        if want_tags and any(p.hashtags is None for p in prompts):
            raise EngineError(f"generate={generate!r} needs prompts tokenised with their hashtag segment")
        categories: list[str | None] = [None] * n
        hashtags: list[list[str]] = [[] for _ in range(n)]
        try:
            vecs, ids = self._run_ids([p.category for p in prompts], "category", generate=want_cat)
            if want_cat:
                categories = [parse_category(t) for t in self._texts(ids)]
            if want_tags:
                _, ids = self._run_ids([p.hashtags for p in prompts], "hashtags", generate=True)  # type: ignore[misc]
                hashtags = [parse_hashtags(t, self.prompt_config.num_topics) for t in self._texts(ids)]
        except (NoteError, EngineError):
            raise
        except Exception as e:  # noqa: BLE001 - ORT/CUDA faults, MemoryError, bugs: not one note's fault
            raise EngineError(f"{type(e).__name__}: {e}") from e
        return vecs, categories, hashtags

    def health(self) -> EncoderHealth:
        if self.session is None:
            return EncoderHealth(False, "encoder session is closed")
        return EncoderHealth(True)

    def restart(self) -> None:
        """A new ONNX Runtime session (the shared-prefix cache goes with the old one)."""
        try:
            self._open_session()
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"could not reopen the ONNX session: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.session = None
        self.embed_session = None
        self._embed_prefix_names = []
        self._embed_prefix_kv = {}
        self._prefix_kv = {}
        self._prefix_batch = {}

    # ---------------------------------------------------- conveniences on notes (export, bench, eval)
    def prompt_tokens(self, note: NoteLike) -> int:
        """Tokens of this note's prompt (category prompt, prefix + continuation): its budget unit."""
        return self.tokenize(note, "none").tokens

    def embed(self, notes: Sequence[NoteLike]) -> np.ndarray:
        """float32 [n, d], L2-normalised note vectors (category prompt)."""
        return self.encode([self.tokenize(n, "none") for n in notes], "none")[0]

    def embed_and_generate(self, notes: Sequence[NoteLike], task: str
                           ) -> tuple[np.ndarray, list[str | None], list[list[str]]]:
        """(vectors, categories, hashtags) for task "category", "hashtags" or "both" (see `encode`)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return self.encode([self.tokenize(n, task) for n in notes], task)  # type: ignore[arg-type]

    def generate_raw(self, notes: Sequence[NoteLike], task: str) -> tuple[np.ndarray, list[str]]:
        """(vectors of this task's prompt, raw output texts cut at the closing quote) — for validation."""
        vecs, ids = self._run_task_ids(notes, task, generate=True)
        return vecs, self._texts(ids)

    # --------------------------------------------------------------------------------------- internals
    def _empty_past(self, n: int) -> list[Any]:
        z = np.zeros((n, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [z] * (2 * self.num_layers)

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[Any], *,
              want_vec: bool = False, want_logits: bool = True
              ) -> tuple[np.ndarray | None, "StepLogits | None", list[Any]]:
        """One graph call. ``past`` holds numpy arrays or OrtValues (kept on the device between steps).
        Outputs not wanted stay on the device: an embed-only prefill never copies the [B, vocab] logits, and
        with ``device_topk`` a decode step copies only the top-k (the full logits on demand, see
        :class:`StepLogits`)."""
        if not self.io_binding:
            feeds: dict[str, Any] = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                     "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
            for name, value in zip(self._past_names, past):
                feeds[name] = value if isinstance(value, np.ndarray) else value.numpy()
            outs = dict(zip(self._out_names, self.session.run(None, feeds)))
            logits = None
            if want_logits:
                full = outs["logits"]
                logits = (StepLogits(outs["top_logits"], outs["top_ids"], lambda: full) if self.device_topk
                          else StepLogits(None, None, lambda: full))
            return (outs["note_vector"] if want_vec else None), logits, [outs[n] for n in self._present_names]
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, value in zip(self._past_names, past):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
            b.bind_ortvalue_input(name, value)
        topk = want_logits and self.device_topk
        where = {"note_vector": "cpu" if want_vec else self._device,
                 "logits": "cpu" if want_logits and not topk else self._device,
                 "top_logits": "cpu" if topk else self._device, "top_ids": "cpu" if topk else self._device}
        names = [n for n in self._out_names if n in where] + self._present_names
        for name in names:
            b.bind_output(name, where.get(name, self._device))
        self.session.run_with_iobinding(b)
        outs = dict(zip(names, b.get_outputs()))
        vec = outs["note_vector"].numpy() if want_vec else None
        logits = None
        if topk:
            full_value = outs["logits"]
            logits = StepLogits(outs["top_logits"].numpy(), outs["top_ids"].numpy(), full_value.numpy)
        elif want_logits:
            full = outs["logits"].numpy()
            logits = StepLogits(None, None, lambda: full)
        return vec, logits, [outs[n] for n in self._present_names]

    def _choose(self, logits: "StepLogits", done: np.ndarray, trie: TrieTables | None = None,
                states: np.ndarray | None = None) -> np.ndarray:
        """The greedy next token of every row (``pad`` for finished rows): the argmax of the logits, or with
        ``trie`` the best token its row's state allows (EOS past a label's end); ties go to the lowest id,
        as numpy's argmax does. From the top-k when it decides a row, else from the full logits."""
        nxt = np.full(len(done), self.pad_id, dtype=np.int64)
        rows = np.flatnonzero(~done)
        if trie is None:
            nxt[rows] = logits.argmax_rows(rows)
            return nxt
        live = trie.any_allowed[states[rows]]
        nxt[rows[~live]] = self.eos_id
        if live.any():
            nxt[rows[live]] = logits.argmax_allowed(rows[live], states[rows[live]], trie)
        return nxt

    @property
    def embed_graph_takes_prefix(self) -> bool:
        """Whether embed-only calls run an embed graph that takes the task instruction's KV (computed once per
        task, "mha-prefix") rather than the instruction in every row."""
        return self.embed_session is not None and bool(self._embed_prefix_names)

    @property
    def call_tokens(self) -> int:
        """One graph run's fixed cost in prompt tokens (the constructor's, or the device's default)."""
        if self._call_tokens is not None:
            return int(self._call_tokens)
        return CALL_TOKENS_CUDA if self._device == "cuda" else CALL_TOKENS_CPU

    def sub_batches(self, lengths: Sequence[int], *, generate: bool) -> list[list[int]]:
        """How a call's prompts (full prompt lengths) are cut into graph runs. By padding too when embedding
        only, unless the step graph runs it with its shared prefix kept on the device per batch size (a new
        size is a new copy); never when generating: its time is mostly decode steps, which cost about the
        same at any batch size, so more sub-batches are more steps (no gain measured on the CPU)."""
        prefix_per_size = (self.embed_session is None and self.share_prefix and self.io_binding
                           and self._device == "cuda")
        return self._batches(lengths, by_padding=not generate and not prefix_per_size)

    def _batches(self, lengths: Sequence[int], *, by_padding: bool = True) -> list[list[int]]:
        """Indices sorted by length and cut into sub-batches of at most `max_batch_notes` and
        `padded_tokens` of at most `max_batch_tokens` (a longer prompt goes alone). ``by_padding``: also
        where the padding saved outweighs the graph runs added (`worker.encoding.length_batches`);
        otherwise each sub-batch is as full as the budgets allow (`worker.encoding.call_batches`)."""
        return call_batches(lengths, self.max_batch_notes, self.max_batch_tokens, self.call_tokens,
                            by_padding=by_padding)

    def _full_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """`worker.encoding.full_batches` under this encoder's budgets: the fewest sizes, for the CUDA step
        graph, whose shared-prefix KV is kept on the device per batch size (`_prefix_past`)."""
        return full_batches(lengths, self.max_batch_notes, self.max_batch_tokens)

    def _texts(self, ids: list[list[int]]) -> list[str]:
        return [cut_output(self.tokenizer.decode(g, skip_special_tokens=False)) if g else "" for g in ids]

    def _run_task_ids(self, notes: Sequence[NoteLike], task: str, *, generate: bool
                      ) -> tuple[np.ndarray, list[list[int]]]:
        """`_run_ids` from notes (tokenised here)."""
        return self._run_ids([self.prompts.note_ids(n, task) for n in notes], task, generate=generate)

    def _run_ids(self, segments: Sequence[Sequence[int]], task: str, *, generate: bool
                 ) -> tuple[np.ndarray, list[list[int]]]:
        """(vectors, generated token ids per note: EOS excluded, a stopping quote token included) from the
        note segments of `task`'s prompts."""
        n = len(segments)
        vecs = np.zeros((n, self.dim), dtype=np.float32)
        out_ids: list[list[int]] = [[] for _ in range(n)]
        if n == 0:
            return vecs, out_ids
        if self.session is None:
            raise EngineError("the encoder is closed")
        instruction = self.prompts.instruction_ids(task)
        if not generate and self.embed_session is not None:
            for idx in self.sub_batches([len(instruction) + len(s) for s in segments], generate=False):
                vecs[idx] = self._embed_rows(task, [segments[i] for i in idx])
            return vecs, out_ids
        shared = self._shared_prefix(task) if self.share_prefix else None
        if shared is not None:  # the instruction's KV is computed once; only the note part is prefilled
            rows = [list(s) for s in segments]
        else:
            rows = [instruction + list(s) for s in segments]
        cont = self.prompts.continuation_ids(task)
        extra = len(cont) if generate else 0
        # batches are cut by full prompt lengths (the token budget's unit), shared prefix or not
        for idx in self.sub_batches([len(instruction) + len(s) + extra for s in segments], generate=generate):
            v, gen = self._run_batch([rows[i] for i in idx], cont if generate else None,
                                     None if shared is None else self._prefix_past(task, len(idx)),
                                     trie=self._category_tables if task == "category" else None)
            vecs[idx] = v
            for k, i in enumerate(idx):
                out_ids[i] = gen[k]
        return vecs, out_ids

    def _shared_prefix(self, task: str) -> list[np.ndarray]:
        """KV cache of the task's instruction (identical for every note), batch 1, kept on the host."""
        if task not in self._prefix_kv:
            ids = np.asarray([self.prompts.instruction_ids(task)], dtype=np.int64)
            _, _, past = self._step(ids, np.ones_like(ids), self._empty_past(1), want_logits=False)
            self._prefix_kv[task] = [p if isinstance(p, np.ndarray) else p.numpy() for p in past]
        return self._prefix_kv[task]

    _PREFIX_BATCH_SIZES = 4  # batch sizes whose broadcast prefix KV is kept (a backlog repeats one size)

    def _prefix_past(self, task: str, batch: int) -> list[Any]:
        """The task's shared-prefix KV for `batch` rows: OrtValues on the session's device with I/O binding,
        numpy arrays without. Read-only inputs of every call, so one copy serves every batch of that size."""
        key = (task, batch)
        past = self._prefix_batch.pop(key, None)
        if past is None:
            host = [np.ascontiguousarray(np.broadcast_to(kv, (batch,) + kv.shape[1:]))
                    for kv in self._shared_prefix(task)]
            past = host if not self.io_binding else [ort.OrtValue.ortvalue_from_numpy(a, self._device, 0)
                                                     for a in host]
            while len(self._prefix_batch) >= self._PREFIX_BATCH_SIZES:
                self._prefix_batch.pop(next(iter(self._prefix_batch)))
        self._prefix_batch[key] = past  # most recently used last
        return past

    def _embed_rows(self, task: str, segments: Sequence[Sequence[int]]) -> np.ndarray:
        """Note vectors of `task`'s prompts (its instruction + each segment) through the embed graph:
        right-padded, each row's vector read at its last real token (``lengths`` - 1). A graph that takes the
        instruction's KV (``prefix.*`` inputs) gets the shared prefix and the segments alone."""
        takes_prefix = bool(self._embed_prefix_names)
        ids, lengths = right_padded(segments, self.pad_id, () if takes_prefix else self.prompts.instruction_ids(task))
        prefix = self._embed_prefix(task) if takes_prefix else []
        if not prefix or not self.io_binding:
            feeds = dict(zip(self._embed_prefix_names, prefix), input_ids=ids, lengths=lengths)
            (vec,) = self.embed_session.run(["note_vector"], feeds)
            return vec.astype(np.float32, copy=False)
        b = self.embed_session.io_binding()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("lengths", lengths)
        for name, value in zip(self._embed_prefix_names, prefix):
            b.bind_ortvalue_input(name, value)
        b.bind_output("note_vector", "cpu")
        self.embed_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def _embed_prefix(self, task: str) -> list[Any]:
        """The task's instruction KV for an embed graph that takes it ([1, kv, P, head_dim] per layer): with
        I/O binding OrtValues kept where the session runs (one copy per task, not one per call), else the
        host arrays."""
        if not self.io_binding:
            return self._shared_prefix(task)
        if task not in self._embed_prefix_kv:
            self._embed_prefix_kv[task] = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(kv), self._device, 0)
                for kv in self._shared_prefix(task)]
        return self._embed_prefix_kv[task]

    def _run_batch(self, prefixes: list[list[int]], continuation: list[int] | None,
                   shared: list[Any] | None = None, *, trie: TrieTables | None = None
                   ) -> tuple[np.ndarray, list[list[int]]]:
        """Prefill ``prefixes`` (left-padded, so every row ends at the last position) after the optional
        shared KV, then greedy-decode when a continuation is given (within ``trie``'s labels when given).
        With a shared prefix the padding sits between the shared part and the note; the graph's mask and
        position ids make that exact."""
        B = len(prefixes)
        T = max(len(p) for p in prefixes)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for r, p in enumerate(prefixes):
            ids[r, T - len(p):] = p
            mask[r, T - len(p):] = 1
        if shared is not None:  # the shared prefix's KV, already broadcast to B rows (`_prefix_past`)
            past: list[Any] = list(shared)
            shared_len = shared[0].shape[2] if isinstance(shared[0], np.ndarray) else shared[0].shape()[2]
            mask = np.concatenate([np.ones((B, int(shared_len)), np.int64), mask], axis=1)
        else:
            past = self._empty_past(B)
        vec, _, past = self._step(ids, mask, past, want_vec=True, want_logits=False)
        vec = vec.astype(np.float32, copy=False)
        if continuation is None:
            return vec, [[] for _ in range(B)]
        cont = np.tile(np.asarray(continuation, dtype=np.int64), (B, 1))
        mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
        _, logits, past = self._step(cont, mask, past)
        generated: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        states = np.zeros(B, dtype=np.int64) if trie is not None else None  # every row at the trie's root
        for step in range(self.max_new_tokens):
            # the best token (that continues some label, with a trie; past a label's end, EOS)
            nxt = self._choose(logits, done, trie, states)
            if trie is not None:
                moving = np.flatnonzero(~done & (nxt != self.eos_id))
                states[moving] = trie.next[states[moving], trie.columns(nxt[moving])]
            for r in np.flatnonzero(~done):
                tok = int(nxt[r])
                if tok == self.eos_id:
                    done[r] = True
                    continue
                generated[r].append(tok)
                if tok < self._stop_mask.shape[0] and self._stop_mask[tok]:
                    done[r] = True
            if done.all() or step == self.max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            _, logits, past = self._step(nxt[:, None], mask, past)
        return vec, generated


def package_advice(device: str, manifest: dict[str, Any]) -> str | None:
    """What to export instead when a package leaves its device's fast paths unused, or None. On CUDA the
    fast paths are the fp16 step graph and, for calls that generate nothing, the embed graph (an H200 in
    docs/results/gpu/README.md, run 8: 2,159 notes/s with category generation, 6,721 embed-only)."""
    if device != "cuda":
        return None
    if manifest.get("dtype") != "fp16":
        return ("an fp32 package on CUDA runs the fp32 step graph for everything: export the GPU's package with "
                "`notellm export --dtype fp16 --embed-graph` (docs/operations.md, Deploy)")
    if not manifest.get("embed_graph"):
        return ("no embed graph: calls that generate nothing run the step graph; export with `--embed-graph` "
                "(docs/operations.md, Deploy)")
    return None


def right_padded(segments: Sequence[Sequence[int]], pad_id: int, prefix: Sequence[int] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [B, S], lengths [B]) int64: each row ``prefix`` + its segment, then ``pad_id``. One
    pass over all tokens (4 ms for 2,048 SmolLM2 prompts against 9 ms row by row, on the call's path)."""
    seg_len = np.fromiter((len(r) for r in segments), dtype=np.int64, count=len(segments))
    P = len(prefix)
    lengths = seg_len + P
    if len(segments) == 0 or int(lengths.min()) < 1:
        raise ValueError("every row needs at least one token")
    ids = np.full((len(segments), int(lengths.max())), pad_id, dtype=np.int64)
    ids[:, :P] = np.asarray(prefix, dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(segments), dtype=np.int64, count=int(seg_len.sum()))
    ids[:, P:][np.arange(ids.shape[1] - P) < seg_len[:, None]] = flat  # row-major: each row's tokens in order
    return ids, lengths


__all__ = ["OnnxNoteEncoder", "EncoderError", "NoteText"]
