"""The decode GEMV's K loop keeps its tiles in registers: no barrier or shared-memory round trip per tile.

Compiled ahead of time for sm_90 (no GPU needed) with the run-time specialisation the launcher gets (16-byte
aligned pointers and strides), then disassembled with the cuobjdump that ships in the triton wheel. A layout
mismatch between the dot results and the accumulator (it happened when the scale row was loaded as
``[1, BLOCK_N]``) makes the compiler move every tile's products through shared memory with two barriers, which
holds the program's warps in lockstep in a loop that should only wait on DRAM.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from uniql.kernels import int4_gemv

kernel = int4_gemv._gemv_h2_kernel
TYPES = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
         "ss_out_ptr": "*fp32", "ss_in_ptr": "*fp32", "inv_k": "fp32", "eps": "fp32"}
base = dict(GROUP=64, SPLIT=True, HAS_BIAS=False, ALIGNED=True, PARTS_P=32, ASM=True, PDL=False)
cases = {"m1_glu_norm": dict(base, NUM_SEG=2, BLOCK_M=1, BLOCK_N=256, SUB_R=4, GLU=True, RES=False, NORM=True,
                             X_BF16=True),
         "m4_residual": dict(base, NUM_SEG=1, BLOCK_M=4, BLOCK_N=128, SUB_R=4, GLU=False, RES=True, NORM=False,
                             X_BF16=False)}
consts = cases[sys.argv[1]]
sig = {a: "constexpr" if a in consts else TYPES.get(a, "*bf16" if a.endswith("_ptr") else "i32")
       for a in kernel.arg_names}
aligned = [a for a in kernel.arg_names if a not in consts and (a.endswith("_ptr") or a.startswith("stride")
                                                                or a in ("K", "s0", "l0"))]
attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
open(sys.argv[2], "wb").write(compiled.asm["cubin"])
"""


def loops(sass: str) -> list[list[str]]:
    """Instruction lists of every backward branch's body (address-ordered SASS)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.MULTILINE)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    bodies = []
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            bodies.append([t for _, t in ins[index[int(target.group(1), 16)]:i + 1]])
    return bodies


@pytest.mark.parametrize("case", ["m1_glu_norm", "m4_residual"])
def test_gemv_k_loop_has_no_barrier_or_shared_memory(case, tmp_path):
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot compile
    cubin = tmp_path / "gemv.cubin"
    done = subprocess.run([sys.executable, "-c", SCRIPT, case, str(cubin)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    k_loop = max(loops(sass), key=len)  # the tile loop; the split-K fixup loop is the short one
    assert sum("HFMA2" in t for t in k_loop) >= 16, "not the dot loop"
    shared = [t for t in k_loop if re.search(r"\b(BAR|STS|LDS|LDSM)\b", t)]
    assert not shared, f"{len(shared)} barrier / shared-memory instructions in the K loop: {shared[:6]}"
