"""The Mamba2 decode step in two launches: (conv + selective state update + gate), then (group norm + conv shift).

Unfused, a Mamba layer's step between its two projections is three kernels: the causal-conv update
(``conv_update.py``), the state update (``ssm_update.py``) and the gated-norm tail (``elementwise.group_rms_norm``).
Inside a CUDA graph at batch 1 each costs a launch gap and a tail, a fixed cost that does not shrink with the
rung. Here the conv moves into the state update and the conv-state shift into the norm:

1. ``ssm_conv_step``: grid ``(batch, H, cdiv(P', BLOCK_P))`` as the state update. Each program computes the conv
   of the channels it needs straight from the conv state and this step's ``xbc`` column: its head's x channels
   ``c * H + h`` and its group's B/C channels (``n * G + g``; recomputed by every program of the group: 2 N' W
   multiply-adds, nothing next to the ``P' x N'`` state tile), then advances the SSM state in place. It only
   READS the conv state: programs of one group share B/C channels, so none may shift them under another.
2. ``group_norm_shift``: grid ``(batch, norm groups + cdiv(ch', 256))``; the first programs do the norm of
   ``elementwise.group_rms_norm``, the others shift 256 conv channels each (drop the oldest column, append
   ``xbc``). Stream order puts it after every read of step 1.

Shapes and layouts are those of the two kernels it fuses: ``xbc [batch, ch']`` (x | B | C of the kept channels,
any strides), conv weight/bias as three row segments (the kept prefixes of x, B, C), states as stacked tensors or
int64 tables of per-request addresses, ``dt [batch, H]`` raw (bias, softplus and the limit are applied here),
``z [batch, H, P']`` any strides. Results equal ``conv_update`` + ``ssm_update`` + ``group_rms_norm``
(``ssm_conv_step_reference`` / ``group_norm_shift_reference`` compose those references).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import conv_update as _conv
from . import elementwise as _ew
from . import ssm_update as _ssm
from .conv_update import _TL_DTYPES, ACTIVATIONS, _activate
from .switches import switch

SHIFT_BLOCK = 256  # conv channels a shift program moves (one load and one store of its [256, W-1] tile)


def fused_enabled() -> bool:
    """Off unless ``UNIQL_SSM_FUSED=1`` (read when a Mamba mixer is built, not per step). The same-run H200 A/B
    (benchmarks/ssm_decode_gpu.py --ab-fused, results/ssm_decode_h200.json) found these two launches SLOWER
    than the unfused three: Mamba2-8B shape TPOT 3.00 / 3.01 ms at rates 0 / 0.35 vs 2.54 / 2.17 ms
    (every program of a group recomputes its group's B/C conv channels: 2 N' W multiply-adds per program).
    Kept, tested, as the opt-in for further work."""
    return switch("UNIQL_SSM_FUSED") == "1"


@triton.jit
def _conv_base(conv_ptr, b, cs_b, TABLE: tl.constexpr, CONV_DTYPE: tl.constexpr):
    """Row ``b``'s conv state: a table row's own contiguous ``[ch', W-1]`` or a slice of a stacked tensor."""
    if TABLE:  # noqa: SIM108 (a constexpr branch)
        base = tl.load(conv_ptr + b).to(tl.pointer_type(CONV_DTYPE))
    else:
        base = conv_ptr + b.to(tl.int64) * cs_b
    return base


@triton.jit
def _conv_of(xbc_row, x_c, conv_base, cs_c, cs_k, ch, w_ptr, w_r, w_k, bias_ptr, b_s, row, live,
             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, W: tl.constexpr):
    """act(conv) fp32 of channels ``ch`` (xbc / conv-state index) whose parameters sit at ``row`` of a segment."""
    acc = tl.zeros(ch.shape, dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row * b_s, mask=live, other=0.0).to(tl.float32)
    for k in tl.static_range(W - 1):
        past = tl.load(conv_base + ch * cs_c + k * cs_k, mask=live, other=0.0).to(tl.float32)
        acc += past * tl.load(w_ptr + row * w_r + k * w_k, mask=live, other=0.0).to(tl.float32)
    new = tl.load(xbc_row + ch * x_c, mask=live, other=0.0).to(tl.float32)
    acc += new * tl.load(w_ptr + row * w_r + (W - 1) * w_k, mask=live, other=0.0).to(tl.float32)
    return _activate(acc, ACT)


@triton.jit
def _conv_step_kernel(xbc_ptr, conv_ptr, wx, wb, wc, bx, bb, bc, state_ptr, dt_ptr, a_ptr, d_ptr, z_ptr, dtb_ptr,
                      out_ptr, x_b, x_c, cs_b, cs_c, cs_k, wx_r, wb_r, wc_r, w_k, bx_s, bb_s, bc_s,
                      s_b, s_h, s_p, s_n, dt_b, dt_h, z_b, z_h, z_p, o_b, o_h, o_p,
                      H, G, heads_per_group, P, N, dt_lo, dt_hi,
                      TABLE: tl.constexpr, CONV_DTYPE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                      ACT: tl.constexpr, W: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                      HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // heads_per_group
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    live_p, live_n = p < P, n < N
    conv_base = _conv_base(conv_ptr, b, cs_b, TABLE, CONV_DTYPE)
    xbc_row = xbc_ptr + b.to(tl.int64) * x_b
    x_row, bc_row = p * H + h, n * G + g  # rank-major x channel, state-major B/C row
    x = _conv_of(xbc_row, x_c, conv_base, cs_c, cs_k, x_row, wx, wx_r, w_k, bx, bx_s, x_row, live_p,
                 HAS_CONV_BIAS, ACT, W)
    bv = _conv_of(xbc_row, x_c, conv_base, cs_c, cs_k, H * P + bc_row, wb, wb_r, w_k, bb, bb_s, bc_row, live_n,
                  HAS_CONV_BIAS, ACT, W)
    cv = _conv_of(xbc_row, x_c, conv_base, cs_c, cs_k, H * P + G * N + bc_row, wc, wc_r, w_k, bc, bc_s, bc_row,
                  live_n, HAS_CONV_BIAS, ACT, W)
    # the unfused conv hands the state update its output rounded to xbc's dtype: round here too
    x = x.to(xbc_ptr.dtype.element_ty).to(tl.float32)
    bv = bv.to(xbc_ptr.dtype.element_ty).to(tl.float32)
    cv = cv.to(xbc_ptr.dtype.element_ty).to(tl.float32)
    s_ptrs = _ssm._state_tile(state_ptr, b, h, p, n, s_b, s_h, s_p, s_n, P, N, TABLE)
    dt = _ssm._time_step(tl.load(dt_ptr + b * dt_b + h * dt_h).to(tl.float32), dtb_ptr, h, dt_lo, dt_hi,
                         HAS_DT_BIAS, SOFTPLUS, CLAMP)
    a = tl.load(a_ptr + h).to(tl.float32)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + b * z_b + h * z_h + p * z_p, mask=live_p, other=0.0).to(tl.float32)
    y = _ssm._advance(s_ptrs, live_p[:, None] & live_n[None, :], x, dt, a, bv, cv, d_ptr, h, z, HAS_D, HAS_Z)
    tl.store(out_ptr + b * o_b + h * o_h + p * o_p, y.to(out_ptr.dtype.element_ty), mask=live_p)


@triton.jit
def _norm_shift_kernel(g_ptr, w_ptr, out_ptr, s_b, s_h, s_p, s_ob, heads, p, heads_per_group, eps, groups,
                       xbc_ptr, x_b, x_c, conv_ptr, cs_b, cs_c, cs_k, CH,
                       TABLE: tl.constexpr, CONV_DTYPE: tl.constexpr, W: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """Programs ``< groups`` normalise one group each; the others shift ``BLOCK_C`` conv channels each (a wide
    grid: a few programs walking every channel serially would cost more than the launch this saves)."""
    b, pid = tl.program_id(0), tl.program_id(1)
    if pid < groups:
        _ew._group_rms_tile(g_ptr, w_ptr, out_ptr, b, pid, s_b, s_h, s_p, s_ob, heads, p, heads_per_group, eps,
                            BLOCK_H, BLOCK_P)
    else:
        c = (pid - groups) * BLOCK_C + tl.arange(0, BLOCK_C)
        k = tl.arange(0, BLOCK_W)
        live_c = c < CH
        rows = _conv_base(conv_ptr, b, cs_b, TABLE, CONV_DTYPE) + c[:, None] * cs_c
        keep = live_c[:, None] & (k[None, :] < W - 2)  # columns 1..W-2 move one to the left
        moved = tl.load(rows + (k[None, :] + 1) * cs_k, mask=keep, other=0.0)
        new = tl.load(xbc_ptr + b.to(tl.int64) * x_b + c * x_c, mask=live_c, other=0.0).to(CONV_DTYPE)
        tile = tl.where(k[None, :] == W - 2, new[:, None], moved)
        tl.debug_barrier()  # every column read before any lane rewrites it (a layout may split a row)
        tl.store(rows + k[None, :] * cs_k, tile, mask=live_c[:, None] & (k[None, :] < W - 1))


def _check_conv_state(conv_state, batch: int, ch: int, width: int, conv_dtype) -> None:
    if _ssm.is_table(conv_state):
        if conv_state.shape != (batch,) or conv_dtype not in _conv.FLOAT_DTYPES:
            raise ValueError(f"a conv state table must be int64 ({batch},) with its states' float conv_dtype")
    elif conv_state.shape != (batch, ch, width - 1):
        raise ValueError(f"conv state must be [batch, ch', W-1] = ({batch}, {ch}, {width - 1}), "
                         f"got {tuple(conv_state.shape)}")


def _check(xbc, conv_state, weights, biases, state, conv_dtype) -> int:
    """Shape checks of launch 1 (its operands are those of the kernels it fuses); returns W."""
    batch, ch = xbc.shape
    width = _conv._check_params(weights, biases, ch)
    if len(weights) != 3:
        raise ValueError("the fused step needs the conv weight as three segments (x | B | C)")
    if _ssm.is_table(conv_state) != _ssm.is_table(state):
        raise ValueError("conv and SSM states must both be tensors or both be address tables")
    _check_conv_state(conv_state, batch, ch, width, conv_dtype)
    return width


def _conv_state_strides(conv_state: torch.Tensor, width: int) -> tuple[int, int, int]:
    return (0, width - 1, 1) if _ssm.is_table(conv_state) else conv_state.stride()


def ssm_conv_step(xbc: torch.Tensor, conv_state: torch.Tensor, weight: Sequence[torch.Tensor],
                  bias: Sequence[torch.Tensor] | None, activation: str | None, state: torch.Tensor,
                  dt: torch.Tensor, A: torch.Tensor, heads: int, groups: int, D: torch.Tensor | None = None,
                  z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                  dt_limit: tuple[float, float] | None = None, conv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch 1: conv of ``xbc`` against the conv state (read only) + the state update (in place) + D + gate.

    ``weight``: the x, B, C conv weight prefixes ``[rows, W]`` (one column stride); ``bias`` likewise or None.
    Returns ``y [batch, H, P']`` in xbc's dtype; call ``group_norm_shift`` next (it shifts the conv state)."""
    weights, biases = list(weight), list(bias or [])
    width = _check(xbc, conv_state, weights, biases, state, conv_dtype)
    batch = xbc.shape[0]
    p, n = weights[0].shape[0] // heads, weights[1].shape[0] // groups
    if p * heads != weights[0].shape[0] or n * groups != weights[1].shape[0] or weights[2].shape != weights[1].shape:
        raise ValueError(f"conv segments {[tuple(w.shape) for w in weights]} do not split into {heads} heads and "
                         f"{groups} groups")
    # the state update's own checks (state fp32 or a table, dt [batch, H], A/D/dt_bias [H] contiguous, z like y)
    _ssm.check_step_operands(state, dt, A, D, z, dt_bias, (batch, heads, p, n),
                             (xbc, conv_state, *weights, *biases))
    out = torch.empty(batch, heads, p, dtype=xbc.dtype, device=xbc.device)
    block_p, block_n = _ssm.block_sizes(p, n)
    table = _ssm.is_table(state)
    bs = biases or weights
    lo, hi = dt_limit if dt_limit is not None else (0.0, float("inf"))
    _conv_step_kernel[(batch, heads, triton.cdiv(p, block_p))](
        xbc, conv_state, *weights, *bs, state, dt, A, D, z, dt_bias, out, *xbc.stride(),
        *_conv_state_strides(conv_state, width), *(w.stride(0) for w in weights), weights[0].stride(1),
        *((b.stride(0) for b in biases) if biases else (0, 0, 0)),
        *((0, p * n, n, 1) if table else state.stride()), *dt.stride(),
        *(z.stride() if z is not None else (0, 0, 0)), *out.stride(), heads, groups, heads // groups, p, n,
        float(lo), float(hi), TABLE=table, CONV_DTYPE=_TL_DTYPES[conv_dtype if table else conv_state.dtype],
        HAS_CONV_BIAS=bool(biases), ACT=ACTIVATIONS[activation], W=width, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=dt_limit is not None,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4 if block_p * block_n >= 2048 else 2)
    return out


def group_norm_shift(g: torch.Tensor, weight: torch.Tensor, groups: int, eps: float, xbc: torch.Tensor,
                     conv_state: torch.Tensor, width: int, out_dtype: torch.dtype | None = None,
                     conv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch 2: ``elementwise.group_rms_norm(g, weight, groups, eps)`` (rank-major ``[B, P' * H]``) and the
    conv-state shift of step 1 (drop the oldest of the ``width - 1`` columns, append ``xbc``), in place."""
    batch, heads, p = g.shape
    ch = xbc.shape[1]
    _ew.check_group_norm(g, weight, groups)
    _check_conv_state(conv_state, batch, ch, width, conv_dtype)
    table = _ssm.is_table(conv_state)
    out = torch.empty(batch, p * heads, dtype=out_dtype or g.dtype, device=g.device)
    per_group = heads // groups
    _norm_shift_kernel[(batch, groups + triton.cdiv(ch, SHIFT_BLOCK))](
        g, weight, out, *g.stride(), out.stride(0), heads, p, per_group, eps, groups, xbc, *xbc.stride(), conv_state,
        *_conv_state_strides(conv_state, width), ch, TABLE=table,
        CONV_DTYPE=_TL_DTYPES[conv_dtype if table else conv_state.dtype], W=width,
        BLOCK_H=triton.next_power_of_2(per_group), BLOCK_P=triton.next_power_of_2(p), BLOCK_C=SHIFT_BLOCK,
        BLOCK_W=triton.next_power_of_2(width - 1), num_warps=4)
    return out


def ssm_conv_step_reference(xbc, conv_state, weight, bias, activation, state, dt, A, heads: int, groups: int,
                            D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None) -> torch.Tensor:
    """Torch: the conv reference on a copy of the conv state (launch 1 does not shift it), then the state update
    reference (in place). ``conv_state``/``state`` tensors or lists of per-request states, as the references."""
    scratch = conv_state.clone() if isinstance(conv_state, torch.Tensor) else [t.clone() for t in conv_state]
    xbc_out = _conv.causal_conv1d_update_reference(xbc, scratch, weight, bias, activation)
    p, n = weight[0].shape[0] // heads, weight[1].shape[0] // groups
    x, B, C = xbc_out.split((heads * p, groups * n, groups * n), dim=-1)
    x = x.unflatten(-1, (p, heads)).transpose(-1, -2)
    B, C = (t.unflatten(-1, (n, groups)).transpose(-1, -2) for t in (B, C))
    return _ssm.selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)


def group_norm_shift_reference(g, weight, groups: int, eps: float, xbc, conv_state) -> torch.Tensor:
    """Torch: the group-norm reference, and the conv state shifted by this step's ``xbc`` (in place)."""
    states = [conv_state] if isinstance(conv_state, torch.Tensor) else conv_state
    rows = [xbc] if isinstance(conv_state, torch.Tensor) else list(xbc)
    for st, new in zip(states, rows, strict=True):
        st.copy_(torch.cat((st[..., 1:], new.to(st.dtype).reshape(st.shape[:-1] + (1,))), dim=-1))
    return _ew.group_rms_norm_reference(g, weight, groups, eps)
