"""GradNorm against a hand-written reference of the paper's Algorithm 1 on a tiny model: G_i as
the norm of ∇_W (w_i L_i) built with ``create_graph`` and differentiated by autograd, the
target Ḡ r_i^α held constant, Adam on w, the model trained on Σ w_i L_i, renormalised Σw = T."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmtl.weighting import GradNorm


class Net(nn.Module):
    def __init__(self, T: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(4, 6)
        self.last = nn.Linear(6, 5)              # W, the last shared layer
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(T))
        self.register_buffer("x", torch.randn(16, 4))
        self.register_buffer("y", torch.randn(T, 16) * torch.arange(1, T + 1)[:, None])
        self.double()

    def losses(self) -> list[torch.Tensor]:
        z = torch.tanh(self.last(torch.tanh(self.enc(self.x))))
        return [((h(z).squeeze(-1) - self.y[i]) ** 2).mean() for i, h in enumerate(self.heads)]


def reference_run(T, steps, alpha, lr_w, lr_model):
    net = Net(T)
    W = list(net.last.parameters())
    w = torch.ones(T, dtype=torch.float64, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=lr_w)
    opt = torch.optim.SGD(net.parameters(), lr=lr_model)
    L0, history = None, []
    for _ in range(steps):
        losses = net.losses()
        Lt = torch.stack(losses)
        if L0 is None:
            L0 = Lt.detach().clone()
        G = []
        for i in range(T):
            gi = torch.autograd.grad(w[i] * losses[i], W, retain_graph=True, create_graph=True)
            G.append(torch.sqrt(sum((g ** 2).sum() for g in gi)))
        G = torch.stack(G)
        ratio = Lt.detach() / L0
        r = ratio / ratio.mean()
        target = (G.mean() * r ** alpha).detach()
        L_grad = (G - target).abs().sum()
        (w_grad,) = torch.autograd.grad(L_grad, w, retain_graph=True)
        opt.zero_grad()
        (w.detach() * Lt).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        w_opt.zero_grad()
        w.grad = w_grad
        w_opt.step()
        with torch.no_grad():
            w.mul_(T / w.sum())
        history.append((w.detach().clone(), grads))
    return net, history


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("T, alpha", [(1, 1.5), (2, 1.5), (3, 0.12), (4, 1.5)])
def test_matches_paper_reference(T, alpha, engine):
    ref_net, history = reference_run(T, steps=5, alpha=alpha, lr_w=0.05, lr_model=0.05)
    net = Net(T)
    gn = GradNorm(num_tasks=T, last_shared_params=net.last.parameters(), alpha=alpha, lr=0.05,
                  engine=engine)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    used = torch.ones(T, dtype=torch.float64)
    for w_ref, grads_ref in history:
        opt.zero_grad()
        w_used = gn.backward(net.losses())
        torch.testing.assert_close(w_used, used)
        for p, g in zip(net.parameters(), grads_ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
        opt.step()
        torch.testing.assert_close(gn.weights, w_ref, rtol=1e-9, atol=1e-12)
        assert gn.weights.sum().item() == pytest.approx(T)
        used = w_ref
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if T > 1:
        assert not torch.allclose(gn.weights, torch.ones(T, dtype=torch.float64))


def test_update_with_external_norms_and_initial_losses():
    net = Net(3)
    gn = GradNorm(num_tasks=3, last_shared_params=net.last.parameters())
    losses = net.losses()
    W = list(net.last.parameters())
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(
        L, W, retain_graph=True))) for L in losses])
    twin = GradNorm(num_tasks=3, last_shared_params=net.last.parameters())
    twin.backward(net.losses())
    w = gn.update(losses, norms)
    torch.testing.assert_close(w, twin.weights)
    torch.testing.assert_close(gn.initial_losses, torch.stack(losses).detach())
    assert w.sum().item() == pytest.approx(3.0)


def test_weights_sum_to_t_over_training():
    net = Net(4, seed=1)
    gn = GradNorm(num_tasks=4, last_shared_params=net.last.parameters(), lr=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        gn.backward(net.losses())
        opt.step()
        assert gn.weights.sum().item() == pytest.approx(4.0)
    assert (gn.weights > 0).all()


def test_state_dict_round_trip():
    def train(model, g, steps):
        o = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(steps):
            o.zero_grad()
            g.backward(model.losses())
            o.step()

    net = Net(3)
    gn = GradNorm(num_tasks=3, last_shared_params=net.last.parameters())
    train(net, gn, 3)
    state = copy.deepcopy(gn.state_dict())
    saved = copy.deepcopy(net.state_dict())
    train(net, gn, 2)
    net2 = Net(3, seed=5)
    net2.load_state_dict(saved)
    gn2 = GradNorm(num_tasks=3, last_shared_params=net2.last.parameters())
    gn2.load_state_dict(state)                       # before the first call: kept pending
    torch.testing.assert_close(gn2.weights, state["weights"])
    train(net2, gn2, 2)
    torch.testing.assert_close(gn2.weights, gn.weights)
    gn2.load_state_dict(state)                       # after: applied in place
    torch.testing.assert_close(gn2.weights, state["weights"])
    with pytest.raises(ValueError, match="expects keys"):
        gn2.load_state_dict({"weights": state["weights"]})


def test_bad_inputs():
    net = Net(2)
    gn = GradNorm(num_tasks=2, last_shared_params=net.last.parameters())
    with pytest.raises(ValueError, match="num_tasks=2 but got 3 losses"):
        gn.backward(net.losses() + net.losses()[:1])
    bad = net.losses()
    with pytest.raises(ValueError, match="non-finite"):
        gn.backward([bad[0], bad[1] * float("inf")])
    with pytest.raises(ValueError, match="grad_norms"):
        gn.update(net.losses(), torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(num_tasks=2, last_shared_params=net.last.parameters(), alpha=-1.0)
    with pytest.raises(ValueError, match="empty"):
        GradNorm(num_tasks=2, last_shared_params=[])
    assert "GradNorm(num_tasks=2" in repr(gn)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_cuda_matches_cpu(engine):
    cpu, gpu = Net(3), Net(3).cuda()
    gn_cpu = GradNorm(num_tasks=3, last_shared_params=cpu.last.parameters(), engine="loop")
    gn_gpu = GradNorm(num_tasks=3, last_shared_params=gpu.last.parameters(), engine=engine)
    for _ in range(3):
        for net, gn in ((cpu, gn_cpu), (gpu, gn_gpu)):
            net.zero_grad()
            gn.backward(net.losses())
    assert gn_gpu.weights.device.type == "cuda"
    torch.testing.assert_close(gn_gpu.weights.cpu(), gn_cpu.weights)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad)
