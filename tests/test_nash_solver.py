"""fm.solvers.nash.nash_bargaining: α > 0 with (K + r·diag K) α = 1/α, every implementation.

In the default process the ``kernels`` tests run the CPU path (numpy Newton with an early exit);
in the interpreter process (``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``)
they run the single-program Triton kernel. The torch reference is called directly.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import device_backend_params

from fastmtl.backend import use_backend
from fastmtl.solvers.nash import nash_bargaining, nash_bargaining_exact, nash_bargaining_reference

PARAMS = device_backend_params()
REG = 1e-6


def gram(T: int, kind: str = "wide", seed: int = 0, dtype=torch.float64, device="cpu"):
    """K = A Aᵀ with row norms over two decades: "wide" (N = 4T + 10, full rank), "conflict"
    (± one direction plus noise, N = 2T + 3), "low_rank" (N = max(1, T // 4): 0 in the hull)."""
    gen = torch.Generator().manual_seed(1000 * T + seed)
    N = {"low_rank": max(1, T // 4), "conflict": 2 * T + 3}.get(kind, 4 * T + 10)
    A = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if kind == "conflict":
        sign = torch.where(torch.rand(T, 1, generator=gen) < 0.5, -1.0, 1.0).double()
        A = sign * torch.randn(1, N, generator=gen, dtype=torch.float64) + 0.5 * A
    A = A * 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    return (A @ A.T).to(device=device, dtype=dtype)


def residual(alpha: torch.Tensor, K: torch.Tensor, reg: float = REG) -> float:
    """max_i |α_i ((K + reg·diag K) α)_i − 1|: the regularised Nash equations."""
    a, K = alpha.double().cpu(), K.double().cpu()
    Kr = K + reg * torch.diag(K.diagonal())
    return (a * (Kr @ a) - 1).abs().max().item()


def solve(K, backend, **kw):
    with use_backend(backend):
        return nash_bargaining(K, **kw)


CASES = [(T, kind) for T in (1, 2, 3, 5, 10) for kind in ("wide", "conflict", "low_rank")]
CASES += [(40, "wide"), (40, "low_rank")]


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", CASES, ids=[f"T{T}-{k}" for T, k in CASES])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_solves_the_regularised_equations(device, backend, T, kind):
    K = gram(T, kind, device=device)
    alpha = solve(K, backend)
    assert alpha.shape == (T,) and alpha.dtype == torch.float64 and alpha.device == K.device
    assert (alpha > 0).all()
    # 0 in the hull ("low_rank"): α̂ ~ 1/√r = 1e3 and rounding grows like ε α̂² cond.
    assert residual(alpha, K) <= (1e-7 if kind == "low_rank" else 1e-9)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 40])
def test_nash_equations_on_full_rank_gram(T):
    """(Kα)_i α_i = 1 up to the regularisation: 1 − α_i(Kα)_i = r ‖g_i‖² α_i² <= r · 30²."""
    K = gram(T, "wide", seed=1)
    alpha = nash_bargaining(K)
    nash = alpha * (K @ alpha)
    assert (nash - 1).abs().max() <= REG * 900
    torch.testing.assert_close(1 - nash, REG * K.diagonal() * alpha**2, rtol=1e-3, atol=1e-12)
    assert residual(nash_bargaining(K, reg=1e-10), K, 1e-10) <= 1e-9


@pytest.mark.parametrize("T", [1, 3, 10])
def test_scale_equivariance(T):
    """g_i → c_i g_i gives α_i → α_i / c_i (so d is unchanged)."""
    K = gram(T, "conflict", seed=2)
    c = torch.logspace(-3, 3, T, dtype=torch.float64)
    torch.testing.assert_close(nash_bargaining(K * c[:, None] * c[None, :]),
                               nash_bargaining(K) / c, rtol=1e-9, atol=0)


def test_single_task():
    """T = 1: α = 1 / (‖g‖ √(1 + r)), i.e. d = g/‖g‖ up to the regulariser."""
    K = torch.tensor([[6.25]], dtype=torch.float64)
    expected = 1 / (2.5 * math.sqrt(1 + REG))
    assert abs(nash_bargaining(K).item() - expected) <= 1e-15
    assert abs(nash_bargaining_reference(K).item() - expected) <= 1e-15


@pytest.mark.kernels
@pytest.mark.parametrize("T,kind", [(3, "conflict"), (10, "wide"), (10, "low_rank")])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_implementations_agree(device, backend, T, kind):
    K = gram(T, kind, seed=3, device=device)
    alpha = solve(K, backend)
    exact = nash_bargaining_exact(K.cpu())
    ref = nash_bargaining_reference(K)
    torch.testing.assert_close(alpha.cpu(), exact, rtol=1e-8, atol=0)
    torch.testing.assert_close(ref.cpu(), exact, rtol=1e-8, atol=0)


@pytest.mark.kernels
@pytest.mark.parametrize("case", ["duplicated", "zero_row", "all_zero", "opposite",
                                  "single_direction"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_degenerate_is_finite(device, backend, case):
    """No solution without the regulariser (0 in the hull, a zero gradient): finite, positive
    weights; duplicated gradients share their weight equally."""
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    if case == "duplicated":
        A[3] = A[1]
    elif case == "zero_row":
        A[2] = 0
    elif case == "all_zero":
        A = torch.zeros(5, 12, dtype=torch.float64)
    elif case == "opposite":
        A[1] = -A[0]
    else:
        A = A[:, :1] * torch.tensor([[1.0], [-2.0], [3.0], [0.5], [-1.0]], dtype=torch.float64)
    K = (A @ A.T).to(device)
    alpha = solve(K, backend)
    assert torch.isfinite(alpha).all() and (alpha > 0).all()
    assert residual(alpha, K) <= 1e-6 or case in ("zero_row", "all_zero")
    if case == "duplicated":
        torch.testing.assert_close(alpha[1], alpha[3], rtol=1e-9, atol=0)
    if case == "all_zero":
        torch.testing.assert_close(alpha.cpu(), torch.full((5,), REG**-0.5).double())


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_float32_and_half_input(device, backend):
    K = gram(5, "conflict", seed=5, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        alpha = solve(K.to(dtype), backend)
        assert alpha.dtype == torch.float64 and residual(alpha, K.to(dtype)) <= 1e-9


@pytest.mark.kernels
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("device,backend", PARAMS)
def test_nonfinite_gives_nan(device, backend):
    K = gram(4, device=device)
    K[0, 3] = K[3, 0] = float("nan")
    assert torch.isnan(solve(K, backend)).all()
    assert torch.isnan(nash_bargaining_reference(K, max_iter=2)).all()
    K[0, 3] = K[3, 0] = float("inf")
    assert torch.isnan(solve(K, backend)).all()


def test_budget():
    """max_iter = 0 returns the start √(T / 1ᵀK̂1)/‖g_i‖; the default budget converges."""
    K = gram(6, "conflict", seed=6)
    D = K.diagonal().sqrt()
    Kh = K / D[:, None] / D[None, :] + REG * torch.eye(6, dtype=K.dtype)
    torch.testing.assert_close(nash_bargaining_reference(K, max_iter=0),
                               (6 / Kh.sum()).sqrt() / D)
    assert residual(nash_bargaining_reference(K), K) <= 1e-12


def test_traces_under_torch_compile():
    K = gram(5, "conflict", seed=7)
    fn = torch.compile(nash_bargaining, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(K), nash_bargaining(K))


def test_bad_input():
    K = gram(3)
    with pytest.raises(ValueError, match="square"):
        nash_bargaining(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        nash_bargaining(K.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        nash_bargaining([[1.0]])
    with pytest.raises(ValueError, match="reg.*0"):
        nash_bargaining(K, reg=0.0)
    with pytest.raises(ValueError, match="max_iter.*-1"):
        nash_bargaining(K, max_iter=-1)
    with pytest.raises(ValueError, match="eps.*1"):
        nash_bargaining(K, eps=1.0)
    with pytest.raises(ValueError, match="CPU"):
        nash_bargaining_exact(K.to("meta"))
