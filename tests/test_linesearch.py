"""fm.linesearch: the Armijo rule, batched == sequential, hand-computed toys, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import device_backend_params
from torch import nn
from torch.func import functional_call

from fastmtl.aggregators import Mean, UPGrad
from fastmtl.backend import use_backend
from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking, StepInfo
from fastmtl.linesearch.latent import CPU_TRIALS_PER_CALL


def _half_sq(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - a) ** 2).sum()


def _quadratic(cls, **kw):
    """z = W x + b with W = b = 0 and x = 0 (so z = b), identity heads, L_i = ½‖z − a_i‖²."""
    enc = nn.Linear(1, 2, dtype=torch.float64)
    with torch.no_grad():
        enc.weight.zero_()
        enc.bias.zero_()
    a = [torch.tensor([[2.0, 0.0]], dtype=torch.float64),
         torch.tensor([[0.0, 2.0]], dtype=torch.float64)]
    ls = cls(enc, [nn.Identity(), nn.Identity()], [_half_sq, _half_sq], **kw)
    return ls, enc, torch.zeros(1, 1, dtype=torch.float64), a


QUAD_CASES = [(LatentBacktracking, {"batched": True}), (LatentBacktracking, {"batched": False}),
              (ParamBacktracking, {})]


@pytest.mark.parametrize("cls,kw", QUAD_CASES, ids=["latent-batched", "latent-seq", "param"])
def test_quadratic_by_hand(cls, kw):
    """g_1 = (−2, 0), g_2 = (0, −2); MGDA: w = (½, ½), d = (−1, −1), ⟨g_i, d⟩ = 2;
    L_i(z − t d) = t² − 2t + 2, so Armijo (c = ¼) holds iff t ≤ 2 − 2c = 1.5. Trials
    5, 3, 1.8, 1.08: the fourth passes, z moves to (1.08, 1.08), L_i = 1.0064."""
    ls, enc, x, a = _quadratic(cls, lr=5.0, shrink=0.6, c=0.25, **kw)
    info = ls.step(x, a)
    assert isinstance(info, StepInfo)
    torch.testing.assert_close(info.losses_before, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(info.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(info.slopes, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert bool(info.accepted) and int(info.trials) == 4
    assert float(info.step_size) == pytest.approx(1.08, rel=1e-12)
    torch.testing.assert_close(info.losses_after, torch.full((2,), 1.0064, dtype=torch.float64))
    torch.testing.assert_close(enc.bias.detach(), torch.full((2,), 1.08, dtype=torch.float64))
    assert torch.equal(enc.weight.detach(), torch.zeros(2, 1, dtype=torch.float64))


def test_quadratic_head_grad_norm_and_mean():
    """Heads without parameters: ‖∇θ_i L_i‖² = 0, so "head_grad_norm" only asks for no
    increase: L(t) = t² − 2t + 2 <= 2 iff t <= 2; first passing trial 1.8. With "mean" and
    the latent slope the answer is the same as "all_tasks" (symmetric tasks): 1.08."""
    ls, _, x, a = _quadratic(LatentBacktracking, lr=5.0, shrink=0.6, c=0.25,
                             armijo="head_grad_norm")
    info = ls.step(x, a)
    assert float(info.step_size) == pytest.approx(1.8) and int(info.trials) == 3
    assert torch.equal(info.slopes, torch.zeros(2, dtype=torch.float64))
    ls, _, x, a = _quadratic(LatentBacktracking, lr=5.0, shrink=0.6, c=0.25, condition="mean")
    assert float(ls.step(x, a).step_size) == pytest.approx(1.08)


# ------------------------------------------------------------------- a small MLP problem

def _mlp(seed: int = 0, T: int = 2, norm: bool = False):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))
    extra = lambda: [nn.BatchNorm1d(8), nn.Dropout(0.3)] if norm else []
    heads = [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), *extra(), nn.Linear(8, 4))
             for _ in range(T)]
    x = torch.randn(32, 6)
    ys = [torch.randint(0, 4, (32,)) for _ in range(T)]
    return enc, heads, x, ys


def _state(enc, heads) -> list[torch.Tensor]:
    return [p.detach().clone() for m in [enc, *heads] for p in m.parameters()]


def _trial_losses(enc, heads, x, ys, w, t) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Independent evaluation: L_i at (z − t d, θ_i − t ∇θ_i L_i), the slopes ⟨∇_z L_i, d⟩ and
    the expected post-step parameters, from a copy of the model before the step."""
    z = enc(x)
    losses = [F.cross_entropy(h(z), y) for h, y in zip(heads, ys)]
    gz = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
    d = sum(wi * g for wi, g in zip(w.tolist(), gz))
    slopes = torch.stack([(g * d).sum() for g in gz])
    gh = [torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
          for loss, h in zip(losses, heads)]
    genc = torch.autograd.grad(z, list(enc.parameters()), grad_outputs=d)
    trial = []
    with torch.no_grad():
        for h, g, y in zip(heads, gh, ys):
            params = {n: p - t * gp for (n, p), gp in zip(h.named_parameters(), g)}
            trial.append(F.cross_entropy(functional_call(h, params, (z - t * d,)), y))
        after = [p - t * g for p, g in zip(enc.parameters(), genc)]
        after += [p - t * gp for h, g in zip(heads, gh) for p, gp in zip(h.parameters(), g)]
    L = torch.stack([loss.detach() for loss in losses])
    return torch.stack(trial), L, slopes.detach(), after


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accepted_step_is_armijo_and_largest(batched, seed):
    enc, heads, x, ys = _mlp(seed)
    enc0, heads0 = copy.deepcopy(enc), copy.deepcopy(heads)
    c, shrink, lr = 0.3, 0.5, 8.0
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=lr, c=c, shrink=shrink,
                            batched=batched)
    info = ls.step(x, ys)
    assert bool(info.accepted)
    t = float(info.step_size)
    trial, L, slopes, after = _trial_losses(enc0, heads0, x, ys, info.weights, t)
    torch.testing.assert_close(info.losses_before, L)
    torch.testing.assert_close(info.slopes, slopes, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info.losses_after, trial, rtol=1e-5, atol=1e-6)
    assert bool((trial <= L - c * t * slopes + 1e-6).all())
    if t < lr:  # the previous, larger trial fails for some task
        bigger, *_ = _trial_losses(enc0, heads0, x, ys, info.weights, t / shrink)
        assert not bool((bigger <= L - c * t / shrink * slopes).all())
        assert int(info.trials) >= 2
    for p, q in zip(_state(enc, heads), after):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _run(batched: bool, steps: int = 4, **kw):
    enc, heads, x, ys = _mlp(3)
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, batched=batched, **kw)
    infos = [ls.step(x, ys) for _ in range(steps)]
    return infos, _state(enc, heads)


