"""Build script: the pure-Python package always; the CUDA extension ``fastmtl._C`` only when
``FASTMTL_BUILD_CUDA=1`` and torch is a CUDA build. Its absence is never an error.

``kernels/`` (the Triton kernels) is shipped inside the package as ``fastmtl.kernels``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _cuda_extension():
    """Return (ext_modules, cmdclass) for fastmtl._C, or ([], {}) with a printed reason."""
    if os.environ.get("FASTMTL_BUILD_CUDA", "0") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # e.g. pip's isolated build environment has no torch
        print(f"fastmtl: not building the CUDA extension ({exc})", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("fastmtl: not building the CUDA extension (torch is not a CUDA build or "
              "CUDA_HOME/nvcc not found)", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    # No -std: torch's cpp_extension picks the standard its headers need (C++20 for recent torch).
    # No --use_fast_math: it flushes fp32 denormals to zero, which the torch references don't.
    nvcc_flags = ["-O3", "-lineinfo"]
    ext = CUDAExtension(
        name="fastmtl._C",
        sources=sources,
        depends=glob.glob("csrc/*.cuh") + glob.glob("csrc/*.h"),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
packages = find_packages(include=["fastmtl", "fastmtl.*"]) + ["fastmtl.kernels"]

setup(
    packages=packages,
    package_dir={"fastmtl.kernels": "kernels"},
    package_data={"fastmtl": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
