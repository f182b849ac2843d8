"""Small fused kernels of the decode step: residual add + RMSNorm and SiLU(gate) * up, one launch each.

At batch 1 the decode step is ~12 launches per layer; in a CUDA graph each torch elementwise op costs a launch
gap of about a microsecond and a kernel tail, so the norm (pow, mean, rsqrt, mul, cast, mul) and the gated
activation (silu, mul) are worth one kernel each; the residual add of the previous block rides along with the
next norm (``add_rms_norm``), which also keeps the chain of programmatic dependent launches (``pdl.py``)
unbroken. All round exactly where the torch modules do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_enter, pdl_ssm


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_d, stride_s, stride_o, n, eps,
                     BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride passes 2^31 on long prompts
    cols = tl.arange(0, BLOCK)
    live = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0)
    if ADD:  # the residual stream: x + d rounded to its dtype first, as torch's add does
        d = tl.load(d_ptr + row * stride_d + cols, mask=live, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=live)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)  # the module casts back before the weight
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: a 128k-token prefill's gate|up
    cols = blk * BLOCK + tl.arange(0, BLOCK)  # (Llama-8B: 28672 a row) passes 2^31 elements
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
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (the residual stream) and ``rms_norm(s)``, in one launch; returns ``(s, normed)``."""
    if delta.shape != x.shape or delta.device != x.device:
        raise ValueError(f"residual {tuple(x.shape)} on {x.device} and block output {tuple(delta.shape)} on "
                         f"{delta.device} must have one shape and device")
    return _norm(x, delta, weight, eps)


def _norm(x, delta, weight, eps):
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n or x.device != weight.device:
        raise ValueError(f"x [..., {n}] and weight {tuple(weight.shape)} must match, same device")
    if n > 1 and weight.stride(0) != 1:  # the kernel reads weight[col] at stride 1
        raise ValueError(f"the norm weight must be contiguous, got stride {weight.stride(0)}")
    x2 = _rows(x)
    d2 = x2 if delta is None else _rows(delta)
    summed = x2 if delta is None else torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, delta.dtype),
                                                    device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(summed.dtype, weight.dtype), device=x.device)
    block, pdl = triton.next_power_of_2(n), pdl_enabled(x.device, x2.shape[0])
    _rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, summed, out, x2.stride(0), d2.stride(0), summed.stride(0),
                                     out.stride(0), n, eps, BLOCK=block, ADD=delta is not None, PDL=pdl,
                                     num_warps=4 if block >= 2048 else 2, launch_pdl=pdl)
    shape = x.shape[:-1] + (n,)
    return (x if delta is None else summed.reshape(shape)), out.reshape(shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    summed = x + delta
    return summed, rms_norm_reference(summed, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [..., 2n]`` = gate | up side by side (the fused gate|up output)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up needs an even last dim (gate | up), got {gate_up.shape[-1]}")
    g2 = _rows(gate_up)
    n = g2.shape[1] // 2
    out = torch.empty(g2.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    pdl = pdl_enabled(gate_up.device, g2.shape[0])
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](g2, out, g2.stride(0), out.stride(0), n, BLOCK=block,
                                                           PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out.reshape(gate_up.shape[:-1] + (n,))


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _group_rms_tile(g_ptr, w_ptr, out_ptr, b, grp, s_b, s_h, s_p, s_ob, heads, p, heads_per_group, eps,
                    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Row ``b``, group ``grp``: its heads' ``g`` normalised together, weighted, stored rank-major."""
    local = tl.arange(0, BLOCK_H)
    h = grp * heads_per_group + local
    c = tl.arange(0, BLOCK_P)
    live = (local < heads_per_group)[:, None] & (c < p)[None, :]
    g = tl.load(g_ptr + b * s_b + h[:, None] * s_h + c[None, :] * s_p, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(g * g, 1), 0) / (heads_per_group * p) + eps)
    rank_major = c[None, :] * heads + h[:, None]  # channel c of head h sits at c * H + h
    w = tl.load(w_ptr + rank_major, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * s_ob + rank_major, (g * rstd * w).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _group_rms_kernel(g_ptr, w_ptr, out_ptr, s_b, s_h, s_p, s_ob, heads, p, heads_per_group, eps,
                      BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    _group_rms_tile(g_ptr, w_ptr, out_ptr, tl.program_id(0), tl.program_id(1), s_b, s_h, s_p, s_ob, heads, p,
                    heads_per_group, eps, BLOCK_H, BLOCK_P)


def check_group_norm(g: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    """``g [B, H, P']`` and a 1-D ``weight`` prefix of >= H * P' channels, read rank-major at stride 1."""
    _, heads, p = g.shape
    if groups < 1 or heads % groups or weight.dim() != 1 or weight.shape[0] < heads * p \
            or weight.device != g.device:
        raise ValueError(f"g [B, H={heads}, P'={p}] needs H divisible by {groups} groups and a 1-D weight of >= "
                         f"{heads * p} channels on its device, got {tuple(weight.shape)} on {weight.device}")
    if heads * p > 1 and weight.stride(0) != 1:
        raise ValueError(f"the group norm weight must be contiguous, got stride {weight.stride(0)}")


def group_rms_norm(g: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mamba2's gated-norm tail for one token per row: ``g [B, H, P']`` (already ``y * silu(z)``, any strides)
    normalised over each group of ``H / groups`` heads' kept channels, times the rank-major ``weight`` prefix,
    written rank-major ``[B, P' * H]`` (what out_proj reads). One launch instead of ~9 torch ops."""
    b, heads, p = g.shape
    check_group_norm(g, weight, groups)
    out = torch.empty(b, p * heads, dtype=out_dtype or g.dtype, device=g.device)
    per_group, pdl = heads // groups, pdl_ssm(g.device, b)
    _group_rms_kernel[(b, groups)](g, weight, out, g.stride(0), g.stride(1), g.stride(2), out.stride(0), heads, p,
                                   per_group, eps, BLOCK_H=triton.next_power_of_2(per_group),
                                   BLOCK_P=triton.next_power_of_2(p), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def group_rms_norm_reference(g: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    b, heads, p = g.shape
    g32 = g.float().view(b, groups, heads // groups, p)
    g32 = (g32 * torch.rsqrt(g32.pow(2).mean((-2, -1), keepdim=True) + eps)).view(b, heads, p)
    return (g32 * weight[:heads * p].view(p, heads).T.float()).transpose(1, 2).reshape(b, p * heads)
