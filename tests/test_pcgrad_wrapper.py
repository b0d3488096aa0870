"""``fm.optim.PCGrad`` against a direct reference of the popular port's algorithm (explicit
flattened per-task gradients over every optimizer parameter, the same random orders, "shared"
= reached by every task), plus training loops, seeding, state_dict and the plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmtl as fm


class Net(nn.Module):
    """Encoder + T heads; ``gate`` is used by tasks 0 and 1 only, ``unused`` by none, and
    ``frozen`` does not require grad."""

    def __init__(self, T: int = 3, seed: int = 0, dtype=torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5))
        self.gate = nn.Parameter(torch.randn(5))
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(T))
        self.unused = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.register_buffer("x", torch.randn(9, 4))
        self.register_buffer("y", torch.randn(T, 9))
        self.to(dtype)

    def losses(self) -> list[torch.Tensor]:
        z = torch.tanh(self.enc(self.x)) + self.frozen.sum()
        out = []
        for i, head in enumerate(self.heads):
            zi = z * self.gate if i < 2 else z
            out.append(((head(zi).squeeze(-1) - self.y[i]) ** 2).mean())
        return out


def reference_pcgrad(params, losses, orders, reduction):
    """The port's algorithm on explicit gradients: per-task flattened grads (None -> zeros and
    "no grad"), projection in the given orders (task i itself included), mean/sum on the
    elements every task has, sum elsewhere. Returns one tensor per parameter (float64)."""
    grads, has = [], []
    for L in losses:
        gs = torch.autograd.grad(L, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None
                                else g.double().reshape(-1) for p, g in zip(params, gs)]))
        has.append(torch.cat([torch.full((p.numel(),), g is not None)
                              for p, g in zip(params, gs)]))
    G = torch.stack(grads)
    shared = torch.stack(has).all(0)
    projected = []
    for i in range(len(losses)):
        gi = G[i].clone()
        for j in orders[i].tolist():
            dot = gi @ G[j]
            if dot < 0:
                gi = gi - dot / (G[j] @ G[j]) * G[j]
        projected.append(gi)
    P = torch.stack(projected)
    reduced = P.mean(0) if reduction == "mean" else P.sum(0)
    merged = torch.where(shared, reduced, P.sum(0))
    out, o = [], 0
    for p in params:
        out.append(merged[o:o + p.numel()].view(p.shape))
        o += p.numel()
    return out


def _trainable(net):
    return [p for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_matches_reference_with_same_orders(T, engine, reduction):
    net = Net(T=T)
    pc = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), reduction=reduction,
                         seed=3, engine=engine)
    for _ in range(3):                        # several calls: several orders
        pc.zero_grad()
        w = pc.pc_backward(net.losses())
        ref = reference_pcgrad(_trainable(net), net.losses(), pc.last_orders, reduction)
        for p, r in zip(_trainable(net), ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
        assert w.shape == (T,)
    assert net.frozen.grad is None
    assert net.unused.grad is not None and not net.unused.grad.any()


def test_two_tasks_need_no_orders_float32():
    net = Net(T=2, dtype=torch.float32)
    pc = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    pc.pc_backward(net.losses())
    arbitrary = torch.tensor([[0, 1], [0, 1]])
    ref = reference_pcgrad(_trainable(net), net.losses(), arbitrary, "mean")
    for p, r in zip(_trainable(net), ref):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-5, atol=1e-6)


def test_self_projection_is_matched():
    """g0 = (1, 0), g1 = (-1, 1), g2 = (-3, -1): visiting 1, 2 then 0 itself, g'_0 turns
    against g_0 = (1, 0) and the port projects it once more; the wrapper must do the same."""
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    dirs = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-3.0, -1.0]], dtype=torch.float64)
    pc = fm.optim.PCGrad(torch.optim.SGD([theta], lr=0.1), reduction="sum", seed=0)
    hits = 0
    for _ in range(40):
        pc.pc_backward([d @ theta for d in dirs])
        orders = pc.last_orders
        assert sorted(orders[0].tolist()) == [0, 1, 2]
        ref = reference_pcgrad([theta], [d @ theta for d in dirs], orders, "sum")[0]
        torch.testing.assert_close(theta.grad, ref)
        hits += orders[0].tolist() == [1, 2, 0]
    assert hits > 0


def test_training_loop_matches_manual_reference():
    net, ref_net = Net(T=3), Net(T=3)
    pc = fm.optim.PCGrad(torch.optim.Adam(net.parameters(), lr=1e-2), seed=11)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-2)
    for _ in range(4):
        pc.zero_grad()
        pc.pc_backward(net.losses())
        pc.step()
        ref_opt.zero_grad()
        grads = reference_pcgrad(_trainable(ref_net), ref_net.losses(), pc.last_orders, "mean")
        for p, g in zip(_trainable(ref_net), grads):
            p.grad = g.to(p.dtype)
        ref_opt.step()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_seed_orders_and_state_dict_round_trip():
    def orders_of(pc, net, n):
        out = []
        for _ in range(n):
            pc.pc_backward(net.losses())
            out.append(pc.last_orders.clone())
        return out

    net = Net(T=4)
    a = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.0), seed=5)
    b = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.0), seed=5)
    oa, ob = orders_of(a, net, 3), orders_of(b, net, 3)
    assert all(torch.equal(x, y) for x, y in zip(oa, ob))
    assert not all(torch.equal(oa[0], x) for x in oa[1:])
    for o in oa:
        assert (o.sort(1).values == torch.arange(4)).all()
    state = copy.deepcopy(a.state_dict())
    assert state["pcgrad"] == {"seed": 5, "calls": 3}
    later = orders_of(a, net, 2)
    c = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.0))
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(later, orders_of(c, net, 2)))
    with pytest.raises(ValueError, match="expects keys"):
        c.load_state_dict({"optimizer": state["optimizer"]})


def test_interface_of_the_port_and_scheduler():
    net = Net(T=2)
    base = torch.optim.SGD(net.parameters(), lr=1.0)
    pc = fm.optim.PCGrad(base)
    assert pc.optimizer is base and pc.reduction == "mean"
    assert pc.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.ExponentialLR(pc, gamma=0.5)
    net.enc[0].weight.grad = torch.ones_like(net.enc[0].weight)   # replaced, not accumulated
    pc.pc_backward(net.losses())
    grad = net.enc[0].weight.grad.clone()
    pc.zero_grad()
    assert net.enc[0].weight.grad is None
    pc.pc_backward(torch.stack(net.losses()))       # a (T,) tensor works too
    torch.testing.assert_close(net.enc[0].weight.grad, grad)
    pc.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.5)
    assert "PCGrad" in repr(pc) and "reduction='mean'" in repr(pc)


def test_bad_inputs():
    net = Net(T=2)
    with pytest.raises(ValueError, match="reduction"):
        fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), reduction="max")
    with pytest.raises(ValueError, match="seed"):
        fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), seed=-1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fm.optim.PCGrad(net.parameters())
    pc = fm.optim.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="empty"):
        pc.pc_backward([])
    with pytest.raises(ValueError, match="does not require grad"):
        pc.pc_backward([torch.tensor(1.0), torch.tensor(2.0)])
    frozen = fm.optim.PCGrad(torch.optim.SGD([net.frozen], lr=0.1))
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        frozen.pc_backward(net.losses())


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_cuda_matches_reference(engine):
    cpu = Net(T=4)
    gpu = copy.deepcopy(cpu).cuda()
    pc = fm.optim.PCGrad(torch.optim.SGD(gpu.parameters(), lr=0.1), seed=2, engine=engine)
    pc.pc_backward(gpu.losses())
    assert pc.last_orders.device.type == "cuda"
    ref = reference_pcgrad(_trainable(cpu), cpu.losses(), pc.last_orders.cpu(), "mean")
    for p, r in zip(_trainable(gpu), ref):
        torch.testing.assert_close(p.grad.cpu(), r, rtol=1e-9, atol=1e-11)
