"""fm.linesearch: bad input gives clear errors, or the documented handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_linesearch import _mlp, _state

from fastmtl.aggregators import MGDA, Aggregator, Mean
from fastmtl.linesearch import ConstantStep, LatentBacktracking, ParamBacktracking


class _Ascent(Aggregator):
    def _weights(self, K, losses):
        return -torch.ones(K.shape[0], dtype=K.dtype)


def test_bad_construction():
    enc, heads, _, _ = _mlp(13)
    fns = [F.cross_entropy] * 2
    with pytest.raises(ValueError, match="same length"):
        LatentBacktracking(enc, heads, [F.cross_entropy])
    with pytest.raises(ValueError, match="heads is empty"):
        LatentBacktracking(enc, [], [])
    with pytest.raises(TypeError, match="sequence of modules"):
        LatentBacktracking(enc, heads[0], fns)
    with pytest.raises(TypeError, match="encoder must be"):
        LatentBacktracking(lambda x: x, heads, fns)
    with pytest.raises(TypeError, match=r"loss_fns\[1\] must be callable"):
        LatentBacktracking(enc, heads, [F.cross_entropy, 3])
    with pytest.raises(TypeError, match="direction must be"):
        LatentBacktracking(enc, heads, fns, direction="mgda")
    with pytest.raises(ValueError, match="disjoint"):
        LatentBacktracking(enc, [heads[0], enc], fns)
    for kw, match in [({"lr": 0}, "lr"), ({"c": 1.0}, "c must"), ({"shrink": 1.0}, "shrink"),
                      ({"max_trials": 0}, "max_trials"), ({"min_step": -1}, "min_step"),
                      ({"condition": "any"}, "condition"), ({"armijo": "x"}, "armijo"),
                      ({"on_failure": "retry"}, "on_failure"), ({"batched": 1}, "batched"),
                      ({"trials_per_call": 0}, "trials_per_call")]:
        with pytest.raises(ValueError, match=match):
            LatentBacktracking(enc, heads, fns, **kw)
    with pytest.raises(TypeError, match="optimizer"):
        ParamBacktracking(enc, heads, fns, optimizer="sgd")
    with pytest.raises(ValueError, match="space"):
        ConstantStep(enc, heads, fns, space="z")


@pytest.mark.parametrize("cls", [LatentBacktracking, ParamBacktracking, ConstantStep])
def test_bad_step_input(cls):
    enc, heads, x, ys = _mlp(14)
    ls = cls(enc, heads, [F.cross_entropy] * 2)
    with pytest.raises(ValueError, match="one target per task"):
        ls.step(x, ys[:1])
    with pytest.raises(TypeError, match="one target per task"):
        ls.step(x, 3)
    bad = [lambda out, y: F.cross_entropy(out, y) * float("nan"), F.cross_entropy]
    with pytest.raises(ValueError, match=r"non-finite losses at task indices \[0\]"):
        cls(enc, heads, bad).step(x, ys)


def test_nonfinite_unchecked_is_a_failed_step():
    enc, heads, x, ys = _mlp(15)
    before = _state(enc, heads)
    bad = [lambda out, y: F.cross_entropy(out, y) + float("inf"), F.cross_entropy]
    ls = LatentBacktracking(enc, heads, bad, direction=Mean(check=False),
                            check=False)
    info = ls.step(x, ys)
    assert not bool(info.accepted) and float(info.step_size) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(_state(enc, heads), before))


@pytest.mark.parametrize("cls", [LatentBacktracking, ParamBacktracking])
def test_non_descent_direction(cls):
    enc, heads, x, ys = _mlp(16)
    with pytest.raises(ValueError, match="not a descent direction for tasks"):
        cls(enc, heads, [F.cross_entropy] * 2, direction=_Ascent()).step(x, ys)


def test_mgda_default_direction():
    enc, heads, _, _ = _mlp(17)
    assert isinstance(LatentBacktracking(enc, heads, [F.cross_entropy] * 2).direction, MGDA)


def test_bad_model_outputs():
    enc, heads, x, ys = _mlp(19)
    per_sample = [lambda out, y: F.cross_entropy(out, y, reduction="none")] * 2
    with pytest.raises(ValueError, match=r"loss_fns\[0\] must return a scalar"):
        LatentBacktracking(enc, heads, per_sample).step(x, ys)

    class Pair(torch.nn.Module):
        def forward(self, x):
            return enc(x), x

    with pytest.raises(TypeError, match="the encoder must return one tensor"):
        LatentBacktracking(Pair(), heads, [F.cross_entropy] * 2).step(x, ys)
