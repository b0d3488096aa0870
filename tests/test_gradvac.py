"""fastmtl.aggregators.gradvac.GradVac: cosine targets with an EMA, in coefficient space."""

from __future__ import annotations

import math

import pytest
import torch
from test_pcgrad import problem

from fastmtl.aggregators.gradvac import GradVac
from fastmtl.aggregators.pcgrad import PCGrad
from fastmtl.solvers.surgery import task_orders


def gradvac_vectors(G: torch.Tensor, orders: torch.Tensor, ema: torch.Tensor, beta: float):
    """Algorithm 1 of Wang et al. on explicit gradients: (G', updated EMA)."""
    out, ema = G.clone(), ema.clone()
    for i in range(G.shape[0]):
        for j in orders[i].tolist():
            ni, nj = out[i].norm(), G[j].norm()
            phi = (out[i] @ G[j]) / (ni * nj)
            target = ema[i, j]
            if phi < target:
                x = ni * (target * (1 - phi**2).sqrt() - phi * (1 - target**2).sqrt()) / (
                    nj * (1 - target**2).sqrt())
                out[i] = out[i] + x * G[j]
            ema[i, j] = (1 - beta) * target + beta * phi
    return out, ema


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_matches_vector_implementation(T):
    """d, G' and the EMA against the algorithm on explicit gradients, over several calls with
    fresh gradients (the EMA carries over)."""
    agg = GradVac(beta=0.3, seed=13, return_projected=True)
    ema = torch.zeros(T, T, dtype=torch.float64)
    for step in range(4):
        G = problem(T, seed=100 * T + step)
        ref, ema = gradvac_vectors(G, task_orders(T, 13, torch.tensor(step)), ema, 0.3)
        d, projected = agg(G)
        scale = G.abs().max().item()
        torch.testing.assert_close(projected, ref, rtol=1e-9, atol=1e-11 * scale)
        torch.testing.assert_close(d, ref.sum(0), rtol=1e-9, atol=1e-10 * scale)
        torch.testing.assert_close(agg.state_dict()["state"]["ema"], ema, rtol=1e-9, atol=1e-12)


def test_beta_zero_is_pcgrad():
    """φ̂ ≡ 0: the same loop gives PCGrad's weights exactly, call after call."""
    pc, gv = PCGrad(seed=21), GradVac(beta=0.0, seed=21)
    for step in range(4):
        K = (lambda G: G @ G.T)(problem(6, seed=step))
        assert torch.equal(gv.weights(K), pc.weights(K))
    assert torch.equal(gv.state_dict()["state"]["ema"], torch.zeros(6, 6, dtype=torch.float64))


def test_first_step_ema_and_targets_are_reached():
    """From φ̂ = 0 the first step is PCGrad and φ̂ = β φ (the pre-correction cosine); with a
    positive target every corrected pair reaches cos(g'_i, g_j) = φ̂_ij (T = 2)."""
    G = problem(2, seed=31)
    G[1] = -G[0] + 0.5 * G[1]
    K = G @ G.T
    cos = K[0, 1] / K.diagonal().prod().sqrt()
    agg = GradVac(beta=0.25, seed=0, return_projected=True)
    d, projected = agg(G)
    torch.testing.assert_close(d, PCGrad(seed=0)(G))
    ema = agg.state_dict()["state"]["ema"]
    torch.testing.assert_close(ema, torch.tensor([[0, 1], [1, 0]], dtype=K.dtype) * 0.25 * cos)
    state = agg.state_dict()
    state["state"]["ema"] = torch.tensor([[0.0, 0.4], [0.7, 0.0]], dtype=K.dtype)
    agg.load_state_dict(state)
    _, projected = agg(G)
    for i, j, target in [(0, 1, 0.4), (1, 0, 0.7)]:
        c = projected[i] @ G[j] / (projected[i].norm() * G[j].norm())
        torch.testing.assert_close(c, torch.tensor(target, dtype=K.dtype))


