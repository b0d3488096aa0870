"""engine="stream" (``fm.engine.StreamGradients``): K, w and every .grad equal the loop engine's
(float64, 1e-10), on an MLP, a Conv-BatchNorm CNN with a Linear applied twice and a raw
parameter, a sequence model with LayerNorm, an embedding model with dropout and a loss of a
parameter alone, with shared parameters only some tasks reach, with cotangents or gradients
kept and folds chunked by a small bucket; BatchNorm running statistics are updated once, by the
forward; what the passes keep is T x min(outputs, parameters) per consumer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmtl as fm
from fastmtl.aggregators import MGDA, Aggregator, UPGrad
from fastmtl.engine import StreamGradients, TaskGradients
from fastmtl.engine import stream as stream_module

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
    return StreamGradients(shared)


def _stream_cotangents(model, shared):
    """Cotangents kept wherever the VJP is separable, in a small bucket (chunked folds)."""
    eng = StreamGradients(shared, bucket_size=100)
    eng._keeps_cotangents = lambda group, numel: group.isolated
    return eng


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
@pytest.mark.parametrize("make", [_stream, _stream_cotangents], ids=["default", "cotangents"])
@pytest.mark.parametrize("trick", [False, True], ids=["vjp", "linear-gram"])
def test_stream_equals_loop(kind, aggregator, make, trick, monkeypatch):
    """``trick``: the Linear layers' blocks of K from x xᵀ and the cotangents (else VJPs)."""
    used = []
    monkeypatch.setattr(stream_module, "_prefers_gram_trick",
                        lambda *args: used.append(1) or trick)
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x, y = _data(kind)
    w_loop, g_loop, b_loop, tg = _step(model, x, y, aggregator, _loop)
    w_str, g_str, b_str, sg = _step(model, x, y, aggregator, make)
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
    if make is _stream_cotangents and kind != "cnn":
        assert used                               # Linear layers met the choice


def test_stream_holds_no_task_by_parameter_matrix():
    """What the T passes keep is T x min(outputs, parameters) per consumer: the cotangents of
    the wide layers, the gradients of the layer whose input is wider than its batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 64), nn.Tanh(),
                          nn.Linear(64, 64)).double()
    x = torch.randn(8, 64, dtype=torch.float64)
    out = model(x)
    losses = [out[:, i].square().mean() for i in range(T)]
    sg = StreamGradients(list(model.parameters()))
    sg.compute(losses)
    # Linear(64, 4): out 8x4 = 32 < 260; Linear(4, 64): out 512 > 320 params; Linear(64, 64):
    # out 512 < 4160
    assert sg.kept_numel == T * (32 + 320 + 512)
    assert sg.kept_numel < T * sum(p.numel() for p in model.parameters()) / 5
    sg.apply(torch.ones(T, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="compute"):
        sg.apply(torch.ones(T, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        losses[0].backward()                   # apply's weighted pass freed the graph


def test_stream_by_name_and_auto(monkeypatch):
    """engine="stream" by name equals the loop engine; "auto" picks it when the (T, N) buffer
    exceeds the budget, and the loop engine otherwise."""
    import fastmtl.engine.base as base

    torch.manual_seed(0)
    model = MLP().double()
    x, y = _data("mlp")
    w_loop, g_loop, _, _ = _step(model, x, y, MGDA(), _loop)
    w_name, g_name, _, _ = _step(model, x, y, MGDA(), lambda m, s: "stream")
    torch.testing.assert_close(w_name, w_loop, rtol=1e-10, atol=1e-12)
    for name, g in g_loop.items():
        torch.testing.assert_close(g_name[name], g, rtol=1e-10, atol=1e-12, msg=name)
    n_bytes = T * sum(p.numel() * 8 for p in _shared(model))
    for budget, kind in [(n_bytes - 1, StreamGradients), (n_bytes, TaskGradients)]:
        monkeypatch.setattr(base, "STREAM_BUDGET_CPU", budget)
        fm.engine.cache.clear()
        m = copy.deepcopy(model)
        losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(m(x))]
        w = fm.mtl_backward(losses, _shared(m), MGDA())
        torch.testing.assert_close(w, w_loop, rtol=1e-10, atol=1e-12)
        (engine,) = [e for _, e in fm.engine.cache._entries.values()]
        assert type(engine) is kind
    fm.engine.cache.clear()


def test_methods_that_need_G_refuse_stream():
    model = MLP()
    shared = _shared(model)
    with pytest.raises(ValueError, match="AdaTask needs the per-task gradients"):
        fm.optim.AdaTaskAdam([{"params": shared, "shared": True}], num_tasks=T,
                             engine="stream")
    with pytest.raises(ValueError, match="TaskGradients needs the per-task gradients"):
        TaskGradients(shared, engine="stream")
    with pytest.raises(ValueError, match="PCGrad needs the per-task gradients"):
        fm.optim.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine="stream")
    z = model.encoder(torch.randn(2, 5))
    losses = [h(z).sum() for h in model.heads]
    with pytest.raises(ValueError, match="latent mode"):
        fm.mtl_backward(losses, shared, MGDA(), features=z, engine="stream")
    with pytest.raises(TypeError, match="LatentGradients"):
        fm.mtl_backward(losses, shared, MGDA(), features=z, engine=StreamGradients(shared))


def test_stream_engine_for_other_params_is_refused():
    model = MLP()
    sg = StreamGradients(_shared(model)[:2])
    losses = [o.sum() for o in model(torch.randn(2, 5))]
    with pytest.raises(ValueError, match="other shared parameters"):
        fm.mtl_backward(losses, _shared(model), MGDA(), engine=sg)


class Embed(nn.Module):
    """Token embedding (a one-input op on a parameter: its consumer is the add of positions),
    dropout (its mask must not be redrawn), and a task whose loss is a parameter alone."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.pos = nn.Parameter(torch.randn(4, 6))
        self.lin = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T - 1))

    def forward(self, tokens):
        z = self.drop(torch.tanh(self.lin(self.emb(tokens) + self.pos))).mean(1)
        return [h(z).squeeze(1) for h in self.heads]


