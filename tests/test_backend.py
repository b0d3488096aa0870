"""Backend selection: auto rules, forcing, clear errors, info()."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastmtl as fm
from fastmtl import backend


def test_cpu_tensor_auto_selects_torch():
    with backend.use_backend(None):
        assert backend.select(torch.zeros(2)) == "torch"


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown fastmtl backend 'bogus'"):
        backend.set_backend("bogus")


def test_use_backend_restores_previous():
    before = backend.forced()
    with backend.use_backend("torch"):
        assert backend.forced() == "torch"
    assert backend.forced() == before


def test_forcing_cuda_on_cpu_tensor_raises():
    with backend.use_backend("cuda"), pytest.raises(RuntimeError, match="FASTMTL_BACKEND=cuda"):
        backend.select(torch.zeros(2))


@pytest.mark.skipif(backend.interpreting(), reason="the interpreter runs Triton on CPU tensors")
def test_forcing_triton_on_cpu_without_interpreter_raises():
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fm.ops.gram(torch.randn(2, 3))


def test_info_reports_every_backend():
    info = backend.info()
    assert set(info) == {"torch", "triton", "cuda", "forced"}
    assert info["torch"]["available"] is True
    for name in ("triton", "cuda"):
        assert isinstance(info[name]["detail"], str) and info[name]["detail"]
    if not torch.cuda.is_available():
        assert info["cuda"]["available"] is False


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTMTL_BACKEND",
                                                                 "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_env_var_forces_backend_at_import():
    out = _run("import fastmtl as fm; print(fm.backend.forced())", FASTMTL_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_env_var_with_unknown_name_fails_clearly():
    out = _run("import fastmtl", FASTMTL_BACKEND="nope")
    assert out.returncode != 0
    assert "unknown fastmtl backend 'nope'" in out.stderr


def test_auto_never_picks_the_interpreter():
    code = ("import torch, fastmtl as fm; "
            "print(fm.backend.select(torch.zeros(3)))")
    out = _run(code, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
