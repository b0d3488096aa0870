"""PaMaL's objective: the ordering regulariser (both signs, against the formula written out),
the single- and multi-forward losses, the inner weightings, and an end-to-end 2-task run in
which each vertex model beats the other on its own task."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmtl import pamal

pytestmark = pytest.mark.usefixtures("one_thread")


# -- regulariser ----------------------------------------------------------------------------------
def _reference_regularizer(alphas, losses, tau, direction):
    """METHODS.md §4.3, loop by loop: sort by α_t descending, consecutive pairs, log-mean-exp."""
    W, T = alphas.shape
    total = 0.0
    for t in range(T):
        order = sorted(range(W), key=lambda w: -float(alphas[w, t]))
        ell = [float(losses[w, t]) for w in order]
        terms = []
        for k in range(W - 1):
            diff = ell[k + 1] - ell[k] if direction == "code" else ell[k] - ell[k + 1]
            terms.append(math.exp(tau * max(diff, 0.0)))
        total += math.log(sum(terms) / (W - 1))
    return total


def _random_case(W, T, seed):
    g = torch.Generator().manual_seed(seed)
    alphas = pamal.sample_alpha(T, 1.0, W, generator=g, dtype=torch.float64)
    losses = torch.rand(W, T, generator=g, dtype=torch.float64) * 3
    return alphas, losses


@pytest.mark.parametrize("W, T, tau", [(2, 2, 1.0), (3, 2, 1.0), (4, 3, 0.5), (5, 4, 2.0)])
@pytest.mark.parametrize("direction", ["intuitive", "code"])
def test_regularizer_matches_formula(W, T, tau, direction):
    alphas, losses = _random_case(W, T, seed=W * 10 + T)
    r = pamal.ordering_regularizer(alphas, losses, temperature=tau, direction=direction)
    assert float(r) == pytest.approx(_reference_regularizer(alphas, losses, tau, direction),
                                     rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("W, T", [(2, 2), (3, 3), (5, 2)])
def test_regularizer_zero_exactly_when_ordered(W, T):
    alphas, _ = _random_case(W, T, seed=1)
    ordered = 2.0 - alphas  # larger α_t -> smaller ℓ_t: the expected ordering
    reversed_ = alphas.clone()  # larger α_t -> larger ℓ_t
    assert float(pamal.ordering_regularizer(alphas, ordered)) == 0.0
    assert float(pamal.ordering_regularizer(alphas, reversed_)) > 0.0
    # the code-compatible sign reproduces the other convention
    assert float(pamal.ordering_regularizer(alphas, ordered, direction="code")) > 0.0
    assert float(pamal.ordering_regularizer(alphas, reversed_, direction="code")) == 0.0
    # a single violated pair makes it positive
    broken = ordered.clone()
    top = int(alphas[:, 0].argmax())
    broken[top, 0] = ordered[:, 0].max() + 1.0
    assert float(pamal.ordering_regularizer(alphas, broken)) > 0.0


def test_regularizer_signs_are_mirror_images_and_differentiable():
    alphas, losses = _random_case(4, 3, seed=5)
    losses.requires_grad_(True)
    a = pamal.ordering_regularizer(alphas, losses)
    b = pamal.ordering_regularizer(alphas, -losses, direction="code")
    torch.testing.assert_close(a, b)
    a.backward()
    assert losses.grad is not None and bool(losses.grad.abs().sum() > 0)
    assert float(pamal.ordering_regularizer(alphas[:1], losses[:1].detach())) == 0.0
    with pytest.raises(ValueError, match="direction"):
        pamal.ordering_regularizer(alphas, losses, direction="up")
    with pytest.raises(ValueError, match="shape"):
        pamal.ordering_regularizer(alphas, losses[:, :2])


# -- the loss -------------------------------------------------------------------------------------
def _two_head_model(T=2, seed=0):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

        def forward(self, x):
            z = self.trunk(x)
            return [h(z).squeeze(-1) for h in self.heads]

    return pamal.to_subspace(Net().double(), T)


def _batch(T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, [torch.randn(16, generator=g, dtype=torch.float64) for _ in range(T)]


def _mse(o, y):
    return ((o - y) ** 2).mean()


def _losses_at(model, alpha, x, ys):
    with pamal.use_alpha(model, alpha):
        out = model(x)
    return torch.stack([_mse(o, y) for o, y in zip(out, ys)])


def test_single_forward_loss_is_alpha_weighted_sum():
    model = _two_head_model()
    x, ys = _batch()
    pm = pamal.PaMaL(model, 2, concentration=2.0, generator=torch.Generator().manual_seed(3))
    loss = pm.loss(x, ys, [_mse, _mse])
    alpha = pamal.sample_alpha(2, 2.0, 1, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(pm.last_alphas[0], alpha)
    expected = (alpha.double() * _losses_at(model, alpha, x, ys)).sum()
    torch.testing.assert_close(loss, expected)
    assert pamal.get_alpha(model) is None  # restored
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # a single callable returning the T losses gives the same value
    pm2 = pamal.PaMaL(model, 2, concentration=2.0, generator=torch.Generator().manual_seed(3))
    loss2 = pm2.loss(x, ys, lambda out, tg: [_mse(o, y) for o, y in zip(out, tg)])
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("gate, direction", [(True, "intuitive"), (False, "intuitive"),
                                             (False, "code")])
def test_multi_forward_loss_with_regulariser(gate, direction):
    model = _two_head_model()
    x, ys = _batch()
    lam = 0.7
    pm = pamal.PaMaL(model, 2, window=3, reg_lambda=lam, gate=gate, precompute=True,
                     direction=direction, temperature=2.0,
                     generator=torch.Generator().manual_seed(4))
    loss = pm.loss(x, ys, [_mse, _mse])
    alphas = pm.last_alphas
    assert alphas.shape == (3, 2)
    rows = torch.stack([_losses_at(model, a, x, ys) for a in alphas])
    torch.testing.assert_close(pm.last_losses, rows)
    objective = (alphas.double() * rows).sum()
    reg = pamal.ordering_regularizer(alphas, rows, temperature=2.0, direction=direction)
    torch.testing.assert_close(pm.last_regularizer, reg)
    torch.testing.assert_close(loss, objective + lam * reg)


def test_gate_drops_a_regulariser_larger_than_the_objective():
    model = _two_head_model()
    x, ys = _batch()
    for seed in range(20):  # find a draw with a violation
        pm = pamal.PaMaL(model, 2, window=4, reg_lambda=1e6,
                         generator=torch.Generator().manual_seed(seed))
        loss = pm.loss(x, ys, [_mse, _mse])
        if float(pm.last_regularizer) > 0:
            break
    assert float(pm.last_regularizer) > 0
    torch.testing.assert_close(loss, pm.last_objective)
    pm_off = pamal.PaMaL(model, 2, window=4, reg_lambda=1e6, gate=False,
                         generator=torch.Generator().manual_seed(seed))
    loss_off = pm_off.loss(x, ys, [_mse, _mse])
    torch.testing.assert_close(loss_off, pm_off.last_objective + 1e6 * pm_off.last_regularizer)


def _grad_norms(model, alpha, x, ys):
    losses = _losses_at(model, alpha, x, ys)
    out = []
    for t in range(2):
        grads = torch.autograd.grad(losses[t], list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
        out.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
    return losses.detach(), torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("inner", ["gradnorm", "rwa", "full"])
def test_inner_weightings(inner):
    model = _two_head_model()
    pm = pamal.PaMaL(model, 2, inner=inner, rwa_window=2,
                     generator=torch.Generator().manual_seed(0))
    history = []
    for step in range(5):
        x, ys = _batch(seed=step)
        loss = pm.loss(x, ys, [_mse, _mse])
        alpha = pm.last_alphas[0].double()
        losses, norms = _grad_norms(model, alpha, x, ys)
        history.append(losses)
        w = torch.ones(2, dtype=torch.float64)
        if inner in ("rwa", "full") and step >= 3:  # warm-up: rwa_window + 1 forwards
            mean = torch.stack(history[-2:]).mean(0)
            w = 1 - mean / mean.sum()
        c = alpha * w
        if inner in ("gradnorm", "full"):
            c = c / (w * norms + 1e-3)
        torch.testing.assert_close(loss.detach(), (c * losses).sum(), rtol=1e-5, atol=1e-7)


def test_pamal_bad_arguments():
    model = _two_head_model()
    with pytest.raises(ValueError, match="members"):
        pamal.PaMaL(model, 3)
    with pytest.raises(ValueError, match="to_subspace"):
        pamal.PaMaL(nn.Linear(2, 2), 2)
    for kwargs, match in [({"inner": "mgda"}, "inner"), ({"window": 0}, "window"),
                          ({"concentration": -1.0}, "concentration"),
                          ({"direction": "down"}, "direction"), ({"reg_lambda": -1}, "reg_lambda"),
                          ({"temperature": 0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            pamal.PaMaL(model, 2, **kwargs)
    pm = pamal.PaMaL(model, 2)
    x, ys = _batch()
    with pytest.raises(ValueError, match="2 callables"):
        pm.loss(x, ys, [_mse])


def test_state_dict_round_trip():
    model = _two_head_model()
    pm = pamal.PaMaL(model, 2, inner="rwa", generator=torch.Generator().manual_seed(0))
    x, ys = _batch()
    pm.loss(x, ys, [_mse, _mse])
    state = pm.state_dict()
    a = pm.loss(x, ys, [_mse, _mse])
    pm2 = pamal.PaMaL(model, 2, inner="rwa", generator=torch.Generator().manual_seed(9))
    pm2.load_state_dict(state)
    torch.testing.assert_close(pm2.loss(x, ys, [_mse, _mse]), a)


# -- end to end -----------------------------------------------------------------------------------
def _two_task_regression(n=512, seed=0):
    """A synthetic 2-task problem with fully conflicting targets for one shared output:
    y1 = x·a and y2 = x·b, so no single model is good at both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    return x, x @ a, x @ b


