"""``fm.optim.MTLOptimizer``: the same updates as ``fm.mtl_backward`` + the base optimizer, the
torch.optim plumbing (schedulers, hooks, state_dict, closures), and input validation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmtl as fm
from fastmtl.aggregators import Aggregator, StatefulAggregator, Sum


class Net(nn.Module):
    def __init__(self, T: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))
        self.register_buffer("x", torch.randn(12, 5))
        self.register_buffer("y", torch.randn(T, 12))

    def features(self) -> torch.Tensor:
        return torch.tanh(self.enc(self.x))

    def losses(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.features() if z is None else z
        return [((h(z).squeeze(-1) - self.y[i]) ** 2).mean() for i, h in enumerate(self.heads)]


class Fixed(Aggregator):
    def __init__(self, w) -> None:
        super().__init__()
        self.w = torch.tensor(w)

    def _weights(self, K, losses):
        return self.w.to(K)


class Ema(StatefulAggregator):
    """Toy stateful aggregator: w = EMA(diag K) normalised to sum 1 (beta 0.5)."""

    def _init_state(self, K):
        return {"ema": torch.zeros(K.shape[0], dtype=K.dtype, device=K.device)}

    def _stateful_weights(self, K, losses, state):
        state["ema"].mul_(0.5).add_(0.5 * K.diagonal())
        return state["ema"] / state["ema"].sum()


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("latent", [False, True])
def test_steps_match_mtl_backward_and_base_optimizer(latent):
    ref, net = Net(), Net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = fm.optim.MTLOptimizer(torch.optim.Adam(net.parameters(), lr=1e-2), Ema(),
                                shared_params=net.enc.parameters())
    ref_agg = Ema()
    for _ in range(4):
        ref_opt.zero_grad()
        z = ref.features() if latent else None
        w_ref = fm.mtl_backward(ref.losses(z), list(ref.enc.parameters()), ref_agg, features=z)
        ref_opt.step()
        opt.zero_grad()
        z = net.features() if latent else None
        w = opt.backward(net.losses(z), features=z)
        opt.step()
        torch.testing.assert_close(w, w_ref)
    for a, b in zip(_params(net), _params(ref)):
        torch.testing.assert_close(a, b)


def test_backward_fills_grads_like_manual_reference():
    net = Net(T=2)
    opt = fm.optim.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), Fixed([0.25, 2.0]),
                                shared_params=net.enc.parameters())
    opt.zero_grad()
    w = opt.backward(net.losses())
    assert w.tolist() == [0.25, 2.0]
    losses = net.losses()
    shared = list(net.enc.parameters())
    g = [torch.autograd.grad(L, shared, retain_graph=True) for L in losses]
    heads = torch.autograd.grad(sum(losses), list(net.heads.parameters()))
    for k, p in enumerate(shared):
        torch.testing.assert_close(p.grad, 0.25 * g[0][k] + 2.0 * g[1][k])
    for p, ref in zip(net.heads.parameters(), heads):
        torch.testing.assert_close(p.grad, ref)


def test_lr_scheduler_drives_the_base_optimizer():
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=1.0)
    opt = fm.optim.MTLOptimizer(base, Sum(), shared_params=net.enc.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # no "scheduler.step() before optimizer.step()"
        for _ in range(3):
            opt.zero_grad()
            opt.backward(net.losses())
            opt.step()
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.125)
    assert sched.get_last_lr() == [pytest.approx(0.125)]


def test_state_dict_round_trip_resumes_identically():
    net = Net()
    opt = fm.optim.MTLOptimizer(torch.optim.Adam(net.parameters(), lr=1e-2), Ema(),
                                shared_params=net.enc.parameters())

    def train(model, o, steps):
        for _ in range(steps):
            o.zero_grad()
            o.backward(model.losses())
            o.step()

    train(net, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    assert set(state) == {"optimizer", "aggregator"} and state["aggregator"]["step"] == 2
    saved = copy.deepcopy(net.state_dict())
    train(net, opt, 3)
    net2 = Net(seed=1)
    net2.load_state_dict(saved)
    opt2 = fm.optim.MTLOptimizer(torch.optim.Adam(net2.parameters(), lr=1e-2), Ema(),
                                 shared_params=net2.enc.parameters())
    opt2.load_state_dict(state)
    train(net2, opt2, 3)
    for a, b in zip(_params(net), _params(net2)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expects keys"):
        opt2.load_state_dict({"optimizer": state["optimizer"]})


def test_zero_grad_step_closure_hooks_and_repr():
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = fm.optim.MTLOptimizer(base, Sum(), shared_params=net.enc.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        losses = net.losses()
        opt.backward(losses)
        return sum(losses).detach()

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and torch.isfinite(loss)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    text = repr(opt)
    assert "MTLOptimizer" in text and "SGD" in text and "Sum()" in text
    clone = copy.deepcopy(opt)
    assert isinstance(clone.optimizer, torch.optim.SGD)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(base.param_groups) == 2


def test_bad_inputs():
    net = Net()
    base = torch.optim.SGD(net.heads.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"shared_params\[0\].*not in the base optimizer"):
        fm.optim.MTLOptimizer(base, Sum(), shared_params=net.enc.parameters())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fm.optim.MTLOptimizer(object(), Sum(), shared_params=net.enc.parameters())
    full = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="weights"):
        fm.optim.MTLOptimizer(full, object(), shared_params=net.enc.parameters())
    with pytest.raises(ValueError, match="empty"):
        fm.optim.MTLOptimizer(full, Sum(), shared_params=[])
    with pytest.raises(ValueError, match="unknown engine"):
        fm.optim.MTLOptimizer(full, Sum(), shared_params=net.enc.parameters(), engine="x")
    opt = fm.optim.MTLOptimizer(full, Fixed([1.0, 1.0, 1.0]), shared_params=net.enc.parameters())
    with pytest.raises(ValueError, match="non-finite"):
        losses = net.losses()
        opt.backward([losses[0], losses[1] * float("nan"), losses[2]], check_finite=True)
