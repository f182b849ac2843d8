"""The decode GEMV's K loop keeps its tiles in registers and its weight loads 16 bytes wide, on sm_90 and sm_87.

``benchmarks/sass_gemv.py`` compiles the kernel ahead of time (no GPU needed) with the launcher's run-time
specialisation and disassembles it with the cuobjdump of the triton wheel. A layout mismatch between the dot
results and the accumulator (it happened when the scale row was loaded as ``[1, BLOCK_N]``) makes the compiler
move every tile's products through shared memory with two barriers, holding the program's warps in lockstep in
a loop that should only wait on DRAM; lost alignment facts turn each 16-byte weight load into four.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "sass_gemv.py"
CONFIGS = ["m1_n256_glu_norm", "m1_n128_qkv_norm", "m4_n128_residual"]


@pytest.mark.parametrize("arch", [90, 87])
def test_gemv_k_loop_has_no_barrier_or_shared_memory_and_wide_weight_loads(arch):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot compile
    done = subprocess.run([sys.executable, str(TOOL), "--arch", str(arch), "--json", "--configs", *CONFIGS], env=env,
                          capture_output=True, text=True, timeout=600, cwd=TOOL.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["config"] for r in rows] == CONFIGS
    for r in rows:
        assert r["hfma2"] >= 32, f"{r}: not the dot loop"
        assert r["shared_or_barrier"] == 0, f"{r['config']}: barrier / shared memory in the K loop: {r}"
        wide = sum(n for op, n in r["ldg"].items() if op.endswith(".128"))
        assert wide >= 2, f"{r['config']}: weight loads are not 16 bytes wide: {r['ldg']}"
