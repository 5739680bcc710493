"""bench/polling.py runs the polling thread's stages end to end on a real package and real notes (as the
consumer's own Message objects), checks the batched prompts equal the per-note ones before timing, and
prints its JSON (the numbers themselves are the bench's to report, not a test's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny import tiny_package

REPO = Path(__file__).resolve().parents[1]


def test_bench_polling_prints_each_stage_per_note():
    pkg, _ = tiny_package("fp32")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "polling.py"), "--package", str(pkg),
                        "--notes", "96", "--poll", "32", "--repeats", "1", "--generate", "both", "--gil-load"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["notes"] == 96 and doc["poll"] == 32 and doc["data"] == "amazon"
    assert doc["generate"] == "both" and doc["gil_load"] is True
    assert doc["mean_prompt_tokens"] > 20
    assert list(doc["stages"]) == ["decode", "tokenize", "batch"]
    for stage in doc["stages"].values():
        assert stage["thread_cpu_us"] > 0 and stage["wall_us"] > 0 and stage["process_cpu_us"] > 0
    assert doc["total"]["wall_us"] == round(sum(s["wall_us"] for s in doc["stages"].values()), 1)
    assert doc["ceiling_notes_s"] == round(1e6 / doc["total"]["wall_us"])


def test_bench_polling_refuses_a_folder_without_a_package(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "bench" / "polling.py"), "--package", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no exported package" in p.stderr
