"""``fastmtl-bench`` runs every case end to end (tiny sizes) and writes its JSON."""

from __future__ import annotations

import json

import pytest

from fastmtl.bench import cli, linesearch


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
        assert ("step", f"fastmtl {method} latent") in impls
        assert ("step", f"fastmtl {method} stream") in impls
    for impl in ("forward + T backward passes", "sum(losses).backward()"):
        assert ("step", impl) in impls
    for impl in linesearch.IMPLS:
        assert ("linesearch step", impl) in impls
    for impl in ("sum(losses).backward()", "fastmtl loop", "fastmtl vmap", "fastmtl stream",
                 "torchjd autojac"):
        assert ("memory", impl) in impls
    memory = {r["impl"]: r for r in rows if r["op"] == "memory"}
    assert memory["fastmtl loop"]["of loop"] == 1.0
    assert memory["sum(losses).backward()"]["extra MB"] == 0.0
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["fastmtl speed-up"] is not None for r in rows)
    assert "fastmtl speed-up" in capsys.readouterr().out


def test_linesearch_rows_follow_each_method():
    """Batched and sequential latent searches train along the same trajectory (same trials,
    same losses); the constant steps take no trial; every search takes >= 1 per step."""
    rows = {r["impl"]: r for r in linesearch.linesearch_cases("cpu", T=2, batch=16, lr=4.0,
                                                                steps=4, warmup=1)}
    assert set(rows) == set(linesearch.IMPLS)
    batched, sequential = rows["fastmtl latent batched"], rows["latent sequential"]
    assert batched["trials"] == sequential["trials"] >= 1
    assert batched["loss"] == pytest.approx(sequential["loss"], rel=1e-5)
    assert rows["constant lr"]["trials"] == rows["param pass only"]["trials"] == 0
    assert rows["param backtracking"]["trials"] >= 1
    assert rows["param backtracking"]["case"] == "LeNet T=2 B=16 t0=4 4 steps"
