"""benchmarks/ratio_bound.py: the stage-latency model of the Llama step's rate ratio, on numbers worked by hand and
on the committed H100 results (where the model, a floor, must stay under every measured step time)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ratio_bound as rb  # noqa: E402


def test_the_model_on_numbers_worked_by_hand():
    # 1 TB/s: 1 GB is 1 ms, 0.6 GB 0.6 ms; 100 stages of 2 us: 0.2 ms each step
    out = rb.bound({0.0: 1e9, 0.35: 0.6e9}, 1.0, {0.0: 100, 0.35: 100}, 2.0)
    assert out["floor_ms"] == pytest.approx({0.0: 1.0, 0.35: 0.6})
    assert out["model_ms"] == pytest.approx({0.0: 1.2, 0.35: 0.8})
    assert out["ratio"] == pytest.approx(0.8 / 1.2) and out["bytes_ratio"] == pytest.approx(0.6)
    # 0.75 = (0.6 + 0.1 L) / (1.0 + 0.1 L) at L = 6 us; at that latency the model gives the target exactly
    assert out["latency_for_target_us"] == pytest.approx(6.0)
    assert rb.bound({0.0: 1e9, 0.35: 0.6e9}, 1.0, {0.0: 100, 0.35: 100}, 6.0)["ratio"] == pytest.approx(0.75)


def test_kv_bytes_follow_the_kept_head_dims():
    full = rb.kv_bytes(0.0, 1000, 128)
    assert full == 32 * (8 * 128 + 8 * 128) * 1000 * 2  # 32 layers, 8 KV heads of 128 for K and for V, bf16
    assert 0.6 * full <= rb.kv_bytes(0.35, 1000, 128) < full


def test_the_committed_h100_results():
    files = ("kernels_h100", "decode_h100", "decode_profile_stop35_h100", "layer_loop_probe_sleep_h100")
    inp = rb.load_inputs(*(rb.RESULTS / f"{name}.json" for name in files))
    assert inp["group"] == 128 and inp["stages"][0.0] == inp["stages"][0.35] > 100
    assert 2.0 < inp["latency_us"] < 4.0
    out = rb.bound(inp["bytes"], inp["copy_TBps"], inp["stages"], inp["latency_us"])
    for rate in (0.0, 0.35):  # a floor: under every measured step
        assert out["model_ms"][rate] < inp["measured_ms"][rate]
    assert out["bytes_ratio"] < out["ratio"] < inp["measured_ms"][0.35] / inp["measured_ms"][0.0]


def test_a_probe_file_without_the_all_boundary_chain_is_refused():
    with pytest.raises(ValueError, match="no 'tiny 32 x 512' chain"):
        rb.stage_latency_us({"rows": [{"chain": "o-sized 32 x 4096", "loop": []}]})