def test_end_to_end_vertices_specialise():
    torch.manual_seed(0)
    x, y1, y2 = _two_task_regression()
    net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    pamal.to_subspace(net, 2)
    g = torch.Generator().manual_seed(0)
    pm = pamal.PaMaL(net, 2, window=2, reg_lambda=1.0, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = pm.loss(x[idx], (y1[idx], y2[idx]), [mse, mse])
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [x[i:i + 128] for i in range(0, len(x), 128)]
    scores = []
    for vertex in ([1.0, 0.0], [0.0, 1.0]):
        plain = pamal.recompute_bn(pamal.extract(net, vertex), None, batches).eval()
        with torch.no_grad():
            out = plain(x)
        scores.append((float(mse(out, y1)), float(mse(out, y2))))
    (l1_at_e1, l2_at_e1), (l1_at_e2, l2_at_e2) = scores
    assert l1_at_e1 < 0.5 * l1_at_e2 and l2_at_e2 < 0.5 * l2_at_e1
    front = pamal.pareto_front(net, lambda m: [float(mse(m(x), y1)), float(mse(m(x), y2))],
                               num_points=5, bn_loader=batches)
    ref = front.values.max(0).values + 1.0
    assert front.hypervolume(ref.tolist()) > 0
    # along the line from e1 to e2, task 1 worsens and task 2 improves (overall)
    assert front.values[0, 0] < front.values[-1, 0] and front.values[-1, 1] < front.values[0, 1]
