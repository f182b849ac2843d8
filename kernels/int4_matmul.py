"""W4A16 matmul over the packed INT4 format with run-time prefix masking: ``out = x @ W[:n, :k]^T``.

The Triton kernels read ``qweight int32 [K/8, N]`` / ``scales fp16 [K/G, N]`` (see ``int4_format``) through the
row strides of the FULL stored tensors, so a rung is just smaller ``n``/``k`` arguments, never a copy:

* ``gemv`` (batch 1..4): fp16/bf16 activations take ``int4_gemv`` (half2 math, ~2.3 instructions per weight).
  fp32 activations take the exact fp32 kernel here: CUDA-core FMAs, each dequantized tile shared by the rows.
  Codes become floats with the exponent trick: OR-ing a code shifted to bit ``4j`` into the bits of 2^23 gives
  the float ``2^23 + q * 16^j`` exactly (j < 5; the top three codes are read after one 20-bit shift), so one
  LOP3 + one FADD + one FFMA per weight and row, with ``x`` pre-scaled by 16^-j. No int-to-float conversions,
  few int-pipe instructions.
* ``gemm`` (batch 5 .. 127): dequantizes a ``[BK, BN]`` tile to the activation dtype and runs ``tl.dot``.
* ``dequant`` (prefill, 128+ rows: ``DEQUANT_MIN_M``): ``int4_dequant`` writes the active prefix in column
  chunks, cuBLAS multiplies.

The Triton paths split K across programs where the N blocks alone cannot fill the GPU (the fixup that sums the
partials deterministically is in ``int4_tiles``).

Fused weights (q|k|v, gate|up, z|x|B|C|dt) are ``segments``: up to five (first stored column, active columns)
pairs read in one launch, written side by side in the output.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .elementwise import silu_mul
from .gemv_conv import check_conv
from .gemv_norm import check_norm
from .int4_config import MAX_SEGMENTS, Int4Config, candidate_configs, choose_path, launch_split, pick_config
from .int4_dequant import dequant_matmul
from .int4_format import GROUP_SIZES, PACK, ZERO, dequantize
from .int4_gemv import launch_gemv_h2
from .int4_tiles import _finish, _rows_out, _segment, glu_paired, reserve_workspace, sum_step, workspace
from .pdl import glu_gemv_preload
from .switches import switch

# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _x_column(x_row_ptr, rows, j: tl.constexpr, mask, x_scale: tl.constexpr):
    """x[8r + j] for the tile's packed rows r, in fp32, scaled by 16^-j to meet the exponent-trick codes."""
    return (tl.load(x_row_ptr + rows * 8 + j, mask=mask, other=0.0).to(tl.float32) * x_scale)[:, None]


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, K, stride_xm, stride_qw, stride_sc, stride_om,
                 s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, tiles_per_split, n_splits, magic,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 NUM_SEG: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                 SUM_STEP: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    blk, col0, n_len, out0 = _segment(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3,
                                        NUM_SEG)
    if ALIGNED:  # segment starts and lengths are multiples of 16: lets the compiler use 16-byte loads
        col0 = tl.multiple_of(col0, 16)
        n_len = tl.multiple_of(n_len, 16)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_len
    wcol = col0 + offs_n
    offs_m = tl.arange(0, BLOCK_M)  # 1, 2 or 4 rows, each with its own 2-D accumulator (one register layout)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    rows_k = K // 8
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(rows_k, BLOCK_R))
    acc0 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)  # rows 1..3 exist only when BLOCK_M says so (else dead code)
    acc2 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    # (loading the next tile ahead of this one's math was measured 1-9 % slower on H100: more registers, and
    # ~8 resident programs per SM already hide the load latency)
    for t in range(t0, t1):
        rows = t * BLOCK_R + offs_r  # packed rows of this tile: all in one quantization group
        mask_r = rows < rows_k
        w = tl.load(qw_ptr + rows[:, None] * stride_qw + wcol[None, :], mask=mask_r[:, None] & mask_n[None, :],
                    other=0, eviction_policy="evict_first")
        scale = tl.load(sc_ptr + (t * BLOCK_R * 8 // GROUP) * stride_sc + wcol, mask=mask_n, other=0.0)
        scale = scale.to(tl.float32)[None, :]
        w_hi = w.to(tl.uint32, bitcast=True) >> 20  # logical shift: the top three codes at bits 0..11
        p0 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        p1 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        p2 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        p3 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for j in tl.static_range(8):
            if j < 5:
                bits = (w & (15 << (4 * j))) | magic
                val = bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << (4 * j)))  # (q-8)*16^j, exact
                x_scale = 1.0 / (1 << (4 * j))
            else:
                bits = (w_hi & (15 << (4 * (j - 5)))) | magic
                val = bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << (4 * (j - 5))))
                x_scale = 1.0 / (1 << (4 * (j - 5)))
            p0 += _x_column(x_ptr, rows, j, mask_r, x_scale) * val
            if BLOCK_M > 1:
                p1 += _x_column(x_ptr + stride_xm, rows, j, mask_r & (offs_r * 0 + 1 < M), x_scale) * val
            if BLOCK_M > 2:
                p2 += _x_column(x_ptr + 2 * stride_xm, rows, j, mask_r & (offs_r * 0 + 2 < M), x_scale) * val
                p3 += _x_column(x_ptr + 3 * stride_xm, rows, j, mask_r & (offs_r * 0 + 3 < M), x_scale) * val
        acc0 += p0 * scale
        if BLOCK_M > 1:
            acc1 += p1 * scale
        if BLOCK_M > 2:
            acc2 += p2 * scale
            acc3 += p3 * scale
    out = _rows_out(acc0, acc1, acc2, acc3, offs_m, BLOCK_M)
    _finish(out, pid_n, split, n_splits, ws_ptr, cnt_ptr, out_ptr, stride_om, bias_ptr, offs_m, mask_m,
            out0 + offs_n, mask_n, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, SUM_STEP)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, sc_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, K, stride_xm, stride_qw, stride_sc, stride_om,
                 s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, tiles_per_split, n_splits, n_blocks,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_SEG: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                 ALIGNED: tl.constexpr, SUM_STEP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    blk, col0, n_len, out0 = _segment(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3,
                                        NUM_SEG)
    if ALIGNED:
        col0 = tl.multiple_of(col0, 16)
        n_len = tl.multiple_of(n_len, 16)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_len
    wcol = col0 + offs_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        rows = t * (BLOCK_K // 8) + offs_r
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + wcol[None, :],
                        mask=(rows < K // 8)[:, None] & mask_n[None, :], other=0)
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 15, [BLOCK_K, BLOCK_N])  # row 8r+j
        if BLOCK_K <= GROUP:  # noqa: SIM108 (a constexpr branch, not a run-time select)
            scale = tl.load(sc_ptr + (t * BLOCK_K // GROUP) * stride_sc + wcol, mask=mask_n, other=0.0)[None, :]
        else:
            scale = tl.load(sc_ptr + (offs_k // GROUP)[:, None] * stride_sc + wcol[None, :],
                            mask=(offs_k < K)[:, None] & mask_n[None, :], other=0.0)
        w = ((codes - 8).to(tl.float32) * scale.to(tl.float32)).to(a.dtype)
        if DOT_IEEE:  # noqa: SIM108 (a constexpr branch)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    _finish(acc, pid_m * n_blocks + pid_n, split, n_splits, ws_ptr, cnt_ptr, out_ptr, stride_om, bias_ptr,
            offs_m, mask_m, out0 + offs_n, mask_n, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, SUM_STEP)


# -------------------------------------------------------------------------------------------------- launcher

def _segments(segments, n: int | None, n_stored: int) -> list[tuple[int, int]]:
    segs = [(0, n_stored if n is None else n)] if segments is None else [(int(a), int(b)) for a, b in segments]
    if not 1 <= len(segs) <= MAX_SEGMENTS:
        raise ValueError(f"1..{MAX_SEGMENTS} segments supported, got {len(segs)}")
    for start, length in segs:
        if length < 1 or start < 0 or start + length > n_stored:
            raise ValueError(f"segment (start={start}, n={length}) is outside the stored {n_stored} columns")
    return segs


def _check(x, qweight, scales, group_size: int, k: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.dim() != 2 or scales.dim() != 2 or x.dim() < 1:
        raise ValueError(f"qweight [K/8, N] and scales [K/G, N] must be 2-D, x [..., K] at least 1-D: got "
                         f"{tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(x.shape)}")
    if qweight.dtype != torch.int32 or scales.dtype != torch.float16:
        raise ValueError(f"qweight must be int32 and scales float16, got {qweight.dtype} / {scales.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != qweight.device or x.device != scales.device:
        raise ValueError(f"x, qweight and scales must share a device ({x.device}, {qweight.device}, {scales.device})")
    if qweight.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight and scales need a contiguous last dim (prefix views keep it)")
    k_stored = qweight.shape[0] * PACK
    if k % PACK or not 0 < k <= k_stored:
        raise ValueError(f"active K={k} must be a positive multiple of {PACK} and <= the stored {k_stored}")
    if scales.shape[1] != qweight.shape[1] or scales.shape[0] * group_size < k:
        raise ValueError(f"scales {tuple(scales.shape)} do not cover qweight {tuple(qweight.shape)} "
                         f"at group {group_size}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the active K is {k}")


def _check_bias(bias, n_total: int, x) -> None:
    """The kernels read ``bias_ptr + column``: one element per output column, stride 1, on x's device."""
    if bias is None:
        return
    if bias.shape != (n_total,):
        raise ValueError(f"bias must have shape ({n_total},), got {tuple(bias.shape)}")
    if bias.device != x.device or (n_total > 1 and bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous on x's device {x.device}, got stride {bias.stride()} on "
                         f"{bias.device}")


def glu_width(segments) -> int:
    """The width of a GLU's (gate, up) segments, which must be two of one width."""
    segs = [tuple(seg) for seg in segments]
    if len(segs) != 2 or segs[0][1] != segs[1][1]:
        raise ValueError(f"a GLU needs two segments of one width (gate, up), got {segs}")
    return int(segs[0][1])


def check_call(x, qweight, scales, group_size: int, k: int, segments, bias=None) -> list[tuple[int, int]]:
    """What every backend of a W4A16 call accepts (``ops``' CPU path runs it too, so both refuse alike and the
    fake's output width always holds): the checked segments."""
    _check(x, qweight, scales, group_size, k)
    segs = _segments(segments, None, qweight.shape[1])
    _check_bias(bias, sum(length for _, length in segs), x)
    return segs


def _inputs(x, qweight, scales, group_size: int, n: int | None, k: int | None, segments):
    """Checked (active K, segments, leading dims, ``x`` as rows the kernels can read) of one call."""
    k = qweight.shape[0] * PACK if k is None else k
    _check(x, qweight, scales, group_size, k)
    segs = _segments(segments, n, qweight.shape[1])
    lead, x2 = x.shape[:-1], x.reshape(-1, k)
    if x2.stride(1) != 1 or x2.data_ptr() % 4 or x2.stride(0) % 2:
        x2 = x2.contiguous() if x2.stride(1) != 1 else x2.clone()  # the half2 gemv reads x as int32 pairs
    return k, segs, lead, x2


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                n: int | None = None, k: int | None = None, bias: torch.Tensor | None = None,
                segments=None, config: Int4Config | None = None, norm=None, conv=None) -> torch.Tensor:
    """``x [..., k]`` times the active prefix of a packed weight -> ``[..., n]`` (or the segments side by side).

    ``bias`` is indexed by OUTPUT column (already concatenated for segments). ``norm`` = (ss ``[M, P]`` fp32,
    eps): x holds ``s * w`` of an RMSNorm whose per-row sums of s^2 come in P parts (``int4_residual``); each
    activation is multiplied by its row's 1/rms(s) in fp32 before the fp16 conversion (half2 GEMV only, see
    ``half2_gemv_config``). ``conv`` (a ``gemv_conv.ConvStep``, half2 GEMV only): Mamba2's causal-conv step on the
    x / B / C segments too, into ``conv.out``.
    """
    k, segs, lead, x2 = _inputs(x, qweight, scales, group_size, n, k, segments)
    m, n_total = x2.shape[0], sum(length for _, length in segs)
    _check_bias(bias, n_total, x)
    out = torch.empty(m, n_total, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n_total)
    cfg = config or pick_config(m, n_total, k, group_size, x.device, half2=x.dtype != torch.float32,
                                widths=tuple(length for _, length in segs))
    _launch(cfg, x2, qweight, scales, group_size, k, segs, bias, out, norm=norm, conv=conv)
    return out.reshape(*lead, n_total)


def half2_gemv_config(m: int, n_total: int, k: int, group_size: int, x: torch.Tensor) -> Int4Config | None:
    """The config of the half2 decode GEMV for this call, or None when another path serves it (the RMSNorm
    split of ``int4_residual`` / ``norm=`` lives in that kernel only)."""
    if m == 0 or x.dtype == torch.float32:
        return None
    cfg = pick_config(m, n_total, k, group_size, x.device, half2=True)
    return cfg if cfg.path == "gemv" and cfg.block_k % 16 == 0 and m <= cfg.block_m else None


def int4_residual(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                  residual: torch.Tensor, norm_weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: Int4Config | None = None, norm=None):
    """A block's output projection fused with the residual add and the first half of the next RMSNorm:
    ``s = residual + x @ W`` (every output column, ``k`` active inputs), ``s * norm_weight`` and per-tile sums
    of s^2 ``[M, tiles]`` fp32, in one launch. Returns ``(s, s * w, sums)``, or None when the half2 GEMV does
    not serve this shape (the caller then runs the plain projection). ``norm``: as ``int4_matmul``'s."""
    n = qweight.shape[1]
    k, _, lead, x2 = _inputs(x, qweight, scales, group_size, None, k, None)
    cfg = config or half2_gemv_config(x2.shape[0], n, k, group_size, x)
    if cfg is None or residual.shape[-1] != n or residual.dtype != x.dtype or norm_weight.shape != (n,):
        return None
    # the kernel reads and writes residual rows for every row of x, and the weight at stride 1
    if residual.numel() != x2.shape[0] * n:
        raise ValueError(f"residual {tuple(residual.shape)} must have one row per row of x ({x2.shape[0]})")
    if n > 1 and norm_weight.stride(0) != 1:
        raise ValueError(f"norm_weight must be contiguous, got stride {norm_weight.stride(0)}")
    if residual.device != x.device or norm_weight.device != x.device:
        raise ValueError(f"residual and norm_weight must be on x's device {x.device}")
    _check_bias(bias, n, x)
    res2 = residual.reshape(-1, n).contiguous()
    if switch("UNIQL_GEMV_STAGED") == "1" and bias is None and config is None:
        from .int4_staged import staged_residual_if_served  # Gluon: imported only when asked for
        if (done := staged_residual_if_served(x2, qweight, scales, group_size, k, res2, norm_weight, norm)) is not None:
            return done[0].reshape(*lead, n), done[1].reshape(*lead, n), done[2]
    out, s, sg = (torch.empty_like(res2) for _ in range(3))
    sums = torch.empty(res2.shape[0], triton.cdiv(n, cfg.block_n), dtype=torch.float32, device=x.device)
    _launch(cfg, x2, qweight, scales, group_size, k, [(0, n)], bias, out, residual=(res2, s, norm_weight, sg, sums),
            norm=norm)
    return s.reshape(*lead, n), sg.reshape(*lead, n), sums


def int4_glu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, segments,
             k: int | None = None, bias: torch.Tensor | None = None,
             config: Int4Config | None = None, norm=None) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate|up weight: ``segments`` = [(gate start, n), (up start, n)] -> ``[..., n]``.

    On the half2 GEMV path (decode) the activation is the epilogue of the projection itself (``_glu_pair``), one
    launch for both; elsewhere the projection, then the same math in torch."""
    k, segs, lead, x2 = _inputs(x, qweight, scales, group_size, None, k, segments)
    m, n = x2.shape[0], glu_width(segs)
    _check_bias(bias, 2 * n, x)
    if m == 0:  # (pick_config has no path for an empty batch)
        return torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    # paired (half2 GEMV only): each program holds gate and up channels alike, so its wave plan sees 2n columns
    paired = glu_paired() and x.dtype != torch.float32
    with glu_gemv_preload() if paired else contextlib.nullcontext():  # its preload cap: the plan and the launch
        cfg = config or pick_config(m, 2 * n, k, group_size, x.device, half2=x.dtype != torch.float32,
                                    widths=(2 * n,) if paired else (n, n), paired=paired)
        if cfg.path == "gemv" and x.dtype != torch.float32:
            gate_up = torch.empty(m, 2 * n, dtype=x.dtype, device=x.device)
            act = torch.empty(m, n, dtype=x.dtype, device=x.device)
            _launch(cfg, x2, qweight, scales, group_size, k, segs, bias, gate_up, act, norm=norm, paired=paired)
            return act.reshape(*lead, n)
    gate_up = int4_matmul(x2, qweight, scales, group_size, k=k, bias=bias, segments=segs, config=config, norm=norm)
    if x.device.type == "cuda":
        return silu_mul(gate_up).reshape(*lead, n)
    gate, up = gate_up.split(n, dim=-1)
    return (torch.nn.functional.silu(gate.float()).to(x.dtype) * up).reshape(*lead, n)


def _launch(cfg: Int4Config, x, qweight, scales, group_size, k, segs, bias, out, act=None, residual=None,
            norm=None, conv=None, paired=False) -> None:
    m = x.shape[0]
    half2_gemv = cfg.path == "gemv" and x.dtype != torch.float32
    if (residual is not None or norm is not None or conv is not None) and not half2_gemv:  # before any path ignores
        raise ValueError(f"the RMSNorm split and the conv epilogue run in the half2 GEMV only, not on the {cfg.path} "
                         f"path ({x.dtype} activations)")
    check_norm(norm, m, x)
    check_conv(conv, segs, m, x)
    if cfg.path == "dequant":
        dequant_matmul(x, qweight, scales, group_size, k, segs, bias, out)
        return
    if max(m * x.stride(0), m * out.stride(0), qweight.shape[0] * qweight.stride(0)) >= 2**31:
        raise ValueError(f"the {cfg.path} kernel indexes x, out and qweight in int32: {m} rows of x / out at strides "
                         f"{x.stride(0)} / {out.stride(0)} pass 2^31 elements (the dequant path serves big batches)")
    if cfg.path == "gemv" and (m > cfg.block_m or cfg.block_k > group_size):
        raise ValueError(f"gemv config {cfg} cannot serve batch {m} at group {group_size}")
    if cfg.path == "gemv" and x.dtype != torch.float32 and cfg.block_k % 16:
        raise ValueError(f"the half2 gemv reads tiles of two row blocks: block_k must be a multiple of 16 ({cfg})")
    paired = paired and half2_gemv and act is not None
    blocks = [triton.cdiv(segs[0][1], cfg.block_n // 2)] if paired else \
        [triton.cdiv(length, cfg.block_n) for _, length in segs]
    pad = [(0, 0)] * (MAX_SEGMENTS - len(segs))
    starts, lengths = zip(*(segs + pad), strict=True)
    nb = blocks + [0] * (MAX_SEGMENTS - len(blocks))
    k_tiles = triton.cdiv(k, cfg.block_k)
    split, per_split = launch_split(k_tiles, cfg.split_k)
    m_blocks = 1 if cfg.path == "gemv" else triton.cdiv(m, cfg.block_m)
    tiles = m_blocks * sum(blocks)
    pair_counters = blocks[0] if act is not None and not paired else 0  # after the tile counters (``_glu_pair``)
    ws, cnt = workspace(x.device, tiles * split * cfg.block_m * cfg.block_n if split > 1 else 0,
                        tiles + pair_counters)
    args = (x, qweight, scales, bias if bias is not None else out, out, ws, cnt, m, k, x.stride(0),
            qweight.stride(0), scales.stride(0), out.stride(0), *starts, *lengths, *nb[:MAX_SEGMENTS - 1], per_split,
            split)
    aligned = all(v % 16 == 0 for seg in segs for v in seg)
    common = dict(GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_SEG=len(segs), SPLIT=split > 1,
                  ALIGNED=aligned, SUM_STEP=sum_step(cfg.block_m, cfg.block_n, split),
                  HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if half2_gemv:
        launch_gemv_h2((sum(blocks), split), args, sub_r=cfg.block_k // 16, x_bf16=x.dtype == torch.bfloat16,
                       act=act, paired=paired, residual=residual, norm=norm, conv=conv, **common)
        return
    if cfg.path == "gemv":
        # the exponent bits of 2^23 travel as an argument so they sit in one register and each LOP3 takes its
        # code mask as the immediate (a literal here makes ptxas rematerialize every mask inside the loop)
        _gemv_kernel[(sum(blocks), split)](*args, 0x4B000000, BLOCK_R=cfg.block_k // 8, **common)
    else:
        _gemm_kernel[(m_blocks, sum(blocks), split)](*args, sum(blocks), BLOCK_K=cfg.block_k,
                                                     DOT_IEEE=x.dtype == torch.float32, **common)


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                          n: int | None = None, k: int | None = None, bias: torch.Tensor | None = None,
                          segments=None) -> torch.Tensor:
    """Plain torch: dequantize each active prefix (views of the stored tensors) and multiply, in fp32."""
    k = qweight.shape[0] * PACK if k is None else k
    segs = _segments(segments, n, qweight.shape[1])
    parts = [x.float() @ dequantize(qweight[:, a:a + b], scales[:, a:a + b], group_size, k, None, torch.float32)
             for a, b in segs]
    out = torch.cat(parts, dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


__all__ = ["Int4Config", "ZERO", "candidate_configs", "choose_path", "glu_width", "int4_glu", "int4_matmul",
           "int4_matmul_reference", "pick_config", "reserve_workspace"]