@pytest.mark.parametrize("make", [_stream, _stream_cotangents], ids=["default", "cotangents"])
def test_embedding_dropout_and_a_parameter_loss(make):
    torch.manual_seed(0)
    model = Embed().double()
    tokens = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(2))
    y = torch.randn(8, T - 1, dtype=torch.float64)
    results = []
    for engine_of in (_loop, make):
        m = copy.deepcopy(model)
        shared = _shared(m)
        torch.manual_seed(5)                          # the same dropout mask for both
        outs = m(tokens)
        losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
        losses.append(m.pos.square().sum())           # task T-1: a parameter alone
        eng = engine_of(m, shared)
        w = fm.mtl_backward(losses, shared, Fixed([0.5, -1.0, 2.0]), engine=eng)
        results.append((w, eng.gram(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (w0, K0, g0), (w1, K1, g1) = results
    torch.testing.assert_close(K1, K0, rtol=1e-10, atol=1e-12)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_an_op_that_cannot_run_again_is_named():
    """The VJPs of a consumer run its backward again from its cotangent: one that cannot
    (an autograd.Function of one's own) is named in the error."""
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("this backward runs once")

    w, v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7, 5))
    y = Once.apply(v * 2, w)      # a consumer of w and (through v * 2) of v, not run in passes
    losses = [y[:, i].sum() for i in range(T)]
    sg = StreamGradients([w, v])
    with pytest.raises(RuntimeError, match="OnceBackward.*use engine='loop'"):
        sg.compute(losses)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("trick", [False, True], ids=["vjp", "linear-gram"])
def test_bf16_model(kind, trick, monkeypatch):
    """A bfloat16 model runs end to end; K accumulates in float32; .grad is within bf16
    rounding of the loop engine's."""
    monkeypatch.setattr(stream_module, "_prefers_gram_trick", lambda *args: trick)
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


@pytest.mark.parametrize("op", ["linear", "linear-nobias", "conv", "conv-strided"])
def test_gram_of_a_matrix_product_from_its_input(op):
    """``_fold_linear``: K of a Linear or Conv2d layer's weight (and bias) from its input rows
    and the T output cotangents equals G Gᵀ of the weight gradients autograd gives."""
    from fastmtl.engine.stream import _fold_linear, _groups, _linear

    torch.manual_seed(0)
    layer = {"linear": lambda: nn.Linear(7, 5),
             "linear-nobias": lambda: nn.Linear(7, 5, bias=False),
             "conv": lambda: nn.Conv2d(3, 4, 3, padding=1),
             "conv-strided": lambda: nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0),
                                               dilation=(1, 2))}[op]().double()
    x = torch.randn(6, 7 if op.startswith("linear") else 3, *(() if op.startswith("linear")
                                                              else (9, 8)),
                    dtype=torch.float64, requires_grad=True)
    y = layer(x)
    deltas = [torch.randn_like(y) for _ in range(4)]
    params = list(layer.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        y, params, d, retain_graph=True)]) for d in deltas])
    groups, _ = _groups([(y * d).sum() for d in deltas], {id(p): k for k, p in
                                                         enumerate(params)})
    (group,) = groups
    lin = _linear(group, {id(p): k for k, p in enumerate(params)})
    assert lin is not None
    K = torch.zeros(4, 4, dtype=torch.float64)
    _fold_linear(K, lin, deltas)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("entry", __import__("_aggregators").ENTRIES, ids=lambda e: e.id)
