"""``fastmtl-bench``: every op against its references, as ratios and % of the bytes floor.

    fastmtl-bench [--device cpu|cuda] [--quick] [--json PATH]

Prints one table; ``--json`` also writes the rows with device, versions, commit and date (GPU
results are committed under ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys

import torch

import fastmtl as fm
from fastmtl.bench.adatask import PARAM_LISTS, adatask_cases
from fastmtl.bench.cases import Row, combine_cases, gram_cases, mgda_cases
from fastmtl.bench.linesearch import linesearch_cases
from fastmtl.bench.memory import memory_cases
from fastmtl.bench.steps import step_cases
from fastmtl.bench.timing import copy_bandwidth_gbs


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


STEP_METHODS = ("MGDA", "UPGrad", "PCGrad", "CAGrad", "NashMTL")


def run(device: str, quick: bool, smoke: bool = False) -> tuple[list[Row], float]:
    """All cases; ``smoke``: tiny sizes that only check every case runs (for the tests)."""
    cuda = device.startswith("cuda")
    floor = copy_bandwidth_gbs(device, 1 << (20 if smoke else 30 if cuda else 26))
    sizes = [10**3] if smoke else [10**5, 10**6] if quick or not cuda else [10**5, 10**6, 10**7]
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda else [])
    rows: list[Row] = []
    for dtype in dtypes:
        for T in (2,) if smoke else (2, 8, 40):
            for N in sizes:
                rows += gram_cases(device, dtype, T, N)
                rows += combine_cases(device, dtype, T, N)
    for T in (3,) if smoke else (2, 10, 40):
        rows += mgda_cases(device, T)
    for method in STEP_METHODS:
        rows += step_cases(device, method, T=3, width=16, depth=1, batch=8) if smoke else \
            step_cases(device, method, T=10)
    for name in PARAM_LISTS:
        for T in (2,) if smoke else (2, 5) if quick else (2, 5, 10):
            rows += adatask_cases(device, name, T, scale=16 if smoke else 1)
    if smoke:
        rows += linesearch_cases(device, T=2, batch=8, steps=2, warmup=1)
    else:
        rows += linesearch_cases(device, T=3, batch=256, steps=100 if quick else 300)
    if smoke:
        rows += memory_cases(device, "mlp", (3,), batch=8, width=16, depth=2, rounds=1)
    else:
        tasks = (2, 10) if quick else (2, 10, 40)
        rows += memory_cases(device, "mlp", tasks)
        rows += memory_cases(device, "resnet18", tasks)
    _add_ratios(rows, floor)
    return rows, floor


def _add_ratios(rows: list[Row], floor: float | None = None) -> None:
    """'fastmtl speed-up' (impl time / the time of the case's first fastmtl row: its default)
    and, given the copy floor, '% floor' of every row with a GB/s."""
    fast: dict[tuple, float] = {}
    for r in rows:
        if str(r["impl"]).startswith("fastmtl"):
            fast.setdefault((r["op"], r["case"]), r["ms"])
    for r in rows:
        base = fast.get((r["op"], r["case"]))
        r["fastmtl speed-up"] = (r["ms"] / base) if base else None
        if floor is not None and "GB/s" in r:
            r["% floor"] = 100.0 * r["GB/s"] / floor


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


COLUMNS = ["op", "case", "impl", "ms", "GB/s", "% floor", "fastmtl speed-up", "extra MB",
           "of loop", "trials", "loss"]


def print_table(rows: list[Row], file=sys.stdout, columns: list[str] | None = None) -> None:
    cols = columns or COLUMNS
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)), file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmtl-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--json", help="also write the rows and metadata to this file")
    args = parser.parse_args(argv)
    rows, floor = run(args.device, args.quick, args.smoke)
    meta = {
        "device": _device_name(args.device), "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "fastmtl": fm.__version__,
        "backends": {k: v["detail"] for k, v in fm.backend.info().items()},
        "copy_floor_GBps": floor,
    }
    print(f"fastmtl-bench on {meta['device']} (commit {meta['commit']}, torch {meta['torch']}); "
          f"copy floor {floor:.1f} GB/s; 'fastmtl speed-up' = impl time / fastmtl time; line "
          "search: mean ms per step of a training run, mean trials per step, loss over its "
          "last 10% of steps; memory: 'extra MB' = the step's peak allocated memory beyond "
          "sum(losses).backward()'s, 'of loop' = that as a fraction of the loop engine's")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
