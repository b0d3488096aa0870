"""The engine against independent references: per-task ``torch.autograd.grad`` + ``torch.cat``.

Problem: a shared encoder (params of shapes (6, 4), (6,), (), (2, 3, 6); optionally the last in
float64, giving two (device, dtype) groups), a shared vector ``partial`` that only the even tasks
use, an ``unused`` shared vector no task uses, and T linear heads.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from fastmtl.engine import LatentGradients, TaskGradients, VmapUnsupportedError, auto_mode, cache
from fastmtl.engine import task_gradients as tg_module
from fastmtl.engine.graph import task_masks

MODES = ["loop", "vmap"]


class Problem:
    def __init__(self, T: int, mixed: bool = False, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)

        def r(*shape, dtype=torch.float32):
            return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()

        self.T = T
        self.W1, self.b1, self.s = r(6, 4), r(6), r()
        self.W2 = r(2, 3, 6, dtype=torch.float64 if mixed else torch.float32)
        self.partial, self.unused = r(6), r(3)
        self.shared = [self.W1, self.b1, self.s, self.W2, self.partial, self.unused]
        self.heads = [t for _ in range(T) for t in (r(6), r())]
        self.x = torch.randn(8, 4, generator=gen)
        self.y = torch.randn(T, 8, generator=gen)

    def features(self) -> torch.Tensor:
        h = torch.tanh(self.x @ self.W1.T + self.b1) * self.s
        return torch.sin(h.to(self.W2.dtype) @ self.W2.reshape(6, 6).T).float()

    def losses(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.features() if z is None else z
        out = []
        for i in range(self.T):
            v, c = self.heads[2 * i], self.heads[2 * i + 1]
            zi = z + self.partial if i % 2 == 0 else z
            out.append(((zi @ v + c - self.y[i]) ** 2).mean() * (i + 1))
        return out


def reference(pb: Problem):
    """Per-task grads by autograd.grad; G per dtype group by torch.cat; reached; head sums."""
    losses = pb.losses()
    rows, reached = [], []
    for loss in losses:
        gs = torch.autograd.grad(loss, pb.shared, retain_graph=True, allow_unused=True)
        reached.append([g is not None for g in gs])
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(pb.shared, gs)])
    heads = torch.autograd.grad(sum(losses), pb.heads)
    groups: dict[torch.dtype, list[int]] = {}
    for k, p in enumerate(pb.shared):
        groups.setdefault(p.dtype, []).append(k)
    G = [torch.stack([torch.cat([row[k].reshape(-1) for k in ks]) for row in rows])
         for ks in groups.values()]
    return G, torch.tensor(reached), heads


def assert_matches(tg: TaskGradients, pb: Problem, exact: bool) -> None:
    G_ref, reached_ref, heads_ref = reference(pb)
    assert len(tg.matrices) == len(G_ref)
    for G, R in zip(tg.matrices, G_ref):
        if exact:
            assert torch.equal(G, R)
        else:
            torch.testing.assert_close(G, R, rtol=1e-5, atol=1e-6)
    assert torch.equal(tg.reached, reached_ref)
    for h, ref in zip(pb.heads, heads_ref):
        torch.testing.assert_close(h.grad, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp64"])
def test_matches_per_task_reference(mode, T, mixed):
    pb = Problem(T, mixed)
    before = [torch.full_like(p, 7.0) for p in pb.shared]
    for p, b in zip(pb.shared, before):
        p.grad = b
    for h in pb.heads:                       # heads accumulate Σ_i ∇L_i into their .grad
        h.grad = torch.ones_like(h)
    tg = TaskGradients(pb.shared, engine=mode).compute(pb.losses())
    for h in pb.heads:
        h.grad -= 1
    assert tg.mode == mode and tg.num_tasks == T
    assert len(tg.groups) == (2 if mixed else 1)
    assert_matches(tg, pb, exact=mode == "loop")
    for p, b in zip(pb.shared, before):      # the shared params' own .grad is restored
        assert p.grad is b and bool((b == 7.0).all())
    assert not tg.reached[:, 5].any()                      # `unused`
    assert tg.reached[:, 4].tolist() == [i % 2 == 0 for i in range(T)]   # `partial`
    for v, p in zip(tg.grads(), pb.shared):
        assert v.shape == (T, *p.shape)


def test_loop_equals_vmap():
    pb = Problem(5, mixed=True)
    loop = TaskGradients(pb.shared, engine="loop").compute(pb.losses())
    vmap = TaskGradients(pb.shared, engine="vmap").compute(pb.losses())
    for a, b in zip(loop.matrices, vmap.matrices):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(loop.reached, vmap.reached)


@pytest.mark.parametrize("mode", MODES)
def test_gram_sums_groups_in_wide_precision(mode):
    pb = Problem(4, mixed=True)
    tg = TaskGradients(pb.shared, engine=mode).compute(pb.losses())
    G_ref, _, _ = reference(pb)
    full = torch.cat([G.double() for G in G_ref], dim=1)
    K = tg.gram()
    assert K.dtype == torch.float64 and K.shape == (4, 4)
    torch.testing.assert_close(K, full @ full.T, rtol=1e-6, atol=1e-8)
    pb32 = Problem(4, mixed=False)
    K32 = TaskGradients(pb32.shared, engine=mode).compute(pb32.losses()).gram()
    assert K32.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_buffer_allocated_once_and_reused(mode):
    pb = Problem(3, mixed=True)
    tg = TaskGradients(pb.shared, engine=mode)
    tg.compute(pb.losses())
    ptrs = [G.untyped_storage().data_ptr() for G in tg.matrices]
    views = tg.grads()
    for step in range(3):
        with torch.no_grad():
            for p in pb.shared:
                p.add_(0.1 * (step + 1))
        for h in pb.heads:
            h.grad = None
        tg.compute(pb.losses())
        assert [G.untyped_storage().data_ptr() for G in tg.matrices] == ptrs
        assert all(a is b for a, b in zip(tg.grads(), views))
        assert_matches(tg, pb, exact=mode == "loop")
    tg.compute(pb.losses()[:2])              # a new T reallocates
    assert tg.matrices[0].shape[0] == 2


@pytest.mark.parametrize("mode", MODES)
def test_rows_of_a_param_no_longer_reached_are_zeroed(mode):
    pb = Problem(3)
    tg = TaskGradients(pb.shared, engine=mode).compute(pb.losses())
    assert tg.reached[0, 4] and bool((tg.grads()[4][0] != 0).any())
    pb.partial.requires_grad_(False)          # same T, but no task reaches `partial` now
    losses = pb.losses()
    pb.partial.requires_grad_(True)
    tg.compute(losses)
    assert not tg.reached[:, 4].any() and bool((tg.grads()[4] == 0).all())


def test_loop_accumulates_into_the_buffer_in_place():
    pb = Problem(3)
    tg = TaskGradients(pb.shared, engine="loop")
    tg.compute(pb.losses())
    storage = tg.matrices[0].untyped_storage().data_ptr()
    nbytes = tg.matrices[0].untyped_storage().nbytes()
    seen = []

    def hook(p):  # runs right after AccumulateGrad wrote p.grad
        seen.append(p.grad.data_ptr())
        assert p.grad.untyped_storage().data_ptr() == storage

    handles = [p.register_post_accumulate_grad_hook(hook) for p in pb.shared]
    for h in pb.heads:
        h.grad = None
    tg.compute(pb.losses())
    for h in handles:
        h.remove()
    assert len(seen) == 3 * 4 + 2           # 4 encoder params x 3 tasks + partial x 2 tasks
    assert all(storage <= ptr < storage + nbytes for ptr in seen)
    assert_matches(tg, pb, exact=True)


def test_direction_and_apply():
    pb = Problem(3, mixed=True)
    tg = TaskGradients(pb.shared, engine="loop").compute(pb.losses())
    G_ref, _, _ = reference(pb)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for d, G in zip(tg.direction(w), G_ref):
        torch.testing.assert_close(d, (w.to(G.dtype) @ G), rtol=1e-5, atol=1e-6)
    for p in pb.shared:
        p.grad = None
    assert tg.apply(w) is None
    assert pb.unused.grad is None            # reached by no task: untouched
    flat = tg.groups[0].flat
    assert pb.W1.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    ref = torch.autograd.grad(sum(float(wi) * L for wi, L in zip(w, pb.losses())), pb.shared[:5])
    for p, r in zip(pb.shared[:5], ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        tg.apply(torch.ones(2))


def test_auto_rule():
    assert auto_mode(torch.device("cpu"), 8) == "loop"
    assert auto_mode(torch.device("cuda"), 2) == "loop"
    assert auto_mode(torch.device("cuda"), 3) == "vmap"
    pb = Problem(4)
    assert TaskGradients(pb.shared).compute(pb.losses()).mode == "loop"


class _ItemInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2 if g.sum().item() > -1e30 else g


def _unvmappable_losses(pb: Problem) -> list[torch.Tensor]:
    return [_ItemInBackward.apply(loss) for loss in pb.losses()]


def test_vmap_failure_is_clear():
    pb = Problem(3)
    with pytest.raises(VmapUnsupportedError, match="engine='loop'"):
        TaskGradients(pb.shared, engine="vmap").compute(_unvmappable_losses(pb))


def test_auto_falls_back_to_loop_once(monkeypatch):
    monkeypatch.setattr(tg_module, "auto_mode", lambda device, T: "vmap")
    pb = Problem(3)
    tg = TaskGradients(pb.shared, engine="auto")
    with pytest.warns(RuntimeWarning, match="falls back"):
        tg.compute(_unvmappable_losses(pb))
    assert tg.mode == "loop"
    G_ref, _, _ = reference(pb)
    torch.testing.assert_close(tg.matrices[0], 2 * G_ref[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tg.compute(_unvmappable_losses(pb)).mode == "loop"
    ok = TaskGradients(pb.shared, engine="auto").compute(pb.losses())   # auto -> vmap works
    assert ok.mode == "vmap" and ok._vmap_ok is True


def test_task_masks_graph_walk():
    a, b, c = (torch.randn(3, requires_grad=True) for _ in range(3))
    shared = torch.tanh(a)
    losses = [(shared * b).sum(), (shared + c).sum(), (shared * 2).sum()]
    leaves, z_mask = task_masks(losses, target=shared)
    masks = {id(t): m for t, m in leaves}
    assert masks[id(b)] == 0b001 and masks[id(c)] == 0b010 and z_mask == 0b111
    assert id(a) not in masks                 # the walk stops at the target
    leaves, _ = task_masks(losses)
    assert {id(t): m for t, m in leaves}[id(a)] == 0b111


def test_weak_references_and_cache():
    pb = Problem(2)
    tg = TaskGradients(pb.shared)
    cache.clear()
    obj = cache.cached("params", "loop", pb.shared, lambda: tg)
    assert cache.cached("params", "loop", pb.shared, lambda: None) is obj
    assert cache.size() == 1
    del pb
    gc.collect()
    assert cache.size() == 0
    with pytest.raises(RuntimeError, match="freed"):
        _ = tg.params


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 3])
def test_latent_equals_chain_rule(mode, T):
    pb = Problem(T, mixed=True)
    z = pb.features()
    losses = pb.losses(z)
    G_z = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0].reshape(-1)
                       for L in losses])
    w = torch.linspace(0.5, 1.5, T)
    d_z = (w @ G_z).view(z.shape)
    encoder = [pb.W1, pb.b1, pb.s, pb.W2]
    ref_enc = torch.autograd.grad(z, encoder, d_z, retain_graph=True)
    ref_rest = torch.autograd.grad(sum(losses), pb.heads + [pb.partial], retain_graph=True)

    lg = LatentGradients(engine=mode).bind(z).compute(losses)
    assert lg.mode == mode and lg.reached.all()
    torch.testing.assert_close(lg.buffer, G_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg.gram(), G_z @ G_z.T, rtol=1e-5, atol=1e-6)
    d = lg.apply(w, return_direction=True)
    torch.testing.assert_close(d, d_z, rtol=1e-5, atol=1e-6)
    for p, r in zip(encoder, ref_enc):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)
    for p, r in zip(pb.heads + [pb.partial], ref_rest):   # plain sum, also for `partial`
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)
    assert pb.unused.grad is None
    with pytest.raises(RuntimeError, match="compute"):
        lg.apply(w)


def test_latent_task_not_reaching_z():
    pb = Problem(2)
    z = pb.features()
    losses = [pb.losses(z)[0], (pb.heads[2] ** 2).sum()]
    for mode in MODES:
        lg = LatentGradients(engine=mode).bind(z).compute(losses)
        assert lg.reached.tolist() == [True, False]
        assert bool((lg.buffer[1] == 0).all()) and bool((lg.buffer[0] != 0).any())
        lg.discard()


@pytest.mark.parametrize("mode", MODES)
def test_latent_skip_connection_around_z(mode):
    """W is behind z and used by the losses directly too: it gets J_zᵀ d_z plus its plain
    gradient along the direct path; V (a head) gets Σ_i ∇_V L_i; the loop engine notices the
    skip and pulls d_z back through the whole graph (``_split`` False), else from z alone."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.tensor([0.25, 1.5], dtype=torch.float64)
    for skip in (True, False):
        W.grad = V.grad = None
        z = torch.tanh(x @ W.T)
        losses = [(z @ V[i]).square().sum() + ((i + 1.0) * W.square().sum() if skip else 0)
                  for i in range(2)]
        G = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0].reshape(-1)
                         for L in losses])
        d_z = (w @ G).view(z.shape)
        ref_W = torch.autograd.grad(z, W, d_z, retain_graph=True)[0] + 3.0 * 2 * W * skip
        ref_V = torch.autograd.grad(sum((z.detach() @ V[i]).square().sum() for i in range(2)),
                                    V)[0]
        lg = LatentGradients(engine=mode).bind(z).compute(losses)
        if mode == "loop":
            assert lg._split is not skip
        lg.apply(w)
        torch.testing.assert_close(W.grad, ref_W, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(V.grad, ref_V, rtol=1e-12, atol=1e-12)
