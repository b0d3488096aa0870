"""The launches ``fastmtl.kernels.aot`` compiles: each kernel's real launcher called on CPU
tensors with the dtypes and argument combinations the ops and solvers pass to it.

Full: every T from 1 to the kernel's limit (``_limits``) for the solvers and every T up to
130 at which a block size or a specialisation changes for the ops (both of ``project``'s
sizes), every dtype, column counts N = 1, 77, 1000 and
1024 (Triton specialises ints equal to 1 and divisible by 16). Quick (CI): T in ``QUICK_T``,
fewer dtypes and one N. Nothing is launched (``aot`` captures the launch), so the tensors'
contents do not matter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from fastmtl.kernels._limits import MAX_T

__all__ = ["cases"]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
GRAD_DTYPES = (F32, F64, BF16, F16)
QUICK_DTYPES = (F32, BF16)
QUICK_T = (1, 2, 3, 8, 16, 64)
Case = tuple[str, Callable[[], object]]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def _ts(full: bool, limit: int, every: bool = False) -> list[int]:
    """T values up to ``limit``: quick, ``QUICK_T``; full, every T if ``every`` (the
    solvers: cheap, one binary per block size), else every T at which a power-of-two block
    size or Triton's specialisation (T = 1, 16 | T) changes: 2^k - 1, 2^k, 2^k + 1."""
    if not full:
        return [t for t in QUICK_T if t <= limit]
    if every:
        return list(range(1, limit + 1))
    edges = {t + d for k in range(12) for t in (2**k,) for d in (-1, 0, 1)} | set(QUICK_T)
    return sorted(t for t in edges | {limit} if 1 <= t <= limit)


def _ns(full: bool) -> tuple[int, ...]:
    return (1, 1024, 1000, 77) if full else (1000,)


def _dtypes(full: bool) -> tuple[torch.dtype, ...]:
    return GRAD_DTYPES if full else QUICK_DTYPES


def _gram(full: bool) -> Iterator[Case]:
    from fastmtl.kernels import gram
    for T, N, dt in itertools.product(_ts(full, 130), _ns(full), GRAD_DTYPES):
        yield f"gram T={T} N={N} {dt}", lambda T=T, N=N, dt=dt: gram.launch(
            torch.empty(T, N, dtype=dt))


def _combine(full: bool) -> Iterator[Case]:
    from fastmtl.kernels import combine
    for T, N, dt, out_acc, accumulate in itertools.product(
            _ts(full, 130), _ns(full), _dtypes(full), (False, True), (False, True)):
        out_dt = _acc(dt) if out_acc else dt
        yield (f"combine T={T} N={N} {dt} out={out_dt} acc={accumulate}",
               lambda T=T, N=N, dt=dt, out_dt=out_dt, accumulate=accumulate: combine.launch(
                   torch.empty(T, dtype=_acc(dt)), torch.empty(T, N, dtype=dt),
                   torch.empty(N, dtype=out_dt), accumulate))


def _project(full: bool) -> Iterator[Case]:
    from fastmtl.kernels import project
    ts = _ts(full, 130)
    for TP, T, N, dt, out_acc in itertools.product(ts, ts, _ns(False), _dtypes(full),
                                                   (False, True)):
        out_dt = _acc(dt) if out_acc else dt
        yield (f"project T'={TP} T={T} N={N} {dt} out={out_dt}",
               lambda TP=TP, T=T, N=N, dt=dt, out_dt=out_dt: project.launch(
                   torch.empty(TP, T, dtype=_acc(dt)), torch.empty(T, N, dtype=dt),
                   torch.empty(TP, N, dtype=out_dt)))


def _trial_points(full: bool) -> Iterator[Case]:
    from fastmtl.kernels import trial_points
    for K, N, dt in itertools.product(_ts(full, 16), _ns(full), _dtypes(full)):
        yield (f"trial_points K={K} N={N} {dt}",
               lambda K=K, N=N, dt=dt: trial_points.launch(
                   torch.empty(N, dtype=dt), torch.empty(N, dtype=dt),
                   torch.empty(K, dtype=_acc(dt)), torch.empty(K, N, dtype=dt)))