@pytest.mark.parametrize("per_call", [None, 1, 3, 10], ids=lambda m: f"per_call={m}")
@pytest.mark.parametrize("kw", [dict(lr=4.0, c=0.3), dict(lr=4.0, c=0.3, warm_start=True),
                                dict(lr=2.0, c=0.1, armijo="head_grad_norm"),
                                dict(lr=4.0, c=0.5, condition="mean", shrink=0.7),
                                dict(lr=50.0, c=0.9, max_trials=2, on_failure="smallest")],
                         ids=["default", "warm", "head_grad_norm", "mean", "smallest"])
def test_batched_equals_sequential(kw, per_call):
    """Any number of trials per batched call (None: the CPU default, 10: all in one call,
    no early stop) picks the same t and the same parameters as one trial at a time."""
    infos_b, state_b = _run(True, trials_per_call=per_call, **kw)
    infos_s, state_s = _run(False, **kw)
    for ib, is_ in zip(infos_b, infos_s):
        assert torch.equal(ib.step_size, is_.step_size)
        assert torch.equal(ib.trials, is_.trials) and torch.equal(ib.accepted, is_.accepted)
        torch.testing.assert_close(ib.losses_after, is_.losses_after)
    for p, q in zip(state_b, state_s):
        assert torch.equal(p, q)


