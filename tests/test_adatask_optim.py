"""fm.optim.AdaTask{Adam,RMSprop,Adagrad}: the paper's algorithm, torch equality at T = 1, state,
schedulers, missing gradients and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastmtl as fm
from fastmtl.ops import adatask as adatask_ops
from fastmtl.optim.adatask import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop

OPTIMIZERS = {"adam": (AdaTaskAdam, torch.optim.Adam),
              "rmsprop": (AdaTaskRMSprop, torch.optim.RMSprop),
              "adagrad": (AdaTaskAdagrad, torch.optim.Adagrad)}
PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]


class PaperAdaTask:
    """Algorithm 2 of Yang et al. (2023) written out per parameter, per task, per element in
    float64 (Adam; RMSprop and Adagrad as reconstructed in METHODS.md 2.3), with the package's
    documented extras: coupled decay g_k + (λ/T)θ, decoupled θ(1 − ηλ), amsgrad, maximize,
    a per-task step counter, and skipped (task, parameter) pairs."""

    def __init__(self, algo, params, T, lr, a=0.9, b=0.999, eps=1e-8, wd=0.0, decoupled=False,
                 amsgrad=False, maximize=False, lr_decay=0.0):
        self.algo, self.T, self.lr, self.a, self.b, self.eps = algo, T, lr, a, b, eps
        self.wd, self.decoupled, self.amsgrad, self.maximize = wd, decoupled, amsgrad, maximize
        self.lr_decay = lr_decay
        self.theta = [p.detach().double().clone().flatten().tolist() for p in params]
        self.m = [[[0.0] * len(t) for _ in range(T)] for t in self.theta]
        self.v = [[[0.0] * len(t) for _ in range(T)] for t in self.theta]
        self.vmax = [[[0.0] * len(t) for _ in range(T)] for t in self.theta]
        self.t = [[0] * T for _ in self.theta]

    def step(self, grads, reached=None):
        for i, theta in enumerate(self.theta):
            if grads[i] is None:
                continue
            old = list(theta)
            new = [x * (1 - self.lr * self.wd) if self.decoupled else x for x in old]
            for k in range(self.T):
                if reached is not None and not reached[i][k]:
                    continue
                self.t[i][k] += 1
                t = self.t[i][k]
                for j in range(len(theta)):
                    g = float(grads[i][k].flatten()[j])
                    g = -g if self.maximize else g
                    if self.wd and not self.decoupled:
                        g += self.wd / self.T * old[j]
                    if self.algo == "adam":
                        m = self.m[i][k][j] = self.a * self.m[i][k][j] + (1 - self.a) * g
                        v = self.v[i][k][j] = self.b * self.v[i][k][j] + (1 - self.b) * g * g
                        if self.amsgrad:
                            v = self.vmax[i][k][j] = max(self.vmax[i][k][j], v)
                        m_hat = m / (1 - self.a**t)
                        v_hat = v / (1 - self.b**t)
                        new[j] -= self.lr * m_hat / (math.sqrt(v_hat) + self.eps)
                    elif self.algo == "rmsprop":
                        v = self.v[i][k][j] = self.a * self.v[i][k][j] + (1 - self.a) * g * g
                        new[j] -= self.lr * g / (math.sqrt(v) + self.eps)
                    else:
                        v = self.v[i][k][j] = self.v[i][k][j] + g * g
                        lr = self.lr / (1 + (t - 1) * self.lr_decay)
                        new[j] -= lr * g / (math.sqrt(v) + self.eps)
            theta[:] = new


def problem(T, seed=0, dtype=torch.float64):
    """Shared params (a matrix, a vector, a scalar) and T smooth task losses of them."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 4, generator=gen, dtype=dtype).requires_grad_(),
              torch.randn(5, generator=gen, dtype=dtype).requires_grad_(),
              torch.randn((), generator=gen, dtype=dtype).requires_grad_()]
    targets = [torch.randn(3, 4, generator=gen, dtype=dtype) * (k + 1) for k in range(T)]

    def losses(ps):
        W, b, s = ps
        return [((W - targets[k]) ** 2).sum() * (k + 1) + (b.sin() * (k - 1.5)).sum()
                + (s - k) ** 2 for k in range(T)]

    return params, losses


def task_grads(params, losses):
    return [torch.stack(g) for g in zip(*[torch.autograd.grad(loss, params, retain_graph=True)
                                          for loss in losses])]


CASES = [
    ("adam", dict(lr=0.05), {}),
    ("adam", dict(lr=0.05, weight_decay=0.1, amsgrad=True), dict(wd=0.1, amsgrad=True)),
    ("adam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
     dict(wd=0.1, decoupled=True, maximize=True)),
    ("rmsprop", dict(lr=0.01), dict(a=0.99)),
    ("rmsprop", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(a=0.99, wd=0.1,
                                                                     maximize=True)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01), dict(eps=1e-10, lr_decay=0.01)),
    ("adagrad", dict(lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
     dict(eps=1e-10, wd=0.1, decoupled=True)),
]


