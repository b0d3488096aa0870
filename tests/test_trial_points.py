"""fm.ops.trial_points: Z_k = z − t_k d against a float64 reference.

Tests marked ``kernels`` also run in the Triton-interpreter process
(``TRITON_INTERPRET=1 FASTMTL_BACKEND=triton pytest -m kernels``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, acc, dtype_id, randn
from conftest import device_backend_params

from fastmtl.backend import use_backend
from fastmtl.ops.trial_points import trial_points, trial_points_reference

PARAMS = device_backend_params()
# 65 = the interpreter's BLOCK_N + 1; (3, 67) a ragged 2-D z; 1000 several blocks.
SHAPES = [(1,), (7,), (65,), (3, 67), (1000,)]
KS = [1, 2, 5]
# One rounding of z − t·d in the accumulation dtype (possibly fused), then one to the dtype.
RTOL = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _error(Z: torch.Tensor, z: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> float:
    """max |Z_kn − (z_n − t_k d_n)| / (|z_n| + |t_k d_n|), reference in float64."""
    z64, d64, t64 = z.double(), d.double(), t.double().view(-1, *([1] * z.dim()))
    ref = z64 - t64 * d64
    scale = (z64.abs() + (t64 * d64).abs()).clamp_min(torch.finfo(torch.float64).tiny)
    return ((Z.double() - ref).abs() / scale).max().item()


@pytest.mark.kernels
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_values(device, backend, dtype, shape, K):
    z = randn(*shape, dtype=dtype, device=device, seed=len(shape) * 100 + shape[-1])
    d = randn(*shape, dtype=dtype, device=device, seed=K)
    t = 0.7 * 0.5 ** torch.arange(K, dtype=acc(dtype), device=device)
    with use_backend(backend):
        Z = trial_points(z, d, t)
    assert Z.shape == (K, *shape) and Z.dtype == dtype and Z.device == z.device
    assert _error(Z, z, d, t) <= RTOL[dtype]


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_rows_match_single_calls(device, backend):
    """Row k of the batched call is exactly the call with steps[k] alone (same arithmetic):
    what makes batched and sequential line searches agree."""
    z = randn(4, 33, device=device, seed=1)
    d = randn(4, 33, device=device, seed=2)
    t = torch.tensor([0.3, 0.15, 1e-3, 0.0], device=device)
    with use_backend(backend):
        Z = trial_points(z, d, t)
        for k in range(4):
            assert torch.equal(Z[k], trial_points(z, d, t[k : k + 1])[0])
    assert torch.equal(Z[3], z)  # t = 0 returns z exactly


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_sequence_and_strided(device, backend):
    """A Python list of steps, fp64 steps for fp32 z, and non-contiguous z, d."""
    z = randn(40, 9, device=device, seed=3).mT  # (9, 40), not contiguous
    d = randn(9, 80, device=device, seed=4)[:, ::2]
    with use_backend(backend):
        Z_list = trial_points(z, d, [1, 0.5, 0.25])
        Z_t = trial_points(z, d, torch.tensor([1, 0.5, 0.25], dtype=torch.float64,
                                               device=device))
    assert torch.equal(Z_list, Z_t)
    assert _error(Z_list, z, d, torch.tensor([1, 0.5, 0.25])) <= RTOL[torch.float32]


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_gradcheck(device, backend):
    z = randn(2, 5, dtype=torch.float64, device=device, seed=5).requires_grad_()
    d = randn(2, 5, dtype=torch.float64, device=device, seed=6).requires_grad_()
    t = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64, device=device).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(trial_points, (z, d, t))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_compile(device, backend):
    torch._dynamo.reset()
    z = randn(3, 20, device=device, seed=7)
    d = randn(3, 20, device=device, seed=8)
    t = torch.tensor([1.0, 0.5], device=device)
    with use_backend(backend):
        compiled = torch.compile(trial_points, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(z, d, t), trial_points(z, d, t))


@pytest.mark.kernels
@pytest.mark.parametrize("device,backend", PARAMS)
def test_trial_points_empty_z(device, backend):
    z = torch.ones(0, 3, device=device)
    with use_backend(backend):
        Z = trial_points(z, z, [1.0, 0.5])
    assert Z.shape == (2, 0, 3)


def test_trial_points_reference_is_the_spec():
    z, d = randn(6, seed=9), randn(6, seed=10)
    t = torch.tensor([2.0, 1.0])
    ref = z.unsqueeze(0) - t.view(-1, 1) * d
    assert torch.equal(trial_points_reference(z, d, t), ref)


# ---------------------------------------------------------------------------- bad input

BAD = [
    ("z not a tensor", lambda: ([1.0], torch.ones(1), [1.0]), TypeError, "z must be"),
    ("d not a tensor", lambda: (torch.ones(1), [1.0], [1.0]), TypeError, "d must be"),
    ("z integer", lambda: (torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64),
                           [1.0]), TypeError, "floating"),
    ("shape mismatch", lambda: (torch.ones(2, 3), torch.ones(3, 2), [1.0]), ValueError,
     "d must have z's shape"),
    ("dtype mismatch", lambda: (torch.ones(3), torch.ones(3, dtype=torch.float64), [1.0]),
     TypeError, "d has dtype"),
    ("steps 2-D", lambda: (torch.ones(3), torch.ones(3), torch.ones(2, 1)), ValueError, "1-D"),
    ("steps integer", lambda: (torch.ones(3), torch.ones(3), torch.ones(2, dtype=torch.int64)),
     TypeError, "steps must be a floating"),
    ("steps empty", lambda: (torch.ones(3), torch.ones(3), []), ValueError, "K >= 1"),
    ("steps strings", lambda: (torch.ones(3), torch.ones(3), ["a"]), TypeError, "numbers"),
    ("steps scalar", lambda: (torch.ones(3), torch.ones(3), 0.5), TypeError, "1-D tensor"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_trial_points_bad_input(make, error, match):
    z, d, steps = make()
    with use_backend("torch"), pytest.raises(error, match=match):
        trial_points(z, d, steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_trial_points_device_mismatch():
    with pytest.raises(ValueError, match="is on"):
        trial_points(torch.ones(3, device="cuda"), torch.ones(3), [1.0])
    with pytest.raises(ValueError, match="steps is on"):
        trial_points(torch.ones(3), torch.ones(3), torch.ones(1, device="cuda"))


def test_trial_points_device_mismatch_meta():
    """The device check, without a GPU: a meta tensor against a CPU one."""
    with pytest.raises(ValueError, match="d is on meta"):
        trial_points(torch.ones(3), torch.ones(3, device="meta"), [1.0])
    with pytest.raises(ValueError, match="steps is on meta"):
        trial_points(torch.ones(3), torch.ones(3), torch.ones(1, device="meta"))