def _adatask(full: bool) -> Iterator[Case]:
    from fastmtl.kernels import adatask

    def call(algo, T, p_dt, m_dt, amsgrad, maximize, wd, decoupled, active):
        shapes = [(7,), (33, 5)]
        params = [torch.empty(s, dtype=p_dt) for s in shapes]
        grads = [torch.empty(T, p.numel(), dtype=p_dt) for p in params]
        moments = [[torch.empty(T, p.numel(), dtype=m_dt) for p in params] for _ in range(3)]
        steps = [torch.empty(T, dtype=F32) for _ in params]
        flags = torch.empty(len(params), T, dtype=torch.int8) if active else None
        adatask.launch(algo, params, grads, moments[0], moments[1],
                       moments[2] if amsgrad else moments[1], steps, flags, lr=1e-3,
                       weight_decay=wd, eps=1e-8, a=0.9, b=0.999, lr_decay=0.0,
                       amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)

    dtypes = [(p, m) for p in GRAD_DTYPES for m in (p, F32, BF16)] if full else \
        [(F32, F32), (BF16, F32), (F64, F64), (F16, BF16)]
    flags = itertools.product((False, True), repeat=4) if full else \
        [(False, False, False, False), (True, True, True, True)]
    for algo, (p_dt, m_dt), (ams, maximize, wd, active), decoupled in itertools.product(
            (0, 1, 2), dtypes, list(flags), (False, True)):
        if ams and algo != 0:
            continue
        for T in (1, 3, 64) if full else (1, 3):
            yield (f"adatask algo={algo} T={T} {p_dt}/{m_dt} ams={ams} max={maximize} "
                   f"wd={wd} dec={decoupled} active={active}",
                   lambda a=(algo, T, p_dt, m_dt, ams, maximize, 0.1 if wd else 0.0, decoupled,
                             active): call(*a))


def _square(name: str, make: Callable[[torch.Tensor], object], dtypes) -> Callable:
    def gen(full: bool) -> Iterator[Case]:
        for T, dt in itertools.product(_ts(full, MAX_T[name], every=True), dtypes):
            yield f"{name} T={T} {dt}", lambda T=T, dt=dt: make(torch.empty(T, T, dtype=dt))
    return gen


def _simplex(K):
    from fastmtl.kernels import simplex
    return simplex.launch(K, 100, 1e-6)


def _cagrad(K):
    from fastmtl.kernels import cagrad
    return cagrad.launch(K, 0.4, 24, 100, 1e-6)


def _nash(K):
    from fastmtl.kernels import nash
    return nash.launch(K, 1e-6, 25, 1e-8, 1e-10)


def _nnqp(K):
    from fastmtl.kernels import nnqp
    T = K.shape[0]
    return nnqp.launch(K.to(F64), torch.empty(T, T, dtype=F64), 4 * T + 20, T, 1e-9)


def _eigh(K):
    from fastmtl.kernels import eigh
    return eigh.launch(K, 30)


_KERNELS: dict[str, Callable[[bool], Iterator[Case]]] = {
    "gram": _gram,
    "combine": _combine,
    "project": _project,
    "trial_points": _trial_points,
    "adatask": _adatask,
    "simplex": _square("simplex", _simplex, (F32, F64)),
    "cagrad": _square("cagrad", _cagrad, (F64,)),
    "nash": _square("nash", _nash, (F32, F64)),
    "nnqp": _square("nnqp", _nnqp, (F64,)),
    "eigh": _square("eigh", _eigh, (F32, F64)),
}


def cases(full: bool, kernels: tuple[str, ...] | None = None) -> Iterator[Case]:
    """(description, call) for every launch to compile, kernel by kernel."""
    unknown = set(kernels or ()) - set(_KERNELS)
    if unknown:
        raise ValueError(f"aot: unknown kernels {sorted(unknown)}; known: {sorted(_KERNELS)}")
    for name, gen in _KERNELS.items():
        if kernels is None or name in kernels:
            yield from gen(full)
