"""fm.ops.combine: d = Gᵀ w (optionally into / added to ``out``) against a float64 reference.

Tests marked ``kernels`` also run in the Triton-interpreter process
(``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, OUT_DTYPES, acc, dtype_id, randn
from _tolerances import RTOL, combine_error
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
# 65 = the interpreter's BLOCK_N + 1; 2000 spans many column blocks with a ragged tail.
SHAPES = [(T, N) for T in (1, 2, 3, 8, 64) for N in (1, 7, 65, 2000)]


def _assert_close(d: torch.Tensor, w: torch.Tensor, G: torch.Tensor) -> None:
    err = combine_error(d, w, G)
    assert err <= RTOL[d.dtype], f"combine error {err:.3e} > {RTOL[d.dtype]:.0e}"


@pytest.mark.kernels
@pytest.mark.parametrize("T,N", SHAPES, ids=[f"T{T}-N{N}" for T, N in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_values(device, backend, dtype, T, N):
    G = randn(T, N, dtype=dtype, device=device, seed=T * 10_000 + N)
    w = randn(T, dtype=acc(dtype), device=device, seed=T)
    with use_backend(backend):
        d = fm.ops.combine(w, G)
    assert d.shape == (N,) and d.dtype == dtype and d.device == G.device
    _assert_close(d, w, G)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_w_in_input_dtype(device, backend, dtype):
    """w in G's dtype gives exactly what the same values in the accumulation dtype give."""
    G = randn(5, 300, dtype=dtype, device=device, seed=1)
    w = randn(5, dtype=dtype, device=device, seed=2)
    with use_backend(backend):
        d_low = fm.ops.combine(w, G)
        d_acc = fm.ops.combine(w.to(acc(dtype)), G)
    assert torch.equal(d_low, d_acc)
    _assert_close(d_low, w, G)


@pytest.mark.kernels
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("dtype,odt", OUT_DTYPES,
                         ids=[f"{dtype_id(d)}-out_{dtype_id(o)}" for d, o in OUT_DTYPES])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_out_slice(device, backend, dtype, odt, accumulate):
    """out= a slice of a bigger flat buffer: the slice gets d (or out + d), the rest is intact."""
    T, N, lo = 3, 130, 5
    G = randn(T, N, dtype=dtype, device=device, seed=3)
    w = randn(T, dtype=acc(dtype), device=device, seed=4)
    buf = randn(N + 13, dtype=odt, device=device, seed=5)
    before = buf.clone()
    out = buf[lo : lo + N]
    with use_backend(backend):
        res = fm.ops.combine(w, G, out=out, accumulate=accumulate)
    assert res is out
    assert torch.equal(buf[:lo], before[:lo]) and torch.equal(buf[lo + N :], before[lo + N :])
    if accumulate:  # out + Gᵀw == [G; out]ᵀ [w; 1]
        G = torch.cat([G.double(), before[None, lo : lo + N].double()])
        w = torch.cat([w, w.new_ones(1)])
    _assert_close(out, w, G)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_accumulate_twice(device, backend):
    """out starts at zero; two accumulations of the same combination give 2 Gᵀw."""
    G = randn(8, 500, device=device, seed=6)
    w = randn(8, device=device, seed=7)
    out = torch.zeros(500, device=device)
    with use_backend(backend):
        fm.ops.combine(w, G, out=out, accumulate=True)
        once = out.clone()
        fm.ops.combine(w, G, out=out, accumulate=True)
        direct = fm.ops.combine(w, G)
    assert torch.equal(once, direct)
    _assert_close(out, torch.cat([w, w]), torch.cat([G, G]))


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "expanded"])
@pytest.mark.parametrize("T,N", [(3, 1), (5, 300), (20, 129)])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_strided_input(device, backend, layout, T, N):
    if layout == "column_slice":  # row stride N + 9, unit stride along N
        G = randn(T, N + 9, device=device, seed=8)[:, 4 : 4 + N]
        assert G.stride(0) == N + 9
    elif layout == "transposed":  # unit stride along T (copied, except N = 1 where it is kept)
        G = randn(N, T, device=device, seed=9).mT
    else:  # row stride 0: the same row T times
        G = randn(1, N, device=device, seed=10).expand(T, N)
    w = randn(2 * T, device=device, seed=11)[::2]  # a strided w too
    with use_backend(backend):
        d = fm.ops.combine(w, G)
    _assert_close(d, w, G)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_deterministic(device, backend):
    G = randn(20, 3000, dtype=torch.bfloat16, device=device, seed=12)
    w = randn(20, device=device, seed=13)
    with use_backend(backend):
        d1 = fm.ops.combine(w, G)
        d2 = fm.ops.combine(w.clone(), G.clone())
    assert torch.equal(d1, d2)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_selects_rows(device, backend):
    """One-hot w returns that row exactly; w = 0 returns exact zeros."""
    G = randn(6, 150, device=device, seed=14)
    with use_backend(backend):
        for i in range(6):
            w = torch.zeros(6, device=device)
            w[i] = 1.0
            assert torch.equal(fm.ops.combine(w, G), G[i])
        assert torch.equal(fm.ops.combine(torch.zeros(6, device=device), G),
                           torch.zeros(150, device=device))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_gradcheck(device, backend):
    G = randn(3, 10, dtype=torch.float64, device=device, seed=15).requires_grad_()
    w = randn(3, dtype=torch.float64, device=device, seed=16).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(fm.ops.combine, (w, G))
        assert torch.autograd.gradgradcheck(fm.ops.combine, (w, G))
        fm.ops.combine(w, G).sum().backward()
    assert G.grad.is_contiguous()  # laid out like G on every backend (no transposing copy)
    torch.testing.assert_close(G.grad, w.detach()[:, None].expand(3, 10))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_out_under_no_grad(device, backend):
    """out= refuses autograd inputs only while grad mode is on."""
    G = randn(4, 70, device=device, seed=17).requires_grad_()
    w = randn(4, device=device, seed=18).requires_grad_()
    out = torch.zeros(70, device=device)
    with use_backend(backend), torch.no_grad():
        fm.ops.combine(w, G, out=out)
    _assert_close(out, w.detach(), G.detach())


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_combine_compile(device, backend):
    torch._dynamo.reset()
    G = randn(6, 100, device=device, seed=19)
    w = randn(6, device=device, seed=20)

    def step(w, G, out):
        d = fm.ops.combine(w, G)
        fm.ops.combine(w, G, out=out, accumulate=True)
        return d

    out = torch.ones(100, device=device)
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        d = compiled(w, G, out)
        eager = fm.ops.combine(w, G)
    assert torch.equal(d, eager)
    _assert_close(d, w, G)
    ones = torch.ones(1, 100, device=device)  # out started at 1
    _assert_close(out, torch.cat([w, w.new_ones(1)]), torch.cat([G, ones]))


