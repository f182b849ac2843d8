"""Prefill path: dequantize the active prefix of a packed weight to the activation dtype, then cuBLAS.

At prefill sizes (hundreds of rows) a matmul is compute bound, and cuBLAS on Hopper runs at a rate our
dequantize-in-the-loop Triton GEMM does not reach (its B operand comes from registers, not shared memory).
Writing the dequantized prefix costs about 2.5 bytes per weight of memory traffic, a few percent of the
matmul's time at M = 2048. The prefix is dequantized in column chunks so the scratch stays small (<= 64 MiB
on an 8 GB board) whatever the layer size; each chunk spans every segment it covers (q|k|v, gate|up) in one launch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .int4_config import MAX_SEGMENTS
from .int4_format import PACK, dequantize
from .switches import switch

CHUNK_ELEMENTS = 32 << 20  # the least weights dequantized at a time (64 MiB of bf16 scratch)
MAX_CHUNK_ELEMENTS = 128 << 20  # the most: a whole 8B gate|up (117 M weights) in one launch and one GEMM
SCRATCH_SHARE = 256  # of the device's memory: 64 MiB on an 8 GB board, 256 MiB from 32 GB up


def chunk_budget(device: torch.device) -> int:
    """Weights dequantized at a time on ``device``. Why more than the floor where memory allows: each chunk is a
    dequantize launch and a GEMM launch, and a 1024-token prefill is bound by the host issuing them (stop 45, H100:
    GPU busy 34 ms of a 63 ms TTFT); a bigger chunk costs no more bytes, only scratch."""
    chosen = switch("UNIQL_DEQUANT_CHUNK")  # millions of weights, or auto
    if chosen != "auto":
        return int(chosen) << 20
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    return _auto_chunk(device)


@functools.cache
def _auto_chunk(device: torch.device) -> int:
    """``auto``'s budget for one GPU, looked up once (every linear of an eager prefill asks)."""
    share = torch.cuda.get_device_properties(device).total_memory // SCRATCH_SHARE // 2  # bf16 elements
    return max(CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, share))