@pytest.mark.kernels
@pytest.mark.parametrize("path", PATHS, ids=["single", "foreach", "fused"])
@pytest.mark.parametrize("algo,ours,paper", CASES)
def test_matches_the_paper_algorithm(algo, ours, paper, path):
    """Many steps along each optimizer's own trajectory, float64: equal to the per-element
    float64 reference of Algorithm 2 (the task sum, per-task bias corrections)."""
    T = 3
    params, losses = problem(T)
    opt = OPTIMIZERS[algo][0]([{"params": params, "shared": True}], num_tasks=T, **ours,
                              **path)
    ref = PaperAdaTask(algo, params, T, ours["lr"], **paper)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    for _ in range(12):
        opt.step(task_grads=task_grads(params, losses(params)))
        ref.step(task_grads(ref_params, losses(ref_params)))
        with torch.no_grad():
            for rp, theta in zip(ref_params, ref.theta):
                rp.copy_(torch.tensor(theta, dtype=torch.float64).view_as(rp))
    for p, theta in zip(params, ref.theta):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(theta, dtype=p.dtype),
                                   rtol=1e-10, atol=1e-12)


TORCH_CASES = [
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("adam", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True)),
    ("rmsprop", dict(lr=0.01, weight_decay=0.05)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, maximize=True)),
    ("adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1)),
]


# Every (case, path) pair but fused RMSprop with momentum (an error, tested in test_bad_input).
TORCH_PAIRS = [pytest.param(algo, kwargs, path, id=f"{algo}{k}-{name}")
               for k, (algo, kwargs) in enumerate(TORCH_CASES)
               for name, path in zip(["single", "foreach", "fused"], PATHS)
               if not (path.get("fused") and kwargs.get("momentum"))]


@pytest.mark.parametrize("algo,kwargs,path", TORCH_PAIRS)
def test_single_task_is_torch(algo, kwargs, path):
    """T = 1: bit for bit torch's optimizer on the single-tensor path, 1e-6 on the others
    (torch's fused Adam/Adagrad on CPU vs ours: T × those kernels, so also equal here)."""
    fused = path.get("fused", False)
    torch_path = {} if algo == "rmsprop" and fused else path  # torch has no fused RMSprop
    params, losses = problem(1, dtype=torch.float32)
    twin = [p.detach().clone().requires_grad_() for p in params]
    ours = OPTIMIZERS[algo][0]([{"params": params, "shared": True}], num_tasks=1, **kwargs,
                               **path)
    theirs = OPTIMIZERS[algo][1](twin, **kwargs, **torch_path)
    for _ in range(6):
        grads = torch.autograd.grad(losses(params)[0], params)
        ours.step(task_grads=[g.unsqueeze(0) for g in grads])
        for p, g in zip(twin, torch.autograd.grad(losses(twin)[0], twin)):
            p.grad = g
        theirs.step()
    for p, q in zip(params, twin):
        if path == dict(foreach=False):
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algo", list(OPTIMIZERS))
def test_backward_heads_and_shared(algo):
    """backward(losses) on a model: shared params get per-task state, heads plain state on
    the summed loss (their update equals torch's optimizer on the same .grad)."""
    torch.manual_seed(0)
    enc, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList(torch.nn.Linear(6, 1)
                                                             for _ in range(3))
    twin_heads = copy.deepcopy(heads)
    opt = OPTIMIZERS[algo][0]([{"params": enc.parameters(), "shared": True},
                               {"params": heads.parameters()}], num_tasks=3, lr=0.01,
                              foreach=False)
    ref = OPTIMIZERS[algo][1](twin_heads.parameters(), lr=0.01, foreach=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        z = torch.relu(enc(x))
        opt.zero_grad()
        opt.backward([h(z).pow(2).mean() * (k + 1) for k, h in enumerate(heads)])
        ref.zero_grad()
        sum(h(z.detach()).pow(2).mean() * (k + 1) for k, h in enumerate(twin_heads)).backward()
        opt.step()
        ref.step()
    assert opt.state[enc.weight]["step"].shape == (3,)
    assert opt.state[heads[0].weight]["step"].shape == ()
    for p, q in zip(heads.parameters(), twin_heads.parameters()):
        assert torch.equal(p, q)
    assert enc.weight.grad is None  # the per-task gradients live in the optimizer


def test_backward_equals_explicit_task_grads_and_accumulates():
    params, losses = problem(2, dtype=torch.float32)
    twin = [p.detach().clone().requires_grad_() for p in params]
    a = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=2, lr=0.1)
    b = AdaTaskAdam([{"params": twin, "shared": True}], num_tasks=2, lr=0.1)
    a.backward(losses(params))
    a.backward(losses(params))  # accumulates, like .grad
    a.step()
    grads = task_grads(twin, losses(twin))
    b.step(task_grads=[2 * g for g in grads])
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    a.zero_grad()
    before = [p.detach().clone() for p in params]
    a.step()  # no per-task gradients: the shared params are not updated
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_task_weights_scale_the_losses():
    params, losses = problem(2, dtype=torch.float64)
    twin = [p.detach().clone().requires_grad_() for p in params]
    a = AdaTaskRMSprop([{"params": params, "shared": True}], num_tasks=2, lr=0.1,
                       task_weights=[0.5, 2.0])
    b = AdaTaskRMSprop([{"params": twin, "shared": True}], num_tasks=2, lr=0.1)
    a.backward(losses(params))
    a.step()
    scaled = losses(twin)
    b.backward([0.5 * scaled[0], 2.0 * scaled[1]])
    b.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


