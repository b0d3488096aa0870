"""PaMaL subspace layers, conversion, α handling and extraction: vertices are the member
networks, linearity in α, ``extract`` matches at random α for every supported layer type,
gradients reach member t scaled by α_t, the precompute option, and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmtl.pamal.layers as layers_module
from fastmtl import pamal
from fastmtl.pamal import SubspaceLayer

pytestmark = pytest.mark.usefixtures("one_thread")


class AllLayers(nn.Module):
    """One of every supported layer type: tokens (B, 5) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(6, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4)
        self.conv2 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.ln = nn.LayerNorm(60)
        self.fc = nn.Linear(60, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h.unsqueeze(1))))
        return self.fc(self.ln(h.flatten(1)))


def _tokens(seed: int = 0, batch: int = 7) -> torch.Tensor:
    return torch.randint(0, 10, (batch, 5), generator=torch.Generator().manual_seed(seed))


def _subspace_all_layers(T: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(a plain template, the subspace model), BN statistics made non-trivial first."""
    torch.manual_seed(seed)
    model = AllLayers()
    template = copy.deepcopy(model)
    pamal.to_subspace(model, T)
    with pamal.use_alpha(model, torch.full((T,), 1.0 / T)):
        model.train()
        model(_tokens(seed + 100, 16))
    model.eval()
    return template, model


def _member_network(template: nn.Module, model: nn.Module, t: int) -> nn.Module:
    """A plain copy of ``template`` holding member t's parameters (views, no interpolation)
    and ``model``'s buffers."""
    state = {f"{name}.{k}" if name else k: v
             for name, m in model.named_modules() if isinstance(m, SubspaceLayer)
             for k, v in m.member(t).items()}
    state.update(dict(model.named_buffers()))
    net = copy.deepcopy(template)
    net.load_state_dict(state)
    return net.eval()


# -- conversion ---------------------------------------------------------------------------------
def test_to_subspace_in_place_keeps_names_and_objects():
    torch.manual_seed(0)
    model = AllLayers()
    before = dict(model.named_modules())
    param_names = {n for n, _ in model.named_parameters()}
    assert pamal.to_subspace(model, 3) is model
    after = dict(model.named_modules())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    kinds = {name: type(m).__name__ for name, m in after.items() if name}
    assert kinds == {"emb": "SubspaceEmbedding", "conv1": "SubspaceConv1d",
                     "bn1": "SubspaceBatchNorm1d", "conv2": "SubspaceConv2d",
                     "bn2": "SubspaceBatchNorm2d", "ln": "SubspaceLayerNorm",
                     "fc": "SubspaceLinear"}
    assert isinstance(model.fc, nn.Linear) and model.conv2.bias is None
    state = model.state_dict()
    assert "fc.members" in state and "bn1.running_mean" in state and "fc.weight" not in state
    assert model.fc.members.shape == (3, 60 * 2 + 2)
    assert {n.rsplit(".", 1)[0] for n in param_names} == {
        n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert "members=3" in repr(model)


def test_reinit_modes():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    orig = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()])
    same = pamal.to_subspace(copy.deepcopy(lin), 3, reinit=False)
    assert all(torch.equal(same.members[t].detach(), orig) for t in range(3))
    fresh = pamal.to_subspace(copy.deepcopy(lin), 3)
    m = fresh.members.detach()
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])
    calls = []

    def init(layer):
        calls.append(layer)
        nn.init.constant_(layer.weight, float(len(calls)))
        nn.init.zeros_(layer.bias)

    custom = pamal.to_subspace(copy.deepcopy(lin), 3, reinit=init)
    assert len(calls) == 3
    assert custom.member(2)["weight"].unique().tolist() == [3.0]


