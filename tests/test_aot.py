"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 (``fastmtl.kernels.aot``):
no compile error, no TF32, shared memory within the target's limit, spills within the budget
written beside each kernel. Quick subset here (CI); ``FASTMTL_AOT=full`` (``make aot-full``)
takes every T up to each kernel's limit and every autotune config. ``make aot`` prints the
table (``-s``). Not under the interpreter (it compiles nothing).
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from fastmtl.kernels._utils import INTERPRET  # noqa: E402

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(INTERPRET, reason="the Triton interpreter compiles nothing"),
]

from fastmtl.kernels import _aot_cases, aot  # noqa: E402

FULL = os.environ.get("FASTMTL_AOT", "quick") == "full"


@pytest.mark.parametrize("kernel", list(_aot_cases._KERNELS))
def test_kernel_compiles_for_sm80_and_sm90(kernel):
    results = aot.check(full=FULL, kernels=(kernel,),
                        log=print if os.environ.get("FASTMTL_AOT_TABLE") else None)
    assert results, f"no launch of {kernel} was compiled"
    assert {r.target for r in results} == {80, 90}
    bad = [r.row() for r in results if r.problems]
    assert not bad, "\n".join([aot.HEADER, *bad])


def test_harness_flags_tf32():
    from _aot_bad_kernels import launch_tf32
    (res,) = aot.check_call(launch_tf32, targets=(90,))
    assert any("TF32" in p for p in res.problems), res.row()


def test_harness_flags_spills_over_budget():
    from _aot_bad_kernels import launch_huge_tile
    (res,) = aot.check_call(launch_huge_tile, targets=(90,))
    assert res.spill > 0 and res.budget == 0
    assert any("spills" in p for p in res.problems), res.row()


def test_harness_flags_compile_errors():
    from _aot_bad_kernels import launch_does_not_compile
    (res,) = aot.check_call(launch_does_not_compile, targets=(80,))
    assert any("compile error" in p for p in res.problems), res.row()


def test_harness_compiles_each_binary_once_and_restores_triton():
    import torch
    from fastmtl.kernels import gram
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface
    getitem, active = KernelInterface.__getitem__, driver._active

    def twice():  # T = 5 and T = 7 share BLOCK_T = 8 and specialise alike: two binaries
        gram.launch(torch.empty(7, 100))
        gram.launch(torch.empty(5, 100))

    results = aot.check_call(twice, targets=(80, 90))
    assert sorted((r.kernel, r.target) for r in results) == [
        ("gram._gram_partial", 80), ("gram._gram_partial", 90),
        ("gram._gram_reduce", 80), ("gram._gram_reduce", 90)]
    assert KernelInterface.__getitem__ is getitem and driver._active is active
