"""benchmarks/wave_plan.py lays out the 8B-shaped models' batch-1 decode GEMVs offline: every launch fits one wave
of 8 programs on each of an H100's 132 SMs at every rung (Mamba2's in-projection at rate 0.35 spilled 22 programs
into a second wave while the split counted its blocks without the segments; test_int4_config checks that count),
and the JSON carries the ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_every_decode_gemv_fits_one_wave(tmp_path):
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, str(BENCH / "wave_plan.py"), "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"llama-3.1-8b", "mamba2-8b-shape"} and len(rows) == 4 * (4 + 2)
    assert all(r["programs"] <= 8 * 132 for r in rows), [r for r in rows if r["programs"] > 8 * 132]
    in_proj = next(r for r in rows if r["model"] == "mamba2-8b-shape" and r["place"] == "gemv0" and r["rate"] == 0.35)
    # UNIQL_WIDE_COLS=auto: 128 columns there (0.75 of a 256-column program's bytes: 784 programs of 4 x 256)
    assert (in_proj["N"], in_proj["programs"], in_proj["k_tiles_a_program"], in_proj["block_n"]) == (12160, 1045, 6,
                                                                                                      128)
    assert all(0 < r["tiles_ratio"] <= 1 and 0 < r["bytes_ratio"] <= 1 for r in rows)
