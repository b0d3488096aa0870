"""Time per training step: constant LR vs latent backtracking (batched, sequential) vs
parameter backtracking (Filatov & Merkulov, arXiv:2110.00874), LeNet encoder, 3 heads.

    .venv/bin/python -m pytest benchmarks/bench_linesearch.py --benchmark-enable -q
    .venv/bin/python benchmarks/bench_linesearch.py [--json PATH]   # training-run table

The model, data and methods are those of ``fastmtl.bench.linesearch`` (also in ``make bench``):
a MultiMNIST-like 3-task problem at 28×28, MGDA directions, c = 1e-4, shrink 0.5, 10 trials at
most. The pytest-benchmark cases time one step from the initial weights (where every search
passes its first trial: the per-step overhead); ``main`` times whole training runs (the
paper's per-epoch comparison: the trials each method needs as training goes on are part of
its cost). Goal: latent batched <= 1.3x constant LR and >= 3x faster than parameter
backtracking.
"""

from __future__ import annotations

import argparse
import datetime
import json

import pytest
import torch

from fastmtl.bench.cli import _add_ratios, _commit, _device_name, print_table
from fastmtl.bench.linesearch import IMPLS, lenet, linesearch_cases, make_search
from fastmtl.bench.multiglyph import multi_glyphs

T = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_linesearch_step(benchmark, device, impl):
    batch = 256
    x, ys = multi_glyphs(batch, tasks=T, size=28)
    x, ys = x.to(device), [y.to(device) for y in ys]
    search = make_search(impl, *lenet(T, device), lr=0.5)
    search.step(x, ys)  # warm-up: vmap tracing, kernels

    def step():
        info = search.step(x, ys)
        if device == "cuda":
            torch.cuda.synchronize()
        return info

    benchmark.group = f"linesearch-{device}"
    info = benchmark(step)
    benchmark.extra_info.update(impl=impl, device=device, trials=int(info.trials),
                                step_size=float(info.step_size))


CONFIGS = [dict(batch=256, lr=0.5), dict(batch=64, lr=0.5), dict(batch=256, lr=0.1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="line-search training-run benchmark")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", help="also write the rows and metadata to this file")
    args = parser.parse_args(argv)
    results = {}
    for device in DEVICES:
        rows = []
        for config in CONFIGS:
            case = linesearch_cases(device, T=T, steps=args.steps, **config)
            constant = next(r["ms"] for r in case if r["impl"] == "constant lr")
            for r in case:
                r["x constant"] = r["ms"] / constant
            rows += case
        _add_ratios(rows)
        print(f"{_device_name(device)}: mean ms per step over {args.steps} training steps")
        print_table(rows, columns=["case", "impl", "ms", "x constant", "fastmtl speed-up",
                                   "trials", "loss"])
        results[_device_name(device)] = rows
    if args.json:
        meta = {"device": ", ".join(results), "commit": _commit(), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
