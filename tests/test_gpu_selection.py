"""Execution-provider choice: onnxruntime-gpu lists CUDAExecutionProvider on any machine, so the encoder
asks for the NVIDIA driver before choosing it (a GPU image on a CPU node falls back quietly; device=cuda
without a driver is a clear configuration error, not ONNX Runtime's raw stderr)."""
from __future__ import annotations

import pytest

from worker import encoder as enc


@pytest.fixture
def gpu_runtime(monkeypatch):
    monkeypatch.setattr(enc.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    loaded: list[bool] = []
    monkeypatch.setattr(enc, "preload_cuda_libraries", lambda: loaded.append(True))
    return loaded


def test_auto_without_driver_is_cpu_and_loads_nothing(gpu_runtime, monkeypatch):
    monkeypatch.setattr(enc, "_no_cuda_driver", lambda: "libcuda.so.1: cannot open shared object file")
    assert enc._choose_providers("auto") == ["CPUExecutionProvider"]
    assert gpu_runtime == []


def test_auto_with_driver_preloads_and_prefers_cuda(gpu_runtime, monkeypatch):
    monkeypatch.setattr(enc, "_no_cuda_driver", lambda: None)
    assert enc._choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu_runtime == [True]


def test_cuda_without_driver_is_a_clear_error(gpu_runtime, monkeypatch):
    monkeypatch.setattr(enc, "_no_cuda_driver", lambda: "libcuda.so.1: cannot open shared object file")
    with pytest.raises(enc.EncoderError, match="no NVIDIA driver.*nvidia.com/gpu"):
        enc._choose_providers("cuda")


def test_cpu_runtime_cannot_be_asked_for_cuda(monkeypatch):
    monkeypatch.setattr(enc.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert enc._choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(enc.EncoderError, match="install onnxruntime-gpu"):
        enc._choose_providers("cuda")


def test_this_machine_has_no_driver_or_says_so():
    """The real probe: on a machine without an NVIDIA driver it names the missing library."""
    why = enc._no_cuda_driver()
    assert why is None or "libcuda" in why
