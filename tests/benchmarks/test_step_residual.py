"""benchmarks/step_residual.py: a profiled decode step split by kernel class into bytes at the copy rate, launches x
L and the residual, on numbers worked by hand and on the committed H100 results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ratio_bound as rb  # noqa: E402
import step_residual as sr  # noqa: E402

LAYERS = ("qkv", "o", "gate_up", "down")


def _kernels(group: int = 128) -> dict:
    """A kernel table at 1 TB/s (1e6 bytes a microsecond) with every Llama layer at 1 MB, the head at 10 MB."""
    rows = [{"model": rb.MODEL, "layer": layer, "rate": rate, "batch": 1, "bytes": 1e6}
            for layer in LAYERS for rate in (0.0, 0.35)]
    rows.append({"model": rb.MODEL, "layer": "lm_head", "rate": 0.0, "batch": 1, "bytes": 10e6})
    return {"copy_TBps": 1.0, "group_size": group, "rows": rows}


def _run(rate: float) -> dict:
    kernels = [{"kernel": sr.GEMV, "us_per_step": 4 * 32 * 3.0 + 12.0, "launches_per_step": 129},
               {"kernel": "_split_kernel", "us_per_step": 100.0, "launches_per_step": 32},
               {"kernel": "_combine_kernel", "us_per_step": 60.0, "launches_per_step": 32},
               {"kernel": "_rms_norm_kernel", "us_per_step": 5.0, "launches_per_step": 1}]
    positions = {**{f"gemv{i}": 3.0 for i in range(4)}, "head": 12.0}
    return {"rate": rate, "replay_us": 600.0, "in_graph": {"kernels": kernels, "gemv_us_by_position": positions,
                                                            "gap_us_per_replay": 20.0}}


def test_a_step_split_by_hand():
    rows = {r["kernel"]: r for r in sr.class_rows(_run(0.0), _kernels(), 128, 1000, 0.5)}
    # a GEMV: 32 x 3 us measured, 32 MB at 1 TB/s = 32 us, 32 launches x 0.5 us = 16 us: 48 us left
    assert rows["qkv"]["measured_us"] == pytest.approx(96.0) and rows["qkv"]["bytes_us"] == pytest.approx(32.0)
    assert rows["qkv"]["stage_us"] == pytest.approx(16.0) and rows["qkv"]["residual_us"] == pytest.approx(48.0)
    assert rows["lm_head"]["residual_us"] == pytest.approx(12.0 - 10.0 - 0.5)
    kv = rb.kv_bytes(0.0, 1000, 128) / 1e6  # 131 us of KV cache at 1 TB/s
    assert rows["attention"]["residual_us"] == pytest.approx(160.0 - kv - 64 * 0.5)
    assert rows["other kernels"]["residual_us"] == pytest.approx(5.0 - 0.5)
    assert rows["gaps between kernels"]["residual_us"] == pytest.approx(20.0)


def test_the_table_group_is_rescaled_to_the_runs():
    """A g64 table's bytes (4.25 bits a weight) on a g128 run (4.125): the weights are 4.125 / 4.25 of them."""
    at64 = sr.class_rows(_run(0.0), _kernels(64), 128, 1000, 0.5)[0]
    assert at64["bytes_us"] == pytest.approx(32.0 * 4.125 / 4.25)


def test_missing_inputs_are_refused():
    profile = {"runs": [_run(0.0)]}
    with pytest.raises(ValueError, match=r"no run at rate\(s\) \[0.35\]"):
        sr.residuals(profile, _kernels(), 128, 1000, 0.5)
    table = _kernels()
    table["rows"] = [r for r in table["rows"] if not (r["layer"] == "down" and r["rate"] == 0.35)]
    with pytest.raises(ValueError, match=r"no batch-1 rows of \['down'\] at rate 0.35"):
        sr.class_rows(_run(0.35), table, 128, 1000, 0.5)


def test_the_committed_h100_step():
    """The GEMV positions add up to the GEMV kernel's time a step, the classes to within 5 % of the profiled replay,
    and ~0.3-0.4 ms is left over at both rates: time that does not shrink with the rate."""
    files = ("kernels_h100", "decode_h100", "decode_profile_stop35_h100", "layer_loop_probe_sleep_h100")
    inp = rb.load_inputs(*(rb.RESULTS / f"{name}.json" for name in files))
    profile = inp["profile"]
    res = sr.residuals(profile, inp["kernels"], inp["group"], inp["cache_tokens"], inp["latency_us"])
    runs = {r["rate"]: r for r in profile["runs"]}
    for rate, step in res.items():
        gemv = next(k for k in runs[rate]["in_graph"]["kernels"] if k["kernel"] == sr.GEMV)["us_per_step"]
        assert sum(r["measured_us"] for r in step["rows"][:5]) == pytest.approx(gemv, rel=1e-3)
        assert step["total"]["measured_us"] == pytest.approx(step["replay_us"], rel=0.05)
        assert 250 < step["total"]["residual_us"] < 450
        # the model is a floor for every streaming class (bytes paired with the wrong GEMV would break it)
        assert all(r["residual_us"] > 0 for r in step["rows"][:6])
    assert abs(res[0.0]["total"]["residual_us"] - res[0.35]["total"]["residual_us"]) < 50