class _NormHead(nn.Module):
    """Not a chain of linear layers (layer norm): the vmapped path, which calls forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(8, 4), nn.LayerNorm(4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(z))


@pytest.mark.parametrize("per_call", [1, 2, 4, 10, None], ids=lambda m: f"per_call={m}")
def test_trials_per_call_stops_after_the_passing_call(per_call):
    """Calls of m trials stop after the call that holds the accepted (n-th) trial:
    ceil(n / m) vmapped head forwards (None: the CPU default)."""
    enc, _, x, ys = _mlp(4)
    torch.manual_seed(7)
    heads = [_NormHead(), _NormHead()]
    counts = [0]
    heads[0].register_forward_hook(lambda *_: counts.__setitem__(0, counts[0] + 1))
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=8.0, c=0.3,
                            trials_per_call=per_call)
    info = ls.step(x, ys)
    n, m = int(info.trials), per_call or CPU_TRIALS_PER_CALL
    assert bool(info.accepted) and n == 6  # several calls for every m < n
    assert counts[0] == 1 + -(-n // m)  # the training forward, then the trial calls


def test_warm_start_next_first_trial():
    infos, _ = _run(True, steps=2, lr=4.0, c=0.3, warm_start=True)
    t = float(infos[0].step_size)
    assert float(infos[1].steps[0]) == pytest.approx(min(4.0, t / 0.5))


class _ItemHead(nn.Module):
    """A head with data-dependent Python control flow: vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.lin(z)
        return out if float(out.detach().abs().sum()) >= 0 else -out


def test_unvmappable_head_falls_back_with_identical_results():
    def run(batched):
        enc, _, x, ys = _mlp(4)
        torch.manual_seed(5)
        heads = [_ItemHead(), _ItemHead()]
        ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=4.0, c=0.3,
                                batched=batched)
        infos = [ls.step(x, ys) for _ in range(3)]
        return ls, infos, _state(enc, heads)

    with pytest.warns(RuntimeWarning, match="falls back to sequential"):
        ls_b, infos_b, state_b = run(True)
    assert ls_b._vmap_ok is False
    _, infos_s, state_s = run(False)
    assert [float(i.step_size) for i in infos_b] == [float(i.step_size) for i in infos_s]
    for p, q in zip(state_b, state_s):
        assert torch.equal(p, q)


def test_batchnorm_dropout_heads_trials_in_eval_mode():
    """Trials in eval mode: the running statistics see only the step's own forward, the
    training flags come back, and batched == sequential (both deterministic in eval mode)."""
    def run(batched):
        enc, heads, x, ys = _mlp(6, norm=True)
        ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=2.0, c=0.1,
                                batched=batched)
        torch.manual_seed(0)  # the training forward's dropout masks
        infos = [ls.step(x, ys) for _ in range(2)]
        assert all(m.training for h in heads for m in h.modules())
        assert all(int(h[2].num_batches_tracked) == 2 for h in heads)
        return infos, _state(enc, heads)

    infos_b, state_b = run(True)
    infos_s, state_s = run(False)
    assert all(bool(i.accepted) for i in infos_b)
    for ib, is_ in zip(infos_b, infos_s):
        assert torch.equal(ib.step_size, is_.step_size)
    for p, q in zip(state_b, state_s):
        assert torch.equal(p, q)


@pytest.mark.parametrize("on_failure", ["zero", "smallest", "raise"])
def test_on_failure(on_failure):
    """c close to 1 with a huge lr and 2 trials: nothing passes."""
    enc, heads, x, ys = _mlp(7)
    before = _state(enc, heads)
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=1e3, c=0.99, max_trials=2,
                            on_failure=on_failure)
    if on_failure == "raise":
        with pytest.raises(RuntimeError, match="no trial step passed"):
            ls.step(x, ys)
        assert all(torch.equal(p, q) for p, q in zip(_state(enc, heads), before))
        return
    info = ls.step(x, ys)
    assert not bool(info.accepted) and int(info.trials) == 2
    if on_failure == "zero":
        assert float(info.step_size) == 0.0
        assert torch.equal(info.losses_after, info.losses_before)
        assert all(torch.equal(p, q) for p, q in zip(_state(enc, heads), before))
    else:
        assert float(info.step_size) == pytest.approx(500.0)
        assert not torch.equal(_state(enc, heads)[0], before[0])