def test_every_aggregator_runs_on_stream(entry):
    """Every aggregator takes K only: on engine="stream" its weights and .grad equal those it
    gives on the loop engine (fresh aggregators, the same seed: same state, same orders)."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = _data("mlp")
    w_loop, g_loop, _, _ = _step(model, x, y, entry.make(), _loop)
    w_str, g_str, _, _ = _step(model, x, y, entry.make(), _stream)
    torch.testing.assert_close(w_str, w_loop, rtol=1e-8, atol=1e-10)
    for name, g in g_loop.items():
        torch.testing.assert_close(g_str[name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(MODELS))
def test_stream_on_cuda_matches_cpu(kind):
    """On a GPU (``make gpu-check``): the stream engine's K and .grad equal the CPU loop
    engine's (float64), with cotangents kept and the Linear/Conv folds forced."""
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x, y = _data(kind)
    _, g_cpu, _, tg = _step(model, x, y, Fixed([0.5, -1.0, 2.0]), _loop)
    _, g_gpu, _, sg = _step(model.cuda(), x.cuda(), y.cuda(), Fixed([0.5, -1.0, 2.0]),
                            _stream_cotangents)
    torch.testing.assert_close(sg.gram().cpu(), tg.gram(), rtol=1e-10, atol=1e-12)
    for name, g in g_cpu.items():
        if g is not None:
            torch.testing.assert_close(g_gpu[name].cpu(), g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_autocast_model(kind):
    """Under CPU autocast (bf16 ops, fp32 parameters reached through casts) the stream
    engine's K and .grad equal the loop engine's to bf16 rounding."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = (t.float() for t in _data(kind))
    results = []
    for engine_of in (_loop, _stream_cotangents):
        m = copy.deepcopy(model)
        shared = _shared(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = m(x)
        losses = [((o.float() - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
        eng = engine_of(m, shared)
        fm.mtl_backward(losses, shared, Fixed([0.5, 1.0, 2.0]), engine=eng)
        results.append((eng.gram(), {n: p.grad for n, p in m.named_parameters()}))
    (K0, g0), (K1, g1) = results
    torch.testing.assert_close(K1, K0, rtol=2e-2, atol=1e-3 * K0.abs().max())
    scale = max(g.abs().max() for g in g0.values() if g is not None)
    for name, g in g0.items():
        if g is None:
            assert g1[name] is None
        else:
            assert (g1[name] - g).abs().max() <= 2 ** -6 * scale, name


def test_checkpointed_encoder():
    """A non-reentrant ``torch.utils.checkpoint`` encoder: its saved tensors are recomputed
    whenever a pass or a fold needs them; .grad equals the loop engine's on the plain model."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = MLP().double()
    x, y = _data("mlp")
    _, g_loop, _, _ = _step(model, x, y, MGDA(), _loop)
    m = copy.deepcopy(model)
    z = checkpoint(m.encoder, x, use_reentrant=False)
    losses = [((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(m.heads)]
    fm.mtl_backward(losses, _shared(m), MGDA(), engine=_stream_cotangents(m, _shared(m)))
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_loop[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("make", [_stream, _stream_cotangents], ids=["default", "cotangents"])
def test_non_shared_layers_behind_the_shared_ones(make):
    """Only the encoder's second Linear is shared: the first (behind it) gets Σ_i ∇ L_i, like
    the heads, through the cotangents the segments carry."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = _data("mlp")
    grads = []
    for engine_of in (_loop, make):
        m = copy.deepcopy(model)
        shared = list(m.encoder[2].parameters())
        losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(m(x))]
        fm.mtl_backward(losses, shared, Fixed([0.5, -1.0, 2.0]), engine=engine_of(m, shared))
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12, msg=name)
