"""The packed INT4 weight format every UniQL kernel reads, and its plain-torch reference.

A linear ``W [N, K]`` (out, in) is stored K-major so that both prefixes a rung can keep are plain views:

* ``qweight``: int32 ``[K/8, N]``; word ``(r, n)`` holds the 4-bit codes of ``W[n, 8r .. 8r+7]``, code ``j`` in
  bits ``4j .. 4j+3``. Codes are ``q = clamp(round(w / s) + 8, 0, 15)`` (symmetric, zero point 8).
* ``scales``: float16 ``[K/G, N]``, one scale per group of ``G`` consecutive input columns (G = 32, 64, 128).

An N prefix (gate/up/q/k/v rows) is ``qweight[:, :n]`` and ``scales[:, :n]`` (strided views); a K prefix
(down/o_proj columns, whole int32 words) is ``qweight[:k/8]`` and ``scales[:ceil(k/G)]`` (contiguous views).
A K prefix may end inside a group: its tail columns are simply not read, the group's scale stays valid.
Embeddings use the same tensors: row ``v`` of the table is column ``v`` of ``[K=hidden, N=vocab]``.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit codes per int32 word
ZERO = 8  # symmetric zero point
MAX_CODE = 15
GROUP_SIZES = (32, 64, 128)
FORMAT = {"bits": 4, "symmetric": True, "zero_point": ZERO, "layout": "qweight int32 [K/8, N] K-major; "
          "scales float16 [K/G, N]", "code": "q = clamp(round(w/s)+8, 0, 15), w = (q-8)*s"}
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def check_shape(n: int, k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"input dim {k} is not a multiple of the group size {group_size}; pick a smaller group")
    if n <= 0:
        raise ValueError("empty weight")


def symmetric_scales(w_group: torch.Tensor) -> torch.Tensor:
    """Scale per output row for a block of columns [N, G]: max|w| / 7.5, rounded to float16."""
    amax = w_group.abs().amax(dim=1).clamp_min(1e-8)
    return (amax / 7.5).to(torch.float16)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 for ``w [N, ...]`` with per-row ``scale [N]`` (broadcast over trailing dims)."""
    s = scale.float().view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.float() / s) + ZERO, 0, MAX_CODE).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (uint8 0..15) -> qweight int32 ``[K/8, N]``."""
    n, k = codes.shape
    if k % PACK:
        raise ValueError(f"K={k} must be a multiple of {PACK}")
    words = codes.T.reshape(k // PACK, PACK, n).to(torch.int64)
    packed = (words << _SHIFTS.to(codes.device, torch.int64).view(1, PACK, 1)).sum(1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 ``[K/8, N]`` (or any prefix view) -> codes ``[K, N]`` (int32, 0..15)."""
    rows, n = qweight.shape
    codes = (qweight.unsqueeze(1) >> _SHIFTS.to(qweight.device).view(1, PACK, 1)) & MAX_CODE
    return codes.reshape(rows * PACK, n)


def rtn_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``weight [N, K]`` -> (qweight ``[K/8, N]``, scales ``[K/G, N]``)."""
    n, k = weight.shape
    check_shape(n, k, group_size)
    groups = weight.float().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(-1).clamp_min(1e-8) / 7.5).to(torch.float16)  # [N, K/G]
    codes = torch.clamp(torch.round(groups / scales.float().unsqueeze(-1)) + ZERO, 0, MAX_CODE)
    return pack(codes.to(torch.uint8).reshape(n, k)), scales.T.contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int | None = None,
               n: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization of the active prefix: ``W^T [k, n]`` from views of the stored tensors."""
    k_stored = qweight.shape[0] * PACK
    k = k_stored if k is None else k
    n = qweight.shape[1] if n is None else n
    codes = unpack(qweight[: -(-k // PACK), :n])[:k]
    group_scales = scales[: -(-k // group_size), :n].to(dtype).repeat_interleave(group_size, 0)[:k]
    return (codes.to(dtype) - ZERO) * group_scales


def packed_bytes(k: int, n: int, group_size: int) -> int:
    """Bytes a ``[k, n]`` prefix occupies (codes + scales)."""
    return (-(-k // PACK)) * n * 4 + (-(-k // group_size)) * n * 2