def test_min_step_excludes_trials():
    enc, heads, x, ys = _mlp(8)
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=1e-3, min_step=1e-2,
                            batched=False)
    info = ls.step(x, ys)
    assert not bool(info.accepted) and int(info.trials) == 0 and float(info.step_size) == 0


def test_param_backtracking_armijo_in_parameter_space():
    enc, heads, x, ys = _mlp(9)
    c = 0.3
    ls = ParamBacktracking(enc, heads, [F.cross_entropy] * 2, lr=8.0, c=c)
    info = ls.step(x, ys)
    assert bool(info.accepted)
    with torch.no_grad():  # losses_after is the loss after the update
        z = enc(x)
        L = torch.stack([F.cross_entropy(h(z), y) for h, y in zip(heads, ys)])
    torch.testing.assert_close(info.losses_after, L)
    t = float(info.step_size)
    assert bool((L <= info.losses_before - c * t * info.slopes + 1e-6).all())


@pytest.mark.parametrize("space", ["latent", "param"])
def test_constant_step_is_sgd(space):
    enc, heads, x, ys = _mlp(10)
    ls = ConstantStep(enc, heads, [F.cross_entropy] * 2, direction=Mean(), lr=0.05, space=space)
    enc0, heads0 = copy.deepcopy(enc), copy.deepcopy(heads)
    info = ls.step(x, ys)
    assert info.losses_after is None and bool(info.accepted)
    z = enc0(x)  # Mean: the direction is the gradient of the mean loss
    loss = sum(F.cross_entropy(h(z), y) for h, y in zip(heads0, ys)) / 2
    params0 = [p for m in [enc0, *heads0] for p in m.parameters()]
    grads = torch.autograd.grad(loss, params0)
    heads_scale = 2.0  # heads get their own task's gradient, not the mean's share
    n_enc = len(list(enc0.parameters()))
    for k, (p, p0, g) in enumerate(zip(_state(enc, heads), params0, grads)):
        scale = 1.0 if k < n_enc else heads_scale
        torch.testing.assert_close(p, p0.detach() - 0.05 * scale * g, rtol=1e-5, atol=1e-6)


def test_optimizer_sgd_matches_plain_update():
    def run(with_opt):
        enc, heads, x, ys = _mlp(11)
        params = [p for m in [enc, *heads] for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=4.0) if with_opt else None
        ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=4.0, c=0.3, optimizer=opt)
        for _ in range(2):
            ls.step(x, ys)
        return _state(enc, heads)

    for p, q in zip(run(True), run(False)):
        torch.testing.assert_close(p, q)


def test_upgrad_direction_three_tasks():
    enc, heads, x, ys = _mlp(12, T=3)
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 3, direction=UPGrad(), lr=4.0)
    first = ls.step(x, ys).losses_before
    for _ in range(5):
        last = ls.step(x, ys).losses_before
    assert bool((last < first).all())


