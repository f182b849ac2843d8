"""Prefill path: dequantize the active prefix of a packed weight to the activation dtype, then cuBLAS.

At prefill sizes (hundreds of rows) a matmul is compute bound, and cuBLAS on Hopper runs at a rate our
dequantize-in-the-loop Triton GEMM does not reach (its B operand comes from registers, not shared memory).
Writing the dequantized prefix costs about 2.5 bytes per weight of memory traffic, a few percent of the
matmul's time at M = 2048. The prefix is dequantized in column chunks so the scratch stays small (<= 64 MiB
by default) whatever the layer size: this runs on 8 GB boards too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4_format import PACK, dequantize

CHUNK_ELEMENTS = 32 << 20  # weights dequantized at a time (64 MiB of bf16 scratch)


@triton.jit
def _dequant_kernel(qw_ptr, sc_ptr, out_ptr, rows_k, n, stride_qw, stride_sc, stride_out,
                    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[8r + j, c] = (code_j(qw[r, c]) - 8) * scale[(8r + j) // G, c] for the tile's packed rows r."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < rows_k)[:, None] & (cols < n)[None, :]
    w = tl.load(qw_ptr + rows[:, None] * stride_qw + cols[None, :], mask=mask, other=0)
    scale = tl.load(sc_ptr + (rows * 8 // GROUP)[:, None] * stride_sc + cols[None, :], mask=mask, other=0.0)
    scale = scale.to(tl.float32)
    for j in tl.static_range(8):
        value = (((w >> (4 * j)) & 15) - 8).to(tl.float32) * scale
        tl.store(out_ptr + (rows * 8 + j)[:, None] * stride_out + cols[None, :],
                 value.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_prefix(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int, n: int,
                      dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T [k, n]`` of the active prefix (views of the stored tensors) in ``dtype``; ``k`` a multiple of 8."""
    if k % PACK or not 0 < k <= qweight.shape[0] * PACK or not 0 < n <= qweight.shape[1]:
        raise ValueError(f"active (k={k}, n={n}) does not fit the stored {tuple(qweight.shape)} (k multiple of 8)")
    if k * (n if out is None else out.stride(0)) >= 2**31 or qweight.shape[0] * qweight.stride(0) >= 2**31:
        raise ValueError(f"the dequant kernel indexes in int32: a [k={k}, n={n}] prefix passes 2^31 elements, "
                         "dequantize it in column chunks (as dequant_matmul does)")
    out = torch.empty(k, n, dtype=dtype, device=qweight.device) if out is None else out
    if out.shape != (k, n) or out.stride(1) != 1:
        raise ValueError(f"out must be a [k={k}, n={n}] tensor with a contiguous last dim")
    block_r, block_n = 8, 128
    grid = (triton.cdiv(k // PACK, block_r), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, scales, out, k // PACK, n, qweight.stride(0), scales.stride(0), out.stride(0),
                          GROUP=group_size, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    return out


def column_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, width)`` pieces of ``n`` columns: as few as ``chunk`` (a multiple of 128) allows, equally wide in
    multiples of 128, so no narrow tail runs a GEMM of its own that fills a fraction of the GPU."""
    parts = triton.cdiv(n, chunk)
    width = triton.cdiv(triton.cdiv(n, parts), 128) * 128  # <= chunk, as chunk is a multiple of 128
    return [(c0, min(width, n - c0)) for c0 in range(0, n, width)]


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                   segments: list[tuple[int, int]], bias: torch.Tensor | None, out: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``out [M, sum n] = x [M, k] @ W^T (+ bias)`` segment by segment, in column chunks of at most
    ``chunk_elements / k``. Each chunk's GEMM writes its columns of ``out`` in place (cuBLAS takes the row stride
    of ``out`` as the leading dimension) with the bias as its epilogue: no temporary, no second pass."""
    chunk = max(128, chunk_elements // k // 128 * 128)
    pieces = [(start, col, c0, width) for (start, n), col in zip(segments, _offsets(segments), strict=True)
              for c0, width in column_chunks(n, chunk)]
    scratch = torch.empty(k, max(width for *_, width in pieces), dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.to(out.dtype)
    for start, col, c0, width in pieces:
        w_t = dequantize_prefix(qweight[:, start + c0:], scales[:, start + c0:], group_size, k, width, x.dtype,
                                out=scratch[:, :width])
        dst = out[:, col + c0:col + c0 + width]
        if bias is None:
            torch.mm(x, w_t, out=dst)
        else:
            torch.addmm(bias[col + c0:col + c0 + width], x, w_t, out=dst)
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
