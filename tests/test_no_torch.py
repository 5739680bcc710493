"""The runtime must work without torch: the CLI's help and every worker/ module import with torch
blocked from import (a meta-path finder that refuses it), in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK = textwrap.dedent(
    """
    import sys, importlib.abc
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "transformers") or name.startswith(("torch.", "transformers.")):
                raise ImportError(f"{name} is blocked: the worker must not import it")
    sys.meta_path.insert(0, _NoTorch())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_without_torch():
    p = _run("""
        from notellm.cli import main
        rc = main(["--help"])
        assert rc == 0
        assert "torch" not in sys.modules
    """)
    assert p.returncode == 0, p.stderr
    for cmd in ("worker", "export", "train", "eval", "similar", "embed"):
        assert cmd in p.stdout


def test_every_worker_module_imports_without_torch():
    p = _run("""
        import importlib, pkgutil, worker, schemas, notellm.prompts
        names = [m.name for m in pkgutil.walk_packages(worker.__path__, "worker.")]
        for n in names:
            importlib.import_module(n)
        assert "torch" not in sys.modules
        print(len(names), "modules")
    """)
    assert p.returncode == 0, p.stderr
