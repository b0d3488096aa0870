"""engine="stream" (``fm.engine.StreamGradients``): K, w and every .grad equal the loop engine's
(float64, 1e-10), on an MLP, a Conv-BatchNorm CNN with a Linear applied twice and a raw
parameter used outside any leaf module, and with shared parameters only some tasks reach;
BatchNorm running statistics are updated once, by the forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmtl as fm
from fastmtl.aggregators import MGDA, Aggregator, UPGrad
from fastmtl.engine import StreamGradients, TaskGradients

T = 3


class Fixed(Aggregator):
    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float64)

    def _weights(self, K, losses):
        return self.w.to(K)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))

    def forward(self, x):
        z = self.encoder(x)
        return [h(z).squeeze(1) for h in self.heads]


class CNN(nn.Module):
    """Conv-BatchNorm, a Linear applied twice (tied weights), a raw parameter used in forward,
    and a branch (``only0``) that only task 0 reaches; ``unused`` is reached by no task."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.tied = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.only0 = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        z = self.tied(torch.tanh(self.tied(h))) * self.scale
        outs = [head(z).squeeze(1) for head in self.heads]
        outs[0] = outs[0] + self.only0(z).sum(1)
        return outs


class Seq(nn.Module):
    """Linear layers on (B, S, features) inputs and a LayerNorm (the generic VJP path)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8, bias=False)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))

    def forward(self, x):
        z = self.mix(self.norm(torch.tanh(self.inp(x)))).mean(1)
        return [h(z).squeeze(1) for h in self.heads]


def _shared(model):
    return [p for n, p in model.named_parameters() if not n.startswith("heads")]


def _step(model, x, y, aggregator, engine_of):
    """One forward + mtl_backward on a fresh copy; returns (w, grads by name, buffers, engine)."""
    model = copy.deepcopy(model)
    shared = _shared(model)
    engine = engine_of(model, shared)
    outs = model(x)
    losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
    w = fm.mtl_backward(losses, shared, aggregator, engine=engine)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return w, grads, buffers, engine


def _loop(model, shared):
    return TaskGradients(shared, engine="loop")


def _stream(model, shared):
    return StreamGradients(model, shared)


MODELS = {"mlp": MLP, "cnn": CNN, "seq": Seq}


def _data(kind: str):
    gen = torch.Generator().manual_seed(1)
    shape = {"mlp": (8, 5), "cnn": (8, 3, 5, 5), "seq": (8, 4, 5)}[kind]
    x = torch.randn(*shape, generator=gen)
    y = torch.randn(8, T, generator=gen)
    return x.double(), y.double()


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("aggregator", [Fixed([0.5, -1.0, 2.0]), MGDA(), UPGrad()],
                         ids=["fixed", "mgda", "upgrad"])
def test_stream_equals_loop(kind, aggregator):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x, y = _data(kind)
    w_loop, g_loop, b_loop, tg = _step(model, x, y, aggregator, _loop)
    w_str, g_str, b_str, sg = _step(model, x, y, aggregator, _stream)
    torch.testing.assert_close(w_str, w_loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sg.gram(), tg.gram(), rtol=1e-10, atol=1e-12)
    assert torch.equal(sg.reached, tg.reached)
    for name, g in g_loop.items():
        if g is None:
            assert g_str[name] is None, name      # reached by no task: .grad stays None
        else:
            torch.testing.assert_close(g_str[name], g, rtol=1e-10, atol=1e-12, msg=name)
    for name, b in b_loop.items():                # BatchNorm statistics: one forward's update
        assert torch.equal(b_str[name], b), name
    if kind == "cnn":
        assert g_loop["unused.weight"] is None and not sg.reached[:, -1].any()


def test_stream_holds_no_task_by_parameter_matrix():
    """The cotangents are T x (module outputs), the blocks one module at a time: nothing of
    size T x N survives ``compute``."""
    torch.manual_seed(0)
    model = MLP().double()
    shared = _shared(model)
    sg = StreamGradients(model, shared)
    x, y = _data("mlp")
    losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))]
    sg.compute(losses)
    kept = sum(c.deltas.numel() for c in sg._pending) + sum(G.numel() for G in sg._orphan_grads)
    assert kept == T * sum(c.out.numel() for c in sg._pending)
    assert sg.orphans == []
    sg.apply(torch.ones(T, dtype=torch.float64))
    assert sg._pending == [] and not sg._ready
    with pytest.raises(RuntimeError, match="compute"):
        sg.apply(torch.ones(T, dtype=torch.float64))
    sg.close()


def test_stream_by_name_says_how():
    model = MLP()
    losses = [o.sum() for o in model(torch.randn(2, 5))]
    with pytest.raises(ValueError, match=r"StreamGradients\(model, shared_params\)"):
        fm.mtl_backward(losses, _shared(model), MGDA(), engine="stream")


def test_stream_engine_for_other_params_is_refused():
    model = MLP()
    sg = StreamGradients(model, _shared(model)[:2])
    losses = [o.sum() for o in model(torch.randn(2, 5))]
    with pytest.raises(ValueError, match="other shared parameters"):
        fm.mtl_backward(losses, _shared(model), MGDA(), engine=sg)


def test_stream_needs_the_forward_recorded():
    model = MLP()
    losses = [o.sum() for o in model(torch.randn(2, 5))]   # forward before the engine exists
    sg = StreamGradients(model, _shared(model))
    with pytest.raises(RuntimeError, match="before the forward"):
        fm.mtl_backward(losses, _shared(model), MGDA(), engine=sg)
    assert all(p.grad is None for p in model.parameters())


def test_other_forwards_are_skipped_and_clear_forgets_them():
    """A forward whose losses are not aggregated (here a whole extra one) is recorded too; its
    calls feed no loss of the step and change nothing; ``clear`` drops them."""
    torch.manual_seed(0)
    model = CNN().double()
    x, y = _data("cnn")
    w_loop, g_loop, _, _ = _step(model, x, y, Fixed([1.0, 2.0, 3.0]), _loop)

    def with_extra_forward(model, shared):
        sg = StreamGradients(model, shared)
        model(x)                       # recorded, never aggregated
        assert len(sg._calls) == 5     # conv, bn, tied twice, only0
        return sg

    w_str, g_str, _, sg = _step(model, x, y, Fixed([1.0, 2.0, 3.0]), with_extra_forward)
    assert len(sg._pending) == 0       # apply consumed the live calls; the stale ones were cut
    for name, g in g_loop.items():
        if g is not None:
            torch.testing.assert_close(g_str[name], g, rtol=1e-10, atol=1e-12, msg=name)
    sg.modules[0](x)                   # the conv of the engine's own (copied) model
    assert len(sg._calls) == 1
    sg.clear()
    assert sg._calls == []


def test_compute_keeps_only_the_calls_the_losses_use():
    model = CNN().double()
    x, y = _data("cnn")
    sg = StreamGradients(model, _shared(model))
    model(x)                                          # stale: 5 calls
    losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))]
    assert len(sg._calls) == 10
    sg.compute(losses)
    assert len(sg._pending) == 5 and sg._calls == []
    sg.discard()


def test_a_dropped_engine_stops_recording():
    import gc
    import weakref

    model = MLP()
    sg = StreamGradients(model, _shared(model))
    ref = weakref.ref(sg)
    model(torch.randn(2, 5))
    del sg
    gc.collect()
    assert ref() is None                       # the hooks did not keep it (or its calls) alive
    assert all(not m._forward_hooks for m in model.modules())
    sg2 = StreamGradients(model, _shared(model))
    sg2.close()
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_model(kind):
    """A bfloat16 model runs end to end; K accumulates in float32; .grad is within bf16
    rounding of the loop engine's."""
    torch.manual_seed(0)
    model = MODELS[kind]().bfloat16()
    x, y = (t.bfloat16() for t in _data(kind))
    _, g_loop, _, tg = _step(model, x, y, Fixed([0.5, 1.0, 2.0]), _loop)
    _, g_str, _, sg = _step(model, x, y, Fixed([0.5, 1.0, 2.0]), _stream)
    assert sg.gram().dtype == torch.float32
    torch.testing.assert_close(sg.gram(), tg.gram(), rtol=2e-2, atol=1e-3 * tg.gram().abs().max())
    # one scale for all: a bias before BatchNorm has a zero gradient, its bf16 value is noise
    scale = max(g.double().abs().max() for g in g_loop.values() if g is not None)
    for name, g in g_loop.items():
        if g is None:
            assert g_str[name] is None
            continue
        assert g_str[name].dtype == torch.bfloat16
        assert (g_str[name].double() - g.double()).abs().max() <= 2 ** -6 * scale, name
