"""FAMO against a reference written from the paper / official code (softmax logits, the log-loss
objective scaled by c, δ from the losses before and after the step, the softmax VJP, and
``torch.optim.Adam`` with weight decay on the logits), plus its schedule and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from fastmtl.weighting import FAMO

EPS = 1e-8


def _sequence(T, steps, seed):
    g = torch.Generator().manual_seed(seed)
    before = torch.rand(steps, T, generator=g, dtype=torch.float64) + 0.2
    after = before * (0.5 + 0.6 * torch.rand(steps, T, generator=g, dtype=torch.float64))
    return before, after


def _reference(before, after, lr, wd, b):
    """Per step: (objective value, its gradient in the losses, z after the logits' update)."""
    T = before.shape[1]
    xi = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=wd)
    out = []
    for lb, la in zip(before, after):
        z = torch.softmax(xi, 0).detach()
        ell = lb.clone().requires_grad_(True)
        D = ell - b + EPS
        c = (z / D).sum().detach()
        value = (z * D.log()).sum() / c
        (grad,) = torch.autograd.grad(value, ell)
        delta = (lb - b + EPS).log() - (la - b + EPS).log()
        (g_xi,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
        opt.zero_grad()
        xi.grad = g_xi
        opt.step()
        out.append((value.detach(), grad, torch.softmax(xi, 0).detach()))
    return out


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("bounds", [False, True])
def test_matches_reference(T, bounds):
    before, after = _sequence(T, 6, T)
    b = torch.full((T,), 0.05 if bounds else 0.0, dtype=torch.float64)
    expected = _reference(before, after, lr=0.025, wd=1e-5, b=b)
    famo = FAMO(num_tasks=T, min_losses=b if bounds else None)
    torch.testing.assert_close(famo.weights, torch.full((T,), 1.0 / T))
    for (value, grad, z), lb, la in zip(expected, before, after):
        ell = lb.clone().requires_grad_(True)
        loss = famo(list(ell.unbind(0)))
        torch.testing.assert_close(loss.detach(), value)
        loss.backward()
        torch.testing.assert_close(ell.grad, grad)
        torch.testing.assert_close(famo.update(la), z)
        torch.testing.assert_close(famo.weights, z)
    assert famo.step == 6


def test_gradient_is_a_convex_combination_and_t1_is_the_gradient():
    famo = FAMO(num_tasks=3)
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
    famo(losses).backward()
    assert losses.grad.sum().item() == pytest.approx(1.0)
    assert (losses.grad > 0).all()
    one = FAMO(num_tasks=1)
    x = torch.tensor([3.0], requires_grad=True)
    one(x).backward()
    assert x.grad.item() == pytest.approx(1.0)
    one.update(torch.tensor([2.0]))
    assert one.weights.tolist() == [1.0]


def test_weights_move_to_the_task_that_decreases_slowest():
    """Task 0 loses 10% per step, task 1 only 1%: z_1 must grow, monotonically."""
    famo = FAMO(num_tasks=2, weight_decay=0.0)
    ell = torch.tensor([1.0, 1.0])
    z1 = [0.5]
    for _ in range(20):
        famo(ell)
        ell = ell * torch.tensor([0.9, 0.99])
        z1.append(famo.update(ell)[1].item())
    assert all(b > a for a, b in zip(z1, z1[1:]))
    assert z1[-1] > 0.7


def test_state_dict_round_trip():
    before, after = _sequence(3, 6, 0)
    famo = FAMO(num_tasks=3, lr=0.1)
    for lb, la in zip(before[:3], after[:3]):
        famo(lb)
        famo.update(la)
    famo(before[3])                                     # mid-step: ℓ(t) recorded
    state = copy.deepcopy(famo.state_dict())
    other = FAMO(num_tasks=3, lr=0.1)
    other.load_state_dict(state)
    for f in (famo, other):
        f.update(after[3])
        for lb, la in zip(before[4:], after[4:]):
            f(lb)
            f.update(la)
    torch.testing.assert_close(famo.weights, other.weights)
    assert other.step == famo.step == 6
    with pytest.raises(ValueError, match="expects keys"):
        other.load_state_dict({"logits": None})
    assert "FAMO(num_tasks=3" in repr(famo)


def test_bad_inputs():
    famo = FAMO(num_tasks=2)
    with pytest.raises(RuntimeError, match="famo\\(losses\\) before"):
        famo.update(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="num_tasks=2 but got 3 losses"):
        famo(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        famo(torch.tensor([1.0, float("nan")]))
    famo.set_min_losses([0.5, 0.5])
    with pytest.raises(ValueError, match="exceed its lower bound"):
        famo(torch.tensor([1.0, 0.2]))
    famo(torch.tensor([1.0, 0.9]))
    with pytest.raises(ValueError, match="num_tasks=2 but got 1 losses"):
        famo.update([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(num_tasks=2, min_losses=[0.0])
    with pytest.raises(ValueError, match="lr"):
        FAMO(num_tasks=2, lr=0)
    with pytest.raises(ValueError, match="betas"):
        FAMO(num_tasks=2, betas=(0.9, 1.0))
