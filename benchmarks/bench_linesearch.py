"""Time per training step: constant LR vs latent backtracking (batched, sequential) vs
parameter backtracking (Filatov & Merkulov, arXiv:2110.00874), on a small CNN, 3 heads.

    .venv/bin/python -m pytest benchmarks/bench_linesearch.py --benchmark-enable -q
    .venv/bin/python benchmarks/bench_linesearch.py      # the table of ratios (CPU and GPU)

The model: a LeNet-like encoder (two 5×5 convolutions, 64 features) on 28×28 inputs and
three MultiLeNet-like heads (64 → 50 → 10), cross-entropy losses, MGDA directions, batch 256
(64 on CPU). Every method starts from the same weights and lr; the line searches use
c = 1e-4, shrink 0.5, 10 trials at most. The goal: latent batched <= 1.3x constant LR and
>= 3x faster than parameter backtracking. Each timed step also records the trials it needed.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking

T = 3
IMPLS = ("constant", "latent_batched", "latent_sequential", "param")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setup(impl: str, device: str, batch: int | None = None, lr: float = 0.5):
    """(line search, x, targets) for one method, deterministic."""
    torch.manual_seed(0)
    batch = batch or (256 if device == "cuda" else 64)
    encoder = nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(320, 64), nn.ReLU(),
    ).to(device)
    heads = [nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10)).to(device)
             for _ in range(T)]
    x = torch.randn(batch, 1, 28, 28, device=device)
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(T)]
    fns = [F.cross_entropy] * T
    if impl == "constant":
        ls = ConstantStep(encoder, heads, fns, lr=lr)
    elif impl == "param":
        ls = ParamBacktracking(encoder, heads, fns, lr=lr)
    else:
        ls = LatentBacktracking(encoder, heads, fns, lr=lr, batched=impl == "latent_batched")
    return ls, x, ys


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_linesearch_step(benchmark, device, impl):
    ls, x, ys = setup(impl, device)
    ls.step(x, ys)  # warm-up: vmap tracing, kernels

    def step():
        info = ls.step(x, ys)
        if device == "cuda":
            torch.cuda.synchronize()
        return info

    benchmark.group = f"linesearch-{device}"
    info = benchmark(step)
    benchmark.extra_info.update(impl=impl, device=device, trials=int(info.trials),
                                step_size=float(info.step_size))


def _timed_step(ls, x, ys, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    info = ls.step(x, ys)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, int(info.trials)


def main(repeats: int = 40) -> None:
    """Median ms per step, the methods interleaved step by step (fair on a noisy machine)."""
    for device in DEVICES:
        runs = {impl: setup(impl, device) for impl in IMPLS}
        for ls, x, ys in runs.values():
            for _ in range(3):
                ls.step(x, ys)
        times: dict[str, list] = {impl: [] for impl in IMPLS}
        for _ in range(repeats):
            for impl, (ls, x, ys) in runs.items():
                times[impl].append(_timed_step(ls, x, ys, device))
        ms = {impl: 1e3 * statistics.median(t for t, _ in v) for impl, v in times.items()}
        print(f"{device} ({torch.get_num_threads()} threads)" if device == "cpu"
              else torch.cuda.get_device_name())
        for impl in IMPLS:
            trials = statistics.mean(n for _, n in times[impl])
            print(f"  {impl:18s} {ms[impl]:8.2f} ms/step  trials {trials:4.1f}  "
                  f"x constant {ms[impl] / ms['constant']:5.2f}  "
                  f"param / this {ms['param'] / ms[impl]:5.2f}")


if __name__ == "__main__":
    main()
