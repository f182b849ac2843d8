"""Every Triton kernel compiles (ahead of time, no GPU needed) for the A6000 (sm_86), the Jetson Orin (sm_87) and
Hopper (sm_90).

Runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it when there is no GPU, and kernels
defined under it cannot be compiled). Uses the ptxas that ships in the triton wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import sys, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from uniql.kernels import decode_attention, elementwise, embedding, greedy, int4_dequant, int4_gemv, int4_matmul, rope
from uniql.kernels import ssm_update

PTRS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32", "ids_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16",
        "q_out_ptr": "*bf16", "k_out_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "idx_ptr": "*i64",
        "d_ptr": "*bf16", "w_ptr": "*bf16", "sum_ptr": "*bf16", "gu_ptr": "*bf16", "kn_ptr": "*bf16",
        "vn_ptr": "*bf16", "kp_ptr": "*i64", "vp_ptr": "*i64", "cap_ptr": "*i32", "len_ptr": "*i32",
        "scale": "fp32", "eps": "fp32", "g_ptr": "*bf16", "act_ptr": "*bf16", "res_ptr": "*bf16",
        "res_out_ptr": "*bf16", "sg_ptr": "*bf16", "ss_out_ptr": "*fp32", "ss_in_ptr": "*fp32", "inv_k": "fp32",
        "val_ptr": "*fp32", "fin_ptr": "*i32", "freq_ptr": "*fp32", "scaling": "fp32", "ss_ptr": "*fp32",
        "conv_tab": "*i64", "cw0": "*bf16", "cw1": "*bf16", "cw2": "*bf16", "cb0": "*bf16", "cb1": "*bf16",
        "cb2": "*bf16", "conv_out": "*bf16", "state_ptr": "*i64", "dt_ptr": "*bf16", "a_ptr": "*fp32",
        "b_ptr": "*bf16", "c_ptr": "*bf16", "z_ptr": "*bf16", "dtb_ptr": "*fp32",
        "dt_lo": "fp32", "dt_hi": "fp32"}
SSM = dict(TABLE=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, SOFTPLUS=True, CLAMP=False, BLOCK_P=8,
           BLOCK_N=128)  # Mamba2-8B's decode step
PDL = "pdl"  # placeholder: programmatic dependent launch where the target has it (sm_90+), off on sm_87
LATE = "late"  # placeholder: UNIQL_PDL=late's mode 2 (dependents released after the main loop) on sm_90+
ATT = dict(REP=4, REP_P=16, QK=128, VO=128, D_QK=128, D_VO=128, MIN_SPLIT=32, DOUBLINGS=1, ROPE=True, CHUNK=32,
           PDL=PDL, PRE_WAIT=False, LOOP=False)
MM = dict(GROUP=64, NUM_SEG=2, SPLIT=True, HAS_BIAS=True, ALIGNED=True, SUM_STEP=4, EARLY=False, PRELOAD=0,
          CONV=False, CONV_W=2, CONV_ACT=0, CONV_BIAS=False, CONV_DTYPE=tl.float32)
SWITCHED = dict(SUM_STEP=8, EARLY=True)  # UNIQL_SPLITK_STEP=8 / UNIQL_EARLY_LOADS=1: both settings compile
CASES = [
    (int4_matmul._gemv_kernel, dict(MM, BLOCK_M=1, BLOCK_N=128, BLOCK_R=8), 8),
    (int4_matmul._gemv_kernel, dict(MM, BLOCK_M=4, BLOCK_N=64, BLOCK_R=8), 4),
    (int4_gemv._gemv_h2_kernel, dict(MM, BLOCK_M=1, BLOCK_N=256, SUB_R=4, GLU=True, RES=False, NORM=True,
                                      PARTS_P=32, X_BF16=True, ASM=True, PDL=PDL), 4),
    (int4_gemv._gemv_h2_kernel, dict(MM, BLOCK_M=1, BLOCK_N=256, SUB_R=4, GLU=2, RES=False, NORM=True,
                                      PARTS_P=32, X_BF16=True, ASM=True, PDL=LATE, PRELOAD=1), 4),  # GLU paired
    (int4_gemv._gemv_h2_kernel, dict(MM, BLOCK_M=4, BLOCK_N=128, SUB_R=2, GLU=False, RES=True, NORM=True,
                                      PARTS_P=2, X_BF16=False, ASM=True, PDL=PDL), 4),
    (int4_gemv._gemv_h2_kernel, dict(MM, **SWITCHED, BLOCK_M=1, BLOCK_N=128, SUB_R=4, GLU=False, RES=True,
                                      NORM=True, PARTS_P=32, X_BF16=True, ASM=True, PDL=PDL), 4),
    (int4_gemv._gemv_h2_kernel, dict(MM, SUM_STEP=32, BLOCK_M=1, BLOCK_N=128, SUB_R=4, GLU=False, RES=True,
                                      NORM=True, PARTS_P=32, X_BF16=True, ASM=True, PDL=PDL), 4),  # SPLITK_STEP=all
    (int4_gemv._gemv_h2_kernel, dict(MM, BLOCK_M=1, BLOCK_N=256, SUB_R=4, NUM_SEG=5, GLU=False, RES=False, NORM=True,
                                      PARTS_P=32, X_BF16=True, ASM=True, PDL=PDL, CONV=True, CONV_W=4, CONV_ACT=1,
                                      CONV_BIAS=True, CONV_DTYPE=tl.bfloat16), 4),  # Mamba's in_proj + conv
    (int4_gemv._gemv_h2_kernel, dict(MM, BLOCK_M=1, BLOCK_N=128, SUB_R=4, NUM_SEG=5, GLU=False, RES=False, NORM=True,
                                      PARTS_P=16, X_BF16=True, ASM=True, PDL=PDL, CONV=True, CONV_W=4, CONV_ACT=1,
                                      CONV_BIAS=True, CONV_DTYPE=tl.bfloat16, SUM_STEP=16), 4),  # WIDE_COLS=auto
    (int4_gemv._gemv_h2_kernel, dict(MM, SUM_STEP=32, BLOCK_M=1, BLOCK_N=128, SUB_R=4, GLU=False, RES=True,
                                      NORM=True, PARTS_P=32, X_BF16=True, ASM=True, PDL=LATE, PRELOAD=2), 4),
    # UNIQL_PDL=late with UNIQL_GEMV_PRELOAD=2 (1 is benchmarks/sass_gemv.py's, tested for sm_87 / sm_90)
    (int4_matmul._gemm_kernel, dict(MM, **SWITCHED, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, DOT_IEEE=False), 4),
    (int4_matmul._gemm_kernel, dict(MM, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT_IEEE=False), 4),
    (int4_matmul._gemm_kernel, dict(MM, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, DOT_IEEE=False, SPLIT=False), 4, 4),
    (int4_dequant._dequant_kernel, dict(GROUP=64, BLOCK_R=8, BLOCK_N=128), 4),
    (rope._rope_qk_kernel, dict(BLOCK_P=64, PDL=PDL), 2),
    (rope._decode_tables_kernel, dict(SCALE=True, BLOCK_P=64), 1),
    (embedding._embedding_int4_kernel, dict(GROUP=64, BLOCK_R=64, NORM=True), 4),
    (elementwise._rms_norm_kernel, dict(BLOCK=4096, ADD=True, PDL=PDL), 4),
    (elementwise._silu_mul_kernel, dict(BLOCK=1024, PDL=PDL), 4),
    (elementwise._group_rms_kernel, dict(BLOCK_H=16, BLOCK_P=64, PDL=PDL), 4),
    (ssm_update._update_kernel, dict(SSM, PDL=PDL), 2),
    (decode_attention._split_kernel, dict(ATT, BLOCK_T=64, PRECISION="tf32", EARLY=False, PRELOAD=False), 4),
    (decode_attention._split_kernel, dict(ATT, BLOCK_T=64, PRECISION="tf32", EARLY=True, PRELOAD=True), 4),
    (decode_attention._split_kernel, dict(ATT, DOUBLINGS=6, BLOCK_T=32, PRECISION="tf32", EARLY=True,
                                          PRELOAD=True, LOOP=True, PRE_WAIT=True), 4),  # a long context's bound
    (decode_attention._split_kernel, dict(ATT, BLOCK_T=64, PRECISION="tf32", EARLY=True, PRELOAD=True, PDL=LATE,
                                          PRE_WAIT=True), 4),  # UNIQL_ATTN_PREWAIT=1
    (decode_attention._combine_kernel, dict(ATT, SPLITS_P=32, EARLY=False), 1),
    (decode_attention._combine_kernel, dict(ATT, SPLITS_P=32, EARLY=True), 1),
    (greedy._chunk_kernel, dict(CHUNK=4096), 8),
    (greedy._combine_kernel, dict(CHUNKS_P=32), 1),
]
# shared memory a block may take (opt-in maximum): the A6000's sm_86 has far less than Hopper; Triton compiles a
# config over it without a word and the launch fails on that GPU only
SHARED_MAX = {86: 99 * 1024, 87: 163 * 1024, 90: 227 * 1024}
for arch in map(int, sys.argv[1:]):
    for kernel, consts, warps, *stages in CASES:  # stages: pick_config's num_stages where it sets one (else 3)
        modes = {PDL: int(arch >= 90), LATE: 2 * (arch >= 90)}
        consts = {k: modes.get(v, v) if isinstance(v, str) else v for k, v in consts.items() if k in kernel.arg_names}
        sig = {a: "constexpr" if a in consts else PTRS.get(a, "i32") for a in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": (stages or [3])[0]})
        assert compiled.metadata.shared <= SHARED_MAX[arch], (kernel.__name__, consts, compiled.metadata.shared)
        if consts.get("PDL"):  # the wait, and (mode 1 right after it, mode 2 after the main loop) the release
            ptx = compiled.asm["ptx"]
            assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, kernel.__name__
        if kernel is rope._decode_tables_kernel:  # accurate cos / sin: decode angles reach thousands of radians
            assert ".approx" not in compiled.asm["ptx"], "the RoPE tables compiled to approximate cos / sin"
        print("ok", arch, kernel.__name__, consts.get("BLOCK_M", ""), compiled.metadata.shared)
"""


@pytest.mark.parametrize("arch", [86, 87, 90])
def test_kernels_compile_for_jetson_and_hopper(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"ok {arch}") == 29  # every case of CASES
