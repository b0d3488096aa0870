"""Properties every aggregator shares (in the manner of torchjd's ``_asserts.py``), run over the
table in ``_aggregators.py``: each call uses a fresh instance, so stateful and randomised
methods are compared from the same state and the same seed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastmtl as fm
from tests._aggregators import ENTRIES, Entry


def _available(e: Entry) -> bool:
    return importlib.util.find_spec(f"fastmtl.aggregators.{e.module}") is not None


PARAMS = [pytest.param(e, id=e.id, marks=[] if _available(e) else
                       [pytest.mark.skip(reason=f"fastmtl.aggregators.{e.module} not present")])
          for e in ENTRIES]


def _problem(T: int, N: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(T, N, generator=g, dtype=dtype)
    losses = torch.rand(T, generator=g, dtype=dtype) + 0.5
    return G, losses


def _weights(e: Entry, K, losses):
    return e.make().weights(K, losses if e.needs_losses else None)


@pytest.mark.parametrize("entry", PARAMS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 10])
def test_weights_shape_dtype_device_finite(entry, T):
    G, losses = _problem(T, 3 * T + 4, seed=T)
    for dtype in (torch.float32, torch.float64):
        K = fm.ops.gram(G.to(dtype))
        w = _weights(entry, K, losses.to(dtype))
        assert w.shape == (T,) and w.dtype == K.dtype and w.device == K.device
        assert torch.isfinite(w).all()


@pytest.mark.parametrize("entry", PARAMS)
def test_single_task_gives_a_positive_multiple_of_the_gradient(entry):
    G, losses = _problem(1, 9, seed=3)
    w = _weights(entry, fm.ops.gram(G), losses)
    assert w.shape == (1,) and w.item() > 0


@pytest.mark.parametrize("entry", [p for p in PARAMS if p.values[0].deterministic])
@pytest.mark.parametrize("T", [3, 5])
def test_permutation_equivariance(entry, T):
    G, losses = _problem(T, 4 * T, seed=10 + T)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
    w = _weights(entry, fm.ops.gram(G), losses)
    w_perm = _weights(entry, fm.ops.gram(G[perm]), losses[perm])
    torch.testing.assert_close(w_perm, w[perm], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("entry", [p for p in PARAMS
                                   if p.values[0].scale_exponent is not None])
@pytest.mark.parametrize("c", [1e-3, 7.0])
def test_positive_scaling(entry, c):
    """d(cG) = c^p d(G) for the exponent p the method promises."""
    e: Entry = entry
    G, losses = _problem(4, 12, seed=5)
    d = fm.ops.combine(_weights(e, fm.ops.gram(G), losses), G)
    d_scaled = fm.ops.combine(_weights(e, fm.ops.gram(c * G), losses), c * G)
    torch.testing.assert_close(d_scaled, c ** e.scale_exponent * d, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("entry", PARAMS)
@pytest.mark.parametrize("case", ["duplicated", "rank_deficient", "zero_row", "all_zero"])
def test_degenerate_gradients_give_finite_weights(entry, case):
    G, losses = _problem(5, 12, seed=7)
    if case == "duplicated":
        G[3] = G[1]
    elif case == "rank_deficient":
        G = G[:, :2].clone()            # T = 5 > N = 2
    elif case == "zero_row":
        G[2] = 0
    else:
        G = torch.zeros_like(G)
    w = _weights(entry, fm.ops.gram(G), losses)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("entry", PARAMS)
def test_call_equals_combine_of_weights(entry):
    e: Entry = entry
    G, losses = _problem(4, 10, seed=11)
    args = (losses,) if e.needs_losses else ()
    d = e.make()(G, *args)
    d = d[0] if isinstance(d, tuple) else d
    expected = fm.ops.combine(e.make().weights(fm.ops.gram(G), *args), G)
    torch.testing.assert_close(d, expected)


@pytest.mark.parametrize("entry", PARAMS)
def test_non_finite_gram_is_an_error_on_cpu(entry):
    G, losses = _problem(3, 6, seed=2)
    G[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _weights(entry, fm.ops.gram(G), losses)


@pytest.mark.parametrize("entry", PARAMS)
@pytest.mark.parametrize("T", [2, 5])
def test_weights_trace_without_graph_breaks(entry, T):
    """No .item()/.tolist()/branch on tensor values: traces with fullgraph=True."""
    e: Entry = entry
    torch._dynamo.reset()
    G, losses = _problem(T, 3 * T, seed=T)
    K = fm.ops.gram(G)
    agg = e.make()
    fn = (lambda K, L: agg.weights(K, L)) if e.needs_losses else (lambda K, L: agg.weights(K))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    w = compiled(K, losses)
    torch.testing.assert_close(w, _weights(e, K, losses), rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("entry", PARAMS)
@pytest.mark.parametrize("T", [2, 5, 40])
def test_no_host_sync_on_cuda(entry, T):
    """weights() under torch.cuda.set_sync_debug_mode("error") (after a warm-up call that may
    compile kernels): any .item()/.cpu()/data-dependent branch raises."""
    e: Entry = entry
    G, losses = _problem(T, 4 * T, seed=T, dtype=torch.float32)
    K, losses = fm.ops.gram(G.cuda()), losses.cuda()
    agg = e.make()
    args = (losses,) if e.needs_losses else ()
    agg.weights(K, *args)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = agg.weights(K, *args)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(w).all()