# -- interpolation --------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [2, 3])
def test_vertex_is_the_member_network(T):
    template, model = _subspace_all_layers(T)
    x = _tokens(1)
    for t in range(T):
        with pamal.use_alpha(model, torch.eye(T)[t]):
            y = model(x)
        torch.testing.assert_close(y, _member_network(template, model, t)(x), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(2, 3, 3), nn.Conv1d(2, 3, 2)])
def test_single_layer_output_is_linear_in_alpha(layer):
    torch.manual_seed(0)
    model = pamal.to_subspace(copy.deepcopy(layer), 3).double()
    shape = {nn.Linear: (4, 5), nn.Conv2d: (2, 2, 6, 6), nn.Conv1d: (2, 2, 7)}[type(layer)]
    x = torch.randn(*shape, dtype=torch.float64)
    vertices = []
    for t in range(3):
        with pamal.use_alpha(model, torch.eye(3, dtype=torch.float64)[t]):
            vertices.append(model(x))
    gen = torch.Generator().manual_seed(1)
    for alpha in pamal.sample_alpha(3, 1.0, 4, generator=gen, dtype=torch.float64):
        with pamal.use_alpha(model, alpha):
            y = model(x)
        torch.testing.assert_close(y, sum(a * v for a, v in zip(alpha, vertices)))


@pytest.mark.parametrize("train", [False, True])
def test_extract_matches_subspace_model_for_every_layer_type(train):
    _, model = _subspace_all_layers(3)
    x = _tokens(2, 9)
    gen = torch.Generator().manual_seed(3)
    for alpha in pamal.sample_alpha(3, 1.0, 3, generator=gen):
        plain = pamal.extract(model, alpha)
        plain.train(train)
        model.train(train)
        with pamal.use_alpha(model, alpha):
            y = model(x)
        torch.testing.assert_close(plain(x), y, rtol=1e-6, atol=1e-6)
        for name, buf in model.named_buffers():
            torch.testing.assert_close(dict(plain.named_buffers())[name], buf)


def test_extract_returns_an_ordinary_model_and_leaves_the_original():
    template, model = _subspace_all_layers(2)
    plain = pamal.extract(model, [0.25, 0.75])
    assert not any(isinstance(m, SubspaceLayer) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in template.modules()]
    assert list(plain.state_dict()) == list(template.state_dict())
    assert all(p.is_leaf and p.requires_grad for p in plain.parameters())
    assert all(isinstance(m, SubspaceLayer) for m in (model.fc, model.emb))
    assert pamal.get_alpha(model) is None
    w = model.fc.members.detach()
    torch.testing.assert_close(plain.fc.weight.detach().flatten(),
                               (0.25 * w[0] + 0.75 * w[1])[:120])


@pytest.mark.parametrize("T", [1, 2, 3])
def test_gradients_reach_member_t_scaled_by_alpha_t(T):
    torch.manual_seed(T)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    pamal.to_subspace(model, T)
    x = torch.randn(4, 3, dtype=torch.float64)
    alpha = pamal.sample_alpha(T, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64).requires_grad_(True)
    plain = pamal.extract(model, alpha.detach())
    plain(x).pow(2).sum().backward()
    with pamal.use_alpha(model, alpha):
        model(x).pow(2).sum().backward()
    expected_alpha_grad = torch.zeros(T, dtype=torch.float64)
    for sub, ref in zip(model, plain):
        if not isinstance(sub, SubspaceLayer):
            continue
        g = torch.cat([p.grad.flatten() for p in ref.parameters()])
        for t in range(T):
            torch.testing.assert_close(sub.members.grad[t], alpha[t].detach() * g)
        expected_alpha_grad += sub.members.detach() @ g
    torch.testing.assert_close(alpha.grad, expected_alpha_grad)


