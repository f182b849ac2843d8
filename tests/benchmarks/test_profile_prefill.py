"""benchmarks/profile_prefill.py: kernels sorted into the right kinds, the wall time split honestly, and the whole
script on a tiny model on CPU (INT4 and dense rows, the INT4 rows timing the INT4 op)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import profile_prefill as pp  # noqa: E402


@pytest.mark.parametrize(("name", "kind"), [
    ("_dequant_kernel", "dequantize"),
    ("_gemv_h2_kernel", "int4 kernels"),
    ("_gemm_kernel", "int4 kernels"),  # a Triton GEMM: ours, not cuBLAS, though its name says gemm
    ("aten::_weight_int4pack_mm_for_cpu", "int4 kernels"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "cublas gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "cublas gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),  # cutlass in the name, attention first
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
])
def test_kernel_names_fall_into_their_kind(name, kind):
    assert pp.category(name) == kind


def test_summary_adds_up_and_leaves_the_rest_to_the_host():
    table = [{"kernel": "a", "us": 1500.0, "launches": 2, "category": "dequantize"},
             {"kernel": "b", "us": 500.0, "launches": 1, "category": "cublas gemm"},
             {"kernel": "c", "us": 1000.0, "launches": 4, "category": "dequantize"}]
    summary = pp.summarize(table, wall_ms=4.0)
    assert summary["by_category_ms"] == {"dequantize": 2.5, "cublas gemm": 0.5}
    assert list(summary["by_category_ms"]) == ["dequantize", "cublas gemm"]  # largest first
    assert summary["busy_ms"] == pytest.approx(3.0) and summary["host_or_idle_ms"] == pytest.approx(1.0)


@pytest.mark.slow
def test_tiny_model_on_cpu(tmp_path):
    out = tmp_path / "prefill.json"
    cmd = [sys.executable, str(BENCH / "profile_prefill.py"), "--tiny", "--device", "cpu", "--prompt-tokens", "32",
           "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weights"], r["rate"]) for r in rows] == [("int4", 0.0), ("int4", 0.35), ("dense", 0.0),
                                                         ("dense", 0.35)]
    for row in rows:
        assert row["ttft_median_ms"] > 0 and row["busy_ms"] > 0 and row["kernels"]
        assert row["busy_ms"] == pytest.approx(sum(row["by_category_ms"].values()))
        host = row["host_functions"]
        assert host and all(f["cum_ms"] >= f["own_ms"] >= 0 and f["calls"] > 0 for f in host)
        assert [f["own_ms"] for f in host] == sorted((f["own_ms"] for f in host), reverse=True)
    int4_kinds = {k["category"] for r in rows if r["weights"] == "int4" for k in r["kernels"]}
    dense_kinds = {k["category"] for r in rows if r["weights"] == "dense" for k in r["kernels"]}
    assert "int4 kernels" in int4_kinds and "int4 kernels" not in dense_kinds
