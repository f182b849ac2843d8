"""Decode GEMV (batch 1..4, fp16/bf16 activations) over the packed INT4 format, in half2 math.

Why half2: at batch 1 the GEMV is bound by instruction issue, not by DRAM, unless each weight costs ~2
instructions. Per int32 word (8 codes of one output column, K rows 8r..8r+7):

* 4 LOP3 (+1 shift) OR each pair of codes into the mantissa of the fp16 1024.0: halves ``1024 + q`` (codes j, j+4
  at bits 4j and 4j+16) or ``1024 + 16 q`` (the next code up, no shift needed);
* 4 HFMA2 turn those into ``(q - 8) / 16`` exactly (the 1/16 keeps half2 sums of 8 products far from fp16
  overflow: activations up to ~16k in magnitude; the output is multiplied back by 16 in fp32);
* 4 HFMA2 per activation row multiply-add the activation pairs ``(x_j, x_j+4)``;
* every two words the half2 sum leaves as one fp32 (2 conversions + 1 add) and meets the group scale in fp32.

So ~2.3 instructions per weight instead of ~5 for fp32 math. Activations are converted once per packed row to
fp16 pairs in the matching order (bf16 -> fp32 is a shift, then one cvt per pair; fp16 needs only PRMTs). Products
are rounded to fp16 (11 bits, finer than bf16 activations themselves) and summed 8 at a time in fp16, the rest in
fp32. fp32 activations take the exact fp32 kernel in ``int4_matmul``.

Each program owns BLOCK_N output columns and a K slice (split K through ``int4_tiles._finish``); a tile is two
row blocks of SUB_R packed rows (2 * SUB_R * 8 <= the group size, so one scale row per tile). Under the Triton
interpreter (CPU tests) the inline assembly is replaced by the same arithmetic in plain Triton ops, so the
indexing, masking, segment and split logic is tested in CI; the assembly itself is tested on the GPU.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .gemv_conv import _conv_tile, conv_args
from .gemv_norm import _residual_in, _residual_tile, _row_rstd
from .int4_tiles import _columns, _finish, _glu_pair, _glu_tile, _rows_out
from .pdl import early_loads, gemv_pipe, gemv_preload, pdl_mode, pdl_release, pdl_wait

# fp16 constants (two per register): 1/16, -(1024/16 + 8/16), 1/256, -(1024/256 + 8/16)
_C_LO_SCALE, _C_LO_BIAS, _C_HI_SCALE, _C_HI_BIAS = 0x2C002C00, 0xD408D408, 0x1C001C00, 0xC480C480
_MAGIC = 0x64006400  # fp16 1024.0 in both halves


def _dot_asm(rows: int) -> str:
    """PTX: 2 words x ``rows`` activation rows -> ``rows`` fp32 partial dots (operands: outs, wa, wb, 8 pairs/row)."""
    lines = ["{", ".reg .b32 t0, t1, t2, t3, s, c0, c1, c2, c3;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;",
             ".reg .b32 " + ", ".join(f"a{m}" for m in range(rows)) + ";",
             f"mov.b32 c0, {_C_LO_SCALE:#x};", f"mov.b32 c1, {_C_LO_BIAS:#x};",
             f"mov.b32 c2, {_C_HI_SCALE:#x};", f"mov.b32 c3, {_C_HI_BIAS:#x};"]
    for word in range(2):
        w = f"${rows + word}"
        lines += [f"lop3.b32 t0, {w}, 0x000F000F, {_MAGIC:#x}, 0xEA;",
                  f"lop3.b32 t1, {w}, 0x00F000F0, {_MAGIC:#x}, 0xEA;",
                  f"shr.u32 s, {w}, 8;", f"lop3.b32 t2, s, 0x000F000F, {_MAGIC:#x}, 0xEA;",
                  f"lop3.b32 t3, s, 0x00F000F0, {_MAGIC:#x}, 0xEA;",
                  "fma.rn.f16x2 t0, t0, c0, c1;", "fma.rn.f16x2 t1, t1, c2, c3;",
                  "fma.rn.f16x2 t2, t2, c0, c1;", "fma.rn.f16x2 t3, t3, c2, c3;"]
        for m in range(rows):
            x0 = rows + 2 + 8 * m + 4 * word  # this row's 4 pairs for this word
            first = "mul.f16x2 a{m}, t0, ${x};" if word == 0 else "fma.rn.f16x2 a{m}, t0, ${x}, a{m};"
            lines += [first.format(m=m, x=x0)] + [f"fma.rn.f16x2 a{m}, t{i}, ${x0 + i}, a{m};" for i in (1, 2, 3)]
    for m in range(rows):
        lines += [f"mov.b32 {{h0, h1}}, a{m};", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", f"add.f32 ${m}, f0, f1;"]
    return "\n".join(lines + ["}"])


_ASM_DOT1 = tl.constexpr(_dot_asm(1))
_ASM_DOT2 = tl.constexpr(_dot_asm(2))
_ASM_DOT4 = tl.constexpr(_dot_asm(4))
_CON_DOT1 = tl.constexpr("=r" + ",r" * 10)
_CON_DOT2 = tl.constexpr("=r,=r" + ",r" * 18)
_CON_DOT4 = tl.constexpr("=r,=r,=r,=r" + ",r" * 34)
def _x_bf16_asm(scaled: bool) -> str:
    """PTX: 8 bf16 activations as 4 int32 (pairs (x0,x1) .. (x6,x7)) -> fp16 pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7).
    bf16 -> fp32 is a shift or a mask; ``scaled``: each value times the fp32 row scale ``$8`` first (an RMSNorm's
    1/rms applied BEFORE the fp16 conversion: the unnormalised s * w would overflow fp16 at real magnitudes)."""
    lines = ["{", ".reg .b32 a0, a1, b0, b1;"]
    for i, (lo, hi) in enumerate(((4, 6), (5, 7))):
        for j, widen in enumerate(("shl.b32 {d}, ${s}, 16;", "and.b32 {d}, ${s}, 0xFFFF0000;")):
            lines += [widen.format(d=f"a{j}", s=lo), widen.format(d=f"b{j}", s=hi)]
            lines += [f"mul.f32 a{j}, a{j}, $8;", f"mul.f32 b{j}, b{j}, $8;"] if scaled else []
            lines.append(f"cvt.rn.f16x2.f32 ${2 * i + j}, b{j}, a{j};")
    return "\n".join(lines + ["}"])


_ASM_X_BF16 = tl.constexpr(_x_bf16_asm(False))
_ASM_X_BF16_SCALED = tl.constexpr(_x_bf16_asm(True))
_ASM_X_F16_SCALED = tl.constexpr("""{
.reg .b16 l0, h0, l1, h1;
.reg .f32 a0, a1, b0, b1;
""" + "".join(f"""mov.b32 {{l0, h0}}, ${4 + i};
mov.b32 {{l1, h1}}, ${6 + i};
cvt.f32.f16 a0, l0;
cvt.f32.f16 b0, l1;
cvt.f32.f16 a1, h0;
cvt.f32.f16 b1, h1;
mul.f32 a0, a0, $8;
mul.f32 b0, b0, $8;
mul.f32 a1, a1, $8;
mul.f32 b1, b1, $8;
cvt.rn.f16x2.f32 ${2 * i}, b0, a0;
cvt.rn.f16x2.f32 ${2 * i + 1}, b1, a1;
""" for i in range(2)) + "}")
_ASM_X_F16 = tl.constexpr("""prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;""")
_FOUR_I32 = tl.constexpr((tl.int32, tl.int32, tl.int32, tl.int32))
USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"

# ----------------------------------------------------------------------------------- plain-Triton twins (CPU)


@triton.jit
def _half(pair, hi: tl.constexpr):
    bits = (pair >> 16) if hi else pair
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dot_emulated(wa, wb, p):
    """What the assembly computes for one activation row, in fp32: sum_j (q_j - 8) / 16 * x_j over both words."""
    acc = tl.zeros(wa.shape, tl.float32)
    for i in tl.static_range(4):
        for hi in tl.static_range(2):
            j = i + 4 * hi
            acc += (((wa >> (4 * j)) & 15) - 8).to(tl.float32) * 0.0625 * _half(p[i], hi)
            acc += (((wb >> (4 * j)) & 15) - 8).to(tl.float32) * 0.0625 * _half(p[4 + i], hi)
    return acc


@triton.jit
def _pair16(lo, hi):
    return (lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | \
        (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


# ------------------------------------------------------------------------------------------------- kernel

@triton.jit
def _dot1(wa, wb, p):
    return tl.inline_asm_elementwise(_ASM_DOT1, _CON_DOT1, [wa, wb, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dot2(wa, wb, p, q):
    return tl.inline_asm_elementwise(
        _ASM_DOT2, _CON_DOT2, [wa, wb, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                               q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _dot4(wa, wb, p, q, u, v):
    return tl.inline_asm_elementwise(
        _ASM_DOT4, _CON_DOT4, [wa, wb, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                               q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7],
                               u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7],
                               v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _x_pairs(x_ptr, row, mask, rs, X_BF16: tl.constexpr, ASM: tl.constexpr, NORM: tl.constexpr):
    """x[8r .. 8r+7] of one activation row, packed rows ``row [R, 1]``, as 4 fp16-pair int32 tensors [R, 1];
    NORM: each activation times the row's fp32 scale ``rs`` first (in fp32, before the fp16 rounding)."""
    if ASM:
        p = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row * 4
        v0 = tl.load(p, mask=mask, other=0)
        v1 = tl.load(p + 1, mask=mask, other=0)
        v2 = tl.load(p + 2, mask=mask, other=0)
        v3 = tl.load(p + 3, mask=mask, other=0)
        if NORM:
            rsb = (tl.zeros(row.shape, tl.float32) + rs).to(tl.int32, bitcast=True)
            if X_BF16:
                return tl.inline_asm_elementwise(_ASM_X_BF16_SCALED, "=r,=r,=r,=r,r,r,r,r,r", [v0, v1, v2, v3, rsb],
                                                 dtype=_FOUR_I32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_ASM_X_F16_SCALED, "=r,=r,=r,=r,r,r,r,r,r", [v0, v1, v2, v3, rsb],
                                             dtype=_FOUR_I32, is_pure=True, pack=1)
        if X_BF16:
            return tl.inline_asm_elementwise(_ASM_X_BF16, "=r,=r,=r,=r,r,r,r,r", [v0, v1, v2, v3], dtype=_FOUR_I32,
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_ASM_X_F16, "=r,=r,=r,=r,r,r,r,r", [v0, v1, v2, v3], dtype=_FOUR_I32,
                                         is_pure=True, pack=1)
    p = x_ptr + row * 8
    return (_pair16(_xs(p, 0, mask, rs), _xs(p, 4, mask, rs)),
            _pair16(_xs(p, 1, mask, rs), _xs(p, 5, mask, rs)),
            _pair16(_xs(p, 2, mask, rs), _xs(p, 6, mask, rs)),
            _pair16(_xs(p, 3, mask, rs), _xs(p, 7, mask, rs)))


@triton.jit
def _xs(p, j: tl.constexpr, mask, rs):
    return tl.load(p + j, mask=mask, other=0.0).to(tl.float32) * rs  # rs is 1.0 without NORM: exact


@triton.jit
def _row_pairs(x_ptr, stride_xm, m: tl.constexpr, M, ra, rb, ma, mb, rs, X_BF16: tl.constexpr,
               ASM: tl.constexpr, NORM: tl.constexpr):
    """Activation row m's pairs for both row blocks of the tile (8 int32 tensors [SUB_R, 1]), scaled by the row's
    1 / rms ``rs`` under NORM; zero past M."""
    ok = (ra * 0 + m) < M  # a tensor predicate (a Python bool breaks the interpreter's masks)
    a0, a1, a2, a3 = _x_pairs(x_ptr + m * stride_xm, ra, ma & ok, rs, X_BF16, ASM, NORM)
    b0, b1, b2, b3 = _x_pairs(x_ptr + m * stride_xm, rb, mb & ok, rs, X_BF16, ASM, NORM)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r, t, rows_k, GROUP: tl.constexpr,
          SUB_R: tl.constexpr, AHEAD: tl.constexpr = False):
    """K tile ``t`` of one column block (``wcol`` [1, BLOCK_N], ``mask_n``): its two row blocks' packed rows and
    masks ``[SUB_R, 1]``, their codes ``[SUB_R, BLOCK_N]`` and the tile's fp32 scale row ``[1, BLOCK_N]``; nothing
    at or past packed row ``rows_k`` is read (AHEAD, the pipelined loop's look-ahead: 0 past its split, nothing)."""
    ra = t * 2 * SUB_R + offs_r  # the tile's first SUB_R packed rows, then the next SUB_R
    rb = ra + SUB_R
    ma = ra < rows_k
    mb = rb < rows_k
    wa = tl.load(qw_ptr + ra * stride_qw + wcol, mask=ma & mask_n, other=0, eviction_policy="evict_first")
    wb = tl.load(qw_ptr + rb * stride_qw + wcol, mask=mb & mask_n, other=0, eviction_policy="evict_first")
    # the tile's scale row as [1, BLOCK_N]: the compiler moves the dot results through shared memory for it (two
    # barriers per tile), yet loading it in the weights' [SUB_R, BLOCK_N] layout instead, barrier-free, measured
    # 17-30 % slower on the H100 (benchmarks/results/gemv_ab_h100.json)
    if AHEAD:  # a look-ahead tile may lie past K: its scale row too (a tensor test: Python ints in the interpreter)
        mask_n = mask_n & ((wcol * 0 + t * 2 * SUB_R) < rows_k)
    scale = tl.load(sc_ptr + (t * 2 * SUB_R * 8 // GROUP) * stride_sc + wcol, mask=mask_n, other=0.0)
    return ra, rb, ma, mb, wa, wb, scale.to(tl.float32)


@triton.jit
def _dot_row(wa, wb, p, ASM: tl.constexpr):
    """One activation row's dot with the tile (``_dot1``; its plain-Triton twin under the interpreter)."""
    if ASM:  # noqa: SIM108 (a constexpr branch, not a run-time select)
        d = _dot1(wa, wb, p)
    else:
        d = _dot_emulated(wa, wb, p)
    return d


@triton.jit
def _acc_tile(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, rs0, rs1, rs2, rs3, ra, rb, ma, mb, wa, wb, scale,
              BLOCK_M: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, NORM: tl.constexpr):
    """The accumulators plus one loaded tile's dots with the BLOCK_M activation rows (rows past M are zero)."""
    p0 = _row_pairs(x_ptr, stride_xm, 0, M, ra, rb, ma, mb, rs0, X_BF16, ASM, NORM)
    if BLOCK_M == 1:
        acc0 += _dot_row(wa, wb, p0, ASM) * scale
    elif BLOCK_M == 2:
        p1 = _row_pairs(x_ptr, stride_xm, 1, M, ra, rb, ma, mb, rs1, X_BF16, ASM, NORM)
        if ASM:
            d0, d1 = _dot2(wa, wb, p0, p1)
        else:
            d0, d1 = _dot_emulated(wa, wb, p0), _dot_emulated(wa, wb, p1)
        acc0 += d0 * scale
        acc1 += d1 * scale
    else:
        p1 = _row_pairs(x_ptr, stride_xm, 1, M, ra, rb, ma, mb, rs1, X_BF16, ASM, NORM)
        p2 = _row_pairs(x_ptr, stride_xm, 2, M, ra, rb, ma, mb, rs2, X_BF16, ASM, NORM)
        p3 = _row_pairs(x_ptr, stride_xm, 3, M, ra, rb, ma, mb, rs3, X_BF16, ASM, NORM)
        if ASM:
            d0, d1, d2, d3 = _dot4(wa, wb, p0, p1, p2, p3)
        else:
            d0, d1 = _dot_emulated(wa, wb, p0), _dot_emulated(wa, wb, p1)
            d2, d3 = _dot_emulated(wa, wb, p2), _dot_emulated(wa, wb, p3)
        acc0 += d0 * scale
        acc1 += d1 * scale
        acc2 += d2 * scale
        acc3 += d3 * scale
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_h2_kernel(x_ptr, qw_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                    M, K, stride_xm, stride_qw, stride_sc, stride_om,
                    s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, tiles_per_split, n_splits,
                    act_ptr, stride_am, res_ptr, res_out_ptr, g_ptr, sg_ptr, ss_out_ptr, stride_res, n_tiles,
                    ss_in_ptr, n_parts, inv_k, eps,
                    conv_tab, cw0, cw1, cw2, cb0, cb1, cb2, cw_r0, cw_r1, cw_r2, conv_out, stride_co,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_R: tl.constexpr,
                    NUM_SEG: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                    GLU: tl.constexpr, RES: tl.constexpr, NORM: tl.constexpr, PARTS_P: tl.constexpr,
                    X_BF16: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, SUM_STEP: tl.constexpr,
                    EARLY: tl.constexpr, PRELOAD: tl.constexpr, PIPE: tl.constexpr, CONV: tl.constexpr,
                    CONV_W: tl.constexpr, CONV_ACT: tl.constexpr, CONV_BIAS: tl.constexpr, CONV_DTYPE: tl.constexpr):
    """GLU (1 / 2): two equal segments (gate, up); besides gate|up in ``out``, ``act = silu(gate) * up``, applied by the
    second program of each gate / up column-block pair to finish (1, ``_glu_pair``) or by the one program holding
    the same channels of both (2, ``int4_tiles.glu_paired``, ``_glu_tile``).
    RES / NORM: the next RMSNorm split across this GEMV and the next one (``_residual_tile``, ``_row_rstd``).
    EARLY (with RES): the residual input is loaded before the split-K sum, not after it (``pdl.early_loads``).
    PRELOAD (0 / 1 / 2): the first K tiles' weights and scales are loaded before the PDL wait (``pdl.gemv_preload``).
    PIPE: the K loop loads tile t + 1 before it computes tile t (``pdl.gemv_pipe``; PRELOAD 2 is then moot).
    CONV (segments z | x | B | C | dt): the x / B / C tiles end with Mamba2's causal-conv step (``gemv_conv``)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    blk, wcol, live_n, ocol = _columns(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, NUM_SEG,
                                       BLOCK_N, ALIGNED, GLU == 2)
    mask_n = live_n[None, :]
    wcol = wcol[None, :]
    offs_r = tl.arange(0, SUB_R)[:, None]
    rows_k = K // 8
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(rows_k, 2 * SUB_R))
    # No L2 prefetch of the weights before the wait: two tiles a program pulled in here made every PDL mode lose
    # (H100 engine A/B, stop 39: 2.39-2.44 ms against 2.24 at rate 0; without them 2.13, docs/performance-log.md)
    if PRELOAD:  # (the switch UNIQL_GEMV_PRELOAD) the first tile (or two) into registers instead
        ra, rb, ma, mb, wa, wb, scale = _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r, t0, rows_k,
                                              GROUP, SUB_R)
    if PRELOAD == 2:  # a real tile of this split, used only if the split has two (splits are never empty)
        ra2, rb2, ma2, mb2, wa2, wb2, scale2 = _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r,
                                                     tl.minimum(t0 + 1, t1 - 1), rows_k, GROUP, SUB_R)
    pdl_wait(PDL)  # x, the workspace and the counters belong to earlier kernels until here
    acc0 = tl.zeros([SUB_R, BLOCK_N], tl.float32)
    acc1 = tl.zeros([SUB_R, BLOCK_N], tl.float32)  # rows 1..3 exist only when BLOCK_M says so (else dead code)
    acc2 = tl.zeros([SUB_R, BLOCK_N], tl.float32)
    acc3 = tl.zeros([SUB_R, BLOCK_N], tl.float32)
    # x holds s * w of an RMSNorm (NORM): each row's 1 / rms(s) scales its activations before the fp16 pack
    # (loads of rows a BLOCK_M never reaches are dead code)
    rs0 = _row_rstd(ss_in_ptr, 0, M, n_parts, inv_k, eps, NORM, PARTS_P)
    rs1 = _row_rstd(ss_in_ptr, 1, M, n_parts, inv_k, eps, NORM, PARTS_P)
    rs2 = _row_rstd(ss_in_ptr, 2, M, n_parts, inv_k, eps, NORM, PARTS_P)
    rs3 = _row_rstd(ss_in_ptr, 3, M, n_parts, inv_k, eps, NORM, PARTS_P)
    if PIPE:  # tile t + 1's loads go out before tile t's arithmetic (the registers of one more tile)
        if not PRELOAD:
            ra, rb, ma, mb, wa, wb, scale = _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r, t0,
                                                  rows_k, GROUP, SUB_R)
        for t in range(t0, t1):
            na, nb, nma, nmb, nwa, nwb, nscale = _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r,
                                                       t + 1, tl.where(t + 1 < t1, rows_k, 0), GROUP, SUB_R, True)
            acc0, acc1, acc2, acc3 = _acc_tile(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, rs0, rs1, rs2, rs3, ra,
                                               rb, ma, mb, wa, wb, scale, BLOCK_M, X_BF16, ASM, NORM)
            ra, rb, ma, mb, wa, wb, scale = na, nb, nma, nmb, nwa, nwb, nscale
    else:
        if PRELOAD:  # the first tile is in flight before the wait (weights depend on no kernel); consumed after it
            acc0, acc1, acc2, acc3 = _acc_tile(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, rs0, rs1, rs2, rs3, ra,
                                               rb, ma, mb, wa, wb, scale, BLOCK_M, X_BF16, ASM, NORM)
        if PRELOAD == 2:  # noqa: SIM102 (a constexpr, then a run-time branch)
            if t0 + 1 < t1:
                acc0, acc1, acc2, acc3 = _acc_tile(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, rs0, rs1, rs2, rs3,
                                                   ra2, rb2, ma2, mb2, wa2, wb2, scale2, BLOCK_M, X_BF16, ASM, NORM)
        for t in range(t0 + PRELOAD, t1):
            ra, rb, ma, mb, wa, wb, scale = _tile(qw_ptr, stride_qw, sc_ptr, stride_sc, wcol, mask_n, offs_r, t,
                                                  rows_k, GROUP, SUB_R)
            acc0, acc1, acc2, acc3 = _acc_tile(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, rs0, rs1, rs2, rs3, ra,
                                               rb, ma, mb, wa, wb, scale, BLOCK_M, X_BF16, ASM, NORM)
    pdl_release(PDL)  # mode 2: the next kernel launches during the split-K sums and epilogues
    offs_m = tl.arange(0, BLOCK_M)
    out = _rows_out(acc0, acc1, acc2, acc3, offs_m, BLOCK_M)
    if RES and EARLY:  # needs nothing from this kernel: in flight while the split-K sum waits
        res_x = _residual_in(res_ptr, stride_res, offs_m, offs_m < M, ocol, live_n)
    total, wrote = _finish(out * 16.0, pid_n, split, n_splits, ws_ptr, cnt_ptr, out_ptr, stride_om, bias_ptr,
                           offs_m, offs_m < M, ocol, live_n, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, SUM_STEP)
    if RES:  # noqa: SIM102 (a constexpr, then a run-time branch)
        if wrote:
            if not EARLY:
                res_x = _residual_in(res_ptr, stride_res, offs_m, offs_m < M, ocol, live_n)
            _residual_tile(total, res_x, res_out_ptr, g_ptr, sg_ptr, ss_out_ptr, stride_res, n_tiles, pid_n,
                           offs_m, offs_m < M, ocol, live_n)
    if CONV:  # noqa: SIM102 (a constexpr, then a run-time branch)
        if wrote & (pid_n >= nb0) & (pid_n < nb0 + nb1 + nb2 + nb3):  # an x / B / C tile
            _conv_tile(total, ocol, live_n, offs_m, M, l0, l1, l2, l1 + l2 + l3, conv_tab, cw0,
                       cw1, cw2, cb0, cb1, cb2, cw_r0, cw_r1, cw_r2, conv_out, stride_co, BLOCK_M, CONV_W, CONV_ACT,
                       CONV_BIAS, CONV_DTYPE)
    if GLU == 1:  # noqa: SIM102 (a constexpr, then a run-time branch)
        if wrote:  # pair counters follow the 2 * nb0 tile counters
            is_gate = pid_n < nb0
            _glu_pair(total, cnt_ptr + 2 * nb0 + blk, is_gate, out_ptr, stride_om, act_ptr, stride_am, offs_m,
                      offs_m < M, ocol, tl.where(is_gate, ocol, ocol - l0), live_n, tl.where(is_gate, l0, -l0))
    if GLU == 2:  # noqa: SIM102 (a constexpr, then a run-time branch)
        if wrote:
            _glu_tile(total, act_ptr, stride_am, offs_m, offs_m < M, blk * (BLOCK_N // 2), l0, BLOCK_M, BLOCK_N)


def launch_gemv_h2(grid, args: tuple, *, sub_r: int, x_bf16: bool, act=None, paired=False, residual=None, norm=None,
                   conv=None, **constexprs) -> None:
    """Launch with the int4_matmul argument tuple (the launcher in int4_matmul checks shapes and builds it).
    ``act`` ``[M, l0]``: also write silu(gate) * up of the two segments there (``paired``: the grid's programs
    each hold BLOCK_N / 2 channels of both). ``residual`` =
    (x, s_out, w, sg_out, ss_out ``[M, tiles]``): write s = x + out, s * w and per-tile sums of s^2. ``norm`` =
    (ss ``[M, P]``, eps): x holds s * w; each activation is multiplied by its row's 1/rms (from those sums) before
    the fp16 conversion. ``conv``: a ``gemv_conv.ConvStep`` for the x / B / C segments."""
    pdl, early = pdl_mode(args[0].device, args[7]), early_loads(args[7])  # args[7]: M, the decode rows
    out = args[4]
    glu = (act, act.stride(0)) if act is not None else (out, 0)
    res = (*residual, residual[0].stride(0), residual[4].shape[1]) if residual is not None \
        else (out, out, out, out, out, 0, 1)
    nrm = (norm[0], norm[0].shape[1], 1.0 / args[8], float(norm[1])) if norm is not None else (out, 1, 1.0, 0.0)
    cnv, cnv_consts = conv_args(conv, out)
    _gemv_h2_kernel[grid](*args, *glu, *res, *nrm, *cnv, SUB_R=sub_r, GLU=0 if act is None else 2 if paired else 1,
                          RES=residual is not None, NORM=norm is not None, PARTS_P=triton.next_power_of_2(nrm[1]),
                          X_BF16=x_bf16, ASM=USE_ASM, PDL=pdl, EARLY=early and residual is not None,
                          PRELOAD=gemv_preload(), PIPE=gemv_pipe(args[7]), launch_pdl=pdl > 0, **cnv_consts,
                          **constexprs)
