"""fastmtl.aggregators.pcgrad.PCGrad: gradient surgery in coefficient space from K."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from fastmtl.aggregators.pcgrad import PCGrad
from fastmtl.solvers.surgery import surgery_coefficients, task_orders


def problem(T: int, N: int = 40, seed: int = 0, dtype=torch.float64):
    """Gradients with norms over two decades and a shared component of random sign, so that
    many pairs conflict."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=gen, dtype=torch.float64)
    G += torch.randn(1, N, generator=gen, dtype=torch.float64) * torch.randn(T, 1, generator=gen,
                                                                             dtype=torch.float64)
    G *= 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
    return G.to(dtype)


def pcgrad_vectors(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad on explicit gradients (the paper's Algorithm 1): the projected rows G'."""
    out = G.clone()
    for i in range(G.shape[0]):
        for j in orders[i].tolist():
            dot = out[i] @ G[j]
            if dot < 0:
                out[i] = out[i] - dot / (G[j] @ G[j]) * G[j]
    return out


def test_two_tasks_closed_form():
    G = torch.tensor([[1.0, 0.0, 1.0], [-2.0, 1.0, 0.5]], dtype=torch.float64)
    K = G @ G.T
    k = K[0, 1]
    assert k < 0
    # g'_1 = g_1 - k/‖g_2‖² g_2 and g'_2 = g_2 - k/‖g_1‖² g_1: w_i = 1 - k/‖g_i‖²
    expected = 1 - k / K.diagonal()
    torch.testing.assert_close(PCGrad(seed=0).weights(K), expected)
    G[1] = -G[1]  # no conflict: the plain sum
    assert torch.equal(PCGrad(seed=0).weights(G @ G.T), torch.ones(2, dtype=G.dtype))


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_matches_vector_implementation(T):
    """d and G' against Algorithm 1 on explicit gradients with the same random orders, over
    several calls (the orders change with the call counter)."""
    G = problem(T, seed=T)
    agg = PCGrad(seed=11, return_projected=True)
    for step in range(3):
        orders = task_orders(T, 11, torch.tensor(step))
        ref = pcgrad_vectors(G, orders)
        d, projected = agg(G)
        torch.testing.assert_close(projected, ref, rtol=1e-10, atol=1e-12 * G.abs().max().item())
        torch.testing.assert_close(d, ref.sum(0), rtol=1e-10, atol=1e-10 * G.abs().max().item())
    assert agg.step == 3


def test_two_tasks_projected_rows_do_not_conflict():
    """T = 2: each projected gradient is orthogonal to the other task's gradient."""
    G = problem(2, seed=3)
    G[1] = -G[0] + 0.1 * G[1]
    _, projected = PCGrad(seed=0, return_projected=True)(G)
    inner = projected @ G.T
    assert inner[0, 1] >= -1e-10 * inner.abs().max() and inner[1, 0] >= -1e-10 * inner.abs().max()


def test_mean_reduction_and_single_task():
    G = problem(5, seed=4)
    K = G @ G.T
    torch.testing.assert_close(PCGrad(seed=3, reduction="mean").weights(K),
                               PCGrad(seed=3).weights(K) / 5)
    assert torch.equal(PCGrad(seed=0).weights(K[:1, :1]), torch.ones(1, dtype=K.dtype))


@pytest.mark.parametrize("case", ["zero", "duplicate", "opposite", "rank_deficient", "all_zero"])
def test_degenerate_gradients_are_finite(case):
    G = problem(5, N=3 if case == "rank_deficient" else 40, seed=5)
    if case == "zero":
        G[2] = 0
    elif case == "duplicate":
        G[3] = G[1]
    elif case == "opposite":
        G[3] = -G[1]
    elif case == "all_zero":
        G.zero_()
    agg = PCGrad(seed=2)
    for _ in range(3):
        w = agg.weights(G @ G.T)
        assert torch.isfinite(w).all()
    if case in ("zero", "all_zero"):
        assert w[2] == 1  # nothing is projected onto a zero gradient
    if case == "all_zero":
        assert torch.equal(w, torch.ones(5, dtype=G.dtype))


def test_orders_are_random_permutations_of_the_other_tasks():
    seen = set()
    for step in range(200):
        orders = task_orders(4, 7, torch.tensor(step))
        for i, row in enumerate(orders.tolist()):
            assert sorted(row) == [j for j in range(4) if j != i]
        seen.add(tuple(orders[0].tolist()))
    assert len(seen) == 6  # every order of the 3 other tasks occurs


def test_seed_reproducibility_and_state_round_trip():
    K = (lambda G: G @ G.T)(problem(6, seed=6))
    a, b = PCGrad(seed=5), PCGrad(seed=5)
    assert torch.equal(a.weights(K), b.weights(K))
    state = a.state_dict()
    w_next = a.weights(K)
    c = PCGrad(seed=5)
    c.load_state_dict(state)
    assert torch.equal(c.weights(K), w_next)
    a.reset()
    assert torch.equal(a.weights(K), PCGrad(seed=5).weights(K))
    torch.manual_seed(0)
    s1 = PCGrad().seed
    torch.manual_seed(0)
    assert PCGrad().seed == s1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_devices_and_dtypes_agree(device, dtype):
    """The orders are a hash of (seed, call count): the same weights on every device."""
    G = problem(7, seed=7)
    K = (G @ G.T).to(device=device, dtype=dtype)
    w = PCGrad(seed=9).weights(K)
    assert w.device == K.device and w.dtype == dtype
    ref = PCGrad(seed=9).weights(G @ G.T)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(w.double().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [2, 5])
def test_traces_under_torch_compile(T):
    torch._dynamo.reset()  # recompiles of Aggregator.weights add up over instances
    K = (lambda G: G @ G.T)(problem(T, seed=8, dtype=torch.float32))
    agg, ref = PCGrad(seed=4), PCGrad(seed=4)
    compiled = torch.compile(agg.weights, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(K), ref.weights(K))


@pytest.mark.compare
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_matches_torchjd(T):
    """torchjd draws one torch.randperm(T) per task from the global RNG (skipping i): replay
    those orders through the same coefficient loop."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    G = problem(T, seed=20 + T)
    K = G @ G.T
    torch.manual_seed(123)
    orders = torch.stack([torch.tensor([j for j in torch.randperm(T).tolist() if j != i],
                                       dtype=torch.int64) for i in range(T)])
    torch.manual_seed(123)
    theirs = aggregation.PCGradWeighting()(K)
    ours = surgery_coefficients(K, orders)[0].sum(0)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    if T == 2:  # orders do not matter: the aggregator itself, on G
        torch.testing.assert_close(PCGrad(seed=0)(G), aggregation.PCGrad()(G))


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed.*-1"):
        PCGrad(seed=-1)
    with pytest.raises(ValueError, match="seed.*1.5"):
        PCGrad(seed=1.5)
    with pytest.raises(ValueError, match="reduction.*'max'"):
        PCGrad(reduction="max")
    with pytest.raises(ValueError, match="return_projected"):
        PCGrad(return_projected=1)
    with pytest.raises(ValueError, match="square"):
        PCGrad().weights(torch.ones(2, 3))
    assert "seed=3" in repr(PCGrad(seed=3))
