"""The decode GEMV's K loop loads its weights 16 bytes wide and runs the packed-fp16 dot, on sm_90 and sm_87.

``benchmarks/sass_gemv.py`` compiles the kernel ahead of time (no GPU needed) with the launcher's run-time
specialisation and disassembles it with the cuobjdump of the triton wheel. Lost alignment facts turn each 16-byte
weight load into four narrow ones. The loop's barriers are reported, not asserted: the scale row loaded as
``[1, BLOCK_N]`` costs two per K tile (the dot results go through shared memory), yet the barrier-free variant
(scale row in the weights' layout) measured 17-30 % slower on the H100 on 8 of 9 batch-1 shapes
(``benchmarks/results/gemv_ab_h100.json``), so the kernel keeps them.
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
CONFIGS = ["m1_n256_glu_norm", "m1_n128_qkv_norm", "m4_n128_residual", "m1_n128_glu_paired_norm"]


@pytest.mark.parametrize("arch", [90, 87])
def test_gemv_k_loop_runs_the_packed_dot_on_wide_weight_loads(arch):
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
        wide = sum(n for op, n in r["ldg"].items() if op.endswith(".128"))
        assert wide >= 2, f"{r['config']}: weight loads are not 16 bytes wide: {r['ldg']}"


def test_the_tool_passes_every_constexpr_of_the_kernel():
    """A constexpr the tool did not pass would compile as a run-time argument, both branches of every ``if`` on it
    (stop 47: a new PIPE constexpr took m1_n128 from 202 to 222 loop instructions and m4 from 96 to 122 registers)."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import sass_gemv
    finally:
        sys.path.remove(str(TOOL.parent))
    import inspect

    from uniql.kernels import int4_gemv

    kernel = int4_gemv._gemv_h2_kernel
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()  # jitted or interpreted
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert {"PIPE", "PRELOAD", "BLOCK_M"} <= constexprs
    for name in sass_gemv.CONFIGS:
        passed = sass_gemv.config_constexprs(name)
        assert constexprs <= set(passed), f"{name}: not passed: {sorted(constexprs - set(passed))}"
