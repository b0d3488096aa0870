"""PaMaL inference tools: the paper's grids, ``pareto_front``, ``recompute_bn``, the exact
hypervolume (known 2D/3D cases and brute-force Monte Carlo up to 4 objectives), ``plot_front``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from fastmtl import pamal

pytestmark = pytest.mark.usefixtures("one_thread")


# -- grids ----------------------------------------------------------------------------------------
def test_simplex_grids_of_the_paper():
    g2 = pamal.simplex_grid(2)
    assert g2.shape == (11, 2)
    torch.testing.assert_close(g2[:, 1], torch.linspace(0, 1, 11, dtype=torch.float64))
    assert g2[0].tolist() == [1.0, 0.0]  # from e_1 to e_2, as the official code lists them
    g3 = pamal.simplex_grid(3, 4)  # 4 points per edge: 10 lattice points
    assert g3.shape == (10, 3)
    assert len({tuple(r) for r in (g3 * 3).round().int().tolist()}) == 10
    for grid in (g2, g3, pamal.simplex_grid(5)):
        torch.testing.assert_close(grid.sum(1), torch.ones(len(grid), dtype=torch.float64))
        assert bool((grid >= 0).all())
    for T in (3, 5):
        rows = {tuple(r) for r in pamal.simplex_grid(T, 4).tolist()}
        assert all(tuple(r) in rows for r in torch.eye(T, dtype=torch.float64).tolist())
    g5 = pamal.simplex_grid(5)
    assert g5.shape == (6, 5) and g5[-1].tolist() == [0.2] * 5
    with pytest.raises(ValueError, match="num_points"):
        pamal.simplex_grid(2, 1)


# -- front and BatchNorm --------------------------------------------------------------------------
def _bn_model(T=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    return pamal.to_subspace(model, T)


def test_pareto_front_evaluates_each_grid_point_and_restores_state():
    model = _bn_model(3)
    model.train()
    pamal.set_alpha(model, [0.2, 0.3, 0.5])
    x = torch.randn(8, 3)
    seen = []

    def evaluate(m):
        seen.append((pamal.get_alpha(m).clone(), m.training, torch.is_grad_enabled()))
        return m(x).mean(0)

    front = pamal.pareto_front(model, evaluate, num_points=3)
    grid = pamal.simplex_grid(3, 3)
    assert front.alphas.shape == (6, 3) and front.values.shape == (6, 2)
    for (alpha, training, grad), expected in zip(seen, grid):
        torch.testing.assert_close(alpha.double(), expected)
        assert not training and not grad
    with pamal.use_alpha(model, grid[4].float()):
        model.eval()
        torch.testing.assert_close(front.values[4], model(x).mean(0).double())
    assert model[1].training is False  # eval() above; pareto_front itself restored train mode
    model.train()
    assert pamal.get_alpha(model).tolist() == pytest.approx([0.2, 0.3, 0.5])
    custom = pamal.pareto_front(model, evaluate, alphas=[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert custom.values.shape == (2, 2)
    with pytest.raises(ValueError, match="simplex"):
        pamal.pareto_front(model, evaluate, alphas=[[1.0, 1.0, 0.0]])


def test_recompute_bn_estimates_the_statistics_at_alpha():
    model = _bn_model()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(10, 3, generator=g) * 3 + 1 for _ in range(4)]
    model.train()
    momentum = model[1].momentum
    pamal.set_alpha(model, [0.5, 0.5])
    alpha = torch.tensor([0.9, 0.1])
    pamal.recompute_bn(model, alpha, [(b, "label") for b in batches])
    with pamal.use_alpha(model, alpha):
        pre = torch.cat([model[0](b) for b in batches]).detach()
    torch.testing.assert_close(model[1].running_mean, pre.mean(0))
    per_batch_var = torch.stack([torch.var(p, 0) for p in pre.split(10)])  # unbiased
    torch.testing.assert_close(model[1].running_var, per_batch_var.mean(0))
    assert model[1].momentum == momentum and model.training and model[2].training
    assert pamal.get_alpha(model).tolist() == [0.5, 0.5]
    plain = pamal.extract(model, alpha)
    plain.eval()
    pamal.recompute_bn(plain, None, batches, num_batches=2)
    torch.testing.assert_close(plain[1].running_mean, pre[:20].mean(0))
    assert not plain.training


def test_pareto_front_with_bn_loader_restores_trained_statistics():
    model = _bn_model()
    batches = [torch.randn(10, 3) for _ in range(2)]
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = torch.randn(5, 3)
    front = pamal.pareto_front(model, lambda m: m(x).mean(0), num_points=3, bn_loader=batches)
    for k, v in model[1].state_dict().items():
        torch.testing.assert_close(v, before[k])
    plain = pamal.recompute_bn(pamal.extract(model, [0.5, 0.5]), None, batches).eval()
    torch.testing.assert_close(front.values[1], plain(x).mean(0).double().detach())


# -- hypervolume ----------------------------------------------------------------------------------
def _monte_carlo_hv(points, ref, n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    low = points.min(0)
    box = np.prod(ref - low)
    samples = low + rng.random((n, len(ref))) * (ref - low)
    dominated = np.zeros(n, dtype=bool)
    for p in points:
        dominated |= np.all(samples >= p, axis=1)
    frac = dominated.mean()
    return box * frac, box * np.sqrt(frac * (1 - frac) / n)


def test_hypervolume_known_cases():
    assert pamal.hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]) == pytest.approx(3.0)
    assert pamal.hypervolume([[0.5, 0.5]], [1.0, 2.0]) == pytest.approx(0.75)
    assert pamal.hypervolume([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], [2, 2, 2]) == pytest.approx(5.0)
    assert pamal.hypervolume([[1.0, 1.0, 1.0]], [2.0, 3.0, 4.0]) == pytest.approx(6.0)
    # dominated, duplicated and out-of-box points change nothing
    base = [[1.0, 2.0], [2.0, 1.0]]
    extra = base + [[2.5, 2.5], [1.0, 2.0], [4.0, 0.0], [3.0, 1.0]]
    assert pamal.hypervolume(extra, [3.0, 3.0]) == pytest.approx(3.0)
    assert pamal.hypervolume([[4.0, 4.0]], [3.0, 3.0]) == 0.0
    assert pamal.hypervolume(np.zeros((0, 2)), [1.0, 1.0]) == 0.0
    assert pamal.hypervolume(torch.tensor([[0.0]]), torch.tensor([2.0])) == pytest.approx(2.0)
    # 4-D: two boxes overlapping in a unit hypercube
    pts = [[0, 0, 0, 1], [1, 1, 1, 0]]
    assert pamal.hypervolume(pts, [2, 2, 2, 2]) == pytest.approx(8 + 2 - 1)


@pytest.mark.parametrize("M, n", [(2, 8), (3, 7), (4, 6)])
def test_hypervolume_against_monte_carlo(M, n):
    rng = np.random.default_rng(M)
    points = rng.random((n, M))
    points[:, 0] = np.sort(points[:, 0])  # a loose trade-off, not all dominated
    points[:, 1] = 1 - points[:, 0] + 0.1 * rng.random(n)
    ref = np.full(M, 1.2)
    exact = pamal.hypervolume(points, ref)
    estimate, se = _monte_carlo_hv(points, ref)
    assert abs(exact - estimate) < 5 * se + 1e-12
    perm = rng.permutation(M)
    assert pamal.hypervolume(points[:, perm], ref[perm]) == pytest.approx(exact)


def test_hypervolume_bad_input():
    with pytest.raises(ValueError, match="shape"):
        pamal.hypervolume([[1.0, 2.0]], [3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        pamal.hypervolume([[1.0, float("nan")]], [3.0, 3.0])
    with pytest.raises(ValueError, match="reference"):
        pamal.hypervolume([[1.0]], [[3.0]])


# -- plot -----------------------------------------------------------------------------------------
def test_plot_front_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    front = pamal.ParetoFront(pamal.simplex_grid(2, 5),
                              torch.tensor([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [3.0, 0.5],
                                            [4.0, 0.0]], dtype=torch.float64))
    path = pamal.plot_front(front, tmp_path / "front.png", labels=["task 1", "task 2"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_front_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        pamal.plot_front(torch.zeros(3, 2), tmp_path / "front.png")
