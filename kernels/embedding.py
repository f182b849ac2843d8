"""4-bit embedding lookup over the packed INT4 format (``int4_format``): the table is a linear with K = hidden,
N = vocab, so row ``v`` of the table is column ``v`` of ``qweight int32 [hidden/8, vocab]`` / ``scales fp16
[hidden/G, vocab]``, and ``value = (code - 8) * scale``.

One program per (token, block of packed rows): it reads ``BLOCK_R`` words of its token's column (one scale per
word, since a group is a whole number of words), unpacks 8 codes from each and writes ``8 * BLOCK_R`` contiguous
outputs. Values are computed in fp32 and cast once to the requested dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .int4_format import GROUP_SIZES, PACK, ZERO, unpack

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_BLOCK_R = 64  # 512 outputs per program


@triton.jit
def _embedding_int4_kernel(ids_ptr, qw_ptr, sc_ptr, out_ptr, qw_row_stride, sc_row_stride, rows,
                           w_ptr, sg_ptr, ss_ptr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr):
    """NORM: also the first RMSNorm's half (as an output GEMV's residual epilogue does): ``s * w`` in the output
    dtype and this tile's sum of s^2 (``ss [tokens, tiles]`` fp32), s the rounded row; the next GEMV finishes it."""
    token = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # packed row r holds hidden 8r .. 8r+7
    live = row < rows
    vocab_id = tl.load(ids_ptr + token).to(tl.int64)
    words = tl.load(qw_ptr + row * qw_row_stride + vocab_id, mask=live, other=0)  # [BLOCK_R] int32
    scale = tl.load(sc_ptr + (row * 8 // GROUP) * sc_row_stride + vocab_id, mask=live, other=0.0).to(tl.float32)
    nibble = tl.arange(0, 8)
    # literals: a jit function cannot read module globals. The arithmetic shift sign-extends words whose top
    # code is >= 8, but the & 15 keeps only the 4 code bits. Zero point 8 (int4_format.ZERO).
    codes = (words[:, None] >> (4 * nibble)[None, :]) & 15  # [BLOCK_R, 8]
    values = (codes.to(tl.float32) - 8.0) * scale[:, None]
    hidden_idx = row[:, None] * 8 + nibble[None, :]
    out = out_ptr + token * rows * 8 + hidden_idx
    rounded = values.to(out_ptr.dtype.element_ty)
    tl.store(out, rounded, mask=hidden_idx < rows * 8)
    if NORM:
        s32 = rounded.to(tl.float32)  # past the row's end: codes 0 times scale 0, so nothing in the sum
        w = tl.load(w_ptr + hidden_idx, mask=hidden_idx < rows * 8, other=0.0).to(tl.float32)
        tl.store(sg_ptr + token * rows * 8 + hidden_idx, (s32 * w).to(out_ptr.dtype.element_ty),
                 mask=hidden_idx < rows * 8)
        tl.store(ss_ptr + token * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(s32 * s32, axis=1), axis=0))


def _check(ids, qweight, scales, group_size: int, dtype) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.dtype != torch.int32 or scales.dtype != torch.float16:
        raise ValueError(f"qweight must be int32 and scales float16, got {qweight.dtype} / {scales.dtype}")
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be float16, bfloat16 or float32, got {dtype}")
    if qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"qweight [hidden/8, vocab] and scales [hidden/G, vocab] must be 2-D, got "
                         f"{tuple(qweight.shape)} / {tuple(scales.shape)}")
    hidden = qweight.shape[0] * PACK
    if hidden == 0 or hidden % group_size or tuple(scales.shape) != (hidden // group_size, qweight.shape[1]):
        raise ValueError(f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)} "
                         f"(hidden {hidden}) at group {group_size}")
    if ids.device != qweight.device or ids.device != scales.device:
        raise ValueError(f"ids, qweight and scales must share a device ({ids.device}, {qweight.device}, "
                         f"{scales.device})")


def _check_ids_in_range(flat_ids: torch.Tensor, vocab: int) -> None:
    """One min/max reduction and one device->host copy, not a per-element check."""
    lo, hi = torch.stack(torch.aminmax(flat_ids)).tolist()
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range [0, {vocab}) for this embedding table")


def embedding_int4(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32, check_ids: bool = True, norm_weight: torch.Tensor | None = None):
    """Triton: rows ``ids`` (any shape) of the packed table -> ``[*ids.shape, hidden]`` in ``dtype``.

    The id range check costs a device->host sync (~60 us on an H100, most of a decode step's lookup) and cannot
    run inside a CUDA graph capture; callers whose ids are already validated (the engine) pass ``check_ids=False``.
    ``norm_weight [hidden]``: return ``(rows, rows * w, sums [tokens, tiles])`` instead, the first half of the
    RMSNorm that follows (``runtime.linear.Prenormed``), in the same launch.
    """
    _check(ids, qweight, scales, group_size, dtype)
    if ids.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"embedding_int4 runs on CUDA (or under TRITON_INTERPRET=1); got {ids.device}, "
                         "use embedding_int4_reference on CPU")
    if qweight.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight and scales need a contiguous last (vocab) dim")
    rows, vocab = qweight.shape
    if norm_weight is not None and (norm_weight.shape != (rows * PACK,) or norm_weight.stride(0) != 1
                                    or norm_weight.device != ids.device):
        raise ValueError(f"norm_weight must be a contiguous [{rows * PACK}] tensor on {ids.device}")
    out = torch.empty(*ids.shape, rows * PACK, dtype=dtype, device=ids.device)
    flat = ids.reshape(-1).contiguous()  # a strided 1-D view would reshape to itself
    block_r = min(MAX_BLOCK_R, triton.next_power_of_2(rows))
    grid = (flat.numel(), triton.cdiv(rows, block_r))
    sg = torch.empty_like(out) if norm_weight is not None else out
    sums = torch.empty(flat.numel(), grid[1], dtype=torch.float32, device=ids.device) if norm_weight is not None \
        else out
    if flat.numel():
        if check_ids:
            _check_ids_in_range(flat, vocab)
        w = norm_weight if norm_weight is not None else out
        _embedding_int4_kernel[grid](flat, qweight, scales, out, qweight.stride(0), scales.stride(0), rows, w, sg,
                                     sums, GROUP=group_size, BLOCK_R=block_r, NORM=norm_weight is not None,
                                     num_warps=4 if block_r >= 32 else 1)
    return out if norm_weight is None else (out, sg, sums)


def embedding_int4_reference(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch, same contract (any device): dequantize only the gathered columns, in fp32."""
    _check(ids, qweight, scales, group_size, dtype)
    flat = ids.reshape(-1).long()
    if flat.numel():
        _check_ids_in_range(flat, qweight.shape[1])
    codes = unpack(qweight[:, flat])  # [hidden, tokens]
    col_scales = scales[:, flat].float().repeat_interleave(group_size, 0)
    values = (codes.float() - ZERO) * col_scales
    return values.T.to(dtype).contiguous().reshape(*ids.shape, qweight.shape[0] * PACK)