@pytest.mark.kernels
@pytest.mark.parametrize("path", PATHS, ids=["single", "foreach", "fused"])
def test_unreached_task_skips_its_moments(path):
    """A task that does not reach a parameter leaves that task's moments and step counter
    alone and adds no step (paper reference with the same mask)."""
    torch.manual_seed(1)
    shared = [torch.randn(4, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True)]
    opt = AdaTaskAdam([{"params": shared, "shared": True}], num_tasks=2, lr=0.1, **path)
    ref = PaperAdaTask("adam", shared, 2, 0.1)
    for _ in range(4):
        losses = [(shared[0] ** 2).sum() + shared[1].sum(), (shared[0] ** 3).sum()]
        g0 = torch.autograd.grad(losses[0], shared, retain_graph=True)
        g1 = torch.autograd.grad(losses[1], shared[0], retain_graph=True)
        opt.zero_grad()
        opt.backward(losses)
        ref.step([torch.stack([g0[0], g1[0]]), torch.stack([g0[1], torch.zeros(3)])],
                 reached=[[True, True], [True, False]])
        opt.step()
    assert opt.state[shared[1]]["step"].tolist() == [4.0, 0.0]
    assert torch.equal(opt.state[shared[1]]["exp_avg"][1], torch.zeros(3, dtype=torch.float64))
    for p, theta in zip(shared, ref.theta):
        torch.testing.assert_close(p.detach(), torch.tensor(theta, dtype=p.dtype), rtol=1e-10,
                                   atol=1e-12)


def test_param_no_task_reaches_is_not_updated():
    used = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    before = unused.detach().clone()
    opt = AdaTaskAdam([{"params": [used, unused], "shared": True}], num_tasks=2, lr=0.1)
    opt.backward([used.sum(), (used**2).sum()])
    opt.step()
    assert torch.equal(unused, before) and len(opt.state[unused]) == 0
    explicit = AdaTaskAdam([{"params": [used, unused], "shared": True}], num_tasks=2, lr=0.1)
    explicit.step(task_grads=[torch.ones(2, 3), None])
    assert torch.equal(unused, before)


@pytest.mark.kernels
@pytest.mark.parametrize("path", PATHS, ids=["single", "foreach", "fused"])
def test_state_dict_resume_is_bit_identical(path):
    params, losses = problem(3, dtype=torch.float32)
    opt = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=3, lr=0.05, amsgrad=True,
                      **path)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(losses(params))
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    opt.backward(losses(params))
    opt.step()
    expected = [p.detach().clone() for p in params]

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = AdaTaskAdam([{"params": resumed, "shared": True}], num_tasks=3, lr=0.05,
                       amsgrad=True, **path)
    opt2.load_state_dict(saved)
    opt2.backward(losses(resumed))
    opt2.step()
    for p, q in zip(resumed, expected):
        assert torch.equal(p, q)


