"""``fm.mtl_backward`` against hand-built references (per-task autograd.grad, then Σ w_i g_i)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmtl as fm
from fastmtl.aggregators import MGDA, Aggregator, Mean, Sum
from fastmtl.engine import LatentGradients, TaskGradients, cache

MODES = ["loop", "vmap"]


class Net(nn.Module):
    """Shared encoder (fp32 conv-free MLP, one fp64 layer in ``mixed``) + T linear heads."""

    def __init__(self, T: int, mixed: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc1 = nn.Linear(5, 8)
        self.enc2 = nn.Linear(8, 6).to(torch.float64 if mixed else torch.float32)
        self.gate = nn.Parameter(torch.randn(6))            # shared, used by task 0 only
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))
        self.register_buffer("x", torch.randn(10, 5))
        self.register_buffer("y", torch.randn(T, 10))

    def shared(self) -> list[nn.Parameter]:
        return [*self.enc1.parameters(), *self.enc2.parameters(), self.gate]

    def features(self) -> torch.Tensor:
        h = torch.relu(self.enc1(self.x))
        return torch.tanh(self.enc2(h.to(self.enc2.weight.dtype))).float()

    def losses(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.features() if z is None else z
        out = []
        for i, head in enumerate(self.heads):
            zi = z * self.gate if i == 0 else z
            out.append(((head(zi).squeeze(-1) - self.y[i]) ** 2).mean())
        return out


class Fixed(Aggregator):
    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.tensor(w)

    def _weights(self, K, losses):
        return self.w.to(K)


class MGDA2(Aggregator):
    """MGDA for T = 2 in closed form: γ = clamp((K22 − K12)/(K11 + K22 − 2K12), 0, 1)."""

    def _weights(self, K, losses):
        g = ((K[1, 1] - K[0, 1]) / (K[0, 0] + K[1, 1] - 2 * K[0, 1])).clamp(0, 1)
        return torch.stack([g, 1 - g])


def reference_grads(net: Net, w: torch.Tensor | None):
    """(shared grads Σ w_i g_i, head grads Σ g_i) by per-task autograd.grad."""
    losses = net.losses()
    heads = list(net.heads.parameters())
    per_task = [torch.autograd.grad(L, net.shared(), retain_graph=True, allow_unused=True)
                for L in losses]
    per_task = [[torch.zeros_like(p) if g is None else g for p, g in zip(net.shared(), gs)]
                for gs in per_task]
    if w is None:  # the MGDA2 weights from the reference Gram
        G = torch.stack([torch.cat([g.double().reshape(-1) for g in gs]) for gs in per_task])
        K = G @ G.T
        g = ((K[1, 1] - K[0, 1]) / (K[0, 0] + K[1, 1] - 2 * K[0, 1])).clamp(0, 1)
        w = torch.stack([g, 1 - g])
    shared = [sum(float(w[i]) * per_task[i][k] for i in range(len(losses)))
              for k in range(len(net.shared()))]
    return shared, list(torch.autograd.grad(sum(losses), heads)), w


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("agg", [Sum(), Mean()], ids=["sum", "mean"])
def test_fast_path_reproduces_backward_exactly(agg, monkeypatch):
    monkeypatch.setattr(TaskGradients, "compute", lambda *a: pytest.fail("not the fast path"))
    net = Net(3, mixed=True)
    ref = copy.deepcopy(net)
    losses = ref.losses()
    (sum(losses) if isinstance(agg, Sum) else sum(losses) / 3).backward()
    w = fm.mtl_backward(net.losses(), net.shared(), agg, engine="vmap")
    torch.testing.assert_close(w, torch.full((3,), 1.0 if isinstance(agg, Sum) else 1 / 3))
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp64"])
def test_weighted_aggregator_matches_reference(mode, mixed):
    net = Net(3, mixed)
    agg = Fixed([0.2, 1.5, -0.7])
    shared_ref, heads_ref, _ = reference_grads(net, agg.w)
    w = fm.mtl_backward(net.losses(), net.shared(), agg, engine=mode)
    assert torch.equal(w, agg.w)
    for p, r in zip(net.shared(), shared_ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)
    for p, r in zip(net.heads.parameters(), heads_ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_mgda_closed_form_t2(mode):
    net = Net(2, mixed=True)
    shared_ref, heads_ref, w_ref = reference_grads(net, None)
    w = fm.mtl_backward(net.losses(), net.shared(), MGDA2(), engine=mode)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-8)
    for p, r in zip(net.shared(), shared_ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_accumulates_like_backward():
    net = Net(3)
    agg = Fixed([1.0, 0.5, 2.0])
    shared_ref, heads_ref, _ = reference_grads(net, agg.w)
    fm.mtl_backward(net.losses(), net.shared(), agg)
    first = grads(net.shared())
    flat = cache.cached("params", "auto", net.shared(), lambda: None).groups[0].flat
    assert net.enc1.weight.grad.data_ptr() == flat.data_ptr()       # None -> buffer slice
    fm.mtl_backward(net.losses(), net.shared(), agg)                 # slices -> accumulate
    for p, f in zip(net.shared(), first):
        torch.testing.assert_close(p.grad, 2 * f)
    for p, r in zip(net.heads.parameters(), heads_ref):
        torch.testing.assert_close(p.grad, 2 * r, rtol=1e-5, atol=1e-6)
    net.zero_grad(set_to_none=False)
    fm.mtl_backward(net.losses(), net.shared(), agg)
    for p, f in zip(net.shared(), first):
        torch.testing.assert_close(p.grad, f)
    net.enc1.bias.grad = None                        # one slice detached, the others kept
    fm.mtl_backward(net.losses(), net.shared(), agg)
    for p, f in zip(net.shared(), first):
        torch.testing.assert_close(p.grad, f if p is net.enc1.bias else 2 * f)
    net.zero_grad(set_to_none=False)
    foreign = [torch.ones_like(p) for p in net.shared()]             # user's own tensors
    for p, f in zip(net.shared(), foreign):
        p.grad = f
    net.enc2.bias.grad = None                                        # mixed None / foreign
    fm.mtl_backward(net.losses(), net.shared(), agg)
    for p, f, r in zip(net.shared(), foreign, shared_ref):
        expected = r if p is net.enc2.bias else 1 + r
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        assert (p.grad is f) == (p is not net.enc2.bias)            # foreign: added in place


def test_param_reached_by_no_task_keeps_none():
    net = Net(2)
    lonely = nn.Parameter(torch.randn(4))
    fm.mtl_backward(net.losses(), net.shared() + [lonely], Fixed([1.0, 2.0]))
    assert lonely.grad is None and net.gate.grad is not None


def test_explicit_engine_object():
    net = Net(3)
    tg = TaskGradients(net.shared(), engine="loop")
    agg = Fixed([1.0, 1.0, 1.0])
    fm.mtl_backward(net.losses(), net.shared(), agg, engine=tg)
    ptr = tg.matrices[0].data_ptr()
    net.zero_grad()
    fm.mtl_backward(net.losses(), net.shared(), agg, engine=tg)
    assert tg.matrices[0].data_ptr() == ptr
    ref = copy.deepcopy(net)
    ref.zero_grad()
    sum(ref.losses()).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other shared parameters"):
        fm.mtl_backward(net.losses(), net.shared()[:2], agg, engine=tg)
    with pytest.raises(TypeError, match="LatentGradients"):
        fm.mtl_backward(net.losses(), net.shared(), agg, features=net.features(), engine=tg)


@pytest.mark.parametrize("mode", MODES)
def test_latent_mode_matches_chain_rule(mode):
    net = Net(2)
    z = net.features()
    losses = net.losses(z)
    G = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0].reshape(-1) for L in losses])
    K = G.double() @ G.double().T
    g = ((K[1, 1] - K[0, 1]) / (K[0, 0] + K[1, 1] - 2 * K[0, 1])).clamp(0, 1)
    w_ref = torch.stack([g, 1 - g]).float()
    d_z = (w_ref @ G).view(z.shape)
    encoder = [*net.enc1.parameters(), *net.enc2.parameters()]
    ref_enc = torch.autograd.grad(z, encoder, d_z, retain_graph=True)
    rest = [net.gate, *net.heads.parameters()]
    ref_rest = torch.autograd.grad(sum(losses), rest, retain_graph=True)
    w = fm.mtl_backward(losses, net.shared(), MGDA2(), features=z, engine=mode)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-7)
    for p, r in zip(encoder + rest, list(ref_enc) + list(ref_rest)):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_training_steps_match_manual_reference(opt_cls):
    net = Net(3, mixed=True)
    ref = copy.deepcopy(net)
    agg = Fixed([0.5, 1.0, 2.0])
    kwargs = {"lr": 0.05, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 0.01}
    opt, opt_ref = opt_cls(net.parameters(), **kwargs), opt_cls(ref.parameters(), **kwargs)
    for _ in range(4):
        opt.zero_grad()
        fm.mtl_backward(net.losses(), net.shared(), agg)
        opt.step()
        opt_ref.zero_grad()
        shared_ref, heads_ref, _ = reference_grads(ref, agg.w)
        for p, r in zip(ref.shared(), shared_ref):
            p.grad = r
        for p, r in zip(ref.heads.parameters(), heads_ref):
            p.grad = r
        opt_ref.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, Net(3, mixed=True).state_dict()[_name(net, p)])


def _name(net: nn.Module, p: torch.Tensor) -> str:
    return next(n for n, q in net.named_parameters() if q is p)


def test_check_finite():
    net = Net(2)
    losses = net.losses()
    bad = [losses[0], losses[1] * float("nan")]
    with pytest.raises(ValueError, match=r"non-finite losses at task indices \[1\]"):
        fm.mtl_backward(bad, net.shared(), Sum(), check_finite=True)


def _bad_inputs():
    net = Net(2)
    L = net.losses()
    sh = net.shared()
    a, b = nn.Parameter(torch.randn(3)), torch.randn(3)
    return [
        ("empty", ([], sh, Sum()), {}, ValueError, "empty"),
        ("non-scalar", ([L[0], torch.stack(L)], sh, Sum()), {}, ValueError, r"losses\[1\].*scalar"),
        ("non-tensor loss", ([L[0], 1.0], sh, Sum()), {}, TypeError, r"losses\[1\]"),
        ("no grad", ([L[0], L[1].detach()], sh, Sum()), {}, ValueError, "does not require grad"),
        ("devices", ([L[0], torch.zeros((), device="meta", requires_grad=True)], sh, Sum()), {},
         ValueError, "different devices"),
        ("no params", (L, [], Sum()), {}, ValueError, "shared_params is empty"),
        ("non-leaf", (L, [sh[0] * 2], Sum()), {}, ValueError, "not a leaf"),
        ("frozen", (L, [b], Sum()), {}, ValueError, "does not require grad"),
        ("duplicate", (L, [a, sh[0], a], Sum()), {}, ValueError, "duplicates"),
        ("not tensor", (L, [a, "w"], Sum()), {}, TypeError, r"shared_params\[1\]"),
        ("engine", (L, sh, Sum()), {"engine": "fast"}, ValueError, "unknown engine"),
        ("engine type", (L, sh, Sum()), {"engine": 3}, TypeError, "engine"),
        ("features", (L, sh, Sum()), {"features": torch.randn(3)}, ValueError, "features"),
        ("aggregator", (L, sh, "mgda"), {}, TypeError, "aggregator"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        fm.mtl_backward(*args, **kwargs)


class _DuckAggregator:  # weights(K, losses), but not an Aggregator
    def weights(self, K, losses=None):
        return torch.ones(K.shape[0], dtype=K.dtype)


@pytest.mark.parametrize("aggregator,match", [
    (fm.weighting.DWA(2), "loss weighting"),
    (fm.weighting.UncertaintyWeighting(2), "loss weighting"),
    (_DuckAggregator(), "subclass it"),
    (MGDA, "got ABCMeta|got type"),            # the class, not an instance
], ids=["DWA", "UW", "duck", "class"])
def test_non_aggregators_are_refused_before_any_backward(aggregator, match):
    net = Net(2)
    calls = []
    hooks = [p.register_hook(lambda g: calls.append(1)) for p in net.parameters()]
    with pytest.raises(TypeError, match=match):
        fm.mtl_backward(net.losses(), net.shared(), aggregator)
    assert not calls and all(p.grad is None for p in net.parameters())
    for h in hooks:
        h.remove()
    with pytest.raises(TypeError, match=match):
        fm.optim.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), aggregator,
                              net.shared())


def test_torchjd_aggregator_names_the_fastmtl_one():
    torchjd = pytest.importorskip("torchjd.aggregation")
    net = Net(2)
    with pytest.raises(TypeError, match=r"fm\.aggregators\.UPGrad\(\)"):
        fm.mtl_backward(net.losses(), net.shared(), torchjd.UPGrad())


def test_a_failing_aggregator_frees_the_latent_graph():
    class Boom(Aggregator):
        def _weights(self, K, losses):
            raise RuntimeError("boom")

    cache.clear()
    net = Net(2)
    z = net.features()
    with pytest.raises(RuntimeError, match="boom"):
        fm.mtl_backward(net.losses(z), net.shared(), Boom(), features=z, engine="loop")
    lg = cache.cached("latent", "loop", net.shared(), lambda: None)
    assert lg._pending is None and lg._features is None


def test_latent_engine_needs_bind():
    net = Net(2)
    z = net.features()
    lg = LatentGradients("loop")
    with pytest.raises(RuntimeError, match=r"bind\(features\)"):
        lg.compute(net.losses(z))
    with pytest.raises(ValueError, match="features"):
        lg.bind(z.detach())


def test_cache_reuses_engine_between_calls():
    cache.clear()
    net = Net(3)
    agg = Fixed([1.0, 2.0, 3.0])
    fm.mtl_backward(net.losses(), net.shared(), agg, engine="loop")
    tg = cache.cached("params", "loop", net.shared(), lambda: None)
    ptr = tg.matrices[0].data_ptr()
    fm.mtl_backward(net.losses(), net.shared(), agg, engine="loop")
    assert cache.cached("params", "loop", net.shared(), lambda: None) is tg
    assert tg.matrices[0].data_ptr() == ptr and cache.size() == 1
    z = net.features()
    fm.mtl_backward(net.losses(z), net.shared(), agg, features=z, engine="loop")
    lg = cache.cached("latent", "loop", net.shared(), lambda: None)
    assert isinstance(lg, LatentGradients) and lg._pending is None


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "loop", "vmap"])
def test_cuda_matches_cpu(mode):
    net = Net(4, mixed=True)
    gpu = copy.deepcopy(net).to("cuda")
    agg = Fixed([0.5, -1.0, 2.0, 1.0])
    fm.mtl_backward(net.losses(), net.shared(), agg, engine="loop")
    w = fm.mtl_backward(gpu.losses(), gpu.shared(), agg, engine=mode)
    assert w.device.type == "cuda"
    for p, q in zip(net.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5)
    tg = cache.cached("params", mode, gpu.shared(), lambda: None)
    assert tg.mode == ("vmap" if mode == "auto" else mode)      # the "auto" rule, T = 4


needs_mgda = pytest.mark.skipif(not hasattr(fm.aggregators, "MGDA"),
                                reason="fastmtl.aggregators.MGDA is not there (another helper's)")


@needs_mgda
@pytest.mark.parametrize("mode", MODES)
def test_mgda_aggregator_t2_matches_closed_form(mode):
    net = Net(2, mixed=True)
    shared_ref, _, w_ref = reference_grads(net, None)
    w = fm.mtl_backward(net.losses(), net.shared(), fm.aggregators.MGDA(), engine=mode)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-4, atol=1e-5)
    for p, r in zip(net.shared(), shared_ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-3, atol=1e-5)


@needs_mgda
@pytest.mark.parametrize("latent", [False, True], ids=["params", "latent"])
def test_mgda_t3_is_the_min_norm_point(latent):
    """KKT of min_{w∈Δ} ‖Gᵀw‖²: ⟨g_i, d⟩ >= ‖d‖², with equality where w_i > 0."""
    net = Net(3)
    z = net.features()
    losses = net.losses(z)
    encoder = [*net.enc1.parameters(), *net.enc2.parameters()]
    target = [z] if latent else net.shared()
    per = [[torch.zeros_like(t) if g is None else g for t, g in zip(target, gs)] for gs in
           (torch.autograd.grad(L, target, retain_graph=True, allow_unused=True) for L in losses)]
    G = torch.stack([torch.cat([g.double().reshape(-1) for g in gs]) for gs in per])
    pulled = [torch.autograd.grad(z, encoder, gs[0], retain_graph=True) for gs in per] \
        if latent else None                               # J_zᵀ g_i per task
    w = fm.mtl_backward(losses, net.shared(), fm.aggregators.MGDA(),
                        features=z if latent else None).double()
    assert bool((w >= -1e-7).all()) and abs(float(w.sum()) - 1) < 1e-5
    d = G.T @ w
    gap = G @ d - d @ d
    tol = 1e-5 * float((G * G).sum(1).max())
    assert bool((gap >= -tol).all()) and bool((gap[w > 1e-4].abs() <= tol).all())
    if latent:
        refs = [sum(float(w[i]) * pulled[i][k] for i in range(3)) for k in range(len(encoder))]
        params = encoder
    else:
        refs = [sum(float(w[i]) * per[i][k] for i in range(3)) for k in range(len(target))]
        params = net.shared()
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
