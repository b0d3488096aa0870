"""fm.ops.project: P = C G (optionally into ``out``) against a float64 reference.

Tests marked ``kernels`` also run in the Triton-interpreter process
(``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, OUT_DTYPES, acc, dtype_id, randn
from _tolerances import RTOL, project_error
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
# T' in {1, T, 2T+1}: one row, the PCGrad/GradVac square case, and more rows than tasks (beyond
# one row tile at T = 64). 257 = the interpreter's BLOCK_N + 1; 2000 spans many column blocks
# with a ragged tail.
SHAPES = [(T, TP, N) for T in (1, 2, 3, 8, 64) for TP in dict.fromkeys((1, T, 2 * T + 1))
          for N in (1, 7, 257, 2000)]


def _assert_close(P: torch.Tensor, C: torch.Tensor, G: torch.Tensor) -> None:
    err = project_error(P, C, G)
    assert err <= RTOL[P.dtype], f"project error {err:.3e} > {RTOL[P.dtype]:.0e}"


@pytest.mark.kernels
@pytest.mark.parametrize("T,TP,N", SHAPES, ids=[f"T{T}-TP{TP}-N{N}" for T, TP, N in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_values(device, backend, dtype, T, TP, N):
    G = randn(T, N, dtype=dtype, device=device, seed=T * 10_000 + N)
    C = randn(TP, T, dtype=acc(dtype), device=device, seed=T * 1000 + TP)
    with use_backend(backend):
        P = fm.ops.project(C, G)
    assert P.shape == (TP, N) and P.dtype == dtype and P.device == G.device
    assert P.is_contiguous()
    _assert_close(P, C, G)


@pytest.mark.kernels
@pytest.mark.parametrize("T,TP", [(1, 9), (2, 16), (8, 64), (3, 40)])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_tall_c_is_ieee_fp32(device, backend, T, TP):
    """A tall C (T' >= 9) over few tasks (T <= 8): the kernel's one-row chunks, which Triton's
    compiler once turned into a TF32 dot (~1e-3 relative error; the interpreter cannot show
    it, ``fastmtl.kernels.aot`` can). fp32 against float64 at 1e-5."""
    G = randn(T, 1000, dtype=torch.float32, device=device, seed=T)
    C = randn(TP, T, dtype=torch.float32, device=device, seed=TP)
    with use_backend(backend):
        P = fm.ops.project(C, G)
    err = project_error(P, C, G)
    assert err <= 1e-5, f"project error {err:.3e} > 1e-5"


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_c_in_input_dtype(device, backend, dtype):
    """C in G's dtype gives exactly what the same values in the accumulation dtype give."""
    G = randn(5, 300, dtype=dtype, device=device, seed=1)
    C = randn(7, 5, dtype=dtype, device=device, seed=2)
    with use_backend(backend):
        P_low = fm.ops.project(C, G)
        P_acc = fm.ops.project(C.to(acc(dtype)), G)
    assert torch.equal(P_low, P_acc)
    _assert_close(P_low, C, G)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype,odt", OUT_DTYPES,
                         ids=[f"{dtype_id(d)}-out_{dtype_id(o)}" for d, o in OUT_DTYPES])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_out_slice(device, backend, dtype, odt):
    """out= a (T', N) view of a slice of a bigger flat buffer: it gets C G, the rest is intact."""
    T, TP, N, lo = 3, 4, 130, 5
    G = randn(T, N, dtype=dtype, device=device, seed=3)
    C = randn(TP, T, dtype=acc(dtype), device=device, seed=4)
    buf = randn(TP * N + 13, dtype=odt, device=device, seed=5)
    before = buf.clone()
    out = buf[lo : lo + TP * N].view(TP, N)
    with use_backend(backend):
        res = fm.ops.project(C, G, out=out)
    assert res is out
    assert torch.equal(buf[:lo], before[:lo])
    assert torch.equal(buf[lo + TP * N :], before[lo + TP * N :])
    _assert_close(out, C, G)
    if odt == dtype:  # the out= form computes what the functional form computes
        with use_backend(backend):
            assert torch.equal(out, fm.ops.project(C, G))


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "expanded"])
@pytest.mark.parametrize("T,TP,N", [(3, 2, 1), (5, 5, 300), (20, 41, 129)])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_strided_input(device, backend, layout, T, TP, N):
    if layout == "column_slice":  # row stride N + 9, unit stride along N
        G = randn(T, N + 9, device=device, seed=8)[:, 4 : 4 + N]
        assert G.stride(0) == N + 9
    elif layout == "transposed":  # unit stride along T (copied, except N = 1 where it is kept)
        G = randn(N, T, device=device, seed=9).mT
    else:  # row stride 0: the same row T times
        G = randn(1, N, device=device, seed=10).expand(T, N)
    C = randn(T, 2 * TP, device=device, seed=11).mT[::2]  # C with strides (2, 2 * TP)
    assert not C.is_contiguous()
    with use_backend(backend):
        P = fm.ops.project(C, G)
    _assert_close(P, C, G)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_deterministic(device, backend):
    G = randn(20, 3000, dtype=torch.bfloat16, device=device, seed=12)
    C = randn(41, 20, device=device, seed=13)
    with use_backend(backend):
        P1 = fm.ops.project(C, G)
        P2 = fm.ops.project(C.clone(), G.clone())
    assert torch.equal(P1, P2)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_selects_rows(device, backend, dtype):
    """Identity C returns G exactly, a permutation permutes its rows, C = 0 gives exact zeros."""
    T, N = 6, 150
    G = randn(T, N, dtype=dtype, device=device, seed=14)
    perm = torch.tensor([3, 0, 5, 1, 1, 4, 2, 0])  # repeats: a selection, T' = 8
    eye = torch.eye(T, device=device)
    with use_backend(backend):
        assert torch.equal(fm.ops.project(eye, G), G)
        assert torch.equal(fm.ops.project(eye[perm], G), G[perm])
        assert torch.equal(fm.ops.project(torch.zeros(5, T, device=device), G),
                           torch.zeros(5, N, dtype=dtype, device=device))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_gradcheck(device, backend):
    G = randn(2, 5, dtype=torch.float64, device=device, seed=15).requires_grad_()
    C = randn(3, 2, dtype=torch.float64, device=device, seed=16).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(fm.ops.project, (C, G))
        assert torch.autograd.gradgradcheck(fm.ops.project, (C, G))


