"""Shared test configuration.

- ``torch.empty``/``empty_like`` are poisoned with NaN (integers with -1) so any output element a
  kernel forgets to write fails the comparison with the reference.
- ``FASTMTL_TEST_DEVICE`` selects the devices (comma-separated, default: "cpu" plus "cuda" when
  a GPU is present); ``devices`` parametrizes over them.
- ``backends(device)`` lists the op implementations that can run there: "torch" always,
  "triton" on CUDA or under ``TRITON_INTERPRET=1``, "cuda" when the extension is built.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmtl import backend

_empty = torch.empty
_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1)
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny ops (OpenMP contention on a shared 2-core machine
    makes them 20-50x slower); ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_devices() -> list[str]:
    env = os.environ.get("FASTMTL_TEST_DEVICE")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICES = test_devices()


def backends(device: str) -> list[str]:
    """Op implementations that can run on ``device`` in this process."""
    info = backend.info()
    names = ["torch"]
    if info["triton"]["available"] and (device.startswith("cuda") or backend.interpreting()):
        names.append("triton")
    if info["cuda"]["available"] and device.startswith("cuda"):
        names.append("cuda")
    forced = backend.forced()
    if forced is not None:
        names = [forced] if forced in names else []
    return names


def device_backend_params() -> list:
    """(device, backend) pairs for op tests, with cuda ones marked."""
    params = []
    for device in DEVICES:
        for name in backends(device):
            marks = [pytest.mark.cuda] if device.startswith("cuda") else []
            params.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return params


def pytest_report_header(config):
    # Thread count changes the summation order of torch's CPU reductions: show it, so a
    # failure that depends on it can be reproduced (``make test-threads`` runs 1 and 3).
    return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS to change)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