class _GradModeHead(nn.Module):
    """Records whether grad mode was on at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.grad_mode: list[bool] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.grad_mode.append(torch.is_grad_enabled())
        return self.lin(z)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_trials_build_no_graph(batched):
    enc, _, x, ys = _mlp(18)
    heads = [_GradModeHead(), _GradModeHead()]
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=4.0, c=0.3, batched=batched)
    info = ls.step(x, ys)
    for h in heads:
        assert h.grad_mode[0] and not any(h.grad_mode[1:])
        assert len(h.grad_mode) == 1 + (1 if batched else int(info.trials))


# ------------------------------------------------ every backend (kernels: Triton interpreter)

PARAMS = device_backend_params()


@pytest.mark.kernels
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_backends_quadratic_and_mlp(device, backend, batched):
    """The op backends (trial_points, gram, combine) inside the search: the hand-computed
    quadratic, and batched == sequential == the torch backend on the small MLP."""
    with use_backend(backend):
        ls, enc, x, a = _quadratic(LatentBacktracking, lr=5.0, shrink=0.6, c=0.25,
                                   batched=batched)
        ls.encoder.to(device)
        info = ls.step(x.to(device), [ai.to(device) for ai in a])
        assert float(info.step_size) == pytest.approx(1.08) and int(info.trials) == 4
        infos, state = _run(batched, steps=2, lr=4.0, c=0.3)
    with use_backend("torch"):
        infos_ref, state_ref = _run(batched, steps=2, lr=4.0, c=0.3)
    assert [float(i.step_size) for i in infos] == [float(i.step_size) for i in infos_ref]
    for p, q in zip(state, state_ref):
        torch.testing.assert_close(p, q)


def test_batched_heads_fast_path_matches_per_trial_losses():
    """MLP heads (Linear + elementwise activations, with/without bias, nested, eval dropout)
    take the batched-matmul path; other heads (LayerNorm) vmap; every (k, i) entry equals
    the loss of head i at θ_i − t_k g_i on z − t_k d, computed trial by trial."""
    from fastmtl.linesearch.heads import (
        ModuleState,
        _linear_chain,
        batched_head_losses,
        head_losses,
    )
    from fastmtl.ops.trial_points import trial_points

    torch.manual_seed(3)
    heads = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 3), nn.Tanh())),
             nn.Linear(6, 3, bias=False),
             nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 3)).eval(),
             nn.Sequential(nn.Linear(6, 3), nn.LayerNorm(3))]
    assert [(_linear_chain(h) is not None) for h in heads] == [True, True, True, False]
    z, d = torch.randn(4, 6), torch.randn(4, 6)
    ys = [torch.randint(0, 3, (4,)) for _ in heads]
    for h in heads:
        for p in h.parameters():
            p.grad = torch.randn_like(p)
    states = [ModuleState(h) for h in heads]
    fns = [F.cross_entropy] * len(heads)
    steps = 0.5 * 0.5 ** torch.arange(5.0)
    with torch.no_grad():
        table = batched_head_losses(states, fns, ys, trial_points(z, d, steps), steps)
        rows = [head_losses(states, fns, ys, trial_points(z, d, steps[k:k + 1])[0],
                            [s.at(steps[k:k + 1]) for s in states]) for k in range(5)]
    torch.testing.assert_close(table, torch.stack(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("armijo", ["latent", "head_grad_norm"])
def test_batched_step_has_no_host_sync_on_cuda(armijo):
    """On a GPU the default batched search evaluates all K trials in one call and decides on
    device: a whole step under set_sync_debug_mode("error") (after a warm-up step that traces
    and compiles), then the same t as the sequential search."""
    enc, heads, x, ys = _mlp(21)
    ref_enc, ref_heads = copy.deepcopy(enc), copy.deepcopy(heads)
    enc, heads = enc.cuda(), [h.cuda() for h in heads]
    xc, ysc = x.cuda(), [y.cuda() for y in ys]
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=4.0, c=0.3, armijo=armijo)
    assert ls._per_call(xc.device) == ls.max_trials
    ls.step(xc, ysc)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        info = ls.step(xc, ysc)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    seq = LatentBacktracking(ref_enc, ref_heads, [F.cross_entropy] * 2, lr=4.0, c=0.3,
                             armijo=armijo, batched=False)
    seq.step(x, ys)
    info_seq = seq.step(x, ys)
    assert float(info.step_size) == float(info_seq.step_size)
    assert int(info.trials) == int(info_seq.trials)


def test_one_latent_step_runs_the_pipeline_once(monkeypatch):
    """One forward's losses are checked once, d_z is formed once (returned by ``apply``), and
    the per-task gradients, K and w come from one ``pipeline.run``."""
    from fastmtl.engine import LatentGradients, pipeline
    from fastmtl.linesearch import base

    counts = {"run": 0, "direction": 0, "check": 0}
    run, direction, check = pipeline.run, LatentGradients.direction, base.check_losses_list

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pipeline, "run", counted("run", run))
    monkeypatch.setattr(LatentGradients, "direction", counted("direction", direction))
    monkeypatch.setattr(base, "check_losses_list", counted("check", check))
    enc, heads, x, ys = _mlp(3)
    ls = LatentBacktracking(enc, heads, [F.cross_entropy] * 2, lr=1.0, batched=False)
    ls.step(x, ys)
    assert counts == {"run": 1, "direction": 1, "check": 1}
