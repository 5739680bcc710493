"""bench/polling.py runs the polling thread's stages end to end on a real package and real notes (as the
consumer's own Message objects), on both tokenising paths, checks the batched prompts equal the per-note
ones before timing, and prints its JSON (the numbers themselves are the bench's to report, not a test's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny import tiny_package

REPO = Path(__file__).resolve().parents[1]


def test_bench_polling_prints_each_stage_per_note_for_both_paths_with_and_without_gil_load():
    pkg, _ = tiny_package("fp32")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "polling.py"), "--package", str(pkg),
                        "--notes", "96", "--poll", "32", "--repeats", "1", "--generate", "both"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["notes"] == 96 and doc["poll"] == 32 and doc["data"] == "amazon" and doc["generate"] == "both"
    assert doc["mean_prompt_tokens"] > 20
    # SmolLM2's tokenizer (the tiny package's) is one composing is proved for: both paths are measured
    assert [(r["path"], r["gil_load"]) for r in doc["rows"]] == [
        ("composed", False), ("whole", False), ("composed", True), ("whole", True)]
    for row in doc["rows"]:
        assert list(row["stages"]) == ["decode", "tokenize", "batch"]
        for stage in row["stages"].values():
            assert stage["thread_cpu_us"] > 0 and stage["wall_us"] > 0 and stage["process_cpu_us"] > 0
        assert row["total"]["wall_us"] == round(sum(s["wall_us"] for s in row["stages"].values()), 1)
        assert row["ceiling_notes_s"] == round(1e6 / row["total"]["wall_us"])
    assert set(doc["whole_over_composed"]) == {"free", "gil_load"}
    assert all(v > 0 for v in doc["whole_over_composed"].values())


def test_bench_polling_refuses_a_folder_without_a_package(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "bench" / "polling.py"), "--package", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no exported package" in p.stderr
