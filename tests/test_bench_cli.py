"""``fastmtl-bench`` runs every case end to end (tiny sizes) and writes its JSON."""

from __future__ import annotations

import json

import pytest

from fastmtl.bench import cli


def test_smoke_run_writes_every_case(tmp_path, capsys):
    pytest.importorskip("torchjd")
    out = tmp_path / "bench.json"
    assert cli.main(["--device", "cpu", "--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "commit", "date", "torch", "copy_floor_GBps"} <= set(data["meta"])
    rows = data["rows"]
    impls = {(r["op"], r["impl"]) for r in rows}
    for op in ("gram", "combine", "mgda.weights"):
        assert (op, "fastmtl") in impls
    for impl in ("fastmtl fused", "foreach path", "official loop", "T x torch Adam(fused)"):
        assert ("adatask.step", impl) in impls
    for method in cli.STEP_METHODS:
        assert ("step", f"fastmtl {method}") in impls
        assert ("step", f"torchjd {method}") in impls
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["fastmtl speed-up"] is not None for r in rows)
    assert "fastmtl speed-up" in capsys.readouterr().out
