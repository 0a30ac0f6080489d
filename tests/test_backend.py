import logging

import pytest
import torch

from vlafast import _backend
from vlafast._backend import BackendUnavailable, _decide


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def triton_ok(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: None)


@pytest.fixture
def triton_missing(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "triton does not import (ImportError: x)")


def test_auto_picks_triton_on_cuda(triton_ok):
    assert _decide(CUDA, "auto")[0] == "triton"


def test_auto_cpu_interpreter_only_with_env(triton_ok, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _decide(CPU, "auto")[0] == "triton-interpret"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend, reason = _decide(CPU, "auto")
    assert backend == "torch" and "TRITON_INTERPRET" in reason


def test_torch_request_always_met(triton_ok, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _decide(CUDA, "torch")[0] == "torch"
    assert _decide(CPU, "torch")[0] == "torch"


def test_unmet_triton_request_raises_with_reason(triton_ok, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="no.* CUDA device|not a CUDA device"):
        _decide(CPU, "triton")


def test_triton_missing(triton_missing, monkeypatch):
    assert _decide(CUDA, "auto")[0] == "torch"
    with pytest.raises(BackendUnavailable, match="does not import"):
        _decide(CUDA, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _decide(CPU, "auto")[0] == "torch"


def test_env_override_and_context(monkeypatch, triton_ok):
    monkeypatch.setenv("VLAFAST_BACKEND", "torch")
    assert _backend.resolve("op_a", CUDA) == "torch"
    monkeypatch.setenv("VLAFAST_BACKEND", "auto")
    assert _backend.resolve("op_a", CUDA) == "triton"
    with _backend.override("torch"):
        assert _backend.resolve("op_a", CUDA) == "torch"
        with _backend.override("auto"):
            assert _backend.resolve("op_a", CUDA) == "triton"
    monkeypatch.setenv("VLAFAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="VLAFAST_BACKEND must be one of auto\\|triton\\|torch"):
        _backend.resolve("op_a", CUDA)
    with pytest.raises(ValueError):
        with _backend.override("fast"):
            pass


def test_choice_logged_once_per_op_and_device(triton_ok, monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_logged", set())
    monkeypatch.setenv("VLAFAST_BACKEND", "auto")
    with caplog.at_level(logging.DEBUG, logger="vlafast._backend"):
        for _ in range(3):
            _backend.resolve("op_log", CUDA)
        _backend.resolve("op_log2", CUDA)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("op_log " in m for m in msgs) == 1
    assert sum("op_log2" in m for m in msgs) == 1
    assert "CUDA tensor and triton imports" in msgs[0]


def test_real_environment_resolves():
    # conftest sets TRITON_INTERPRET=1 on CPU-only machines: kernels must run in the interpreter.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    expected = "triton" if dev == "cuda" else "triton-interpret"
    assert _backend.resolve("real", dev) == expected
