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


class _Opened(Exception):
    """Raised by the recording InferenceSession: what the encoder asked ONNX Runtime for is all we need."""


def _record_session(monkeypatch) -> list:
    seen: list = []

    def session(path, sess_options=None, providers=None):
        seen.append(providers)
        raise _Opened

    monkeypatch.setattr(enc.ort, "InferenceSession", session)
    return seen


def test_a_gpu_memory_limit_bounds_the_cuda_sessions_arena(gpu_runtime, monkeypatch):
    """NOTELLM_MODEL__GPU_MEM_LIMIT_MIB reaches ONNX Runtime's CUDA provider as gpu_mem_limit (bytes) with the
    arena grown by what is asked: unbounded, the arena doubles and keeps what it took, so a second worker on
    the same GPU could not allocate (run 10). Unset, the provider keeps ONNX Runtime's defaults."""
    from tests.tiny import tiny_package
    from worker.encoders import cuda_arena_options, load_encoder

    pkg = tiny_package("fp32")[0]  # built (and validated) before ONNX Runtime's session is replaced
    monkeypatch.setattr(enc, "_no_cuda_driver", lambda: None)
    seen = _record_session(monkeypatch)
    with pytest.raises(_Opened):
        load_encoder(pkg, device="cuda", isolation="thread", gpu_mem_limit_mib=3072)
    assert seen[-1] == [("CUDAExecutionProvider", {"gpu_mem_limit": str(3072 * 2**20),
                                                   "arena_extend_strategy": "kSameAsRequested"}),
                        "CPUExecutionProvider"]
    with pytest.raises(_Opened):
        load_encoder(pkg, device="cuda", isolation="thread")
    assert seen[-1] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError):
        cuda_arena_options(0)


def test_the_worker_and_backfill_pass_the_gpu_memory_limit_from_settings(monkeypatch):
    import worker.encoders
    from worker import app as app_mod
    from worker.backfill import backfill
    from worker.config import load_settings

    monkeypatch.setenv("NOTELLM_MODEL__GPU_MEM_LIMIT_MIB", "2048")
    s = load_settings()
    assert s.model.gpu_mem_limit_mib == 2048
    seen: list = []

    def fake(model_dir, **kw):
        seen.append(kw.get("gpu_mem_limit_mib"))
        raise _Opened

    monkeypatch.setattr(worker.encoders, "load_encoder", fake)  # both open it through load_configured_encoder
    with pytest.raises(_Opened):
        app_mod.WorkerApp(s).start()
    with pytest.raises(_Opened):
        backfill(s)
    assert seen == [2048, 2048]
    monkeypatch.delenv("NOTELLM_MODEL__GPU_MEM_LIMIT_MIB")
    assert load_settings().model.gpu_mem_limit_mib is None
    with pytest.raises(ValueError):  # below 256 MiB no session fits
        load_settings({"model": {"gpu_mem_limit_mib": 16}})
