"""Ahead-of-time compilation of every Triton kernel for real GPU targets, with no GPU.

``python -m fastmtl.kernels.aot [--full] [--targets 80,90]`` (``make aot`` / ``make aot-full``)
runs each kernel's real launcher (``kernels/X.launch``) on CPU tensors of the shapes and
dtypes the ops pass, catches the launch, and compiles it for sm_80 and sm_90 through Triton's
own ``warmup`` path: the same binder (specialisation of ints equal to 1 and of 16-divisible
ints and pointers), the same constexprs, every config the autotuner keeps after pruning plus
the ``FASTMTL_AUTOTUNE=0`` default. Nothing runs: a stand-in driver names the target, and
ptxas (shipped in the triton wheel) builds the cubin. Each distinct binary is then checked:

- it compiles (a Triton or ptxas error is a failure, reported with the launch that hit it);
- no TF32 (``.tf32`` in the PTX): every kernel here promises IEEE fp32 arithmetic;
- shared memory within the target's per-block limit (``SHARED_LIMIT``);
- register spills within the kernel's budget, ``SPILL_BUDGET`` in its module (spill bytes
  per thread: the stack frame of the cubin Triton built, read with ``cuobjdump``; an int or
  a function of the launch's constexprs): the budget is the documentation of what is
  acceptable.

Quick mode (CI) takes T in {1, 2, 3, 8, 16, 64}; ``--full`` every T from 1 to each kernel's
limit (so every T at which a block size or a specialisation changes) and more column counts.
Launches that Triton maps to one binary are compiled once (its in-memory cache).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import triton
from fastmtl.kernels._utils import INTERPRET
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

__all__ = ["SHARED_LIMIT", "Result", "check", "check_call", "main"]

# Shared memory one block can opt into (bytes): A100 163 KiB, H100/H200 227 KiB. (Consumer
# Ampere/Ada GPUs have 99 KiB: the table reports every kernel's use.)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class Result:
    """One distinct binary (or one failure) for one target."""

    kernel: str
    target: int
    config: str
    launch: str
    regs: int = -1
    spill: int = -1
    shared: int = -1
    budget: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def row(self) -> str:
        status = "ok" if not self.problems else "FAIL: " + "; ".join(self.problems)
        return (f"{self.kernel:<28} sm_{self.target:<3} {self.config:<44} {self.regs:>5} "
                f"{self.spill:>6} {self.budget:>6} {self.shared:>7}  {status}")


HEADER = (f"{'kernel':<28} {'target':<6} {'config (constexprs, warps, stages)':<44} "
          f"{'regs':>5} {'spill':>6} {'budget':>6} {'shared':>7}  status")


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, never touches a GPU. The device
    index is the capability, so each target gets its own binder and kernel cache."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclasses.dataclass
class _Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    default: bool  # the FASTMTL_AUTOTUNE=0 config


def _expand(kernel: KernelInterface, args: tuple, kwargs: dict, tuned: bool) -> list[_Launch]:
    """The launches a kernel call can compile: the ``FASTMTL_AUTOTUNE=0`` default config and,
    if ``tuned``, each config the autotuner keeps after pruning."""
    if isinstance(kernel, JITFunction):
        return [_Launch(kernel, args, kwargs, False)]
    if not isinstance(kernel, Autotuner):
        raise TypeError(f"aot: unsupported kernel wrapper {type(kernel).__name__}")
    configs = []
    if tuned:
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = list(kernel.prune_configs(kwargs))
        finally:
            kernel.nargs = None
    default = getattr(kernel, "fastmtl_default", None)
    if default is None and not configs:
        configs = list(kernel.configs)
    out = [_Launch(kernel.fn, args, {**kwargs, **c.all_kwargs()}, False) for c in configs]
    if default is not None and default not in configs:
        out.append(_Launch(kernel.fn, args, {**kwargs, **default.all_kwargs()}, True))
    return out


@contextlib.contextmanager
def _capture(tuned: bool) -> Iterator[list[_Launch]]:
    """Inside, ``kernel[grid](...)`` records the launches instead of running them."""
    launches: list[_Launch] = []
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.extend(_expand(self, args, kwargs, tuned))

    KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


def _constexprs(launch: _Launch) -> dict:
    names = [p.name for p in launch.fn.params if p.is_constexpr]
    return {k: launch.kwargs[k] for k in names if k in launch.kwargs}


def _describe(launch: _Launch) -> str:
    meta = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in _constexprs(launch).items())
    warps = launch.kwargs.get("num_warps", 4)
    stages = launch.kwargs.get("num_stages", 3)
    return f"{meta} w{warps} s{stages}" + (" (default)" if launch.default else "")


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


def _resource_usage(cubin: bytes, cache: dict) -> tuple[int, int]:
    """(registers, stack-frame bytes) per thread of the cubin Triton built (``cuobjdump
    --dump-resource-usage``, shipped in the triton wheel). Triton kernels have no local
    arrays, so the stack frame is the spill area: read from the real binary, it reflects the
    ptxas flags of the installed Triton (3.7 passes --regAllocOptLevel=2, 3.6 does not)."""
    key = hashlib.sha1(cubin).hexdigest()
    if key not in cache:
        from triton import knobs
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                 capture_output=True, text=True, check=True).stdout
        found = _USAGE.findall(out)
        if not found:
            raise RuntimeError(f"aot: no resource usage in cuobjdump's output:\n{out}")
        cache[key] = max(int(r) for r, _ in found), max(int(st) for _, st in found)
    return cache[key]


def _budget(launch: _Launch) -> int:
    """The kernel module's ``SPILL_BUDGET[kernel name]``: spill bytes per thread, an
    int or (constexpr name, {value: bytes}); 0 when the module gives none."""
    module = sys.modules[launch.fn.fn.__module__]
    rule = getattr(module, "SPILL_BUDGET", {}).get(launch.fn.fn.__name__, 0)
    if isinstance(rule, tuple):
        name, table = rule
        return int(table[_constexprs(launch)[name]])
    return int(rule)


class _Compiler:
    """Compiles launches for one target, once per distinct binary."""

    def __init__(self, capability: int) -> None:
        self.capability = capability
        self.driver = _CompileOnlyDriver(capability)
        self.seen: dict[tuple, Result] = {}
        self.usage: dict = {}

    def _key(self, launch: _Launch) -> tuple:
        binder = launch.fn.device_caches[self.capability][4]
        _, spec, options = binder(*launch.args, **launch.kwargs)
        return (launch.fn.fn.__module__, launch.fn.fn.__name__, repr(spec),
                repr(sorted(options.items())))

    def compile(self, launch: _Launch, where: str) -> Result | None:
        """The launch's Result, or None if its binary was already checked."""
        key = self._key(launch)
        if key in self.seen:
            return None
        name = f"{launch.fn.fn.__module__.rsplit('.', 1)[-1]}.{launch.fn.fn.__name__}"
        res = Result(name, self.capability, _describe(launch), where, budget=_budget(launch))
        self.seen[key] = res
        try:
            kernel = launch.fn.warmup(*launch.args, grid=(1,), **launch.kwargs)
        except Exception as exc:  # a Triton (MLIR) or ptxas failure
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            res.problems.append(f"compile error ({type(exc).__name__}: "
                                f"{lines[-1][:120] if lines else ''}) at {where}")
            return res
        ptx = kernel.asm["ptx"]
        res.shared = int(kernel.metadata.shared)
        res.regs, res.spill = _resource_usage(kernel.asm["cubin"], self.usage)
        if re.search(r"\.tf32\b", ptx):
            res.problems.append(f"TF32 in the PTX (the kernel promises IEEE fp32) at {where}")
        if res.shared > SHARED_LIMIT[self.capability]:
            res.problems.append(f"shared memory {res.shared} B > {SHARED_LIMIT[self.capability]}")
        if res.spill > res.budget:
            res.problems.append(f"spills {res.spill} B/thread > budget {res.budget} at {where}")
        return res


