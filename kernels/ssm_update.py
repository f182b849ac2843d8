"""Mamba2 selective state update: one decode step of the SSM over (possibly pruned) head and state dims.

Per head ``h`` (group ``g = h // (H / G)``), with the state in fp32 and updated in place::

    dt = dt + dt_bias;  dt = softplus(dt) (if dt_softplus);  dt = clamp(dt, *dt_limit) (if given)
    state = state * exp(dt * A[h]) + dt * x[:, None] * B[g][None, :]        # [P', N']
    y = state @ C[g] + D[h] * x  (D optional);  y = y * silu(z) (z optional)  # [P']

Shapes (``P'``/``N'`` are the rung's kept head dim / state size, any value, not only powers of two):
* ``x [batch, H, P']`` and ``z`` any strides: the runtime's rank-major channels (flat ``c * H + h``) arrive as
  ``flat.view(batch, P', H).transpose(1, 2)``; ``B, C [batch, G, N']`` likewise from rows ``n * G + g``.
* ``dt [batch, H]`` (raw when ``dt_softplus``, else already the time step), ``A, D, dt_bias [H]``.
* the state is either ONE tensor ``[batch, H, P', N']`` fp32 (any strides), or, for an engine batch where every
  request owns its state, an int64 table ``[batch]`` of base addresses, each of a contiguous fp32
  ``[H, P', N']`` (e.g. a request's ``[1, H, P', N']`` cache tensor). All rows of one call share the rung.
Returns ``y [batch, H, P']`` in x's dtype (``out`` may be given, any strides).

Grid ``(batch, H, cdiv(P', BLOCK_P))``: each program owns a ``[BLOCK_P, N']`` tile of one head's state, so the
state is read and written once (the step is memory bound: 2 x 4 bytes x H P' N' per layer). No autotuning:
it would run the in-place update several times.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_ssm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_table(state) -> bool:
    """Whether ``state`` is an int64 address table of per-request states (the engine's decode batches), not the
    states themselves (a tensor, or a list of them)."""
    return isinstance(state, torch.Tensor) and state.dtype == torch.int64


@triton.jit
def _softplus(v):
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)  # threshold as torch's softplus


@triton.jit
def _time_step(dt, dtb_ptr, h, dt_lo, dt_hi, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               CLAMP: tl.constexpr):
    """Raw dt of head ``h`` (fp32) -> the time step: + bias, softplus, clamp (each optional)."""
    if HAS_DT_BIAS:
        dt += tl.load(dtb_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    return dt


@triton.jit
def _advance(state, s_ptrs, live, x, dt, a, bv, cv, d_ptr, h, z, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """The recurrence on one ``[BLOCK_P, BLOCK_N]`` state tile (loaded from ``s_ptrs``, stored back there) ->
    ``y [BLOCK_P]`` fp32, D skip and ``silu(z)`` gate applied when given (``z`` fp32 ``[BLOCK_P]``, ignored
    without HAS_Z)."""
    state = state * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(s_ptrs, state, mask=live)
    y = tl.sum(state * cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    if HAS_Z:
        y *= z * tl.sigmoid(z)
    return y


@triton.jit
def _state_tile(state_ptr, b, h, p, n, s_b, s_h, s_p, s_n, P, N, TABLE: tl.constexpr):
    """Pointers to row ``b``'s state tile of head ``h``: a table row's own ``[H, P, N]`` or a strided tensor."""
    if TABLE:
        s_base = tl.load(state_ptr + b).to(tl.pointer_type(tl.float32)) + h.to(tl.int64) * P * N
    else:
        s_base = state_ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    return s_base + p[:, None] * s_p + n[None, :] * s_n


@triton.jit
def _update_kernel(state_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dtb_ptr, out_ptr,
                   s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n,
                   z_b, z_h, z_p, o_b, o_h, o_p, heads_per_group, P, N, dt_lo, dt_hi,
                   TABLE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                   SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   PDL: tl.constexpr):
    """The state tile is loaded after the PDL wait. (Before it, as nothing just before this kernel writes the
    state, measured even on Mamba2-8B: x0.993-1.001, H100, stop 42, results/stop42_ab_h100.json; removed.)"""
    b, h, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // heads_per_group
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    live_p, live_n = p < P, n < N
    live = live_p[:, None] & live_n[None, :]
    s_ptrs = _state_tile(state_ptr, b, h, p, n, s_b, s_h, s_p, s_n, P, N, TABLE)  # the address table: bound ahead
    pdl_enter(PDL)  # x, dt, B, C and z come from the in-projection
    x = tl.load(x_ptr + b * x_b + h * x_h + p * x_p, mask=live_p, other=0.0).to(tl.float32)
    dt = _time_step(tl.load(dt_ptr + b * dt_b + h * dt_h).to(tl.float32), dtb_ptr, h, dt_lo, dt_hi,
                    HAS_DT_BIAS, SOFTPLUS, CLAMP)
    a = tl.load(a_ptr + h).to(tl.float32)
    bv = tl.load(b_ptr + b * b_b + g * b_g + n * b_n, mask=live_n, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b * c_b + g * c_g + n * c_n, mask=live_n, other=0.0).to(tl.float32)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + b * z_b + h * z_h + p * z_p, mask=live_p, other=0.0).to(tl.float32)
    state = tl.load(s_ptrs, mask=live, other=0.0)
    y = _advance(state, s_ptrs, live, x, dt, a, bv, cv, d_ptr, h, z, HAS_D, HAS_Z)
    tl.store(out_ptr + b * o_b + h * o_h + p * o_p, y.to(out_ptr.dtype.element_ty), mask=live_p)


def _check(state, x, dt, A, B, C, D, z, dt_bias, out) -> None:
    batch, heads, p = x.shape
    if x.dtype not in FLOAT_DTYPES or out.dtype != x.dtype:
        raise ValueError(f"x and out must share one float dtype, got {x.dtype}, {out.dtype}")
    if B.dim() != 3 or B.shape != C.shape or B.shape[0] != batch or heads % B.shape[1]:
        raise ValueError(f"B, C [batch, G, N'] with H a multiple of G: got {tuple(B.shape)}, {tuple(C.shape)} "
                         f"for x {tuple(x.shape)}")
    if out.shape != x.shape:
        raise ValueError(f"out must be shaped like x {tuple(x.shape)}, got {tuple(out.shape)}")
    check_step_operands(state, dt, A, D, z, dt_bias, (batch, heads, p, B.shape[2]), (x, B, C, out))


def check_step_operands(state, dt, A, D, z, dt_bias, dims: tuple[int, int, int, int], others=()) -> None:
    """The state and per-head operands of one step: ``dims`` = (batch, H, P', N'); ``others`` are further tensors
    that must share the device."""
    batch, heads, p, n = dims
    if dt.shape != (batch, heads) or A.shape != (heads,):
        raise ValueError(f"dt [batch, H], A [H]: got {tuple(dt.shape)}, {tuple(A.shape)} for batch {batch}, "
                         f"H {heads}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and (t.shape != (heads,) or t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [H] = ({heads},) tensor")
    if A.stride(0) != 1:
        raise ValueError("A must be contiguous")
    if z is not None and z.shape != (batch, heads, p):
        raise ValueError(f"z must be shaped like x {(batch, heads, p)}, got {tuple(z.shape)}")
    if state.dtype == torch.int64:
        if state.shape != (batch,) or not state.is_contiguous():
            raise ValueError(f"a state address table must be a contiguous int64 ({batch},) tensor")
    elif state.dtype != torch.float32 or state.shape != (batch, heads, p, n):
        raise ValueError(f"state must be fp32 [batch, H, P', N'] = ({batch}, {heads}, {p}, {n}) or an "
                         f"int64 address table, got {state.dtype} {tuple(state.shape)}")
    devices = {t.device for t in (state, dt, A, D, z, dt_bias, *others) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_reference(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    """The kernel's checks, with ``state`` also a list of per-request fp32 states (one ``H * P' * N'`` each)."""
    if isinstance(state, torch.Tensor):
        _check(state, x, dt, A, B, C, D, z, dt_bias, x)
        return
    size = x.shape[1] * x.shape[2] * B.shape[-1]
    if len(state) != x.shape[0] or any(t.dtype != torch.float32 or t.numel() != size or t.device != x.device
                                       for t in state):
        raise ValueError(f"a list of states needs one fp32 state of H * P' * N' = {size} elements per row of x "
                         f"({x.shape[0]}) on {x.device}, got {[(t.dtype, t.numel(), str(t.device)) for t in state]}")
    _check(x.new_zeros(x.shape[0], dtype=torch.int64), x, dt, A, B, C, D, z, dt_bias, x)  # a table stands in


def block_sizes(p: int, n: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_N)``: all N' states in one tile (B/C read once), about 1024 state elements a program.

    The step is latency bound at batch 1: more, smaller programs keep more loads in flight. H100, Mamba2-8B shape
    (results/ssm_update_probe_h100.json, the update alone, 4 warps): 8 head channels a program 5.1 / 4.4 us a layer
    at rates 0 / 0.35 against 6.1 / 5.7 with the former 32 (about 4096 elements); in the engine with the 2 warps
    ``launch_config`` gives it (same machine, two alternating rounds, results/envab_ssm_block_p_h100.json) TPOT
    2.503-2.504 / 2.056-2.057 ms against 2.573-2.576 / 2.151, ratio 0.821 against 0.836."""
    block_n = max(16, triton.next_power_of_2(n))
    return min(triton.next_power_of_2(p), max(4, 1024 // block_n)), block_n


def launch_config(p: int, n: int) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_N, num_warps)`` of a step (benchmarks/ssm_update_probe.py times the alternatives).
    ``UNIQL_SSM_BLOCK_P=R`` (experiment, for engine A/Bs): at most R head channels a program (more programs)."""
    block_p, block_n = block_sizes(p, n)
    raw = os.environ.get("UNIQL_SSM_BLOCK_P", "")
    if raw:
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # isdigit() alone takes '²', int() does not
            raise ValueError(f"UNIQL_SSM_BLOCK_P must be a positive integer, got {raw!r}")
        block_p = min(block_p, triton.next_power_of_2(int(raw)))
    return block_p, block_n, 4 if block_p * block_n >= 2048 else 2


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False, dt_limit: tuple[float, float] | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step (Triton); ``state`` (tensor or address table, see the module doc) is updated in place.

    Returns ``y [batch, H, P']``. Addresses in a table are trusted: the runtime builds them from live caches.
    (Two experiments that normalised inside this launch, the gated norm begun here and finished by out_proj's
    GEMV, or done here by each norm group's last program, lost the H100 engine A/Bs and were removed, stop 35.)
    """
    batch, heads, p = x.shape
    n = B.shape[-1]
    if out is None:
        out = torch.empty(batch, heads, p, dtype=x.dtype, device=x.device)
    _check(state, x, dt, A, B, C, D, z, dt_bias, out)
    block_p, block_n, warps = launch_config(p, n)
    table = state.dtype == torch.int64
    s_strides = (0, p * n, n, 1) if table else state.stride()
    zs = z.stride() if z is not None else (0, 0, 0)
    lo, hi = dt_limit if dt_limit is not None else (0.0, float("inf"))
    pdl = pdl_ssm(x.device, batch)
    _update_kernel[(batch, heads, triton.cdiv(p, block_p))](
        state, x, dt, A, B, C, D, z, dt_bias, out, *s_strides, *x.stride(), *dt.stride(), *B.stride(),
        *C.stride(), *zs, *out.stride(), heads // B.shape[1], p, n, float(lo), float(hi),
        TABLE=table, HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, CLAMP=dt_limit is not None, BLOCK_P=block_p, BLOCK_N=block_n, PDL=pdl,
        num_warps=warps, launch_pdl=pdl)
    return out


def selective_state_update_reference(state: torch.Tensor | list[torch.Tensor], x: torch.Tensor, dt: torch.Tensor,
                                     A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                                     z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                                     dt_softplus: bool = False, dt_limit: tuple[float, float] | None = None
                                     ) -> torch.Tensor:
    """Plain torch, same contract as the kernel; ``state`` is ``[batch, H, P', N']`` fp32 or a list of
    ``batch`` per-request fp32 states of ``H * P' * N'`` elements each (``[1, H, P', N']`` or ``[H, P', N']``),
    updated in place. Returns ``y [batch, H, P']`` in x's dtype. Checked as the kernel is: broadcasting would
    otherwise take a ``dt [batch, 1]`` or ``A [1]`` the GPU refuses."""
    _check_reference(state, x, dt, A, B, C, D, z, dt_bias)
    heads = x.shape[1]
    rep = heads // B.shape[1]
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(*dt_limit)
    Bh = B.float().repeat_interleave(rep, dim=1)  # [batch, H, N']
    Ch = C.float().repeat_interleave(rep, dim=1)
    xf = x.float()
    s = state if isinstance(state, torch.Tensor) else torch.stack([t.view(x.shape[1:] + B.shape[-1:])
                                                                  for t in state])
    new = s * torch.exp(dt * A.float())[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + D.float()[:, None] * xf
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    if isinstance(state, torch.Tensor):
        state.copy_(new)
    else:
        for t, row in zip(state, new, strict=True):
            t.copy_(row.view(t.shape))
    return y.to(x.dtype)