@pytest.mark.parametrize("case", ["zero", "duplicate", "opposite", "rank_deficient", "all_zero",
                                  "target_one"])
def test_degenerate_gradients_are_finite(case):
    G = problem(5, N=3 if case == "rank_deficient" else 40, seed=5)
    if case == "zero":
        G[2] = 0
    elif case in ("duplicate", "target_one"):
        G[3] = G[1]
    elif case == "opposite":
        G[3] = -G[1]
    elif case == "all_zero":
        G.zero_()
    agg = GradVac(beta=1.0 if case == "target_one" else 0.5, seed=2)
    for _ in range(4):
        w = agg.weights(G @ G.T)
        assert torch.isfinite(w).all()
        assert torch.isfinite(agg.state_dict()["state"]["ema"]).all()
    if case == "all_zero":
        assert torch.equal(w, torch.ones(5, dtype=G.dtype))


def test_state_round_trip_and_reset():
    Ks = [(lambda G: G @ G.T)(problem(4, seed=s)) for s in range(4)]
    a = GradVac(beta=0.2, seed=8)
    a.weights(Ks[0])
    a.weights(Ks[1])
    state = a.state_dict()
    b = GradVac(beta=0.2, seed=8)
    b.load_state_dict(state)
    for K in Ks[2:]:
        assert torch.equal(a.weights(K), b.weights(K))
    a.reset()
    assert torch.equal(a.weights(Ks[0]), GradVac(beta=0.2, seed=8).weights(Ks[0]))


def test_mean_reduction():
    K = (lambda G: G @ G.T)(problem(5, seed=9))
    torch.testing.assert_close(GradVac(seed=3, reduction="mean").weights(K),
                               GradVac(seed=3).weights(K) / 5)


@pytest.mark.parametrize("T", [2, 5])
def test_traces_under_torch_compile(T):
    torch._dynamo.reset()  # recompiles of Aggregator.weights add up over instances
    agg, ref = GradVac(beta=0.5, seed=4), GradVac(beta=0.5, seed=4)
    compiled = torch.compile(agg.weights, fullgraph=True, backend="aot_eager")
    for step in range(3):
        K = (lambda G: G @ G.T)(problem(T, seed=step, dtype=torch.float32))
        torch.testing.assert_close(compiled(K), ref.weights(K))
    torch.testing.assert_close(agg.state_dict()["state"], ref.state_dict()["state"])


@pytest.mark.compare
@pytest.mark.parametrize("T", [2, 3, 5])
def test_matches_torchjd(T):
    """torchjd's GradVacWeighting (eps=0) over several calls, replaying its orders (one
    torch.randperm(T − 1) over the other tasks per task, global RNG) through our class."""
    aggregation = pytest.importorskip("torchjd.aggregation")

    class Replayed(GradVac):
        def _orders(self, K, state):
            state["counter"].add_(1)
            return self.next_orders

    theirs = aggregation.GradVacWeighting(beta=0.5, eps=0.0)
    ours = Replayed(beta=0.5, seed=0)
    for step in range(4):
        K = (lambda G: G @ G.T)(problem(T, seed=50 + step))
        torch.manual_seed(step)
        ours.next_orders = torch.stack([
            torch.tensor([j for j in range(T) if j != i], dtype=torch.int64)[torch.randperm(T - 1)]
            for i in range(T)])
        torch.manual_seed(step)
        torch.testing.assert_close(ours.weights(K), theirs(K), rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    for beta in (-0.1, 1.5, math.nan, "0.1", True):
        with pytest.raises(ValueError, match="beta"):
            GradVac(beta=beta)
    with pytest.raises(ValueError, match="reduction.*'max'"):
        GradVac(reduction="max")
    with pytest.raises(ValueError, match="seed.*-2"):
        GradVac(seed=-2)
    assert "beta=0.01" in repr(GradVac())
