"""Small fused kernels of the decode step: RMSNorm and SiLU(gate) * up, one launch each instead of 3-6.

At batch 1 the decode step is ~12 launches per layer; in a CUDA graph each torch elementwise op costs a launch
gap of about a microsecond and a kernel tail, so the norm (pow, mean, rsqrt, mul, cast, mul) and the gated
activation (silu, mul) are worth one kernel each. Both round exactly where the torch modules do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    live = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the module casts back before the weight
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    live = cols < n
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=live, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n + cols, mask=live, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # silu in fp32, rounded like F.silu's output
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=live)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim, one program a row."""
    if x.shape[-1] != weight.shape[0] or x.device != weight.device:
        raise ValueError(f"x [..., {x.shape[-1]}] and weight {tuple(weight.shape)} must match, same device")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    n = x2.shape[1]
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=block,
                                     num_warps=4 if block >= 2048 else 2)
    return out.reshape(x.shape[:-1] + (n,))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [..., 2n]`` = gate | up side by side (the fused gate|up output)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up needs an even last dim (gate | up), got {gate_up.shape[-1]}")
    g2 = _rows(gate_up)
    n = g2.shape[1] // 2
    out = torch.empty(g2.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](g2, out, g2.stride(0), out.stride(0), n, BLOCK=block,
                                                           num_warps=4)
    return out.reshape(gate_up.shape[:-1] + (n,))


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