@triton.jit
def _dequant_kernel(qw_ptr, sc_ptr, out_ptr, rows_k, n, stride_qw, stride_sc, stride_out, col0,
                    b1, b2, b3, b4, d0, d1, d2, d3, d4,
                    GROUP: tl.constexpr, NUM_SEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[8r + j, c] = (code_j(qw[r, s]) - 8) * scale[(8r + j) // G, s] for the tile's packed rows r, where the
    stored column s of output column g = col0 + c is g + d_i in the segment i that holds g (it begins at b_i)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = col0 + cols
    src = g + d0
    if NUM_SEG > 1:
        src = tl.where(g >= b1, g + d1, src)
    if NUM_SEG > 2:
        src = tl.where(g >= b2, g + d2, src)
    if NUM_SEG > 3:
        src = tl.where(g >= b3, g + d3, src)
    if NUM_SEG > 4:
        src = tl.where(g >= b4, g + d4, src)
    mask = (rows < rows_k)[:, None] & (cols < n)[None, :]
    w = tl.load(qw_ptr + rows[:, None] * stride_qw + src[None, :], mask=mask, other=0)
    scale = tl.load(sc_ptr + (rows * 8 // GROUP)[:, None] * stride_sc + src[None, :], mask=mask, other=0.0)
    scale = scale.to(tl.float32)
    for j in tl.static_range(8):
        value = (((w >> (4 * j)) & 15) - 8).to(tl.float32) * scale
        tl.store(out_ptr + (rows * 8 + j)[:, None] * stride_out + cols[None, :],
                 value.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_prefix(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int, n: int,
                      dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T [k, n]`` of the active prefix (views of the stored tensors) in ``dtype``; ``k`` a multiple of 8."""
    return dequantize_columns(qweight, scales, group_size, k, [(0, n)], 0, n, dtype, out)


def dequantize_columns(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                       segments: list[tuple[int, int]], col0: int, width: int, dtype: torch.dtype,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Columns ``[col0, col0 + width)`` of the segments' prefixes packed side by side (``segments`` = [(stored
    start, n)], as the GEMM's output lays them out) as ``W^T [k, width]`` in ``dtype``, in one launch."""
    total = sum(n for _, n in segments)
    if k % PACK or not 0 < k <= qweight.shape[0] * PACK or not 1 <= len(segments) <= MAX_SEGMENTS or \
            any(a < 0 or n <= 0 or a + n > qweight.shape[1] for a, n in segments):
        raise ValueError(f"active k={k}, segments {segments} do not fit the stored {tuple(qweight.shape)} "
                         f"(k a multiple of 8, 1 to {MAX_SEGMENTS} segments)")
    if col0 < 0 or width <= 0 or col0 + width > total:
        raise ValueError(f"columns [{col0}, {col0 + width}) are outside the segments' {total}")
    if k * (width if out is None else out.stride(0)) >= 2**31 or qweight.shape[0] * qweight.stride(0) >= 2**31:
        raise ValueError(f"the dequant kernel indexes in int32: a [k={k}, n={width}] prefix passes 2^31 elements, "
                         "dequantize it in column chunks (as dequant_matmul does)")
    out = torch.empty(k, width, dtype=dtype, device=qweight.device) if out is None else out
    if out.shape != (k, width) or out.stride(1) != 1:
        raise ValueError(f"out must be a [k={k}, n={width}] tensor with a contiguous last dim")
    begins = _offsets(segments)
    pad = MAX_SEGMENTS - len(segments)
    bounds = begins[1:] + [total] * pad
    deltas = [a - b for (a, _), b in zip(segments, begins, strict=True)] + [0] * pad
    block_r, block_n = 8, 128
    grid = (triton.cdiv(k // PACK, block_r), triton.cdiv(width, block_n))
    _dequant_kernel[grid](qweight, scales, out, k // PACK, width, qweight.stride(0), scales.stride(0), out.stride(0),
                          col0, *bounds, *deltas, GROUP=group_size, NUM_SEG=len(segments), BLOCK_R=block_r,
                          BLOCK_N=block_n, num_warps=4)
    return out


def column_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, width)`` pieces of ``n`` columns: as few as ``chunk`` (a multiple of 128) allows, equally wide in
    multiples of 128, so no narrow tail runs a GEMM of its own that fills a fraction of the GPU."""
    parts = triton.cdiv(n, chunk)
    width = triton.cdiv(triton.cdiv(n, parts), 128) * 128  # <= chunk, as chunk is a multiple of 128
    return [(c0, min(width, n - c0)) for c0 in range(0, n, width)]


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                   segments: list[tuple[int, int]], bias: torch.Tensor | None, out: torch.Tensor,
                   chunk_elements: int | None = None) -> torch.Tensor:
    """``out [M, sum n] = x [M, k] @ W^T (+ bias)`` in column chunks of at most ``chunk_elements / k`` (default
    :func:`chunk_budget`) across the segments: one dequantize launch and one GEMM a chunk, whatever segments it
    spans. Each GEMM writes its columns of ``out`` in place (cuBLAS takes the row stride of ``out`` as the leading
    dimension) with the bias as its epilogue: no temporary, no second pass."""
    chunk_elements = chunk_elements or chunk_budget(x.device)
    chunk = max(128, chunk_elements // k // 128 * 128)
    pieces = column_chunks(sum(n for _, n in segments), chunk)
    scratch = torch.empty(k, pieces[0][1], dtype=x.dtype, device=x.device)  # the first piece is the widest
    bias = None if bias is None else bias.to(out.dtype)
    for c0, width in pieces:
        w_t = dequantize_columns(qweight, scales, group_size, k, segments, c0, width, x.dtype, out=scratch[:, :width])
        dst = out[:, c0:c0 + width]
        if bias is None:
            torch.mm(x, w_t, out=dst)
        else:
            torch.addmm(bias[c0:c0 + width], x, w_t, out=dst)
    return out


def _offsets(segments: list[tuple[int, int]]) -> list[int]:
    """Where each segment's columns begin in the output (segments are packed side by side there)."""
    offsets, col = [], 0
    for _, n in segments:
        offsets.append(col)
        col += n
    return offsets


def dequantize_prefix_reference(qweight, scales, group_size: int, k: int, n: int, dtype) -> torch.Tensor:
    """Plain torch: fp32 dequantization of the prefix, cast once."""
    return dequantize(qweight, scales, group_size, k, n, torch.float32).to(dtype)