def test_scheduler_changes_lr():
    params, losses = problem(2, dtype=torch.float64)
    opt = AdaTaskAdagrad([{"params": params, "shared": True}], num_tasks=2, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    opt.backward(losses(params))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    opt.backward(losses(params))
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_mixed_dtypes_in_a_group():
    a = torch.randn(3, dtype=torch.float32, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    opt = AdaTaskAdam([{"params": [a, b], "shared": True}], num_tasks=2, lr=0.1, fused=True)
    ref = PaperAdaTask("adam", [a, b], 2, 0.1)
    grads = [torch.randn(2, 3), torch.randn(2, 2, dtype=torch.float64)]
    opt.step(task_grads=grads)
    ref.step(grads)
    for p, theta in zip([a, b], ref.theta):
        torch.testing.assert_close(p.detach().double(), torch.tensor(theta, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)


def test_bfloat16_moments():
    params, losses = problem(2, dtype=torch.float32)
    twin = [p.detach().clone().requires_grad_() for p in params]
    low = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=2, lr=0.01,
                      moment_dtype=torch.bfloat16)
    full = AdaTaskAdam([{"params": twin, "shared": True}], num_tasks=2, lr=0.01)
    for _ in range(3):
        low.step(task_grads=task_grads(params, losses(params)))
        full.step(task_grads=task_grads(twin, losses(twin)))
    assert low.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=0.05 * 0.01 * 3 * 2)
    low.load_state_dict(low.state_dict())
    assert low.state[params[0]]["exp_avg_sq"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="moment_dtype needs the fused path"):
        AdaTaskAdam([{"params": twin, "shared": True}], num_tasks=2, foreach=True,
                    moment_dtype=torch.bfloat16)


def test_nonfinite_gradients_propagate_and_check_finite_raises():
    p = torch.ones(3, requires_grad=True)
    opt = AdaTaskAdam([{"params": [p], "shared": True}], num_tasks=2, lr=0.1)
    opt.step(task_grads=[torch.tensor([[float("nan"), 0.0, 1.0], [1.0, 1.0, 1.0]])])
    assert torch.isnan(p[0]) and torch.isfinite(p[1:]).all()
    q = torch.ones(3, requires_grad=True)
    opt = AdaTaskAdam([{"params": [q], "shared": True}], num_tasks=2)
    with pytest.raises(ValueError, match="non-finite"):
        opt.backward([q.sum() * float("inf"), q.sum()], check_finite=True)


def test_bad_input():
    p = torch.ones(3, requires_grad=True)
    opt = AdaTaskAdam([{"params": [p], "shared": True}], num_tasks=2)
    with pytest.raises(ValueError, match="got 3 losses for num_tasks=2"):
        opt.backward([p.sum()] * 3)
    with pytest.raises(ValueError, match=r"task_grads for '0' must have shape \(2, 3\)"):
        opt.step(task_grads=[torch.ones(3, 3)])
    with pytest.raises(ValueError, match="task_grads has 2 entries for 1"):
        opt.step(task_grads=[torch.ones(2, 3), None])
    with pytest.raises(ValueError, match="num_tasks"):
        AdaTaskAdam([p], num_tasks=0)
    with pytest.raises(ValueError, match="betas"):
        AdaTaskAdam([p], num_tasks=2, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="task_weights"):
        AdaTaskAdam([p], num_tasks=2, task_weights=[1.0])
    with pytest.raises(ValueError, match="fused=True does not support RMSprop's momentum"):
        AdaTaskRMSprop([p], num_tasks=2, momentum=0.9, fused=True)
    with pytest.raises(ValueError, match="cannot both"):
        AdaTaskAdam([p], num_tasks=2, fused=True, foreach=True)
    with pytest.raises(ValueError, match="shared must be a bool|shared"):
        AdaTaskAdam([{"params": [p], "shared": "yes"}], num_tasks=2)


def test_exported():
    assert fm.optim.AdaTaskAdam is AdaTaskAdam
    assert fm.ops.adatask_adam_ is adatask_ops.adatask_adam_
    assert fm.diagnostics.TaskDominance.__module__ == "fastmtl.diagnostics.dominance"


def test_capturable_keeps_steps_on_the_device():
    """capturable=True: step counters live on the parameters' device and the update is the
    same as without it (on the fused path here; CUDA graph capture below on GPU sessions)."""
    params, losses = problem(2, dtype=torch.float32)
    twin = [p.detach().clone().requires_grad_() for p in params]
    a = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=2, lr=0.1, capturable=True)
    b = AdaTaskAdam([{"params": twin, "shared": True}], num_tasks=2, lr=0.1)
    for _ in range(2):
        a.step(task_grads=task_grads(params, losses(params)))
        b.step(task_grads=task_grads(twin, losses(twin)))
    assert a.state[params[0]]["step"].device == params[0].device
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("path", [dict(fused=True), dict(foreach=True, capturable=True)],
                         ids=["fused", "foreach-capturable"])
def test_cuda_graph_capture(path):
    """A warmed-up step replayed from a CUDA graph equals eager steps."""
    params, losses = problem(2, dtype=torch.float32)
    params = [p.detach().cuda().requires_grad_() for p in params]
    twin = [p.detach().clone().requires_grad_() for p in params]
    grads = [torch.randn(2, *p.shape, device="cuda") for p in params]
    a = AdaTaskAdam([{"params": params, "shared": True}], num_tasks=2, lr=0.01, **path)
    b = AdaTaskAdam([{"params": twin, "shared": True}], num_tasks=2, lr=0.01, **path)
    a.step(task_grads=grads)  # warm-up: state, tables, compilation
    b.step(task_grads=grads)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        a.step(task_grads=grads)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
        b.step(task_grads=grads)
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
