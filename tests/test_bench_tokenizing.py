"""bench/tokenizing.py runs end to end on a real package and real notes, checks the batched prompts equal
the per-note ones before timing, and prints its JSON (the ratio itself is the bench's to report, not a test's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny import tiny_package

REPO = Path(__file__).resolve().parents[1]


def test_bench_tokenizing_prints_both_modes_for_each_task_and_poll():
    pkg, _ = tiny_package("fp32")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizing.py"), "--package", str(pkg),
                        "--notes", "96", "--polls", "16,64", "--repeats", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["notes"] == 96 and doc["data"] == "amazon" and doc["mean_prompt_tokens"] > 20
    assert [(r["generate"], r["poll_notes"]) for r in doc["rows"]] == [
        ("category", 16), ("category", 64), ("both", 16), ("both", 64)]
    assert all(r["per_note_notes_s"] > 0 and r["batched_notes_s"] > 0 and r["ratio"] > 0 for r in doc["rows"])
    # this venv's tokenizers has encode_batch_fast: each row also times the pass with offsets beside it
    assert all(r["offsets_cost"]["with_ms"] > 0 and r["offsets_cost"]["without_ms"] > 0 for r in doc["rows"])


def test_bench_tokenizing_refuses_a_folder_without_a_package(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizing.py"), "--package", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no exported package" in p.stderr