@pytest.mark.kernels
@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_grad_dtype(device, backend, cdt):
    """Half G: dG in G's dtype = Cᵀ dP, dC in C's dtype = dP Gᵀ (computed in float32)."""
    G = randn(4, 50, dtype=torch.bfloat16, device=device, seed=17).requires_grad_()
    C = randn(5, 4, dtype=cdt, device=device, seed=18).requires_grad_()
    dP = randn(5, 50, device=device, seed=19)
    with use_backend(backend):
        (fm.ops.project(C, G) * dP).sum().backward()
    dP_in = dP.to(torch.bfloat16).double()  # P is bf16, so the incoming gradient is too
    assert G.grad.dtype == torch.bfloat16 and C.grad.dtype == cdt
    ref_dG = (C.detach().double().mT @ dP_in).to(torch.bfloat16)
    ref_dC = (dP_in @ G.detach().double().mT).to(cdt)
    tol = RTOL[torch.bfloat16]
    torch.testing.assert_close(G.grad, ref_dG, rtol=tol, atol=tol)
    torch.testing.assert_close(C.grad, ref_dC, rtol=tol, atol=tol)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_out_under_no_grad(device, backend):
    """out= refuses autograd inputs only while grad mode is on."""
    G = randn(4, 70, device=device, seed=20).requires_grad_()
    C = randn(4, 4, device=device, seed=21).requires_grad_()
    out = torch.zeros(4, 70, device=device)
    with use_backend(backend), torch.no_grad():
        fm.ops.project(C, G, out=out)
    _assert_close(out, C.detach(), G.detach())


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_compile(device, backend):
    torch._dynamo.reset()
    G = randn(6, 100, device=device, seed=22)
    C = randn(6, 6, device=device, seed=23)

    def step(C, G, out):
        P = fm.ops.project(C, G)
        fm.ops.project(C, G, out=out)
        return P

    out = torch.zeros(6, 100, device=device)
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        P = compiled(C, G, out)
        eager = fm.ops.project(C, G)
    assert torch.equal(P, eager) and torch.equal(out, eager)
    _assert_close(P, C, G)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_project_compile_backward(device, backend):
    """The registered backward traces too (aot_eager compiles the backward graph)."""
    torch._dynamo.reset()
    G = randn(3, 40, device=device, seed=24)
    C = randn(5, 3, device=device, seed=25)
    weight = randn(5, 40, device=device, seed=26)

    def loss(C, G):
        return (fm.ops.project(C, G) * weight).sum()

    grads = []
    with use_backend(backend):
        for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
            Cg, Gg = C.clone().requires_grad_(), G.clone().requires_grad_()
            fn(Cg, Gg).backward()
            grads.append((Cg.grad, Gg.grad))
    (dC, dG), (dC_c, dG_c) = grads
    torch.testing.assert_close(dC_c, dC, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dG_c, dG, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dG, C.mT @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dC, weight @ G.mT, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bad input

def _G() -> torch.Tensor:
    return torch.ones(3, 5)


BAD = [
    ("G not a tensor", lambda: (torch.ones(2, 3), [[1.0] * 5] * 3, {}), TypeError, "G must be"),
    ("C not a tensor", lambda: ([[1.0, 2.0, 3.0]], _G(), {}), TypeError, "C must be"),
    ("G 1-D", lambda: (torch.ones(2, 3), torch.ones(5), {}), ValueError, "G must be 2-D"),
    ("G 3-D", lambda: (torch.ones(2, 3), torch.ones(3, 5, 1), {}), ValueError, "G must be 2-D"),
    ("G integer", lambda: (torch.ones(2, 3), torch.ones(3, 5, dtype=torch.int32), {}),
     TypeError, "floating"),
    ("T=0", lambda: (torch.ones(2, 0), torch.ones(0, 5), {}), ValueError, "T >= 1"),
    ("N=0", lambda: (torch.ones(2, 3), torch.ones(3, 0), {}), ValueError, "N >= 1"),
    ("C 1-D", lambda: (torch.ones(3), _G(), {}), ValueError, r"C must be 2-D of shape \(T', 3\)"),
    ("C 3-D", lambda: (torch.ones(2, 3, 1), _G(), {}), ValueError, r"shape \(T', 3\)"),
    ("C mismatched T", lambda: (torch.ones(3, 2), _G(), {}), ValueError,
     r"shape \(T', 3\).*got \(3, 2\)"),
    ("C with T'=0", lambda: (torch.ones(0, 3), _G(), {}), ValueError, "T' >= 1"),
    ("C fp64 for fp32 G", lambda: (torch.ones(2, 3, dtype=torch.float64), _G(), {}),
     TypeError, "C has dtype torch.float64"),
    ("C fp16 for fp32 G", lambda: (torch.ones(2, 3, dtype=torch.float16), _G(), {}),
     TypeError, "C has dtype torch.float16"),
    ("C bf16 for fp16 G", lambda: (torch.ones(2, 3, dtype=torch.bfloat16),
                                   _G().half(), {}), TypeError, "C has dtype torch.bfloat16"),
    ("C integer", lambda: (torch.ones(2, 3, dtype=torch.int64), _G(), {}), TypeError, "int64"),
    ("C on another device", lambda: (torch.ones(2, 3, device="meta"), _G(), {}),
     ValueError, "C is on meta but G is on cpu"),
    ("out wrong shape", lambda: (torch.ones(2, 3), _G(), {"out": torch.empty(3, 5)}),
     ValueError, r"out must have shape \(2, 5\)"),
    ("out 1-D", lambda: (torch.ones(1, 3), _G(), {"out": torch.empty(5)}),
     ValueError, r"out must have shape \(1, 5\)"),
    ("out wrong dtype", lambda: (torch.ones(2, 3), _G(),
                                 {"out": torch.empty(2, 5, dtype=torch.float64)}),
     TypeError, "out has dtype torch.float64"),
    ("out half for fp32 G", lambda: (torch.ones(2, 3), _G(),
                                     {"out": torch.empty(2, 5, dtype=torch.bfloat16)}),
     TypeError, "out has dtype torch.bfloat16"),
    ("out non-contiguous", lambda: (torch.ones(2, 3), _G(), {"out": torch.empty(5, 2).mT}),
     ValueError, "contiguous"),
    ("out on another device", lambda: (torch.ones(2, 3), _G(),
                                       {"out": torch.empty(2, 5, device="meta")}),
     ValueError, "out is on meta"),
    ("out not a tensor", lambda: (torch.ones(2, 3), _G(), {"out": [[0.0] * 5] * 2}),
     TypeError, "out must be"),
    ("out= with requires_grad C", lambda: (torch.ones(2, 3, requires_grad=True), _G(),
                                           {"out": torch.empty(2, 5)}), RuntimeError, "autograd"),
    ("out= with requires_grad G", lambda: (torch.ones(2, 3), _G().requires_grad_(),
                                           {"out": torch.empty(2, 5)}), RuntimeError, "autograd"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_project_bad_input(make, error, match):
    C, G, kwargs = make()
    with use_backend("torch"), pytest.raises(error, match=match):
        fm.ops.project(C, G, **kwargs)