def test_precompute_interpolates_once_per_block(monkeypatch):
    _, model = _subspace_all_layers(2)
    calls = []
    real = layers_module.combine
    monkeypatch.setattr(layers_module, "combine", lambda w, G: calls.append(1) or real(w, G))
    n_layers = len(pamal.subspace_layers(model))
    xs = [_tokens(s) for s in range(3)]
    with pamal.use_alpha(model, [0.3, 0.7]):
        plain = [model(x) for x in xs]
    assert len(calls) == 3 * n_layers
    calls.clear()
    model.fc.members.grad = None
    with pamal.use_alpha(model, [0.3, 0.7], precompute=True):
        fused = [model(x) for x in xs]
        sum(y.sum() for y in fused).backward()
    assert len(calls) == n_layers
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grad = model.fc.members.grad.clone()
    model.fc.members.grad = None
    with pamal.use_alpha(model, [0.3, 0.7]):
        sum(model(x).sum() for x in xs).backward()
    torch.testing.assert_close(model.fc.members.grad, grad)


def test_set_use_get_alpha():
    _, model = _subspace_all_layers(2)
    assert pamal.get_alpha(model) is None
    with pytest.raises(RuntimeError, match="set_alpha"):
        model(_tokens())
    pamal.set_alpha(model, (0.5, 0.5))
    with pamal.use_alpha(model, torch.tensor([1.0, 0.0])) as a:
        assert pamal.get_alpha(model) is model.fc._alpha
        assert a.tolist() == [1.0, 0.0]
    assert pamal.get_alpha(model).tolist() == [0.5, 0.5]
    torch.testing.assert_close(model.fc.weight,
                               model.fc.members.detach().mean(0)[:120].view(2, 60))
    pamal.set_alpha(model, None)
    assert pamal.get_alpha(model) is None


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, match", [
    ([0.5, 0.6], "simplex"), ([1.5, -0.5], "simplex"), ([float("nan"), 1.0], "simplex"),
    ([0.2, 0.3, 0.5], r"shape \(2,\)"), ([[0.5, 0.5]], r"shape \(2,\)"),
])
def test_bad_alpha(alpha, match):
    _, model = _subspace_all_layers(2)
    for call in (lambda: pamal.set_alpha(model, alpha), lambda: pamal.extract(model, alpha),
                 lambda: pamal.use_alpha(model, alpha).__enter__()):
        with pytest.raises(ValueError, match=match):
            call()


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize("model, kind", [
    (nn.Sequential(nn.Linear(2, 3), nn.GRU(3, 3)), "GRU"),
    (nn.Sequential(nn.Conv3d(1, 1, 1)), "Conv3d"),
    (_Scaled(), "_Scaled"),
])
def test_unsupported_layer_lists_the_supported_ones(model, kind):
    with pytest.raises(TypeError, match=kind) as info:
        pamal.to_subspace(model, 2)
    for name in ("nn.Linear", "nn.Conv1d", "nn.Conv2d", "nn.BatchNorm1d", "nn.BatchNorm2d",
                 "nn.LayerNorm", "nn.Embedding"):
        assert name in str(info.value)
    assert not any(isinstance(m, SubspaceLayer) for m in model.modules())  # nothing converted


