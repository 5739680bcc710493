"""The GPU check's CPU rehearsal: `scripts/gpu-check --cpu` runs the device run's code path end to end
(export + validation, the fused package built in a child process, every engine configuration, the worker's
encode -> sink path on milvus-lite, both fusion recipes, the profile) with a tiny model, so a device run can
fail only for GPU reasons."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker_support import tiny_dir  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


def test_cpu_rehearsal_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    fuse_site = tmp_path / "site-fuse"  # the pack's folder for the fusing child (empty here: this venv's onnxscript)
    fuse_site.mkdir()
    env = dict(os.environ, NOTELLM_PYTHON=sys.executable)
    p = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--cpu", "--out", str(out), "--work", str(tmp_path / "w"),
                        "--n-notes", "16", "--batches", "1,4", "--point-s", "0.1", "--fuse-site", str(fuse_site),
                        "--expanded-dtypes", "fp32", "--worker-lite", "thread,writer", "--worker-replicas", "1,2",
                        # every phase takes ~190 s here alone; the default 240 s budget would skip the last ones
                        # on a busier machine
                        "--budget-s", "360"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "gpu-check.json").read_text())
    assert {k: v["status"] for k, v in doc["phases"].items()} == {
        k: "ok" for k in ("environment", "model", "export_fp32", "export_fp16", "export_fp32_expanded",
                          "fuse_fp16", "embed_graph_fp16_gqa", "embed_graph_fp16_mha", "embed_graph_fp16_mha-prefix",
                          "embed_graph_fp16_mha-prefix-fold", "encoder", "polling", "worker/embed", "worker/embed+category",
                          "worker/embed/writer", "worker/embed+category/writer", "worker/embed/x2",
                          "worker/embed+category/x2",
                          "worker/embed/x2/writer", "worker/embed+category/x2/writer", "calibration",
                          "fusions", "profile", "ort_profile")}
    for kind in ("fp32", "fp16"):
        v = doc[f"export_{kind}"]["validation"]
        assert v["passed"], v
        assert v["providers"][0] == "CPUExecutionProvider"
    assert doc["export_fp32"]["validation"]["metrics"]["generation_agreement"] == 1.0
    fz = doc["fuse_fp16"]
    assert fz["validation"]["passed"] and fz["fused_with"]["site"] == str(fuse_site)
    assert fz["ops"]["MultiHeadAttention"] == 2 and fz["fusions"]["sdpa"] == 2  # what `notellm export --fuse` writes
    # the hand-built embed graph, the default variants (Q and K rotated in each of the 2 layers by "mha")
    for rotary, gqa, mha, rotary_ops in (("gqa", 2, 0, 0), ("mha", 0, 2, 4), ("mha-prefix", 0, 2, 4),
                                         ("mha-prefix-fold", 0, 2, 0)):
        eg = doc[f"embed_graph_fp16_{rotary}"]
        assert eg["validation"]["passed"] and eg["rotary"] == rotary
        assert eg["ops"]["GroupQueryAttention"] == gqa and eg["ops"]["MultiHeadAttention"] == mha
        assert eg["ops"]["RotaryEmbedding"] == rotary_ops
        assert eg["validation"]["metrics"]["embed_graph"]["min_cosine"] > 0.999  # both vector paths vs torch
        assert eg["validation"]["metrics"]["step_graph"]["min_cosine"] > 0.999
    enc = doc["encoder"]
    engines = {"ort-fp32", "ort-fp32-nobinding", "ort-fp16", "ort-fp16-nobinding", "ort-fp16-fused", "torch-fp32",
               "torch-bf16", "ort-fp32-expanded", "ort-fp32-expanded-nobinding"}
    for mode in ("embed", "embed+category"):
        extra = ({"ort-fp32-hostlogits", "ort-fp16-hostlogits", "ort-fp32-expanded-hostlogits"}
                 if mode == "embed+category"
                 else {f"ort-fp16-embedgraph{v}{cut}" for v in ("", "-mha", "-mha-prefix", "-mha-prefix-fold")
                       for cut in ("", "-fullbatch")})  # embed-only, cut by padding and not
        assert set(enc[mode]) == engines | extra
        for name in engines | extra:
            for b in ("1", "4"):
                r = enc[mode][name][b]
                assert r["notes_per_s"] > 0 and r["prompt_tokens_per_s"] > r["notes_per_s"], (mode, name, b, r)
                if "-mha-prefix" not in name:  # tokens computed over real, as the engine cut each call
                    assert 1.0 <= r["padded_over_real"] < 2.0, (mode, name, b, r)
                else:  # the instruction is computed once, not per row: fewer tokens than the same cut without it
                    same = enc[mode][name.replace("-mha-prefix-fold", "-mha").replace("-mha-prefix", "-mha")][b][
                        "padded_over_real"]
                    assert 0 < r["padded_over_real"] < same, (name, b, r, same)
    for name in ("ort-fp16-embedgraph", "ort-fp16-embedgraph-mha", "ort-fp16-embedgraph-mha-prefix",
                 "ort-fp16-embedgraph-mha-prefix-fold"):  # the cut
        # computes fewer padded tokens
        for b in ("1", "4"):
            cut, full = enc["embed"][name][b]["padded_over_real"], enc["embed"][f"{name}-fullbatch"][b]["padded_over_real"]
            assert 0 < cut <= full and (cut >= 1.0 or "-mha-prefix" in name), (name, b, cut, full)
    cal = doc["calibration"]  # the worker's start-up calibration, first worker mode (embed-only), CPU defaults
    assert cal["generate"] == "none" and cal["device"] == "cpu" and cal["max_notes"] == 512 and cal["budget_s"] == 3.0
    assert cal["calibrated"] and cal["notes_per_s"] and cal["batch_notes"] in map(int, cal["notes_per_s"])
    assert cal["providers"][0] == "CPUExecutionProvider" and cal["seconds"] < 3.0 + 2.0
    assert "Start-up calibration" in (out / "gpu-check.md").read_text()
    pol = doc["polling"]  # the polling thread alone (bench/polling.py): both prompt paths, with and without GIL load
    assert pol["notes"] == 16 and pol["package"] in ("fp32", "fp16")
    assert {(r["path"], r["gil_load"]) for r in pol["rows"]} == {(p, g) for p in ("composed", "whole") for g in (0, 1)}
    assert all(r["total"]["wall_us"] > 0 and r["ceiling_notes_s"] > 0 for r in pol["rows"])
    for mode, generate, lite in [(m, g, lite) for m, g in (("embed", "none"), ("embed+category", "category"))
                                 for lite in ("", "/writer")]:  # the worker per mode, milvus-lite in or out
        w = doc[f"worker/{mode}{lite}"]
        # writer: milvus-lite served from a child (as `--worker-lite process`) and written from a writer process
        assert w["generate"] == generate and w["lite_process"] == w["write_process"] == bool(lite)
        # the 16 notes cycled (each record its own id) to at least six batches of the batch the phase ran
        assert w["milvus_rows"] == w["notes"] == max(16, 6 * w["max_batch_notes"]) and w["batches"] >= 6
        assert w["pipeline_notes_per_s"] > 0 and w["encoder_alone_notes_per_s"] > 0 and w["milvus_rows_per_s"] > 0
        assert w["package"] == "fp32"  # on the CPU the worker phase keeps the first package
        # the worker process's CPU (the encoder runs in its own process): polling and sink threads within it
        c = w["cpu_s"]
        assert 0 < c["polling_thread"] < c["worker_process"] and 0 < c["sink_thread"] < c["worker_process"]
        # per thread group, at the clock tick's resolution: never more than the process used
        assert all(v > 0 for v in c["by_thread"].values())
        assert sum(c["by_thread"].values()) <= c["worker_process"] + 0.05
        assert w["cpus"] >= 1
    for mode, generate, lite in [(m, g, lite) for m, g in (("embed", "none"), ("embed+category", "category"))
                                 for lite in ("", "/writer")]:  # two worker processes sharing the device
        w = doc[f"worker/{mode}/x2{lite}"]
        assert w["replicas"] == 2 and w["generate"] == generate
        assert w["lite_process"] == w["write_process"] == bool(lite)
        assert len(w["per_replica"]) == 2 and w["notes"] == sum(r["milvus_rows"] for r in w["per_replica"])
        # every replica wrote its notes; the passes overlapped (started together: the barrier)
        assert all(r["milvus_rows"] == max(16, 6 * w["max_batch_notes"]) for r in w["per_replica"])
        assert w["start_spread_s"] < min(r["time_s"]["pipeline_wall"] for r in w["per_replica"])
        # together: every note over the span of both passes, so never more than their sum
        assert 0 < w["pipeline_notes_per_s"] <= 1.01 * sum(r["pipeline_notes_per_s"] for r in w["per_replica"])
        assert w["ratio"] == pytest.approx(w["pipeline_notes_per_s"] / w["encoder_alone_notes_per_s"], abs=0.002)
        assert w["per_replica"][1]["time_s"]["encoder_alone"] is None  # only replica 0 measures it, alone
    f = doc["fusions"]
    assert not any(k.startswith("fp16-fused") for k in f)  # a fused package is not fused again
    for kind in ("fp32", "fp16"):
        for recipe in ("ort_transformers_gpt2", "onnxscript_ort_fusions"):
            r = f[f"{kind}/{recipe}"]
            assert "error" not in r, r
            assert r["parity_min_cosine"] > 0.999
    # the onnxscript recipe fuses attention in our dynamo-exported graph
    assert f["fp32/onnxscript_ort_fusions"]["ops"]["MultiHeadAttention"] == 2
    pr = doc["profile"]
    ort_rows = {f"ort-{k}{m}" for k in ("fp32", "fp16", "fp16-fused", "fp32-expanded") for m in ("", "/embed+category")}
    assert set(pr) == {"batch", "torch-fp32", "ort-fp16-embedgraph", "ort-fp16-embedgraph-mha",
                       "ort-fp16-embedgraph-mha-prefix", "ort-fp16-embedgraph-mha-prefix-fold"} | ort_rows
    t = pr["torch-fp32"]  # on the CPU the profiler sees torch's operators (ORT's only as wall time)
    assert t["events"] > 0 and 0 < t["busy_ms"] <= t["wall_ms"] and t["by_class_ms"]["matmul"] > 0
    assert all(pr[k]["wall_ms"] > 0 and pr[k]["prompt_tokens"] > 0 for k in pr if k != "batch")
    op = doc["ort_profile"]  # ONNX Runtime's own profiler: host time per graph call
    for k in ("fp32", "fp16", "fp16-fused", "fp32-expanded"):
        e, g = op[f"ort-{k}/embed"], op[f"ort-{k}/embed+category"]
        # embed: one run per sub-batch (cut by padding); generation: prefill, continuation, decode steps
        assert e["graph_runs_per_call"] >= 1 and g["graph_runs_per_call"] > 2
        assert 0 < e["nodes_host_ms_per_call"] <= e["model_run_ms_per_call"] <= e["wall_ms_per_call"] * 1.05
        assert e["by_provider_ms_per_call"]["CPU"] > 0 and e["top_ops"]
    # the step graph with K/V expanded to every query head runs more nodes than the default (grouped) one
    assert op["ort-fp32-expanded/embed"]["node_calls_per_run"] > op["ort-fp32/embed"]["node_calls_per_run"]
    assert doc["export_fp32_expanded"]["validation"]["passed"]
    # the fused graph runs fewer nodes per call than the plain one, the embed graph fewer still
    assert op["ort-fp16-fused/embed"]["node_calls_per_run"] < op["ort-fp16/embed"]["node_calls_per_run"]
    for k in ("ort-fp16-embedgraph", "ort-fp16-embedgraph-mha", "ort-fp16-embedgraph-mha-prefix",
              "ort-fp16-embedgraph-mha-prefix-fold"):
        e = op[f"{k}/embed"]
        assert f"{k}/embed+category" not in op and e["graph_runs_per_call"] >= 1  # one per sub-batch
        assert e["node_calls_per_run"] < op["ort-fp16-fused/embed"]["node_calls_per_run"]
    workers = [f"{m}{x}{lite}" for m in ("embed", "embed+category") for x in ("", "/x2") for lite in ("", "/writer")]
    assert set(doc["goals"]) == {"ort_fp16_vs_torch_eager_embed", "embed_prompt_tokens_per_s"} | {
        f"pipeline_vs_encoder_alone/{w}" for w in workers}
    assert all(doc["goals"][f"pipeline_vs_encoder_alone/{w}"]["value"] == doc[f"worker/{w}"]["ratio"] for w in workers)
    md = (out / "gpu-check.md").read_text()
    assert "Worker path, embed (" in md and "Worker path, embed+category/writer (" in md
    assert "served from a child process, written from a writer process" in md
    assert "Worker path, embed/x2 (2 worker processes sharing the device" in md
    assert "**embed**" in md and "| goal |" in md and "Kernel profile" in md and "**Polling thread**" in md
    assert "Fused fp16 package" in md and "Embed graph on the fp16 package" in md and "ONNX Runtime's profiler" in md
    assert (out / "gpu-check.log").stat().st_size > 0


def test_gpu_check_refuses_an_incomplete_pack(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "part-00").write_bytes(b"x" * 10)
    (pack / "MANIFEST.json").write_text(json.dumps({"parts": [
        {"name": "part-00", "bytes": 10, "sha256": "0" * 64},
        {"name": "part-01", "bytes": 10, "sha256": "0" * 64}]}))
    env = dict(os.environ, NOTELLM_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    p = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--pack", str(pack), "--out", str(tmp_path / "o")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "part-00: sha256 differs" in p.stderr and "part-01: missing" in p.stderr


def test_a_crashing_embed_graph_fails_its_phase_alone(monkeypatch, tmp_path):
    """The embed graph's probe runs in a child: a native crash there (ORT 1.31.1's CUDA provider died of
    SIGSEGV on one variant in run 8) is an exception naming the signal, not the end of the check."""
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "EMBED_PROBE_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(RuntimeError, match="SIGSEGV"):
        gpu_check.probe_embed_graph(tmp_path, "cpu")
    monkeypatch.setattr(gpu_check, "EMBED_PROBE_CHILD", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match="exit 3"):
        gpu_check.probe_embed_graph(tmp_path, "cpu")


def test_the_worker_phase_runs_the_fastest_package_of_its_mode():
    """Embed-only, the worker runs the fastest fp16 package with an embed graph when that is fastest (the
    encoder serves embed-only calls with it); generating, the fastest package that generates."""
    from bench.gpu_check import worker_package

    packages = {k: f"/p/{k}" for k in ("fp32", "fp16", "fp16-fused", "fp16-embedgraph", "fp16-embedgraph-mha-prefix")}
    enc = {"best_embed": {"ort-fp16": {"batch": 1024, "notes_per_s": 3000.0},
                          "ort-fp16-fused": {"batch": 2048, "notes_per_s": 5000.0},
                          "ort-fp16-embedgraph": {"batch": 2048, "notes_per_s": 6700.0},
                          "ort-fp16-embedgraph-mha-prefix": {"batch": 1024, "notes_per_s": 9000.0},
                          "ort-fp16-embedgraph-mha-prefix-fullbatch": {"batch": 2048, "notes_per_s": 9500.0},
                          "torch-fp16": {"batch": 2048, "notes_per_s": 9900.0}},
           "best_embed+category": {"ort-fp16": {"batch": 2048, "notes_per_s": 2100.0},
                                   "ort-fp16-fused": {"batch": 1024, "notes_per_s": 1900.0}}}
    # an engine that is no package (-fullbatch: the same package, uncut) or not ORT is never chosen
    assert worker_package(enc, packages, "cuda", "embed") == ("fp16-embedgraph-mha-prefix", 1024)
    assert worker_package(enc, packages, "cuda", "embed+category") == ("fp16", 2048)
    assert worker_package(enc, packages, "cpu", "embed") == ("fp32", None)
    assert worker_package({}, packages, "cuda", "embed") == ("fp16", None)  # nothing measured: the first fp16


def test_thread_cpu_groups_a_threads_cpu_by_its_name():
    """The worker phase's CPU per thread group: a named pool's threads sum under the name without its counter."""
    import threading
    import time

    from bench.gpu_check import thread_cpu, thread_cpu_delta

    def spin():
        t = time.thread_time()
        while time.thread_time() - t < 0.15:
            pass

    before = thread_cpu()
    ready = threading.Barrier(3)
    done = threading.Event()

    def work():
        spin()
        ready.wait()  # stay alive until the second snapshot
        done.wait(10)

    threads = [threading.Thread(target=work, name=f"pool-{i}_{i}") for i in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    after = thread_cpu()
    done.set()
    for t in threads:
        t.join()
    cpu = thread_cpu_delta(before, after)
    assert 0.25 <= cpu["pool"] < 0.6, cpu  # both threads' 0.15 s, under one name
    assert list(cpu) == sorted(cpu, key=lambda k: -cpu[k])


def test_worker_lite_takes_thread_process_writer_each_once():
    import argparse

    from bench.gpu_check import _lite_modes, worker_phase_name

    for good in ("thread", "process", "writer", "thread,process", "process,writer", "thread,process,writer"):
        assert _lite_modes(good) == good
    for bad in ("", "proc", "thread,thread", "thread,process,thread", "writer,writer"):  # a repeat would overwrite
        with pytest.raises(argparse.ArgumentTypeError):                                  # its phase
            _lite_modes(bad)
    assert worker_phase_name("embed", "thread") == "worker/embed"
    assert worker_phase_name("embed+category", "process") == "worker/embed+category/lite-process"
    assert worker_phase_name("embed", "writer", 2) == "worker/embed/x2/writer"


def test_worker_replicas_takes_distinct_counts_and_names_their_phases():
    import argparse

    from bench.gpu_check import _replica_counts, worker_phase_name

    assert _replica_counts("1") == (1,) and _replica_counts("1,2,3") == (1, 2, 3)
    for bad in ("", "0", "1,1", "two", "2,-1"):  # a repeat would overwrite its phase
        with pytest.raises(argparse.ArgumentTypeError):
            _replica_counts(bad)
    assert worker_phase_name("embed", "thread", 1) == "worker/embed"
    assert worker_phase_name("embed", "process", 3) == "worker/embed/x3/lite-process"


def test_the_worker_phase_writes_to_a_milvus_server_and_leaves_nothing_there(tmp_path, milvus_server, tiny_dir):
    """`--worker-milvus-uri`: the worker phase on the production store, its writes from the worker's own client
    and from a writer process; every note stored once, the phase's collection dropped after."""
    from pymilvus import MilvusClient

    from bench.gpu_check import worker_phase
    from notellm.prompts import NoteText

    notes = [NoteText(title=f"note {i} about things", content="some content " * (i % 5), topic="news")
             for i in range(12)]
    colls = []
    for write_process in (False, True):
        w = worker_phase(str(tiny_dir), "cpu", notes, 4, "none", tmp_path / f"w{write_process}", "thread",
                         write_process=write_process, milvus_uri=milvus_server)
        assert w["milvus"] == "server" and w["write_process"] == write_process and not w["lite_process"]
        assert w["milvus_rows"] == w["notes"] == 24 and w["ratio"] > 0  # 6 batches of 4: each note once
        assert 0 < w["cpu_s"]["sink_thread"] < w["cpu_s"]["worker_process"]
        colls.append(w["milvus_collection"])
    client = MilvusClient(uri=milvus_server, timeout=30)
    try:
        assert len(set(colls)) == 2 and not set(colls) & set(client.list_collections())
    finally:
        client.close()


