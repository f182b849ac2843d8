"""The kernel benchmark runs its code paths on CPU (--cpu-smoke: tiny shapes in the Triton interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_kernel_bench_cpu_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(BENCH / "kernel_bench.py"), "--cpu-smoke", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "float16" and report["copy_TBps"] > 0 and report["copy_engine_TBps"] > 0
    assert {(r["layer"], r["rate"]) for r in report["rows"]} == {("qkv", 0.0), ("qkv", 0.35), ("o", 0.0),
                                                                  ("o", 0.35)}
    assert all(r["ours_us"] > 0 and r["n_active"] <= r["N"] for r in report["rows"])
    assert [r["layer"] for r in report["prefill"]] == ["qkv", "o"]


def test_kernel_bench_small_batch_sweep(tmp_path):
    """--sweep-batches: the sweep at batch 4 times GEMV and 16-row GEMM configs; --prefill-m 0 skips prefill."""
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(BENCH / "kernel_bench.py"), "--cpu-smoke", "--layers", "o", "--rates", "0",
           "--batches", "4", "--sweep", "--sweep-batches", "4", "--prefill-m", "0", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["prefill"] == [] and [(r["layer"], r["batch"]) for r in report["rows"]] == [("o", 4)]
    (sweep,) = report["sweep"]
    paths = {c["config"]["path"] for c in sweep["configs"] if "us" in c}
    assert sweep["M"] == 4 and paths == {"gemv", "gemm"} and sweep["best"]["us"] > 0


def test_kernel_bench_sweeps_a_pruned_shape(tmp_path):
    """--sweep-rates: the sweep tunes the rate-0.35 shape (its active K and N), not the rate-0 one."""
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(BENCH / "kernel_bench.py"), "--cpu-smoke", "--layers", "o", "--rates", "0", "0.35",
           "--sweep", "--sweep-rates", "0.35", "--prefill-m", "0", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    (sweep,) = report["sweep"]
    pruned = next(r for r in report["rows"] if r["rate"] == 0.35)
    assert sweep["rate"] == 0.35 and (sweep["k_active"], sweep["n_active"]) == (pruned["k_active"], pruned["n_active"])
    assert sweep["k_active"] < sweep["K"] and sweep["best"]["us"] > 0
