"""Latent vs parameter backtracking on a MultiMNIST-like 2-task problem (synthetic, seeded).

Each image overlays two glyphs on a 12×12 canvas: one of 10 fixed random 6×6 patterns near
the top-left corner (task 1: which one?) and another near the bottom-right (task 2), each
with a random offset of up to one pixel, plus a little noise. A small CNN encoder, two
linear heads, cross-entropy losses, MGDA directions, 50 steps of each search.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking

STEPS = 50


def multi_glyphs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (n, 1, 12, 12), left labels (n,), right labels (n,)), deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    glyphs = (torch.rand(10, 6, 6, generator=gen) < 0.45).float()
    left = torch.randint(0, 10, (n,), generator=gen)
    right = torch.randint(0, 10, (n,), generator=gen)
    offsets = torch.randint(0, 2, (n, 4), generator=gen).tolist()
    x = 0.1 * torch.rand(n, 1, 12, 12, generator=gen)
    for k, (r1, c1, r2, c2) in enumerate(offsets):
        a = x[k, 0, r1 : r1 + 6, c1 : c1 + 6]
        a.copy_(torch.maximum(a, glyphs[left[k]]))
        b = x[k, 0, 5 + r2 : 11 + r2, 5 + c2 : 11 + c2]
        b.copy_(torch.maximum(b, glyphs[right[k]]))
    return x, left, right


def _model(seed: int) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU())
    heads = [nn.Linear(32, 10), nn.Linear(32, 10)]
    return encoder, heads


def _full_losses(encoder, heads, x, ys) -> torch.Tensor:
    with torch.no_grad():
        z = encoder(x)
        return torch.stack([F.cross_entropy(h(z), y) for h, y in zip(heads, ys)])


@pytest.fixture(scope="module")
def data():
    x, left, right = multi_glyphs(256)
    return x, [left, right]


@pytest.mark.parametrize("cls,kw", [(LatentBacktracking, {"batched": True}),
                                    (LatentBacktracking, {"batched": False}),
                                    (ParamBacktracking, {})],
                         ids=["latent-batched", "latent-sequential", "param"])
def test_multiglyph_decreases_every_loss(data, cls, kw):
    x, ys = data
    encoder, heads = _model(0)
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    ls = cls(encoder, heads, [F.cross_entropy] * 2, lr=2.0, c=1e-4, **kw)
    start = _full_losses(encoder, heads, x, ys)
    calls.clear()
    trials = 0
    for s in range(STEPS):
        batch = slice(64 * (s % 4), 64 * (s % 4 + 1))
        info = ls.step(x[batch], [y[batch] for y in ys])
        trials += int(info.trials)
    forwards = len(calls)
    end = _full_losses(encoder, heads, x, ys)
    assert bool((end < 0.8 * start).all()), (start, end)
    assert trials > STEPS  # some steps backtracked at least once
    if cls is LatentBacktracking:
        assert forwards == STEPS  # one encoder forward per step, none per trial
    else:
        assert forwards == STEPS + trials  # plus one per trial


def test_constant_step_baseline(data):
    x, ys = data
    encoder, heads = _model(0)
    ls = ConstantStep(encoder, heads, [F.cross_entropy] * 2, lr=0.5)
    start = _full_losses(encoder, heads, x, ys)
    for s in range(STEPS):
        batch = slice(64 * (s % 4), 64 * (s % 4 + 1))
        ls.step(x[batch], [y[batch] for y in ys])
    assert bool((_full_losses(encoder, heads, x, ys) < start).all())


def test_generator_is_deterministic():
    a, b = multi_glyphs(8, seed=3), multi_glyphs(8, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (8, 1, 12, 12) and int(a[1].max()) < 10
