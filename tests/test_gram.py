"""fm.ops.gram: K = G Gᵀ against a float64 reference, on every backend that can run here.

Tests marked ``kernels`` also run in the Triton-interpreter process
(``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, acc, randn
from _tolerances import RTOL, gram_error
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend

PARAMS = device_backend_params()
# 65 = the interpreter's BLOCK_N + 1; 2000 spans several N-chunks with a ragged tail.
SHAPES = [(T, N) for T in (1, 2, 3, 8, 64) for N in (1, 7, 65, 2000)]


def _check(K: torch.Tensor, G: torch.Tensor) -> None:
    T = G.shape[0]
    assert K.shape == (T, T)
    assert K.dtype == acc(G.dtype)
    assert K.device == G.device
    assert torch.equal(K, K.mT), "K is not exactly symmetric"
    # K is fp32/fp64 whatever G's dtype: only accumulation error is allowed, not input rounding.
    err = gram_error(K, G)
    assert err <= RTOL[K.dtype], f"gram error {err:.3e} > {RTOL[K.dtype]:.0e}"


@pytest.mark.kernels
@pytest.mark.parametrize("T,N", SHAPES, ids=[f"T{T}-N{N}" for T, N in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_values(device, backend, dtype, T, N):
    G = randn(T, N, dtype=dtype, device=device, seed=T * 10_000 + N)
    with use_backend(backend):
        K = fm.ops.gram(G)
    _check(K, G)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_many_row_tiles(device, backend, dtype):
    """T beyond one row tile on every configuration (off-diagonal tile pairs, ragged tile)."""
    G = randn(130, 70, dtype=dtype, device=device, seed=1)
    with use_backend(backend):
        K = fm.ops.gram(G)
    _check(K, G)


@pytest.mark.parametrize("N", [2 * 16384, 3 * 16384 + 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_gram_reference_in_chunks(dtype, N):
    """The reference sums partial Grams of 16384-column chunks (one batched matmul) and the
    ragged tail: the same K to the accumulation tolerance, exactly symmetric, with a tail."""
    from fastmtl.ops.gram import _CHUNK, gram_reference
    assert N >= 2 * _CHUNK
    G = randn(10, N, dtype=dtype, seed=N)
    _check(gram_reference(G), G)


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "expanded"])
@pytest.mark.parametrize("T,N", [(3, 1), (5, 300), (20, 129)])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_strided_input(device, backend, layout, T, N):
    if layout == "column_slice":  # row stride N + 9, unit stride along N
        G = randn(T, N + 9, device=device, seed=2)[:, 4 : 4 + N]
        assert G.stride(0) == N + 9
    elif layout == "transposed":  # unit stride along T (copied, except N = 1 where it is kept)
        G = randn(N, T, device=device, seed=3).mT
    else:  # row stride 0: the same row T times
        G = randn(1, N, device=device, seed=4).expand(T, N)
    with use_backend(backend):
        K = fm.ops.gram(G)
    _check(K, G)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_deterministic(device, backend):
    G = randn(20, 3000, device=device, seed=5)
    with use_backend(backend):
        K1 = fm.ops.gram(G)
        K2 = fm.ops.gram(G.clone())
    assert torch.equal(K1, K2)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_orthogonal_rows(device, backend):
    """Exact zeros off the diagonal and exact squared norms for disjoint one-hot-like rows."""
    T, N = 5, 200
    G = torch.zeros(T, N, device=device)
    for i in range(T):
        G[i, 37 * i : 37 * i + 4] = float(i + 1)
    with use_backend(backend):
        K = fm.ops.gram(G)
    expected = torch.diag(torch.tensor([4.0 * (i + 1) ** 2 for i in range(T)], device=device))
    assert torch.equal(K, expected)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_gradcheck(device, backend):
    G = randn(3, 10, dtype=torch.float64, device=device, seed=6).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(fm.ops.gram, (G,))
        assert torch.autograd.gradgradcheck(fm.ops.gram, (G,))


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_grad_dtype(device, backend, dtype):
    """The gradient of a half input is in its dtype and equals (dK + dKᵀ) G."""
    G = randn(4, 50, dtype=dtype, device=device, seed=7).requires_grad_()
    dK = randn(4, 4, device=device, seed=8)
    with use_backend(backend):
        (fm.ops.gram(G) * dK).sum().backward()
    assert G.grad.dtype == dtype
    ref = ((dK + dK.mT).double() @ G.detach().double()).to(dtype)
    torch.testing.assert_close(G.grad, ref, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_gram_compile(device, backend):
    torch._dynamo.reset()
    G = randn(6, 100, device=device, seed=9)
    with use_backend(backend):
        compiled = torch.compile(fm.ops.gram, fullgraph=True, backend="aot_eager")
        K = compiled(G)
        eager = fm.ops.gram(G)
    _check(K, G)
    assert torch.equal(K, eager)


# ---------------------------------------------------------------------------- bad input

BAD = [
    ("not a tensor", lambda: [[1.0, 2.0]], TypeError, "torch.Tensor"),
    ("1-D", lambda: torch.ones(5), ValueError, "2-D"),
    ("3-D", lambda: torch.ones(2, 3, 4), ValueError, "2-D"),
    ("integer", lambda: torch.ones(2, 3, dtype=torch.int64), TypeError, "floating"),
    ("bool", lambda: torch.ones(2, 3, dtype=torch.bool), TypeError, "floating"),
    ("T=0", lambda: torch.ones(0, 3), ValueError, r"T >= 1"),
    ("N=0", lambda: torch.ones(3, 0), ValueError, r"N >= 1"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_gram_bad_input(make, error, match):
    with use_backend("torch"), pytest.raises(error, match=match):
        fm.ops.gram(make())
