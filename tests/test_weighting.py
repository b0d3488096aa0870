"""DWA, uncertainty weighting and RLW against references written from the papers' equations,
their documented schedules, state_dict round trips and bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastmtl as fm
from fastmtl.weighting import DWA, RLW, UW, UncertaintyWeighting


def _losses(T, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, generator=g, dtype=torch.float64) + 0.1
    return list(x.clone().requires_grad_(requires_grad).unbind(0)) if requires_grad else x


# -- DWA --------------------------------------------------------------------------------------
def _dwa_reference(epoch_batches, T, tau):
    """Weights per epoch from the MTAN equations: 1 for epochs 0, 1; then T·softmax(r/τ)."""
    means = [torch.stack(b).mean(0) for b in epoch_batches]
    out = []
    for t in range(len(epoch_batches)):
        if t < 2:
            out.append(torch.ones(T, dtype=torch.float64))
            continue
        r = means[t - 1] / means[t - 2]
        e = [math.exp(float(r[k]) / tau) for k in range(T)]
        out.append(torch.tensor([T * v / sum(e) for v in e], dtype=torch.float64))
    return out


@pytest.mark.parametrize("T, tau", [(1, 2.0), (3, 2.0), (4, 0.5)])
def test_dwa_matches_equations(T, tau):
    g = torch.Generator().manual_seed(T)
    epochs = [[torch.rand(T, generator=g, dtype=torch.float64) + 0.5 for _ in range(3 + e)]
              for e in range(5)]
    expected = _dwa_reference(epochs, T, tau)
    dwa = DWA(num_tasks=T, temperature=tau)
    for t, batches in enumerate(epochs):
        w = dwa.weights(dtype=torch.float64)
        torch.testing.assert_close(w, expected[t])
        assert w.sum().item() == pytest.approx(T)
        for b in batches:
            losses = list(b.clone().requires_grad_(True).unbind(0))
            total = dwa(losses)
            torch.testing.assert_close(total, (expected[t] * b).sum())
            total.backward()
            dwa.update(losses)
        dwa.end_epoch()
    assert dwa.epoch == 5


def test_dwa_first_two_epochs_are_one_and_device_dtype():
    dwa = DWA(num_tasks=3)
    assert dwa.weights().tolist() == [1.0, 1.0, 1.0] and dwa.weights().dtype == torch.float32
    dwa.update(torch.tensor([1.0, 2.0, 3.0]))
    dwa.end_epoch()
    assert dwa.weights(dtype=torch.float64).tolist() == [1.0, 1.0, 1.0]
    dwa.update(torch.tensor([1.0, 1.0, 3.0]))
    dwa.end_epoch()
    w = dwa.weights()
    assert w.argmin().item() == 1 and w[0] == w[2]    # task 1 decreased most: lowest weight


def test_dwa_state_dict_round_trip_mid_epoch():
    dwa = DWA(num_tasks=2)
    for e in range(3):
        for k in range(2):
            dwa.update([torch.tensor(1.0 + e + k), torch.tensor(2.0 / (e + 1))])
        dwa.end_epoch()
    dwa.update([torch.tensor(0.3), torch.tensor(0.4)])
    state = copy.deepcopy(dwa.state_dict())
    other = DWA(num_tasks=2)
    other.load_state_dict(state)
    for d in (dwa, other):
        d.update([torch.tensor(0.5), torch.tensor(0.2)])
        d.end_epoch()
    torch.testing.assert_close(dwa.weights(), other.weights())
    assert other.epoch == 4 and "DWA(num_tasks=2" in repr(other)
    with pytest.raises(ValueError, match="expects keys"):
        other.load_state_dict({"epoch": 1})


def test_dwa_bad_inputs():
    dwa = DWA(num_tasks=3)
    with pytest.raises(ValueError, match="num_tasks=3 but got 2 losses"):
        dwa.update([torch.tensor(1.0), torch.tensor(2.0)])
    with pytest.raises(ValueError, match="num_tasks=3 but got 4 losses"):
        dwa(torch.ones(4))
    with pytest.raises(ValueError, match=r"non-finite losses at task indices \[1\]"):
        dwa.update(torch.tensor([1.0, float("inf"), 2.0]))
    with pytest.raises(RuntimeError, match="no losses were recorded"):
        dwa.end_epoch()
    with pytest.raises(ValueError, match="temperature"):
        DWA(num_tasks=3, temperature=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        DWA(num_tasks=0)
    with pytest.raises(TypeError, match="losses"):
        dwa.update("abc")


# -- Uncertainty weighting --------------------------------------------------------------------
@pytest.mark.parametrize("classification", [None, [True, False, True]])
def test_uw_value_and_gradients_match_equations(classification):
    uw = UncertaintyWeighting(num_tasks=3, classification=classification)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2, 1.1]))
    losses = [torch.tensor(v, requires_grad=True) for v in (0.7, 1.9, 0.4)]
    out = uw(losses)
    out.backward()
    c = [1.0 if classification and classification[i] else 0.5 for i in range(3)]
    s = [0.3, -0.2, 1.1]
    L = [0.7, 1.9, 0.4]
    expected = sum(c[i] * math.exp(-s[i]) * L[i] + 0.5 * s[i] for i in range(3))
    assert out.item() == pytest.approx(expected, rel=1e-6)
    for i in range(3):
        assert losses[i].grad.item() == pytest.approx(c[i] * math.exp(-s[i]), rel=1e-6)
        assert uw.log_vars.grad[i].item() == pytest.approx(
            -c[i] * math.exp(-s[i]) * L[i] + 0.5, rel=1e-5)
    torch.testing.assert_close(uw.weights, torch.tensor([c[i] * math.exp(-s[i])
                                                         for i in range(3)]))


def test_uw_learns_log_of_the_loss_and_libmtl_convention():
    """Regression form: the optimum in s_i is s_i = log L_i (e^{-s} L = 1)."""
    uw = UW(num_tasks=2)
    assert uw.log_vars.tolist() == [0.0, 0.0]
    opt = torch.optim.Adam(uw.parameters(), lr=0.05)
    L = torch.tensor([4.0, 0.25])
    for _ in range(600):
        opt.zero_grad()
        uw(L).backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), L.log(), atol=1e-2, rtol=0)
    lib = UW(num_tasks=2, init=-0.5)
    s = lib.log_vars.detach()
    torch.testing.assert_close(lib(L), (L / (2 * s.exp()) + s / 2).sum())


def test_uw_state_dict_and_bad_inputs():
    uw = UW(num_tasks=2)
    with torch.no_grad():
        uw.log_vars.add_(0.5)
    other = UW(num_tasks=2)
    other.load_state_dict(uw.state_dict())
    torch.testing.assert_close(other.log_vars, uw.log_vars)
    assert set(uw.state_dict()) == {"log_vars"}
    with pytest.raises(ValueError, match="num_tasks=2 but got 3 losses"):
        uw(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        uw(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="classification"):
        UW(num_tasks=2, classification=[True])
    uw64 = UW(num_tasks=2)
    assert uw64(torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float64


# -- RLW --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_rlw_draws_match_equations(distribution, rescale):
    T = 4
    rlw = RLW(num_tasks=T, distribution=distribution, rescale=rescale,
              generator=torch.Generator().manual_seed(7))
    ref = torch.Generator().manual_seed(7)
    for _ in range(3):
        losses = _losses(T, 1)
        total = rlw(losses)
        if distribution == "normal":
            lam = torch.softmax(torch.randn(T, generator=ref), dim=0)
        else:
            e = torch.zeros(T).exponential_(1.0, generator=ref)     # Exp(1) = Gamma(1, 1)
            lam = e / e.sum()
        lam = lam * (T if rescale else 1)
        torch.testing.assert_close(rlw.last_weights, lam.double())
        assert rlw.last_weights.sum().item() == pytest.approx(T if rescale else 1.0)
        assert (rlw.last_weights > 0).all()
        torch.testing.assert_close(total, (lam.double() * torch.stack(losses)).sum())


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_rlw_distribution_moments(distribution):
    T, n = 3, 4000
    rlw = RLW(num_tasks=T, distribution=distribution, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([rlw.sample() for _ in range(n)])
    torch.testing.assert_close(draws.mean(0), torch.full((T,), 1 / T), atol=0.02, rtol=0)
    if distribution == "dirichlet":                    # Var of Dir(1,1,1) marginal = 2/36
        torch.testing.assert_close(draws.var(0), torch.full((T,), 2 / 36), atol=0.01, rtol=0)


def test_rlw_state_dict_and_bad_inputs():
    rlw = RLW(num_tasks=2, generator=torch.Generator().manual_seed(1))
    rlw.sample()
    state = copy.deepcopy(rlw.state_dict())
    a = rlw.sample()
    other = RLW(num_tasks=2, generator=torch.Generator())
    other.load_state_dict(state)
    torch.testing.assert_close(other.sample(), a)
    assert RLW(num_tasks=2).state_dict() == {"generator_state": None}
    with pytest.raises(ValueError, match="no generator"):
        RLW(num_tasks=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tasks=2 but got 1 losses"):
        rlw([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="distribution"):
        RLW(num_tasks=2, distribution="uniform")
    with pytest.raises(TypeError, match="generator"):
        RLW(num_tasks=2, generator=0)
    assert "RLW(num_tasks=2" in repr(rlw)


def test_exported_from_package():
    assert fm.weighting.UW is fm.weighting.UncertaintyWeighting
    assert set(fm.weighting.__all__) >= {"DWA", "FAMO", "GradNorm", "RLW", "UW"}


@pytest.mark.cuda
def test_cuda_state_stays_on_device_without_sync():
    T = 3
    cpu = torch.tensor([0.9, 1.7, 0.4])
    gpu = cpu.cuda().requires_grad_(True)
    dwa, uw = DWA(num_tasks=T), UW(num_tasks=T).cuda()
    rlw = RLW(num_tasks=T, generator=torch.Generator("cuda").manual_seed(0))
    famo, famo_cpu = fm.weighting.FAMO(num_tasks=T), fm.weighting.FAMO(num_tasks=T)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            dwa(gpu)
            dwa.update(gpu)
            dwa.end_epoch()
            uw(gpu)
            rlw(gpu)
            famo(gpu)
            famo.update(gpu.detach() * 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        famo_cpu(cpu)
        famo_cpu.update(cpu * 0.9)
    assert dwa.weights().device.type == "cuda" and rlw.last_weights.device.type == "cuda"
    torch.testing.assert_close(famo.weights.cpu(), famo_cpu.weights)
