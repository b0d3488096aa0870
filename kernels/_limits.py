"""The largest T each single-program solver kernel serves: ONE table, imported by the kernels
(their launchers refuse a larger T) and by ``fastmtl.solvers`` (which run the torch path above
it). Imports nothing, so importing it never imports triton.

Each limit is the widest padded block the kernel is compiled and checked for
(``python -m fastmtl.kernels.aot --full``: every T up to it compiles for sm_80 and sm_90).
"""

from __future__ import annotations

__all__ = ["MAX_T"]

MAX_T: dict[str, int] = {
    "simplex": 1024,  # MGDA's min-norm point: vectors of T in registers, K rows from memory
    "cagrad": 1024,  # the same solver on shifted Grams
    "nash": 128,  # Nash-MTL's Newton steps: a T x T tile
    "nnqp": 128,  # UPGrad's dual-cone projections: a T x T tile per problem
    "eigh": 128,  # Jacobi eigendecomposition: T x T tiles
}
