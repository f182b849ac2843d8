"""The decode GEMV's norm prologue (``int4_gemv._gemv_h2_kernel``): the producer of its input wrote ``s * w`` and
partial sums of ``s^2``; the GEMV scales each activation by 1 / rms before its fp16 conversion: one scale a row
(an RMSNorm over the whole input, ``_row_rstd``), from the ``[M, parts]`` sums the previous GEMV's residual epilogue
wrote (``_residual_in`` / ``_residual_tile``: s = x + out, s * w, sums of s^2).

(A per-head-group variant for Mamba2's gated norm, begun by the state update, lost the H100 engine A/Bs and was
removed, stop 35.) ``check_norm`` is the launchers' check of the ``norm`` argument.
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
    """``norm`` = (ss, eps): the GEMV reads row r's P partial sums at ``ss + r * P`` (P = ss.shape[1]), fp32."""
    if norm is None:
        return
    if len(norm) != 2:
        raise ValueError(f"norm must be (sums, eps), got {len(norm)} items")
    ss = norm[0]
    if ss.dtype != torch.float32 or ss.dim() != 2 or ss.shape[0] < m or ss.shape[1] < 1 \
            or not ss.is_contiguous() or ss.device != x.device:
        raise ValueError(f"norm sums must be a contiguous fp32 [>= {m} rows, parts] tensor on {x.device}, got "
                         f"{ss.dtype} {tuple(ss.shape)} stride {ss.stride()} on {ss.device}")
