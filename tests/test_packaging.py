"""The wheel ships ``kernels/`` as ``fastmtl.kernels`` (nothing top-level) and ``py.typed``;
the package imports without the CUDA extension."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

import fastmtl as fm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_and_import_without_extension():
    assert isinstance(fm.__version__, str) and fm.__version__.count(".") >= 2
    import fastmtl._ext as ext

    ok, why = ext.available()
    assert isinstance(ok, bool) and why


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="not a source checkout")
def test_wheel_contents(tmp_path):
    pytest.importorskip("wheel")
    pytest.importorskip("setuptools")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(tmp_path), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = tmp_path.glob("fastmtl-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "fastmtl/kernels/__init__.py" in names
    assert "fastmtl/py.typed" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
