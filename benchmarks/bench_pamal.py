"""PaMaL: a training step of a subspace model vs the plain model, and the interpolation op.

    .venv/bin/python -m pytest benchmarks/bench_pamal.py --benchmark-enable -q

- ``test_train_step``: one forward + backward of an MLP and of a small ResNet-style CNN
  (conv-BN-ReLU residual blocks), plain vs subspace with T in {2, 3, 5} members, with W(α)
  computed inside each layer's forward ("subspace") or once before it ("subspace_precompute").
  ``extra_info``: parameter bytes and, on CUDA, the step's peak allocated memory.
- ``test_interpolation``: W(α) = Σ_t α_t W_t for one layer of N weights: ``fm.ops.combine``
  on the (T, N) member matrix vs a naive sum over T separate member tensors.

Without ``--benchmark-enable`` (the default) every case runs once, small, as a smoke test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _common import DEVICE, measure
from torch import nn

import fastmtl as fm
from fastmtl import pamal

TS = (2, 3, 5)
CUDA = DEVICE.type == "cuda"
BATCH = 128 if CUDA else 16
IMAGE = 32 if CUDA else 16
INTERP_NS = (10**6, 10**7) if CUDA else (10**5, 10**6)


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def _resnet(width: int = 32, blocks: int = 2) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), *[_Block(width) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def _mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


ARCHS = {"mlp": (_mlp, (BATCH, 256)), "resnet": (_resnet, (BATCH, 3, IMAGE, IMAGE))}


def _cases() -> list:
    params = []
    for arch in ARCHS:
        params.append(pytest.param(arch, 1, "plain", id=f"{arch}-plain"))
        for T in TS:
            for impl in ("subspace", "subspace_precompute"):
                params.append(pytest.param(arch, T, impl, id=f"{arch}-T{T}-{impl}"))
    return params


def _run(benchmark, fn) -> None:
    fn()  # warm-up
    if CUDA:
        torch.cuda.synchronize(DEVICE)

    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize(DEVICE)

    benchmark(call)


@pytest.mark.parametrize("arch, T, impl", _cases())
def test_train_step(benchmark, arch, T, impl):
    build, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = build().to(DEVICE)
    x = torch.randn(*shape, device=DEVICE)
    if impl != "plain":
        model = pamal.to_subspace(copy.deepcopy(model), T)
        alpha = pamal.sample_alpha(T, generator=torch.Generator().manual_seed(0), device=DEVICE)

    def step():
        for p in model.parameters():
            p.grad = None
        if impl == "plain":
            model(x).square().mean().backward()
            return
        with pamal.use_alpha(model, alpha, precompute=impl == "subspace_precompute",
                             check=False):
            model(x).square().mean().backward()

    extra = benchmark.extra_info
    extra.update(arch=arch, T=T, impl=impl, device=str(DEVICE), batch=shape[0],
                 param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)
        step()
        torch.cuda.synchronize(DEVICE)
        extra["peak_bytes"] = torch.cuda.max_memory_allocated(DEVICE)
    benchmark.group = f"pamal step {arch}"
    _run(benchmark, step)


@pytest.mark.parametrize("impl", ["combine", "naive_sum"])
@pytest.mark.parametrize("N", INTERP_NS, ids=lambda n: f"N{n:.0e}")
@pytest.mark.parametrize("T", TS)
def test_interpolation(benchmark, T, N, impl):
    gen = torch.Generator().manual_seed(T)
    members = torch.randn(T, N, generator=gen).to(DEVICE)
    separate = [members[t].clone() for t in range(T)]  # one tensor per member, as in the code
    alpha = pamal.sample_alpha(T, generator=gen, device=DEVICE)
    fn = {
        "combine": lambda: fm.ops.combine(alpha, members),
        "naive_sum": lambda: sum(a * w for a, w in zip(alpha, separate)),
    }[impl]
    torch.testing.assert_close(fn(), fm.ops.combine(alpha, members), rtol=1e-5, atol=1e-5)
    benchmark.group = f"pamal interpolation T={T} N={N:.0e}"
    measure(benchmark, fn, bytes_moved=(T + 1) * N * members.element_size(), op="pamal_interp",
            impl=impl, T=T, N=N, backend=fm.backend.select(members))
