"""Fused RoPE for sorted, pruned Q/K head dims: rotates q and k in one launch and writes them head-major.

Input layout (``runtime/decoder.py``): one token's q projection is ``n_heads * qk`` values in rank-major order,
element ``c * n_heads + head`` with channel ``c = 2 * m + t`` (pair ``m`` in importance order, ``t`` = 0 first
member / 1 partner); k likewise over ``n_kv`` heads. Query head ``h`` is in KV group ``h // (n_heads // n_kv)``
and pair ``m`` of group ``g`` turns at the original frequency ``rope_index[g, m]``.

The cos/sin tables ``[T, head_dim/2]`` are per token in the ORIGINAL frequency order (already multiplied by the
attention scaling), so the kernel gathers them through ``rope_index`` instead of the caller building one table
per group. Outputs are ``[heads, T, qk]`` with pairs still interleaved (what attention and the KV cache take):
``out[.., 2m] = x0 c - x1 s`` and ``out[.., 2m+1] = x1 c + x0 s``, computed in fp32, stored in the input dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_enter

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rotate_head(src_ptr, src_row_stride, dst_ptr, cos_ptr, sin_ptr, table_row_stride, idx_ptr, idx_row_stride,
                 token, n_tokens, head, group, heads, half, BLOCK_P: tl.constexpr):
    """One head of one token. The tile is [pair, member], so the store is one contiguous run of ``qk`` values."""
    pair = tl.arange(0, BLOCK_P)
    member = tl.arange(0, 2)
    live = pair < half
    freq = tl.load(idx_ptr + group * idx_row_stride + pair, mask=live, other=0)
    cos = tl.load(cos_ptr + token * table_row_stride + freq, mask=live, other=0.0)[:, None]
    sin = tl.load(sin_ptr + token * table_row_stride + freq, mask=live, other=0.0)[:, None]
    # each value and its partner (the other member of the pair): out = x cos -/+ partner sin
    channel = 2 * pair[:, None] + member[None, :]
    partner = 2 * pair[:, None] + (1 - member[None, :])
    live2 = channel < 2 * half  # the pair mask, broadcast over both members
    row = src_ptr + token * src_row_stride + head
    x = tl.load(row + channel * heads, mask=live2, other=0.0).to(tl.float32)
    x_partner = tl.load(row + partner * heads, mask=live2, other=0.0).to(tl.float32)
    sign = tl.where(member[None, :] == 0, -1.0, 1.0)
    out = x * cos + sign * x_partner * sin
    dst = dst_ptr + (head * n_tokens + token) * (2 * half) + channel
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=live2)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, idx_ptr,
                    q_row_stride, k_row_stride, table_row_stride, idx_row_stride,
                    n_tokens, n_heads, n_kv, half, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """Grid (T, n_heads + n_kv): programs below ``n_heads`` rotate a query head, the rest a KV head."""
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)  # int64 so T * heads * qk offsets cannot overflow on long prompts
    head = tl.program_id(1)
    if head < n_heads:
        _rotate_head(q_ptr, q_row_stride, q_out_ptr, cos_ptr, sin_ptr, table_row_stride, idx_ptr, idx_row_stride,
                     token, n_tokens, head, head // (n_heads // n_kv), n_heads, half, BLOCK_P)
    else:
        kv_head = head - n_heads
        _rotate_head(k_ptr, k_row_stride, k_out_ptr, cos_ptr, sin_ptr, table_row_stride, idx_ptr, idx_row_stride,
                     token, n_tokens, kv_head, kv_head, n_kv, half, BLOCK_P)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, P_full]`` fp32 in original frequency order: the same angles as ``rope_cos_sin``."""
    if inv_freq.dim() != 1 or positions.dim() != 1:
        raise ValueError(f"inv_freq must be [P] and positions [T], got {tuple(inv_freq.shape)} / "
                         f"{tuple(positions.shape)}")
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    return angles.cos() * scaling, angles.sin() * scaling


