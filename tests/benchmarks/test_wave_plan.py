"""benchmarks/wave_plan.py lays out the 8B-shaped models' batch-1 decode GEMVs offline: every launch fits one wave
of 8 programs (10 on the wide path's 128-column launches) on each of an H100's 132 SMs at every rung (Mamba2's
in-projection at rate 0.35 spilled 22 programs into a second wave while the split counted its blocks without the
segments; test_int4_config checks that count), and the JSON carries the ratios."""

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
    # 8 programs an SM, 10 on the wide path's (N > 8192) 128-column launches (UNIQL_GEMV_PER_SM=wide), 7 on the
    # paired gate|up's 256-column ones (70 registers with the preload)
    def slots(r: dict) -> int:
        wide = r["N"] > 8192
        return (10 if wide and r["block_n"] == 128 else 7 if r["place"] == "gemv2" and r["block_n"] == 256 else 8) * 132

    assert all(r["programs"] <= slots(r) for r in rows), [r for r in rows if r["programs"] > slots(r)]
    in_proj = {r["rate"]: (r["N"], r["programs"], r["k_tiles_a_program"], r["block_n"]) for r in rows
               if r["model"] == "mamba2-8b-shape" and r["place"] == "gemv0"}
    # UNIQL_WIDE_COLS=auto: 128 columns at 0.25 / 0.35 (a program's share 0.75 / 0.625 of 256 columns' 4 x 256);
    # at 0 / 0.15 too since stop 48: with the pipelined loop (79 registers at five segments) 256 columns hold 6 an SM
    assert in_proj[0.25] == (13952, 1199, 6, 128) and in_proj[0.35] == (12160, 1235, 5, 128)
    assert in_proj[0.0] == (18560, 1160, 8, 128) and in_proj[0.15][3] == 128
    gate_up = {r["rate"]: (r["block_n"], r["programs"], r["k_tiles_a_program"]) for r in rows
               if r["model"] == "llama-3.1-8b" and r["place"] == "gemv2"}
    assert gate_up == {0.0: (256, 896, 8), 0.15: (128, 1140, 11), 0.25: (256, 924, 6), 0.35: (128, 1168, 8)}
    assert all(0 < r["tiles_ratio"] <= 1 and 0 < r["bytes_ratio"] <= 1 for r in rows)
