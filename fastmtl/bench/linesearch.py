"""Line-search step benchmark (Filatov & Merkulov, arXiv:2110.00874): time per training step.

A MultiMNIST-like problem (``fastmtl.bench.multiglyph``: 28×28, T glyphs), a LeNet encoder
(two 5×5 convolutions, 64 features) and T MultiLeNet-like heads (64 → 50 → 10), cross-entropy
losses, MGDA directions, plain SGD updates. Every method starts from the same weights and
trains on the same sequence of mini-batches; their steps are interleaved (a noisy machine
slows all of them alike) and each step is timed whole, host syncs included.

Methods: the latent line search batched (fastmtl's) and sequential, the constant step (the
same latent gradient pass, no trials), the parameter-space backtracking (per-task gradients
of the encoder's parameters, one encoder forward per trial) and that search's gradient pass
alone (``ConstantStep(space="param")``): no parameter-space search can be faster than this
floor, so param backtracking / latent batched <= floor / latent batched + trials · forward.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.bench.cases import Row
from fastmtl.bench.multiglyph import multi_glyphs
from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking

__all__ = ["IMPLS", "lenet", "linesearch_cases", "make_search"]

IMPLS = ("fastmtl latent batched", "latent sequential", "constant lr", "param pass only",
         "param backtracking")


def lenet(T: int, device: str, seed: int = 0) -> tuple[nn.Module, list[nn.Module]]:
    """The MultiLeNet-like encoder (28×28 → 64) and T heads, seeded."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(320, 64), nn.ReLU(),
    ).to(device)
    heads = [nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10)).to(device)
             for _ in range(T)]
    return encoder, heads


def make_search(impl: str, encoder: nn.Module, heads: list[nn.Module], lr: float):
    """The line search (or constant step) named ``impl`` (one of ``IMPLS``)."""
    fns = [F.cross_entropy] * len(heads)
    if impl == "constant lr":
        return ConstantStep(encoder, heads, fns, lr=lr)
    if impl == "param pass only":
        return ConstantStep(encoder, heads, fns, lr=lr, space="param")
    if impl == "param backtracking":
        return ParamBacktracking(encoder, heads, fns, lr=lr)
    batched = impl == "fastmtl latent batched"
    return LatentBacktracking(encoder, heads, fns, lr=lr, batched=batched)


def linesearch_cases(device: str, T: int = 3, batch: int = 256, lr: float = 0.5,
                     steps: int = 300, warmup: int = 3) -> list[Row]:
    """One row per method, each training from the same start on the same mini-batches for
    ``steps`` timed steps (after ``warmup`` untimed ones): mean ms per step over the run (the
    per-epoch time of the paper's comparison, trials included), mean trials per step, and
    the mean task loss over the last 10% of the steps."""
    x, ys = multi_glyphs(batch * 16, tasks=T, size=28, seed=0)
    x, ys = x.to(device), [y.to(device) for y in ys]
    searches = {impl: make_search(impl, *lenet(T, device), lr=lr) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    trials: dict[str, list[int]] = {impl: [] for impl in IMPLS}
    losses: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    cuda = torch.device(device).type == "cuda"
    for s in range(warmup + steps):
        rows = slice(batch * (s % 16), batch * (s % 16 + 1))
        xb, yb = x[rows], [y[rows] for y in ys]
        for impl, search in searches.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            info = search.step(xb, yb)
            if cuda:
                torch.cuda.synchronize()
            if s >= warmup:
                times[impl].append(1e3 * (time.perf_counter() - start))
                trials[impl].append(int(info.trials))
                losses[impl].append(float(info.losses_before.mean()))
    case = f"LeNet T={T} B={batch} t0={lr:g} {steps} steps"
    tail = max(1, steps // 10)
    return [{"op": "linesearch step", "case": case, "impl": impl,
             "ms": statistics.mean(times[impl]), "trials": statistics.mean(trials[impl]),
             "loss": statistics.mean(losses[impl][-tail:])} for impl in IMPLS]
