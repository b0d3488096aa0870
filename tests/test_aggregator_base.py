"""The aggregator contract: input validation policy and the stateful plumbing."""

from __future__ import annotations

import pytest
import torch

import fastmtl as fm
from fastmtl.aggregators import Aggregator, StatefulAggregator


class _EMA(StatefulAggregator):
    """Toy stateful method: w = EMA of the diagonal of K (beta 0.5)."""

    def _init_state(self, K):
        return {"ema": torch.zeros(K.shape[0], dtype=K.dtype, device=K.device)}

    def _stateful_weights(self, K, losses, state):
        state["ema"].mul_(0.5).add_(0.5 * K.diagonal())
        return state["ema"].clone()


def _gram(T, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=g, dtype=torch.float64)
    return G @ G.T


@pytest.mark.parametrize("bad, err, match", [
    ([[1.0]], TypeError, "torch.Tensor"),
    (torch.ones(2, 3), ValueError, "square"),
    (torch.ones(3), ValueError, "square"),
    (torch.ones(2, 2, dtype=torch.int64), TypeError, "floating"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), ValueError, "non-finite"),
    (torch.tensor([[1.0, 0.5], [-0.5, 1.0]]), ValueError, "not symmetric"),
])
def test_bad_gram_is_rejected(bad, err, match):
    with pytest.raises(err, match=match):
        fm.aggregators.Sum().weights(bad)


def test_value_checks_can_be_disabled():
    K = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    w = fm.aggregators.Sum(check=False).weights(K)
    assert torch.equal(w, torch.ones(2))


@pytest.mark.parametrize("losses, err, match", [
    ([torch.tensor(1.0)], ValueError, r"shape \(2,\)"),
    ([torch.ones(2), torch.ones(2)], ValueError, "scalar"),
    ([1.0, 2.0], TypeError, "scalar tensors"),
    (torch.tensor([1.0, float("inf")]), ValueError, "non-finite"),
])
def test_bad_losses_are_rejected(losses, err, match):
    with pytest.raises(err, match=match):
        fm.aggregators.Sum().weights(torch.eye(2), losses)


def test_call_equals_combine_of_weights():
    G = torch.randn(3, 11, dtype=torch.float64)
    agg = fm.aggregators.Mean()
    torch.testing.assert_close(agg(G), fm.ops.combine(agg.weights(fm.ops.gram(G)), G))


def test_base_requires_a_method():
    with pytest.raises(NotImplementedError):
        Aggregator().weights(torch.eye(2))


def test_stateful_round_trip_and_reset():
    a, b = _EMA(), _EMA()
    Ks = [_gram(3, seed=s) for s in range(4)]
    for K in Ks[:2]:
        a.weights(K)
    assert a.step == 2
    b.load_state_dict(a.state_dict())
    for K in Ks[2:]:
        torch.testing.assert_close(a.weights(K), b.weights(K), rtol=0, atol=0)
    assert a.step == b.step == 4
    expected = 0.5 * Ks[0].diagonal()
    a.reset()
    assert a.step == 0 and a.state_dict()["state"] == {}
    torch.testing.assert_close(a.weights(Ks[0]), expected)


def test_state_dict_is_a_copy():
    a = _EMA()
    a.weights(_gram(2))
    sd = a.state_dict()
    a.weights(_gram(2, seed=1))
    assert not torch.equal(sd["state"]["ema"], a.state_dict()["state"]["ema"])


def test_state_restarts_when_the_number_of_tasks_changes():
    a = _EMA()
    a.weights(_gram(3))
    w = a.weights(_gram(5))
    assert w.shape == (5,) and a.step == 1


def test_bad_state_dict_keys():
    with pytest.raises(ValueError, match="expects keys"):
        _EMA().load_state_dict({"ema": torch.zeros(2)})


def test_stateless_load_state_dict_rejects_state():
    with pytest.raises(ValueError, match="stateless"):
        fm.aggregators.Sum().load_state_dict({"x": 1})
