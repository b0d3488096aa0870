"""Latent vs parameter backtracking on a MultiMNIST-like 2-task problem (synthetic, seeded:
``fastmtl.bench.multiglyph``, 12×12 canvas, 6×6 glyphs). A small CNN encoder, two linear
heads, cross-entropy losses, MGDA directions, 50 steps of each search.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.bench.multiglyph import multi_glyphs
from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking

STEPS = 50


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
    return multi_glyphs(256)


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


def test_generator_is_deterministic_and_labels_match_the_glyphs():
    a, b = multi_glyphs(8, seed=3), multi_glyphs(8, seed=3)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
    x, labels = multi_glyphs(64, tasks=3, size=28, seed=1)
    assert x.shape == (64, 1, 28, 28) and len(labels) == 3
    assert all(int(y.min()) >= 0 and int(y.max()) < 10 for y in labels)
    # the same label in corner 0 gives the same glyph there, up to the one-pixel shift and
    # the other glyphs' overlap: images with equal labels are closer than with different ones
    corner = (x[:, 0, :13, :13] > 0.5).float().flatten(1)
    same = labels[0][:, None] == labels[0][None, :]
    dist = torch.cdist(corner, corner)
    off = ~torch.eye(64, dtype=torch.bool)
    assert float(dist[same & off].mean()) < 0.8 * float(dist[~same].mean())


def test_generator_bad_arguments():
    with pytest.raises(ValueError, match="tasks"):
        multi_glyphs(4, tasks=4)
    with pytest.raises(ValueError, match="size"):
        multi_glyphs(4, size=5)
