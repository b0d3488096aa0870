"""fm.diagnostics: AU / rAU task dominance (AdaTask, Yang et al. 2023) against float64
recomputations, Adam's update as the sum of the per-task updates, the paper's dominance claim on
a synthetic problem, read-outs, state and bad input; pairwise cosines from a Gram matrix."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastmtl.diagnostics import TaskDominance, conflict_fraction, pairwise_cosines
from fastmtl.optim.adatask import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop

T = 3


class Tiny:
    """Shared W (4, 3) and b (4,), three regression heads; task 2 uses b on even steps only."""

    def __init__(self, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
        self.W = torch.nn.Parameter(r(4, 3))
        self.b = torch.nn.Parameter(r(4))
        self.heads = r(T, 4)
        self.scale = torch.tensor([1.0, 3.0, 0.5], dtype=dtype)
        self.data = [(r(8, 3), r(T, 8)) for _ in range(6)]

    def params(self):
        return [("W", self.W), ("b", self.b)]

    def losses(self, step):
        x, y = self.data[step % len(self.data)]
        z = x @ self.W.T
        out = [(z + self.b) if k < 2 or step % 2 == 0 else z for k in range(T)]
        return [self.scale[k] * ((out[k] @ self.heads[k] - y[k]) ** 2).mean() for k in range(T)]

    def task_grads(self, step):
        """Per-task gradients (T, *p.shape) per parameter, None rows for unreached pairs."""
        losses = self.losses(step)
        rows = [torch.autograd.grad(loss, [self.W, self.b], retain_graph=True, allow_unused=True)
                for loss in losses]
        return [[rows[k][i] for k in range(T)] for i in range(2)]


def stacked(per_task, like):
    return torch.stack([torch.zeros_like(like) if g is None else g for g in per_task])


def adam_reference(rows, lr, betas, eps, amsgrad, beta, steps):
    """Float64 AU of AdaTask-Adam from the per-task gradients of each step (None: skipped)."""
    b1, b2 = betas
    state = [dict(m=0.0, v=0.0, vmax=0.0, t=0) for _ in range(T)]
    au = torch.zeros(T, *next(g for g in rows[0] if g is not None).shape, dtype=torch.float64)
    for per_task in rows[:steps]:
        for k, g in enumerate(per_task):
            s = state[k]
            delta = 0.0
            if g is not None:
                g = g.double()
                s["t"] += 1
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                s["vmax"] = torch.maximum(torch.as_tensor(s["vmax"]), s["v"])
                v = s["vmax"] if amsgrad else s["v"]
                delta = -lr * (s["m"] / (1 - b1 ** s["t"])) / (
                    (v / (1 - b2 ** s["t"])).sqrt() + eps)
            au[k] = beta * au[k] + (1 - beta) * torch.as_tensor(delta) ** 2
    return au


@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=True)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adatask_adam_au_matches_float64_recomputation(path, amsgrad):
    model = Tiny()
    lr, betas, eps, beta = 0.05, (0.8, 0.95), 1e-8, 0.7
    opt = AdaTaskAdam([{"params": [model.W, model.b], "shared": True}], num_tasks=T, lr=lr,
                      betas=betas, eps=eps, amsgrad=amsgrad, **path)
    dom = TaskDominance(model.params(), T, beta=beta)
    history = []
    for step in range(5):
        history.append(model.task_grads(step))
        before = [model.W.detach().clone(), model.b.detach().clone()]
        opt.zero_grad()
        opt.backward(model.losses(step))
        opt.step()
        deltas = dom.update_from(opt)
        for (name, p), old in zip(model.params(), before):
            torch.testing.assert_close(deltas[name].sum(0), (p.detach() - old).float(),
                                       atol=1e-6, rtol=1e-5)
        if step % 2:  # task 2 did not reach b: it adds nothing, though its moments are not 0
            assert torch.all(deltas["b"][2] == 0) and opt.state[model.b]["exp_avg"][2].any()
        for i, (_, p) in enumerate(model.params()):
            ref = adam_reference([h[i] for h in history], lr, betas, eps, amsgrad, beta,
                                 step + 1)
            torch.testing.assert_close(dom.au(p).double(), ref, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True), dict(maximize=True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_per_task_updates_sum_to_adams_step(dtype, options):
    model = Tiny(dtype)
    opt = torch.optim.Adam([model.W, model.b], lr=0.05, **options)
    dom = TaskDominance(model.params(), T)
    tol = dict(atol=1e-13, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    for step in range(5):
        grads = [stacked(rows, p) for rows, p in zip(model.task_grads(step), [model.W, model.b])]
        before = [model.W.detach().clone(), model.b.detach().clone()]
        model.W.grad, model.b.grad = grads[0].sum(0), grads[1].sum(0)
        if step == 2:  # Adam skips b: so do its first moments here
            model.b.grad = None
        opt.step()
        deltas = dom.update_from(opt, task_grads=grads)
        for (name, p), old in zip(model.params(), before):
            torch.testing.assert_close(deltas[name].sum(0), p.detach() - old, **tol)
        assert deltas["b"].any() == (step != 2)


@pytest.mark.parametrize("cls,options", [(AdaTaskRMSprop, dict(alpha=0.9)),
                                         (AdaTaskAdagrad, dict(lr_decay=0.1)),
                                         (AdaTaskAdagrad, dict(maximize=True))])
def test_rmsprop_adagrad_updates_from_task_grads(cls, options):
    model = Tiny(torch.float64)
    opt = cls([{"params": [model.W, model.b], "shared": True}], num_tasks=T, lr=0.05, **options)
    dom = TaskDominance(model.params(), T, beta=0.5)
    au = [torch.zeros(T, *p.shape, dtype=torch.float64) for _, p in model.params()]
    for step in range(4):
        grads = [stacked(rows, p) for rows, p in zip(model.task_grads(step), [model.W, model.b])]
        before = [model.W.detach().clone(), model.b.detach().clone()]
        opt.step(task_grads=grads)
        deltas = dom.update_from(opt, task_grads=grads)
        for i, ((name, p), old) in enumerate(zip(model.params(), before)):
            torch.testing.assert_close(deltas[name].sum(0), p.detach() - old,
                                       atol=1e-13, rtol=1e-10)
            au[i] = 0.5 * au[i] + 0.5 * deltas[name] ** 2
            torch.testing.assert_close(dom.au(p), au[i])


def run_scaled(make_opt, T=3, big=1, steps=20, n=50):
    """g_k = s_k g(t): one direction pattern per step, task ``big`` 100× larger."""
    theta = torch.nn.Parameter(torch.zeros(n))
    opt = make_opt(theta)
    dom = TaskDominance([("theta", theta)], T)
    scales = torch.ones(T, 1)
    scales[big] = 100.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        G = scales * torch.randn(n, generator=gen)
        if isinstance(opt, AdaTaskAdam):
            opt.step(task_grads=[G])
            dom.update_from(opt)
        else:
            theta.grad = G.sum(0)
            opt.step()
            dom.update_from(opt, task_grads=[G])
    return dom


def test_large_task_dominates_adam_but_not_adatask():
    adam = run_scaled(lambda p: torch.optim.Adam([p], lr=1e-3))
    rau = adam.per_layer()["theta"]
    assert rau[1] > 0.999 and rau[0] < 1e-3 and rau[2] < 1e-3
    torch.testing.assert_close(adam.dominated_fraction()["theta"], torch.tensor([0.0, 1, 0]))
    ada = run_scaled(lambda p: AdaTaskAdam([{"params": [p], "shared": True}], num_tasks=3,
                                           lr=1e-3))
    torch.testing.assert_close(ada.per_layer()["theta"], torch.full((3,), 1 / 3), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(ada.dominated_fraction()["theta"], torch.zeros(3))


def test_rau_per_layer_and_dominated_fraction():
    model = Tiny()
    opt = torch.optim.Adam([model.W, model.b], lr=0.05)
    dom = TaskDominance(model.params(), T)
    for _, p in model.params():  # nothing yet: balanced
        torch.testing.assert_close(dom.rau(p), torch.full((T, *p.shape), 1 / T))
    for step in range(3):
        grads = [stacked(rows, p) for rows, p in zip(model.task_grads(step), [model.W, model.b])]
        model.W.grad, model.b.grad = grads[0].sum(0), grads[1].sum(0)
        opt.step()
        dom.update_from(opt, task_grads=grads)
    layers = dom.per_layer()
    assert list(layers) == ["W", "b"]
    for name, p in model.params():
        au, rau = dom.au(name), dom.rau(p)
        assert au is dom.au(p) and (au.sum(0) > 0).all()
        torch.testing.assert_close(rau.sum(0), torch.ones(p.shape))
        torch.testing.assert_close(rau, au / au.sum(0))
        torch.testing.assert_close(layers[name], rau.reshape(T, -1).mean(1))
        frac = dom.dominated_fraction(0.5)[name]
        torch.testing.assert_close(frac, (rau > 0.5).float().reshape(T, -1).mean(1))
    names = TaskDominance([model.W, model.b], T).per_layer()
    assert list(names) == ["0", "1"]


def test_single_task_is_never_dominated():
    theta = torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.Adam([theta])
    dom = TaskDominance([theta], 1)
    theta.grad = torch.arange(5.0)
    opt.step()
    dom.update_from(opt, task_grads=[theta.grad.unsqueeze(0)])
    torch.testing.assert_close(dom.rau(theta), torch.ones(1, 5))
    torch.testing.assert_close(dom.dominated_fraction()["0"], torch.zeros(1))


def test_state_dict_round_trip_and_reset():
    model = Tiny()
    opt = torch.optim.Adam([model.W, model.b], lr=0.05)
    first, second = TaskDominance(model.params(), T), TaskDominance(model.params(), T, beta=0.5)
    for step in range(3):
        grads = [stacked(rows, p) for rows, p in zip(model.task_grads(step), [model.W, model.b])]
        model.W.grad, model.b.grad = grads[0].sum(0), grads[1].sum(0)
        opt.step()
        if step == 2:
            second.load_state_dict(copy.deepcopy(first.state_dict()))
            assert second.beta == first.beta and second.source == "adam"
        for dom in (first, second) if step == 2 else (first,):
            dom.update_from(opt, task_grads=grads)
    for name in ("W", "b"):
        torch.testing.assert_close(second.au(name), first.au(name), atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_tasks=3"):
        TaskDominance(model.params(), 2).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="parameters"):
        TaskDominance([model.W], T).load_state_dict(first.state_dict())
    first.reset()
    assert first.source is None and torch.all(first.au("W") == 0)


def test_bad_input():
    model = Tiny()
    params = [model.W, model.b]
    with pytest.raises(ValueError, match="num_tasks"):
        TaskDominance(params, 0)
    with pytest.raises(ValueError, match="beta"):
        TaskDominance(params, T, beta=1.0)
    with pytest.raises(TypeError, match="single tensor"):
        TaskDominance(model.W, T)
    with pytest.raises(ValueError, match="twice"):
        TaskDominance([model.W, model.W], T)
    with pytest.raises(TypeError, match="floating"):
        TaskDominance([torch.zeros(3, dtype=torch.long)], T)
    dom = TaskDominance(model.params(), T)
    with pytest.raises(ValueError, match="not a tracked parameter"):
        dom.au(torch.zeros(4))
    with pytest.raises(ValueError, match="not a tracked parameter"):
        dom.rau("nope")
    with pytest.raises(TypeError, match="SGD"):
        dom.update_from(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="pass task_grads"):
        dom.update_from(torch.optim.Adam(params))
    with pytest.raises(ValueError, match="pass task_grads"):
        dom.update_from(AdaTaskRMSprop([{"params": params, "shared": True}], num_tasks=T))
    with pytest.raises(ValueError, match="num_tasks=2"):
        dom.update_from(AdaTaskAdam([{"params": params, "shared": True}], num_tasks=2))
    with pytest.raises(ValueError, match="non-shared"):
        dom.update_from(AdaTaskAdam(params, num_tasks=T))
    with pytest.raises(ValueError, match="'b' is not in"):
        dom.update_from(torch.optim.Adam([model.W]), task_grads=[None, None])
    adam = torch.optim.Adam(params)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        dom.update_from(adam, task_grads=[torch.zeros(T, 4, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="1 entries"):
        dom.update_from(adam, task_grads=[torch.zeros(T, 4, 3)])
    with pytest.raises(ValueError, match="not tracked"):
        dom.update_from(adam, task_grads={torch.zeros(1): torch.zeros(T, 1)})
    with pytest.raises(TypeError, match="list"):
        dom.update_from(adam, task_grads=torch.zeros(T, 4))
    dom.update_from(adam, task_grads={model.W: torch.zeros(T, 4, 3)})  # no state yet: no-op
    assert dom.source == "adam"
    ada = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=T)
    with pytest.raises(ValueError, match="reset"):
        dom.update_from(ada)
    with pytest.raises(ValueError, match="threshold"):
        dom.dominated_fraction(1.5)


# -- pairwise cosines ----------------------------------------------------------------------
def direct_cosines(G):
    n = G.norm(dim=1, keepdim=True)
    unit = torch.where(n > 0, G / torch.where(n > 0, n, 1), 0)
    C = unit @ unit.T
    C.fill_diagonal_(1)
    return C


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pairwise_cosines_match_direct_computation(dtype):
    G = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G[3] = 0
    G[4] = -2.5 * G[0]
    K = (G @ G.T).to(dtype)
    C = pairwise_cosines(K)
    assert C.dtype == dtype and not C.isnan().any()
    torch.testing.assert_close(C, direct_cosines(G).to(dtype))
    assert C[3, 3] == 1 and torch.all(C[3, [0, 1, 2, 4]] == 0)
    assert math.isclose(float(C[0, 4]), -1, rel_tol=1e-6) and C.abs().max() <= 1
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = sum(bool(direct_cosines(G)[i, j] < 0) for i, j in pairs) / len(pairs)
    assert math.isclose(float(conflict_fraction(K)), expected, rel_tol=1e-6)


def test_pairwise_cosines_edge_cases():
    for K in (torch.tensor([[4.0]]), torch.zeros(1, 1)):
        torch.testing.assert_close(pairwise_cosines(K), torch.ones(1, 1))
        assert conflict_fraction(K) == 0
    torch.testing.assert_close(pairwise_cosines(torch.zeros(3, 3)), torch.eye(3))
    K16 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float16)
    assert pairwise_cosines(K16).dtype == torch.float32
    assert conflict_fraction(K16) == 1
    with pytest.raises(ValueError, match="square"):
        pairwise_cosines(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating"):
        pairwise_cosines(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        conflict_fraction([[1.0]])