@triton.jit
def _decode_tables_kernel(len_ptr, freq_ptr, cos_ptr, sin_ptr, half, scaling, SCALE: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    """Row ``b``: the angles of position ``lengths[b] - 1`` (fp32, as ``rope_tables``), their cos and sin. On
    NVIDIA ``tl.cos`` / ``tl.sin`` compile to libdevice's accurate routines (the same PTX as calling libdevice,
    checked for sm_90), not the ``.approx`` instructions: decode angles reach thousands of radians."""
    b = tl.program_id(0)
    pair = tl.arange(0, BLOCK_P)
    live = pair < half
    angle = (tl.load(len_ptr + b) - 1).to(tl.float32) * tl.load(freq_ptr + pair, mask=live, other=0.0)
    cos, sin = tl.cos(angle), tl.sin(angle)
    if SCALE:
        cos, sin = cos * scaling, sin * scaling
    tl.store(cos_ptr + b * half + pair, cos, mask=live)
    tl.store(sin_ptr + b * half + pair, sin, mask=live)


def decode_rope_tables(inv_freq: torch.Tensor, lengths: torch.Tensor, scaling: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_tables`` at positions ``lengths - 1`` (a decode step's new tokens; ``lengths`` int32/int64 ``[B]``
    counts them) in one launch, where torch takes seven small ones (the positions, a cast, the angles, cos, sin and
    two scalings): a few microseconds of every graph-replayed step. Off the GPU (and outside the interpreter) or under
    ``torch.compile`` it is ``rope_tables`` itself."""
    if inv_freq.dim() != 1 or lengths.dim() != 1 or lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"inv_freq must be [P] and lengths int32/int64 [B], got {tuple(inv_freq.shape)} / "
                         f"{lengths.dtype} {tuple(lengths.shape)}")
    if inv_freq.device != lengths.device:
        raise ValueError(f"inv_freq and lengths must share a device, got {inv_freq.device} / {lengths.device}")
    if torch.compiler.is_compiling() or (lengths.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return rope_tables(inv_freq, lengths.long() - 1, scaling)  # torch ops: what torch.compile can trace
    half = inv_freq.shape[0]
    cos = torch.empty(lengths.shape[0], half, dtype=torch.float32, device=lengths.device)
    sin = torch.empty_like(cos)
    if lengths.shape[0]:  # inv_freq is fp32 already (ElasticDecoder keeps it so): no copy
        freqs = inv_freq.float().contiguous()
        _decode_tables_kernel[(lengths.shape[0],)](lengths, freqs, cos, sin, half, float(scaling),
                                                   SCALE=scaling != 1.0, BLOCK_P=triton.next_power_of_2(half))
    return cos, sin


def _check(q, k, cos, sin, rope_index, n_heads: int, n_kv: int, qk: int) -> None:
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv ({n_kv})")
    if qk <= 0 or qk % 2:
        raise ValueError(f"qk (kept channels per head) must be positive and even (whole pairs), got {qk}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must be [T, heads*qk] with the same T, got {tuple(q.shape)} / {tuple(k.shape)}")
    if q.shape[1] != n_heads * qk or k.shape[1] != n_kv * qk:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match n_heads*qk={n_heads * qk} / "
                         f"n_kv*qk={n_kv * qk}")
    if q.dtype not in FLOAT_DTYPES or k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q and k must be float16, bfloat16 or float32, got {q.dtype} / {k.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos/sin tables must be float32 (see rope_tables), got {cos.dtype} / {sin.dtype}")
    p_full = cos.shape[-1]
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != q.shape[0]:
        raise ValueError(f"cos/sin must both be [T={q.shape[0]}, head_dim/2], got {tuple(cos.shape)} / "
                         f"{tuple(sin.shape)}")
    if cos.shape[0] > 1 and cos.stride(0) != sin.stride(0):  # the kernels take one row stride for both tables
        raise ValueError(f"cos and sin must share a row stride, got {cos.stride(0)} / {sin.stride(0)} "
                         "(pass both from one layout, e.g. rope_tables)")
    if qk > 2 * p_full:
        raise ValueError(f"qk={qk} exceeds the head dim {2 * p_full} the tables cover")
    if rope_index.dtype not in INDEX_DTYPES or rope_index.dim() != 2 or rope_index.shape[0] != n_kv \
            or rope_index.shape[1] < qk // 2:
        raise ValueError(f"rope_index must be int32/int64 [n_kv={n_kv}, >= {qk // 2}], got {rope_index.dtype} "
                         f"{tuple(rope_index.shape)}")
    tensors = (q, k, cos, sin, rope_index)
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"all inputs must share a device, got {[str(t.device) for t in tensors]}")
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in tensors):
        raise ValueError("q, k, cos, sin and rope_index need a contiguous last dim (rows may be strided)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_index: torch.Tensor,
            n_heads: int, n_kv: int, qk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: ``q [T, n_heads*qk]``, ``k [T, n_kv*qk]`` rank-major -> ``q_rot [n_heads, T, qk]``,
    ``k_rot [n_kv, T, qk]``. ``rope_index`` values are trusted (the checkpoint loader validates them)."""
    _check(q, k, cos, sin, rope_index, n_heads, n_kv, qk)
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"rope_qk runs on CUDA (or under TRITON_INTERPRET=1); got {q.device}, "
                         "use rope_qk_reference on CPU")
    n_tokens = q.shape[0]
    q_rot = torch.empty(n_heads, n_tokens, qk, dtype=q.dtype, device=q.device)
    k_rot = torch.empty(n_kv, n_tokens, qk, dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_rot, k_rot
    half, pdl = qk // 2, pdl_enabled(q.device, n_tokens)
    _rope_qk_kernel[(n_tokens, n_heads + n_kv)](
        q, k, q_rot, k_rot, cos, sin, rope_index, q.stride(0), k.stride(0), cos.stride(0), rope_index.stride(0),
        n_tokens, n_heads, n_kv, half, BLOCK_P=triton.next_power_of_2(half), PDL=pdl,
        num_warps=1 if half <= 32 else 2, launch_pdl=pdl)
    return q_rot, k_rot


def _rotate_reference(x: torch.Tensor, heads: int, qk: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads*qk]`` rank-major, ``cos/sin [heads, T, qk/2]`` -> ``[heads, T, qk]`` in x's dtype."""
    pairs = x.float().reshape(x.shape[0], qk // 2, 2, heads).permute(3, 0, 1, 2)  # [heads, T, qk/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype).contiguous()


def rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      rope_index: torch.Tensor, n_heads: int, n_kv: int, qk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same contract as ``rope_qk`` (any device)."""
    _check(q, k, cos, sin, rope_index, n_heads, n_kv, qk)
    freq = rope_index[:, : qk // 2].long()  # [n_kv, P]
    cos_kv = cos[:, freq].permute(1, 0, 2)  # [n_kv, T, P]
    sin_kv = sin[:, freq].permute(1, 0, 2)
    rep = n_heads // n_kv
    q_rot = _rotate_reference(q, n_heads, qk, cos_kv.repeat_interleave(rep, 0), sin_kv.repeat_interleave(rep, 0))
    return q_rot, _rotate_reference(k, n_kv, qk, cos_kv, sin_kv)
