"""fm.ops.adatask_{adam,rmsprop,adagrad}_: every implementation against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import device_backend_params

import fastmtl as fm
from fastmtl.backend import use_backend
from fastmtl.ops.adatask import adatask_reference

PARAMS = device_backend_params()
SHAPES = [(5, 7), (130,), (1,), (2, 1, 33)]  # tails of the interpreter's 64-element block


def _state(T, shapes, dtype, state_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, positive=False):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (x.abs() if positive else x).to(device)

    params = [rand(*s) for s in shapes]
    grads = [rand(T, *s) for s in shapes]
    m = [0.1 * rand(T, *s) for s in shapes]
    v = [0.1 * rand(T, *s, positive=True) for s in shapes]
    x = [vi + 0.01 * rand(T, *s, positive=True) for vi, s in zip(v, shapes)]
    steps = [torch.randint(0, 5, (T,), generator=gen).float().to(device) for _ in shapes]
    exact = dict(params=params, grads=grads, m=m, v=v, x=x, steps=steps)
    cast = {k: [t.to(dtype) for t in ts] for k, ts in exact.items() if k in ("params", "grads")}
    cast.update({k: [t.to(state_dtype).contiguous() for t in exact[k]] for k in ("m", "v", "x")})
    cast["steps"] = [s.clone() for s in steps]
    return exact, cast


def _run(algo, s, hyper, active, amsgrad):
    if algo == "adam":
        fm.ops.adatask_adam_(s["params"], s["grads"], s["m"], s["v"], s["steps"],
                             max_exp_avg_sqs=s["x"] if amsgrad else None, active=active,
                             lr=hyper["lr"], beta1=hyper["a"], beta2=hyper["b"], eps=hyper["eps"],
                             weight_decay=hyper["weight_decay"],
                             decoupled_weight_decay=hyper["decoupled_weight_decay"],
                             maximize=hyper["maximize"])
    elif algo == "rmsprop":
        fm.ops.adatask_rmsprop_(s["params"], s["grads"], s["v"], s["steps"], active=active,
                                lr=hyper["lr"], alpha=hyper["a"], eps=hyper["eps"],
                                weight_decay=hyper["weight_decay"],
                                decoupled_weight_decay=hyper["decoupled_weight_decay"],
                                maximize=hyper["maximize"])
    else:
        fm.ops.adatask_adagrad_(s["params"], s["grads"], s["v"], s["steps"], active=active,
                                lr=hyper["lr"], lr_decay=hyper["lr_decay"], eps=hyper["eps"],
                                weight_decay=hyper["weight_decay"],
                                decoupled_weight_decay=hyper["decoupled_weight_decay"],
                                maximize=hyper["maximize"])


HYPER = {"adam": dict(lr=0.01, a=0.9, b=0.999, eps=1e-8, lr_decay=0.0),
         "rmsprop": dict(lr=0.01, a=0.99, b=0.0, eps=1e-8, lr_decay=0.0),
         "adagrad": dict(lr=0.1, a=0.0, b=0.0, eps=1e-10, lr_decay=0.05)}
OPTIONS = [dict(weight_decay=0.0, decoupled_weight_decay=False, maximize=False, amsgrad=False),
           dict(weight_decay=0.1, decoupled_weight_decay=False, maximize=True, amsgrad=True),
           dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=False, amsgrad=False)]


def _compare(algo, exact, cast, hyper, amsgrad, active, rtol):
    adatask_reference(algo, exact["params"], exact["grads"], exact["m"], exact["v"],
                      exact["steps"], max_exp_avg_sqs=exact["x"] if amsgrad else None,
                      active=active, **hyper)
    for name in ("params", "v", "steps") + (("m",) if algo == "adam" else ()):
        for got, want in zip(cast[name], exact[name]):
            err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)
            assert err <= rtol, (name, err.item())


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "coupled-max-ams", "decoupled"])
@pytest.mark.parametrize("algo", ["adam", "rmsprop", "adagrad"])
def test_against_float64(device, backend, algo, options):
    """fp32 tensors vs the reference on float64 copies: rel. error < 1e-5; with a mask."""
    T = 3
    options = dict(options)
    amsgrad = options.pop("amsgrad") and algo == "adam"
    hyper = dict(HYPER[algo], **options)
    exact, cast = _state(T, SHAPES, torch.float32, torch.float32, device, seed=1)
    active = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    with use_backend(backend):
        _run(algo, cast, hyper, active.to(device), amsgrad)
    _compare(algo, exact, cast, hyper, amsgrad, active, 1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("T,shapes", [(1, [(70,)]), (64, [(3,)]), (2, [(1,), (1,)])])
def test_task_and_size_tails(device, backend, T, shapes):
    exact, cast = _state(T, shapes, torch.float32, torch.float32, device, seed=2)
    hyper = dict(HYPER["adam"], weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    with use_backend(backend):
        _run("adam", cast, hyper, None, False)
    _compare("adam", exact, cast, hyper, False, None, 1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32),
                                               (torch.float32, torch.bfloat16),
                                               (torch.float64, torch.float64)])
def test_low_precision_storage(device, backend, dtype, state_dtype):
    """Half parameters or moments are storage only: the result is the float64 update rounded
    once to the storage dtype (float64 tensors: 1e-12)."""
    exact, cast = _state(2, SHAPES[:2], dtype, state_dtype, device, seed=3)
    for name in ("params", "grads"):
        exact[name] = [t.to(dtype).double() for t in exact[name]]
    for name in ("m", "v"):
        exact[name] = [t.to(state_dtype).double() for t in exact[name]]
    hyper = dict(HYPER["adam"], weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    with use_backend(backend):
        _run("adam", cast, hyper, None, False)
    low = max(torch.finfo(dtype).eps, torch.finfo(state_dtype).eps)
    _compare("adam", exact, cast, hyper, False, None, 1e-12 if low < 1e-10 else 2 * low)
    assert cast["m"][0].dtype == state_dtype and cast["params"][0].dtype == dtype


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_engine_buffer_views(device, backend):
    """Gradients given as the engine's row-strided (T, *shape) views of one (T, N) buffer."""
    T, shapes = 2, [(4, 3), (5,)]
    exact, cast = _state(T, shapes, torch.float32, torch.float32, device, seed=4)
    buffer = torch.cat([g.reshape(T, -1) for g in cast["grads"]], dim=1)
    offsets = [0, 12]
    cast["grads"] = [buffer[:, o:o + s.numel()].view(T, *s.shape)
                     for o, s in zip(offsets, cast["params"])]
    assert not cast["grads"][0].is_contiguous()
    hyper = dict(HYPER["adam"], weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    with use_backend(backend):
        _run("adam", cast, hyper, None, False)
    _compare("adam", exact, cast, hyper, False, None, 1e-5)


def test_bad_input():
    p = [torch.zeros(3)]
    g = [torch.zeros(2, 3)]
    m = [torch.zeros(2, 3)]
    s = [torch.zeros(2)]
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape \(2, 3\)"):
        fm.ops.adatask_adam_(p, [torch.zeros(2, 4)], m, m, s, lr=0.1)
    with pytest.raises(ValueError, match="grads has 2 tensors for 1 params"):
        fm.ops.adatask_adam_(p, g * 2, m, m, s, lr=0.1)
    with pytest.raises(ValueError, match=r"state_steps\[0\] must be a float32"):
        fm.ops.adatask_adam_(p, g, m, m, [torch.zeros(2, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] must be contiguous"):
        fm.ops.adatask_adam_(p, g, m, [torch.zeros(3, 2).t()], s, lr=0.1)
    with pytest.raises(ValueError, match="all params must share"):
        fm.ops.adatask_rmsprop_(p + [torch.zeros(3, dtype=torch.float64)], g * 2, m * 2, s * 2,
                                lr=0.1)
    with pytest.raises(ValueError, match="active must be a bool tensor of shape"):
        fm.ops.adatask_adagrad_(p, g, m, s, lr=0.1, active=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lr"):
        fm.ops.adatask_adam_(p, g, m, m, s, lr=-1.0)
    with pytest.raises(TypeError, match="params must be a list"):
        fm.ops.adatask_adam_(torch.zeros(3), g, m, m, s, lr=0.1)
    fm.ops.adatask_adam_([], [], [], [], [], lr=0.1)  # nothing to do