def test_other_conversion_errors():
    lin = nn.Linear(3, 3)
    tied = nn.Sequential(lin, nn.Linear(3, 3))
    tied[1].weight = lin.weight
    with pytest.raises(ValueError, match="tied"):
        pamal.to_subspace(tied, 2)
    with pytest.raises(ValueError, match="lazy"):
        pamal.to_subspace(nn.LazyLinear(3), 2)
    with pytest.raises(ValueError, match="max_norm"):
        pamal.to_subspace(nn.Embedding(4, 2, max_norm=1.0), 2)
    model = pamal.to_subspace(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="already"):
        pamal.to_subspace(model, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        pamal.to_subspace(nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="to_subspace"):
        pamal.set_alpha(nn.Linear(2, 2), [1.0])
    with pytest.raises(TypeError, match="reinit"):
        pamal.to_subspace(nn.Linear(2, 2), 2, reinit="yes")


def test_linear_subclass_is_supported():
    class MyLinear(nn.Linear):
        pass

    model = pamal.to_subspace(nn.Sequential(MyLinear(3, 2)), 2)
    assert isinstance(model[0], MyLinear) and isinstance(model[0], SubspaceLayer)
    plain = pamal.extract(model, [0.5, 0.5])
    assert type(plain[0]) is MyLinear


# -- α sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.05, 0.3, 1.0, 5.0])
def test_sample_alpha_matches_dirichlet_moments(p):
    T, n = 3, 20000
    a = pamal.sample_alpha(T, p, n, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    assert a.shape == (n, T) and bool((a >= 0).all())
    torch.testing.assert_close(a.sum(1), torch.ones(n, dtype=torch.float64))
    var = (1 / T) * (1 - 1 / T) / (T * p + 1)
    se_mean = (var / n) ** 0.5
    assert (a.mean(0) - 1 / T).abs().max() < 5 * se_mean
    assert (a.var(0) / var - 1).abs().max() < 0.06


def test_sample_alpha_uniform_for_p1_and_reproducible():
    g = lambda: torch.Generator().manual_seed(7)
    a = pamal.sample_alpha(2, 1.0, 20000, generator=g())
    assert abs(float((a[:, 0] < 0.1).double().mean()) - 0.1) < 0.01  # Beta(1, 1) = U(0, 1)
    assert torch.equal(a, pamal.sample_alpha(2, 1.0, 20000, generator=g()))
    assert pamal.sample_alpha(4).shape == (4,)
    assert pamal.sample_alpha(1, 2.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="concentration"):
        pamal.sample_alpha(2, 0.0)
    with pytest.raises(TypeError, match="generator"):
        pamal.sample_alpha(2, generator=0)


# -- the fused interpolation ----------------------------------------------------------------------
def test_interpolate_members_gradients_and_dtypes():
    g = torch.Generator().manual_seed(0)
    members = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layers_module.interpolate_members, (alpha, members))
    d = layers_module.interpolate_members(alpha, members)
    d.backward(torch.ones_like(d))
    assert members.grad.is_contiguous() and members.grad.shape == members.shape
    half = members.detach().to(torch.bfloat16).requires_grad_(True)
    out = layers_module.interpolate_members(alpha.detach().float(), half)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad[1].float(),
                               torch.full((11,), float(alpha[1].detach())), rtol=1e-2, atol=1e-2)


class _ResNetStyle(nn.Module):
    """torchvision-style: stem, nested residual blocks with downsample, pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(self._block(8, 16), self._block(16, 16))
        self.fc = nn.Linear(16, 5)

    @staticmethod
    def _block(cin: int, cout: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            "conv1": nn.Conv2d(cin, cout, 3, padding=1, bias=False), "bn1": nn.BatchNorm2d(cout),
            "conv2": nn.Conv2d(cout, cout, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(cout),
            "downsample": nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                        nn.BatchNorm2d(cout)) if cin != cout else nn.Identity(),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for b in self.layer1:
            h = torch.relu(b["bn1"](b["conv1"](x)))
            x = torch.relu(b["bn2"](b["conv2"](h)) + b["downsample"](x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_resnet_style_model_converts_and_extracts():
    torch.manual_seed(0)
    model = _ResNetStyle()
    names = [n for n, _ in model.named_modules()]
    pamal.to_subspace(model, 3)
    assert [n for n, _ in model.named_modules()] == names
    assert isinstance(model.layer1[0]["downsample"][1], SubspaceLayer)
    x = torch.randn(2, 3, 8, 8)
    model.train()
    with pamal.use_alpha(model, [1 / 3] * 3):
        model(x)  # BN statistics
    model.eval()
    alpha = [0.6, 0.1, 0.3]
    with pamal.use_alpha(model, alpha):
        y = model(x)
    torch.testing.assert_close(pamal.extract(model, alpha).eval()(x), y, rtol=1e-5, atol=1e-6)
