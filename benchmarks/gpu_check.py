"""`make gpu-check`: everything that needs a GPU, in one command, on a machine with no registry.

Stages, each under its own time limit, all within ``--budget`` seconds (default 480):

1. install: ``pip install --no-index --no-deps --no-build-isolation -e .`` (torch, triton and
   pytest must be there already);
2. build: the CUDA extension ``fastmtl._C`` in place (``FASTMTL_BUILD_CUDA=1``, ``MAX_JOBS`` =
   the cores), skipped without a CUDA device, a CUDA torch or nvcc;
3. tests: every ``cuda``-marked test (the ops on the device, each aggregator's sync-debug test,
   the CUDA-graph and no-host-sync tests) once with ``FASTMTL_BACKEND=cuda`` (skipped when the
   extension did not build) and once with ``FASTMTL_BACKEND=triton``;
4. bench: ``fastmtl-bench --device cuda --quick --json``.

Writes ``gpu-check.json`` (device, versions, commit, date, each stage's status, time, reason
and the tail of its output), ``bench.json`` and ``summary.txt`` under ``--out``, prints the
summary with what was skipped and why, and exits 1 if any stage failed. On a machine without
a GPU it runs end to end with the GPU stages reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], limit: float, env: dict | None = None) -> tuple[str, float, str]:
    """(status "passed"|"failed"|"timeout", seconds, output tail) of one command."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=max(limit, 1))
        status, out = ("passed" if proc.returncode == 0 else "failed"), proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        status = "timeout"
    return status, time.perf_counter() - start, out[-4000:]


def _probe() -> dict:
    """What this machine has, from a fresh interpreter (after the install)."""
    code = ("import json, torch, shutil; from torch.utils.cpp_extension import CUDA_HOME\n"
            "try:\n import triton; tv = triton.__version__\nexcept ImportError: tv = None\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'triton': tv, 'cuda': cuda,\n"
            " 'torch_cuda': torch.version.cuda, 'nvcc': CUDA_HOME is not None,\n"
            " 'device': torch.cuda.get_device_name(0) if cuda else 'cpu'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _pytest_line(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if " in " in ln and ("passed" in ln or "skipped"
                                                                  in ln or "failed" in ln)]
    return lines[-1].strip("= ") if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON files and summary")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages")
    parser.add_argument("--skip-install", action="store_true", help="use the package as is")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    left = lambda cap: min(cap, deadline - time.perf_counter())  # noqa: E731
    stages: list[dict] = []

    def stage(name: str, status: str, seconds: float = 0.0, reason: str = "", tail: str = ""):
        stages.append({"stage": name, "status": status, "seconds": round(seconds, 1),
                       "reason": reason, "tail": tail})
        print(f"[gpu-check] {name}: {status} ({seconds:.0f} s){' - ' + reason if reason else ''}",
              flush=True)

    if args.skip_install:
        stage("install", "skipped", reason="--skip-install")
    else:
        stage("install", *_run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                "--no-deps", "--no-build-isolation", "-e", "."], left(120))[:2])
    info = _probe()
    cores = os.cpu_count() or 1

    if not info["cuda"]:
        stage("build", "skipped", reason="no CUDA device")
    elif not info["torch_cuda"] or not info["nvcc"]:
        stage("build", "skipped", reason="torch is not a CUDA build or nvcc/CUDA_HOME missing")
    else:
        status, secs, tail = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                                  left(240), {"FASTMTL_BUILD_CUDA": "1", "MAX_JOBS": str(cores)})
        stage("build", status, secs, tail=tail)
    built = stages[-1]["status"] == "passed"

    for backend in ("cuda", "triton"):
        name = f"tests[{backend}]"
        if backend == "cuda" and not built:
            stage(name, "skipped", reason="the CUDA extension was not built (see build)")
            continue
        if backend == "triton" and info["triton"] is None:
            stage(name, "skipped", reason="triton is not installed")
            continue
        status, secs, tail = _run(
            [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs", "-x",
             "-p", "no:cacheprovider"], left(150), {"FASTMTL_BACKEND": backend})
        line = _pytest_line(tail)
        if status == "passed" and not info["cuda"]:
            status, line = "skipped", f"no CUDA device: every cuda test skipped ({line})"
        stage(name, status, secs, reason=line, tail=tail)

    bench_json = os.path.join(args.out, "bench.json")
    if not info["cuda"]:
        stage("bench", "skipped", reason="no CUDA device")
    else:
        stage("bench", *_run([sys.executable, "-m", "fastmtl.bench.cli", "--device", "cuda",
                              "--quick", "--json", bench_json], left(180)))

    failed = [s for s in stages if s["status"] in ("failed", "timeout")]
    report = {"device": info["device"], "commit": _commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": info["torch"], "triton": info["triton"], "cores": cores,
              "ok": not failed, "stages": stages}
    with open(os.path.join(args.out, "gpu-check.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = [f"gpu-check on {info['device']} (commit {report['commit']}, torch {info['torch']}, "
             f"triton {info['triton']}): {'OK' if not failed else 'FAILED'}"]
    for s in stages:
        lines.append(f"  {s['stage']:<14} {s['status']:<8} {s['seconds']:>6.0f} s  {s['reason']}")
    for s in failed:
        lines += [f"--- {s['stage']} output (tail) ---", s["tail"][-2000:]]
    summary = "\n".join(lines)
    with open(os.path.join(args.out, "summary.txt"), "w") as fh:
        fh.write(summary + "\n")
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
