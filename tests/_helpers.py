"""Helpers shared by several test modules: the ops' dtypes and inputs, and the aggregator
checks every method repeats (tracing under ``torch.compile``, non-finite Grams, permutations
and scaling in float64)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

# The dtypes of the ops (gram, combine, project).
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype the ops promise: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


dtype_id = lambda d: str(d).removeprefix("torch.")
# out= in G's dtype or in the accumulation dtype
OUT_DTYPES = [(d, o) for d in DTYPES for o in dict.fromkeys([d, acc(d)])]


def randn(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def assert_compiles(agg: Any, K: torch.Tensor, *args: Any) -> None:
    """``agg.weights`` traces with ``fullgraph=True`` and gives the eager weights."""
    compiled = torch.compile(agg.weights, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(K, *args), agg.weights(K, *args))


def assert_equivariant_and_scale_free(agg: Any, G: torch.Tensor, rtol: float,
                                      atol: float) -> None:
    """For float64 G: the weights permute with the rows of G and do not change under
    G → 10³G (K → 10⁶K), and the direction scales with G (tighter than the shared property
    tests, which run every method in float32)."""
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(0))
    w = agg.weights(G @ G.T)
    torch.testing.assert_close(agg.weights(G[perm] @ G[perm].T), w[perm], rtol=rtol, atol=atol)
    torch.testing.assert_close(agg.weights(1e6 * (G @ G.T)), w, rtol=rtol, atol=atol)
    torch.testing.assert_close(agg(1e-3 * G), 1e-3 * agg(G))


def assert_nonfinite_gram_gives_nan(make: Callable[..., Any], T: int = 4) -> None:
    """A NaN in K gives all-NaN weights with ``check=False`` and a ValueError by default."""
    K = torch.eye(T)
    K[0, 1] = K[1, 0] = float("nan")
    assert torch.isnan(make(check=False).weights(K)).all()
    with pytest.raises(ValueError, match="non-finite"):
        make().weights(K)
