r"""Aligned-MTL: align the task gradients to condition number 1, then average them.

Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (Algorithm 1): with the eigendecomposition K = V Λ Vᵀ restricted to its
numerical rank r (eigenvalues λ_i > T·ε·λ_max, ``kept_eigenvalues``),

.. math::

    B = \sqrt{\lambda_{\min}}\; V_r \Lambda_r^{-1/2} V_r^\top, \qquad
    \hat G = B G, \qquad d = \hat G^\top \pi = G^\top w, \quad w = B \pi,

with λ_min the smallest kept eigenvalue and π the preferences (1/T each by default). If
G = V Σ Wᵀ (SVD), Ĝ = √λ_min V_r W_rᵀ: all its nonzero singular values equal √λ_min, i.e. the
aligned Gram Ĝ Ĝᵀ = B K B = λ_min V_r V_rᵀ has condition number 1 on the span of the
gradients; the aligned gradients are orthogonal with equal norms. B is symmetric with
‖B‖ = 1, so |w| <= ‖π‖ (bounded weights), and w is invariant under G → cG (d scales with G).
T = 1: w = π_1 (d = g for the default). K = 0 (rank 0): w = π (d = 0), as torchjd.
``scale`` replaces λ_min by the median ("median": the lower middle kept eigenvalue, as
``torch.median``) or the mean ("rmse": the root-mean-square singular value) of the kept
eigenvalues: the options of the official code and torchjd.

The eigendecomposition is ``fastmtl.solvers.eigh.symmetric_eigh`` (LAPACK on CPU; on CUDA one
single-program Triton Jacobi kernel, no host sync, where ``torch.linalg.eigh`` would
synchronise), then a few small ops.

Departures and conventions:

- torchjd's ``AlignedMTL(pref_vector=None, scale_mode="min")``: the same B, tolerance and
  default preferences (the mean, 1/T): the same weights. torchjd builds B from the eigenvalues
  sorted descending and sliced to the rank on the host; here the rank is a mask.
- The official code (SamsungLabs/MTL, ``ProcrustesSolver``) *sums* the aligned gradients
  (π = 1: T times this direction) and takes ε from the default float32 whatever the dtype;
  pass ``pref=[1.0] * T`` for its scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastmtl._checks import check_choice, check_int, check_number
from fastmtl.aggregators.base import Aggregator
from fastmtl.solvers.eigh import MAX_SWEEPS, kept_eigenvalues, symmetric_eigh

__all__ = ["AlignedMTL"]

_SCALES = ("min", "median", "rmse")


def _preferences(pref: object) -> tuple[float, ...] | None:
    if pref is None:
        return None
    values = pref.detach().cpu().flatten().tolist() if isinstance(pref, Tensor) else pref
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        raise ValueError(f"pref must be None or a non-empty sequence of numbers, got {pref!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           for v in values):
        raise ValueError(f"pref must hold finite numbers, got {pref!r}")
    return tuple(float(v) for v in values)


class AlignedMTL(Aggregator):
    """Aligned-MTL weights (Senushkin et al. 2023): w = B π with B = √λ_min V Λ^{-1/2} Vᵀ on
    the numerical span of K (see the module docstring).

    Args:
        pref: the preferences π, one number a task (None: 1/T each). Read once, at
            construction (a tensor is copied to the host then, never in ``weights``).
        scale: "min" (the paper, default), "median" or "rmse" (see above).
        rtol: relative eigenvalue cut (None: T·ε of the work dtype).
        max_sweeps: Jacobi sweep budget of the eigendecomposition on CUDA.
        check: value checks of the inputs (see ``Aggregator``).
    """

    def __init__(self, pref: Tensor | Sequence[float] | None = None, scale: str = "min",
                 rtol: float | None = None, max_sweeps: int = MAX_SWEEPS, *,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        self.pref = _preferences(pref)
        check_choice("scale", scale, _SCALES)
        check_number("rtol", rtol, low=0, high=1, high_open=True, none_ok=True)
        check_int("max_sweeps", max_sweeps)
        self.scale = scale
        self.rtol = None if rtol is None else float(rtol)
        self.max_sweeps = max_sweeps
        self._pref_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _pi(self, T: int, like: Tensor) -> Tensor:
        if self.pref is None:
            return torch.full((T,), 1.0 / T, dtype=like.dtype, device=like.device)
        if len(self.pref) != T:
            raise ValueError(f"pref has {len(self.pref)} entries but K has T = {T} tasks")
        key = (like.device, like.dtype)
        if key not in self._pref_cache:  # one host-to-device copy per device and dtype
            self._pref_cache[key] = torch.tensor(self.pref, dtype=like.dtype, device=like.device)
        return self._pref_cache[key]

    def _scale(self, lam: Tensor, keep: Tensor) -> Tensor:
        r = keep.sum()
        if self.scale == "min":
            return torch.where(keep, lam, math.inf).min()
        if self.scale == "rmse":
            return torch.where(keep, lam, 0.0).sum() / r.clamp_min(1)
        # λ is ascending and the kept ones are the top r: the lower median is at T − r + (r−1)//2
        T = lam.shape[0]
        return lam.gather(0, (T - r + (r - 1).clamp_min(0) // 2).clamp(0, T - 1).reshape(1))[0]

    def _weights(self, K: Tensor, losses: Tensor | None) -> Tensor:
        T = K.shape[0]
        lam, V = symmetric_eigh(K, self.max_sweeps)
        keep = kept_eigenvalues(lam, self.rtol)
        scale = self._scale(lam, keep)
        root = torch.where(keep, (scale / torch.where(keep, lam, 1.0)).sqrt(), 0.0)
        pi = self._pi(T, lam)
        w = V @ (root * (V.mT @ pi))
        w = torch.where(keep.any(), w, pi)  # rank 0 (K = 0): B = I, as torchjd
        w = w + 0.0 * lam.sum()  # non-finite K: NaN (its λ are NaN, none kept)
        return w.to(K.dtype)

    def __repr__(self) -> str:
        return (f"AlignedMTL(pref={self.pref}, scale={self.scale!r}, rtol={self.rtol}, "
                f"max_sweeps={self.max_sweeps})")
