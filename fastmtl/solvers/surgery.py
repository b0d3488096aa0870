r"""Gradient surgery in coefficient space: the sequential projection loop of PCGrad and GradVac.

Every surgically modified gradient stays in the span of the originals, g'_i = Σ_k C_ik g_k, so
the whole procedure runs on the T×T Gram matrix K = G Gᵀ and a T×T coefficient matrix C
(row i = the coefficients of g'_i), never on the (T, N) gradients:

.. math::

    P = C K,\quad P_{ij} = \langle g'_i, g_j\rangle,\qquad
    \|g'_i\|^2 = (C K C^\top)_{ii} = \textstyle\sum_k P_{ik} C_{ik},\qquad
    \|g_j\| = \sqrt{K_{jj}}.

Each task i visits the other tasks j in its own order (row i of ``orders``). At step s every
i looks at its own j = orders[i, s], so one step is a handful of batched T-vectors ops and the
loop takes T − 1 steps (no host synchronisation, traceable by ``torch.compile``). For the pair
(i, j), with φ = ⟨g'_i, g_j⟩/(‖g'_i‖‖g_j‖) and the target φ̂_ij (GradVac, Wang et al., ICLR
2021, Algorithm 1):

.. math::

    \text{if } \phi < \hat\phi_{ij}:\quad g'_i \leftarrow g'_i + x\,g_j,\qquad
    x = \frac{\|g'_i\|\big(\hat\phi\sqrt{1-\phi^2} - \phi\sqrt{1-\hat\phi^2}\big)}
             {\|g_j\|\sqrt{1-\hat\phi^2}},

i.e. C_ij += x and P_i· += x K_j·. With φ̂ ≡ 0 this is PCGrad (Yu et al., NeurIPS 2020):
x = −⟨g'_i, g_j⟩/‖g_j‖² whenever ⟨g'_i, g_j⟩ < 0, the projection of g'_i onto the normal plane
of the *original* g_j. The loop also returns φ at each visited pair (before its correction),
for GradVac's EMA of the targets.

Degenerate inputs: a pair with ‖g'_i‖‖g_j‖ = 0 has φ := 0 and is never corrected (a zero
gradient neither conflicts nor is projected onto); a target with √(1 − φ̂²) = 0 (φ̂ = ±1) is
unattainable and skipped; φ is clamped to [−1, 1] against rounding. So zero, duplicated and
rank-deficient gradients give finite coefficients.

``task_orders(T, seed, counter)`` gives the random visiting orders from a counter-based hash
(a torch.Generator cannot be traced by ``torch.compile``): each row is a uniformly random
permutation of the other tasks, a pure function of (seed, counter), identical on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["surgery_coefficients", "task_orders"]

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for 0 <= x < 2³², in int64 without overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the "lowbias32" xorshift-multiply finaliser), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def task_orders(T: int, seed: int, counter: Tensor) -> Tensor:
    """(T, T − 1) int64 on ``counter``'s device: row i is a random order of {0..T−1} \\ {i}.

    ``counter`` is a 0-d int64 tensor (the call count, kept in an aggregator's state); the
    orders are a pure function of (seed, counter mod 2³²), so they survive a state_dict round
    trip and agree between CPU, CUDA and compiled code.
    """
    s1, s2 = _mix32_int(seed), _mix32_int(seed ^ 0x9E3779B9)
    step = _mix32((counter & _M32) ^ s1)
    idx = torch.arange(T * T, device=counter.device, dtype=torch.int64).view(T, T)
    keys = _mix32(_mix32(idx ^ step) ^ s2)
    eye = torch.eye(T, dtype=torch.bool, device=counter.device)
    keys = torch.where(eye, _M32 + 1, keys)  # task i itself sorts last and is dropped
    return torch.argsort(keys, dim=1, stable=True)[:, : T - 1]


def surgery_coefficients(K: Tensor, orders: Tensor,
                         targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """C (T, T) with g'_i = Σ_k C_ik g_k after the projection loop, and the cosines φ (T, T).

    Args:
        K: the Gram matrix (T, T) of the original gradients (float32/float64).
        orders: (T, S) int64, row i the tasks j ≠ i that task i visits, in order (S <= T − 1;
            ``task_orders`` gives the random orders).
        targets: φ̂ (T, T), the cosine targets (GradVac); None means 0 (PCGrad).

    Returns:
        (C, phi): C the coefficient matrix (the projected gradients are C G and the summed
        direction is Gᵀ Cᵀ1); phi_ij the cosine of (g'_i, g_j) when task i visited j, before its
        correction (0 where not visited and on the diagonal).
    """
    T = K.shape[0]
    C = torch.eye(T, dtype=K.dtype, device=K.device)
    P = K.clone()
    phi_all = torch.zeros_like(K)
    norms = K.diagonal().clamp_min(0.0).sqrt()
    for s in range(orders.shape[1]):
        j = orders[:, s]
        col = j[:, None]
        p = P.gather(1, col).squeeze(1)  # <g'_i, g_j>
        nj = norms.gather(0, j)
        ni = (P * C).sum(1).clamp_min(0.0).sqrt()  # ‖g'_i‖
        den = ni * nj
        ok = den > 0
        phi = torch.where(ok, p / torch.where(ok, den, 1.0), 0.0).clamp(-1.0, 1.0)
        if targets is None:
            target = torch.zeros_like(phi)
        else:
            target = targets.gather(1, col).squeeze(1)
        root = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        root_t = (1.0 - target * target).clamp_min(0.0).sqrt()
        act = ok & (phi < target) & (root_t > 0)
        safe_t = torch.where(act, root_t, 1.0)
        safe_j = torch.where(act, nj, 1.0)
        x = torch.where(act, (ni * target * root / safe_t - p / safe_j) / safe_j, 0.0)
        C = C.scatter_add(1, col, x[:, None])
        P = P + x[:, None] * K.index_select(0, j)
        phi_all = phi_all.scatter(1, col, phi[:, None])
    return C, phi_all
