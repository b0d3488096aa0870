"""fastmtl.aggregators.cdtt.CDTT: EDM direction + task tensioners, in coefficient space."""

from __future__ import annotations

import math

import pytest
import torch

from fastmtl.aggregators.cdtt import CDTT, tensions
from fastmtl.solvers import min_norm_simplex_exact
from fastmtl.solvers.central import central_coefficients


def run(T: int, steps: int, seed: int = 0, N: int = 30, dtype=torch.float64, conflict=True,
        spread=False):
    """A sequence of (G, losses): norms drifting over the steps, losses around 1. ``spread``:
    norms from 0.01 to 1, so that the unit-length tensions dominate and the non-conflict
    projection runs."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(T, N, generator=gen, dtype=torch.float64)
    if not conflict:  # every pair of gradients agrees: all entries >= 0
        base = base.abs()
    scale = 10 ** (torch.rand(T, 1, generator=gen, dtype=torch.float64) - 0.5)
    if spread:
        scale = torch.logspace(-2, 0, T, dtype=torch.float64)[:, None]
    out = []
    for t in range(steps):
        noise = 0.3 * torch.randn(T, N, generator=gen, dtype=torch.float64)
        G = (base + (noise.abs() if not conflict else noise)) * scale * (1 + 0.05 * t)
        losses = 0.2 + 2 * torch.rand(T, generator=gen, dtype=torch.float64)
        out.append((G.to(dtype), losses.to(dtype)))
    return out


class CDTTVectors:
    """The method on explicit gradients, following Gama's code (angles, tan, a ring buffer)."""

    def __init__(self, T: int, alpha: float, window: int = 10):
        self.alpha, self.window = alpha, window
        self.history = torch.zeros(T, window, dtype=torch.float64)
        self.iterations, self.prev = 0, None

    def __call__(self, G: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        n = G.norm(dim=1)
        if (n == 0).any():
            return torch.zeros(G.shape[1], dtype=G.dtype)
        self.history[:, self.iterations % self.window] = n
        self.iterations += 1
        U = G / n[:, None]
        alpha = min_norm_simplex_exact(U @ U.T)
        d = (alpha @ U) / (alpha / n).sum()
        if self.iterations >= self.window:
            zeta = self.history.sum(1)
            if self.prev is not None:
                v = d.clone()
                for i in range(G.shape[0]):
                    delta = zeta[i] / self.prev[i] + torch.log10(losses[i])
                    c = self.alpha / (1 + math.exp(-delta * math.e + math.e)) + 1 - self.alpha
                    r = (G[i] - d).norm()
                    if r > 1e-6 * n[i]:  # g_i = d* (T = 1): no unit vector, tension dropped
                        v += c * (G[i] - d) / r
                for i in range(G.shape[0]):
                    angle = torch.arccos(G[i] @ v / (n[i] * v.norm()))
                    if angle > math.pi / 2:
                        u = G[i] / n[i]
                        w = v - (v @ u) * u
                        diff = v - G[i]
                        beta = math.pi - torch.arccos(G[i] @ diff / (n[i] * diff.norm()))
                        v = torch.tan(beta) * n[i] * w / w.norm()
                d = v
            self.prev = zeta
        return d


def test_tensions_lie_in_the_documented_range():
    gen = torch.Generator().manual_seed(0)
    zeta_prev = 1 + torch.rand(1000, generator=gen, dtype=torch.float64)
    zeta = zeta_prev * (0.5 + torch.rand(1000, generator=gen, dtype=torch.float64))
    losses = 10 ** (4 * torch.rand(1000, generator=gen, dtype=torch.float64) - 2)
    for alpha in (0.0, 0.3, 1.0):
        c = tensions(zeta, zeta_prev, losses, alpha)
        assert (c > 1 - alpha - 1e-15).all() and (c <= 1).all()
        if alpha > 0:
            assert (c > 1 - alpha).all()  # strictly, for moderate δ
    extreme = tensions(torch.ones(3), torch.ones(3), torch.tensor([0.0, -1.0, 1e30]), 0.3)
    torch.testing.assert_close(extreme, torch.tensor([0.7, 0.7, 1.0]))


@pytest.mark.parametrize("spread", [False, True], ids=["tension", "projection"])
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_matches_vector_implementation(T, spread):
    """20 steps (warm-up and tensioned) against the method on explicit gradients; with
    ``spread`` the non-conflict projection runs in most tensioned steps (T >= 2)."""
    agg, ref = CDTT(alpha=0.6), CDTTVectors(T, alpha=0.6)
    for step, (G, losses) in enumerate(run(T, 20, seed=T + 2, spread=spread)):
        d = agg(G, losses)
        d_ref = ref(G, losses)
        torch.testing.assert_close(d, d_ref, rtol=1e-7, atol=1e-8 * G.norm(dim=1).max().item(),
                                   msg=f"step {step}")


def test_warm_up_is_the_edm_direction():
    """The first `window` steps return the EDM coefficients; tensions start on step 11."""
    agg = CDTT()
    for step, (G, losses) in enumerate(run(4, 12, seed=1)):
        K = G @ G.T
        w = agg.weights(K, losses)
        a = central_coefficients(K)
        if step < 10:
            torch.testing.assert_close(w, a)
        else:
            assert not torch.allclose(w, a)
    assert agg.state_dict()["state"]["count"] == 11


@pytest.mark.parametrize("T,conflict", [(2, True), (3, False), (5, False)])
def test_direction_does_not_conflict_after_the_projection(T, conflict):
    """⟨g_i, v⟩ >= 0 for every task once tensions apply: for any T when no two gradients
    conflict (by construction), and for T = 2 (observed, not proven); for T >= 3 with
    conflicting pairs the single pass can leave a conflict (module docstring). Some of these
    steps do need the projection."""
    agg, projected = CDTT(alpha=1.0), 0
    for G, losses in run(T, 40, seed=10 + T, N=6, conflict=conflict, spread=True):
        K = G @ G.T
        w = agg.weights(K, losses)
        inner = K @ w
        assert (inner >= -1e-10 * K.diagonal().sqrt() * (w @ K @ w).sqrt()).all()
        if (inner.abs() <= 1e-10 * K.diagonal().sqrt() * (w @ K @ w).sqrt()).any():
            projected += 1  # a task sits on its hyperplane: its projection ran
    assert projected > 0


def test_zero_gradient_gives_zero_and_is_not_recorded():
    agg = CDTT()
    steps = run(3, 12, seed=2)
    for G, losses in steps[:11]:
        agg.weights(G @ G.T, losses)
    before = agg.state_dict()
    G, losses = steps[11]
    G[1] = 0
    assert torch.equal(agg.weights(G @ G.T, losses), torch.zeros(3, dtype=G.dtype))
    after = agg.state_dict()
    assert torch.equal(after["state"]["norms"], before["state"]["norms"])
    assert torch.equal(after["state"]["count"], before["state"]["count"])
    assert after["step"] == before["step"] + 1


@pytest.mark.parametrize("case", ["duplicate", "rank_deficient", "all_zero", "bad_losses"])
def test_degenerate_inputs_are_finite(case):
    agg = CDTT()
    for G, losses in run(5, 14, seed=3, N=3 if case == "rank_deficient" else 30):
        if case == "duplicate":
            G[3] = G[1]
        elif case == "all_zero":
            G.zero_()
        elif case == "bad_losses":
            losses[0], losses[2] = 0.0, -1.0
        w = agg.weights(G @ G.T, losses)
        assert torch.isfinite(w).all()


def test_single_task_is_the_gradient():
    agg = CDTT()
    for G, losses in run(1, 14, seed=4):
        assert torch.equal(agg.weights(G @ G.T, losses), torch.ones(1, dtype=G.dtype))


def test_state_dict_round_trip_mid_run():
    steps = run(4, 16, seed=5)
    agg = CDTT(alpha=0.5)
    for G, losses in steps[:12]:
        agg.weights(G @ G.T, losses)
    clone = CDTT(alpha=0.5)
    clone.load_state_dict(agg.state_dict())
    for G, losses in steps[12:]:
        assert torch.equal(clone.weights(G @ G.T, losses), agg.weights(G @ G.T, losses))
    agg.reset()
    assert agg.state_dict()["state"] == {} and agg.step == 0


@pytest.mark.parametrize("T", [2, 5])
def test_traces_under_torch_compile(T):
    """Through the warm-up and into the tensioned steps."""
    torch._dynamo.reset()  # recompiles of Aggregator.weights add up over instances
    agg, ref = CDTT(), CDTT()
    compiled = torch.compile(agg.weights, fullgraph=True, backend="aot_eager")
    for G, losses in run(T, 13, seed=6, dtype=torch.float32):
        K = G @ G.T
        torch.testing.assert_close(compiled(K, losses), ref.weights(K, losses),
                                   rtol=1e-4, atol=1e-6)


def test_nonfinite_gram_gives_nan_without_checks():
    K = torch.eye(3, dtype=torch.float64)
    K[0, 1] = K[1, 0] = float("nan")
    assert torch.isnan(CDTT(check=False).weights(K, torch.ones(3, dtype=K.dtype))).any()


def test_bad_arguments():
    for alpha in (-0.1, 1.5, math.inf, True):
        with pytest.raises(ValueError, match="alpha"):
            CDTT(alpha=alpha)
    with pytest.raises(ValueError, match="window.*0"):
        CDTT(window=0)
    with pytest.raises(ValueError, match="max_iter.*0"):
        CDTT(max_iter=0)
    with pytest.raises(ValueError, match="tol.*-1"):
        CDTT(tol=-1.0)
    with pytest.raises(ValueError, match="eps.*0"):
        CDTT(eps=0.0)
    with pytest.raises(ValueError, match="losses"):
        CDTT().weights(torch.eye(2))
    assert "alpha=0.3" in repr(CDTT())