def test_worker_milvus_uri_takes_thread_and_writer_only(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(tmp_path),
                        "--worker-lite", "thread,process", "--worker-milvus-uri", "http://127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--worker-lite process serves a milvus-lite db" in p.stderr, p.stderr[-1000:]


def test_the_check_runs_a_milvus_server_of_its_own_from_the_packs_package(tmp_path, milvus_server):
    """`--worker-milvus-server` as on the device: the `milvus` package importable (the pack's site/ on
    PYTHONPATH; here a folder linking scripts/milvus's installed one), a two-file venv pointing scripts/milvus
    at this Python, free ports; the server answers, and is gone after `stop_milvus_server`."""
    pkg = next((REPO / ".local" / "milvus-server" / "venv" / "lib").glob("python3*/site-packages/milvus"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "milvus").symlink_to(pkg)
    code = """
import json, sys
from pathlib import Path
from pymilvus import MilvusClient
from bench.gpu_check import start_milvus_server, stop_milvus_server
s = start_milvus_server(Path(sys.argv[1]))
c = MilvusClient(uri=s["uri"], timeout=30)
c.list_collections()
c.close()
stop_milvus_server(s)
print(json.dumps(s))
"""
    env = dict(os.environ, PYTHONPATH=f"{site}:{REPO}")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["venv"] == str(tmp_path / "work" / "milvus-venv") and s["uri"] != milvus_server  # its own, not CI's
    import socket

    port = int(s["uri"].rsplit(":", 1)[1])
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
