"""End-to-end step benchmark: one aggregation step of a shared-MLP, T-head model.

Compared in one run, for a method (MGDA, UPGrad, PCGrad, ...): ``fm.mtl_backward`` (parameter
space with the default engine and with ``engine="stream"``, and latent mode with
``features=z``), torchjd's ``mtl_backward`` + ``jac_to_grad`` with
its aggregator of the same name (when installed), a LibMTL-style loop (per-task
``autograd.grad`` + ``torch.cat``, the weights — for MGDA by host-side Frank–Wolfe as in Sener &
Koltun's code, else fastmtl's — and a per-parameter copy back), and two floors: the forward plus
T plain ``backward(retain_graph=True)`` passes (the least an exact per-task method pays on a
CPU; the floor of the parameter-space row) and unitary scalarization ``sum(losses).backward()``
(the floor of the latent row).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import fastmtl as fm
from fastmtl.bench.cases import Row, _numpy_frank_wolfe, _time_impls


def _model(device: str, T: int, width: int, depth: int):
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    encoder = nn.Sequential(*layers).to(device)
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(T)).to(device)
    return encoder, heads


def _losses(encoder, heads, x, y):
    z = encoder(x)
    return z, [nn.functional.mse_loss(h(z), y[:, i : i + 1]) for i, h in enumerate(heads)]


def step_cases(device: str, method: str = "MGDA", T: int = 10, width: int = 512,
               depth: int = 4, batch: int = 256, rounds: int = 9) -> list[Row]:
    """Rows of one case (and its latent case), timed in ``rounds`` interleaved rounds."""
    torch.manual_seed(0)
    encoder, heads = _model(device, T, width, depth)
    shared = list(encoder.parameters())
    x = torch.randn(batch, 64, device=device)
    y = torch.randn(batch, T, device=device)
    impls: dict[str, Callable[[], object]] = {}

    def sum_step():
        _, losses = _losses(encoder, heads, x, y)
        torch.stack(losses).sum().backward()

    impls["sum(losses).backward()"] = sum_step

    def per_task_floor():
        _, losses = _losses(encoder, heads, x, y)
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < T - 1)

    impls["forward + T backward passes"] = per_task_floor
    agg = getattr(fm.aggregators, method)()

    def fastmtl_step():
        _, losses = _losses(encoder, heads, x, y)
        fm.mtl_backward(losses, shared, aggregator=agg)

    impls[f"fastmtl {method}"] = fastmtl_step
    def fastmtl_stream_step():
        _, losses = _losses(encoder, heads, x, y)
        fm.mtl_backward(losses, shared, aggregator=agg, engine="stream")

    impls[f"fastmtl {method} stream"] = fastmtl_stream_step

    def fastmtl_latent_step():
        z, losses = _losses(encoder, heads, x, y)
        fm.mtl_backward(losses, shared, aggregator=agg, features=z)

    latent = {f"fastmtl {method} latent": fastmtl_latent_step, "sum(losses).backward()": sum_step}
    try:
        import torchjd.aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        # torchjd's constructors: CAGrad needs c, NashMTL the number of tasks.
        kwargs = {"CAGrad": {"c": 0.4}, "NashMTL": {"n_tasks": T}}.get(method, {})
        tjd = getattr(torchjd.aggregation, method)(**kwargs)

        def torchjd_step():
            z, losses = _losses(encoder, heads, x, y)
            mtl_backward(losses, features=z)
            jac_to_grad(shared, tjd)

        impls[f"torchjd {method}"] = torchjd_step
    except (ImportError, AttributeError):
        pass

    def loop_step():
        _, losses = _losses(encoder, heads, x, y)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss, shared, retain_graph=True)]) for loss in losses]
        G = torch.stack(rows)
        if method == "MGDA":
            w = torch.as_tensor(_numpy_frank_wolfe((G @ G.T).double().cpu().numpy()),
                                dtype=G.dtype, device=G.device)
        else:
            w = agg.weights(G @ G.T).to(G.dtype)
        d = w @ G
        offset = 0
        for p in shared:
            p.grad = d[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for head, loss in zip(heads, losses):
            head_grads = torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
            for p, g in zip(head.parameters(), head_grads):
                p.grad = g

    impls["LibMTL-style loop"] = loop_step

    def zero_then(fn):
        def run():
            for p in [*encoder.parameters(), *heads.parameters()]:
                p.grad = None
            fn()

        return run

    case = f"{method} T={T} MLP {depth}x{width} batch {batch}"
    rows = _time_impls("step", case, device, {k: zero_then(f) for k, f in impls.items()},
                       None, rounds=rounds)
    return (rows
            + _time_impls("step", f"{case} latent (features=z)", device,
                          {k: zero_then(f) for k, f in latent.items()}, None, rounds=rounds))