def _run_case(compilers: list[_Compiler], where: str, call: Callable[[], object],
              tuned: bool) -> list[Result]:
    with _capture(tuned) as launches:
        call()
    out = []
    previous = driver._active  # None on a machine without a GPU: restored as it was
    try:
        for comp in compilers:
            driver.set_active(comp.driver)
            for launch in launches:
                res = comp.compile(launch, where)
                if res is not None:
                    out.append(res)
    finally:
        driver._active = previous
    return out


def check_call(call: Callable[[], object], targets: tuple[int, ...] = (80, 90),
               where: str = "call") -> list[Result]:
    """Compile the launches ``call`` makes (default configs) for ``targets``: one Result each."""
    return _run_case([_Compiler(c) for c in targets], where, call, tuned=False)


def check(full: bool = False, targets: tuple[int, ...] = (80, 90),
          kernels: tuple[str, ...] | None = None, log: Callable[[str], None] | None = None
          ) -> list[Result]:
    """Compile every case of ``fastmtl.kernels._aot_cases`` for ``targets``; one Result per
    distinct binary and target (failures included). ``log`` gets each row as it is made."""
    from fastmtl.kernels import _aot_cases

    compilers = [_Compiler(c) for c in targets]
    results = []
    for where, call in _aot_cases.cases(full=full, kernels=kernels):
        for res in _run_case(compilers, where, call, tuned=full):
            results.append(res)
            if log is not None:
                log(res.row())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmtl.kernels.aot", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every T up to each limit")
    parser.add_argument("--targets", default="80,90", help="compute capabilities (80,90)")
    parser.add_argument("--kernels", default=None, help="comma-separated modules (gram,...)")
    args = parser.parse_args(argv)
    if INTERPRET:
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    targets = tuple(int(t) for t in args.targets.split(","))
    kernels = tuple(args.kernels.split(",")) if args.kernels else None
    start = time.perf_counter()
    print(f"triton {triton.__version__}; targets {targets}; {'full' if args.full else 'quick'}")
    print(HEADER)
    results = check(args.full, targets, kernels, log=print)
    bad = [r for r in results if r.problems]
    print(f"\n{len(results)} binaries, {len(bad)} failing, "
          f"{time.perf_counter() - start:.0f} s (triton {triton.__version__})")
    for r in bad:
        print(r.row())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
