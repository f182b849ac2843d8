"""The decode GEMV's norm prologue (``int4_gemv._gemv_h2_kernel``): the producer of its input wrote ``s * w`` and
partial sums of ``s^2``; the GEMV scales each activation by 1 / rms before its fp16 conversion.

* per row (an RMSNorm over the whole input, ``_row_rstd``): one scale a row, from ``[M, parts]`` sums, which the
  previous GEMV's residual epilogue wrote (``_residual_in`` / ``_residual_tile``: s = x + out, s * w, sums of s^2).
* per head group (Mamba2's gated RMSNorm, ``_group_rstd`` / ``_pick_group``): the input is rank-major (flat
  channel ``c * H + h``), the sums ``[groups * parts]`` hold each group's partials side by side. When 8 divides both
  H and the heads per group, the 8 inputs of a packed row (channels 8r .. 8r+7: one ``c``, heads ``h .. h+7``)
  share a group, so the scale is one value per packed row. At most 8 groups.

``check_norm`` is the launchers' check of the ``norm`` argument that selects either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_rstd(ss_ptr, m: tl.constexpr, M, n_parts, inv_k, eps, ON: tl.constexpr, PARTS_P: tl.constexpr):
    """Row m's 1 / sqrt(mean(s^2) + eps) from the producer's per-tile sums of squares ``[M, n_parts]`` (1.0 when
    not ON; rows past M are masked anyway)."""
    if ON:
        parts = tl.arange(0, PARTS_P)
        ss = tl.load(ss_ptr + m * n_parts + parts, mask=(parts < n_parts) & ((parts * 0 + m) < M), other=0.0)
        return 1.0 / tl.sqrt(tl.sum(ss, axis=0) * inv_k + eps)
    return 1.0


@triton.jit
def _group_rstd(ss_ptr, n_parts, inv_count, eps, groups, G: tl.constexpr, PARTS_P: tl.constexpr):
    """Each head group's 1 / sqrt(mean(g^2) + eps) ``[G]`` (row 0) from ``groups x n_parts`` partial sums, summed
    in a fixed order (the same bits every step); ``inv_count`` = 1 / (heads per group x channels)."""
    grp = tl.arange(0, G)[:, None]
    part = tl.arange(0, PARTS_P)[None, :]
    ss = tl.load(ss_ptr + grp * n_parts + part, mask=(grp < groups) & (part < n_parts), other=0.0)
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1) * inv_count + eps)


@triton.jit
def _group_scalar(grp_rs, j: tl.constexpr, G: tl.constexpr):
    """Group ``j``'s scale as a scalar (1.0 past the last group: never picked)."""
    if j < G:
        return tl.sum(tl.where(tl.arange(0, G) == j, grp_rs, 0.0), axis=0)
    return 1.0


@triton.jit
def _group_scalars(grp_rs, G: tl.constexpr):
    """The (at most 8) group scales as scalars, once per program: the K loop then picks a row's scale with
    selects, where a pick from the ``[G]`` tensor cost warp shuffles every tile."""
    return (_group_scalar(grp_rs, 0, G), _group_scalar(grp_rs, 1, G), _group_scalar(grp_rs, 2, G),
            _group_scalar(grp_rs, 3, G), _group_scalar(grp_rs, 4, G), _group_scalar(grp_rs, 5, G),
            _group_scalar(grp_rs, 6, G), _group_scalar(grp_rs, 7, G))


@triton.jit
def _pick_group(scales, rows, RH: tl.constexpr, RG: tl.constexpr, G: tl.constexpr):
    """The scale of packed rows ``rows [R, 1]`` (inputs 8r .. 8r+7: channel ``8r // H`` of heads ``8r % H`` ..
    +7, one head group): group ``(r % (H / 8)) // (heads per group / 8)``, both divisors compile-time constants
    (``RH``, ``RG``). ``scales``: ``_group_scalars``."""
    grp = (rows % RH) // RG
    rs = tl.where(grp == 1, scales[1], scales[0])
    if G > 2:
        rs = tl.where(grp == 2, scales[2], rs)
        rs = tl.where(grp == 3, scales[3], rs)
    if G > 4:
        rs = tl.where(grp == 4, scales[4], rs)
        rs = tl.where(grp == 5, scales[5], rs)
        rs = tl.where(grp == 6, scales[6], rs)
        rs = tl.where(grp == 7, scales[7], rs)
    return rs


@triton.jit
def _residual_in(res_ptr, stride_res, offs_m, mask_m, ocol, mask_n):
    """This tile of the residual stream's input x ``[BLOCK_M, BLOCK_N]``."""
    offs = offs_m[:, None] * stride_res + ocol[None, :]
    return tl.load(res_ptr + offs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def _residual_tile(delta, x, res_out_ptr, g_ptr, sg_ptr, ss_out_ptr, stride_res, n_tiles, tile, offs_m,
                   mask_m, ocol, mask_n):
    """This tile of the residual stream ``s = x + delta`` (x from ``_residual_in``, rounded like torch's add),
    the next norm's input ``s * w`` and the tile's sum of s^2 per row: the next GEMV finishes the norm
    (``_row_rstd``)."""
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m[:, None] * stride_res + ocol[None, :]
    s = (x.to(tl.float32) + delta).to(x.dtype)
    tl.store(res_out_ptr + offs, s, mask=mask)
    s32 = s.to(tl.float32)
    w = tl.load(g_ptr + ocol, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(sg_ptr + offs, (s32 * w[None, :]).to(x.dtype), mask=mask)
    tl.store(ss_out_ptr + offs_m * n_tiles + tile, tl.sum(s32 * s32, axis=1), mask=mask_m)


def check_norm(norm, m: int, x) -> None:
    """``norm`` = (ss, eps): the GEMV reads row r's P partial sums at ``ss + r * P`` (P = ss.shape[1]), fp32; or
    (ss, eps, heads, groups, count), a group norm over rank-major inputs (one row; 8 | heads per group)."""
    if norm is None:
        return
    ss = norm[0]
    if len(norm) == 5:
        _, _, heads, groups, count = norm
        if m != 1 or not 1 <= groups <= 8 or heads % groups or (heads // groups) % 8 or ss.shape[-1] % groups \
                or count < 1:
            raise ValueError(f"a group norm in the GEMV needs one row, 1-8 groups of a multiple of 8 heads and sums "
                             f"of groups x parts: got {m} rows, {heads} heads, {groups} groups, sums "
                             f"{tuple(ss.shape)}")
    if ss.dtype != torch.float32 or ss.dim() != 2 or ss.shape[0] < m or ss.shape[1] < 1 \
            or not ss.is_contiguous() or ss.device != x.device:
        raise ValueError(f"norm sums must be a contiguous fp32 [>= {m} rows, parts] tensor on {x.device}, got "
                         f"{ss.dtype} {tuple(ss.shape)} stride {ss.stride()} on {ss.device}")