# ---------------------------------------------------------------------------- bad input

def _G() -> torch.Tensor:
    return torch.ones(3, 5)


BAD = [
    ("G not a tensor", lambda: (torch.ones(3), [[1.0] * 5] * 3, {}), TypeError, "G must be"),
    ("w not a tensor", lambda: ([1.0, 2.0, 3.0], _G(), {}), TypeError, "w must be"),
    ("G 1-D", lambda: (torch.ones(3), torch.ones(5), {}), ValueError, "2-D"),
    ("G 3-D", lambda: (torch.ones(3), torch.ones(3, 5, 1), {}), ValueError, "2-D"),
    ("G integer", lambda: (torch.ones(3), torch.ones(3, 5, dtype=torch.int32), {}),
     TypeError, "floating"),
    ("T=0", lambda: (torch.ones(0), torch.ones(0, 5), {}), ValueError, "T >= 1"),
    ("N=0", lambda: (torch.ones(3), torch.ones(3, 0), {}), ValueError, "N >= 1"),
    ("w too short", lambda: (torch.ones(2), _G(), {}), ValueError, r"shape \(3,\)"),
    ("w 2-D", lambda: (torch.ones(3, 1), _G(), {}), ValueError, r"shape \(3,\)"),
    ("w fp64 for fp32 G", lambda: (torch.ones(3, dtype=torch.float64), _G(), {}),
     TypeError, "float64"),
    ("w fp16 for fp32 G", lambda: (torch.ones(3, dtype=torch.float16), _G(), {}),
     TypeError, "float16"),
    ("w integer", lambda: (torch.ones(3, dtype=torch.int64), _G(), {}), TypeError, "int64"),
    ("out wrong shape", lambda: (torch.ones(3), _G(), {"out": torch.empty(4)}),
     ValueError, r"out must have shape \(5,\)"),
    ("out 2-D", lambda: (torch.ones(3), _G(), {"out": torch.empty(1, 5)}),
     ValueError, r"out must have shape \(5,\)"),
    ("out wrong dtype", lambda: (torch.ones(3), _G(), {"out": torch.empty(5, dtype=torch.float64)}),
     TypeError, "out has dtype torch.float64"),
    ("out half for fp32 G", lambda: (torch.ones(3), _G(),
                                     {"out": torch.empty(5, dtype=torch.bfloat16)}),
     TypeError, "out has dtype torch.bfloat16"),
    ("out non-contiguous", lambda: (torch.ones(3), _G(), {"out": torch.empty(10)[::2]}),
     ValueError, "contiguous"),
    ("out not a tensor", lambda: (torch.ones(3), _G(), {"out": [0.0] * 5}),
     TypeError, "out must be"),
    ("out= with requires_grad w", lambda: (torch.ones(3, requires_grad=True), _G(),
                                           {"out": torch.empty(5)}), RuntimeError, "autograd"),
    ("out= with requires_grad G", lambda: (torch.ones(3), _G().requires_grad_(),
                                           {"out": torch.empty(5)}), RuntimeError, "autograd"),
    ("accumulate without out", lambda: (torch.ones(3), _G(), {"accumulate": True}),
     ValueError, "accumulate=True needs out="),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_combine_bad_input(make, error, match):
    w, G, kwargs = make()
    with use_backend("torch"), pytest.raises(error, match=match):
        fm.ops.combine(w, G, **kwargs)
