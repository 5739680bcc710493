"""worker.demo's helpers: which notes it publishes and when it re-exports its package."""
from __future__ import annotations

import json
from pathlib import Path

from worker import demo

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-scientific"


def test_the_default_models_held_out_notes_come_first():
    notes, what = demo.demo_notes(AMAZON, 30, demo.DEFAULT_ADAPTER)
    held = json.loads((demo.DEFAULT_ADAPTER / "adapter.json").read_text())["held_out_notes"]
    assert len(held) > 30 and "none of them seen in training" in what
    assert [n["note_id"] for n in notes] == [f"amazon-{i}" for i in held[:30]]
    n = notes[0]
    assert n["category"] is None and n["topic"] is None and n["title"]  # the worker writes the category
    assert n["_truth"]["category"]  # shown beside the generated one, never published


def test_the_package_is_exported_again_only_when_its_source_changed(tmp_path, monkeypatch):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter.json").write_text("{}")
    pkg = tmp_path / "pkg"
    calls = []

    def fake_export(cmd, cwd):
        calls.append(cmd)
        pkg.mkdir(exist_ok=True)
        (pkg / "notellm.json").write_text("{}")
        return 0

    monkeypatch.setattr(demo.subprocess, "call", fake_export)
    assert demo.ensure_package(pkg, str(src)) == 0 and len(calls) == 1  # absent: exported
    assert calls[0][-4:] == ["--model", str(src), "--out", str(pkg)]
    assert demo.ensure_package(pkg, str(src)) == 0 and len(calls) == 1  # same source: kept
    (src / "adapter.json").write_text('{"steps": 2}')
    assert demo.ensure_package(pkg, str(src)) == 0 and len(calls) == 2  # the artifact changed: again
    (pkg.with_name("pkg.source")).unlink()
    assert demo.ensure_package(pkg, str(src)) == 0 and len(calls) == 3  # no record of its source: again


def test_a_failed_export_leaves_no_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.subprocess, "call", lambda cmd, cwd: 1)
    assert demo.ensure_package(tmp_path / "pkg", "smollm2") == 1
    assert not (tmp_path / "pkg.source").exists()
