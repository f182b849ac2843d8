"""Batch-1 decode GEMV whose weights a TMA copy stages in shared memory before its PDL wait (Gluon, sm_90+).

Why: a decode step is ~200 dependent launches, and each costs ~2.5 us beyond its bytes with the split-K GEMV of
``int4_gemv``, whose programs can start streaming weights only once the previous kernel is done (one preloaded tile
aside): registers cannot hold more across the wait. A TMA copy needs no registers. Here a program owns ``BLOCK_N``
output columns and ALL of K (no split-K partials, no finishing round trip, no atomics), queues its whole weight
slice into shared memory before ``griddepcontrol.wait``, and releases the next launch right after it, so a layer's
weights stream while the layer before still computes. ``benchmarks/staged_probe.py`` (stop 50, H100, chains of 32
dependent layers against the production GEMV in the same run): 1.49 us a layer on an all-boundary 512-wide chain
against 2.45; o-sized 4.27-4.35 us against 6.10-6.15; q|k|v-sized 5.78-5.82 against 7.35-7.42. Where the slice does
not fit next to the next layer's (the MLP's 14336-wide K), a ring of chunks lost (x1.17): ``staged_config`` refuses.

Layout: the packed rows are read as two TMA views, the even rows ``2p`` (K 16p .. 16p+7) and the odd ``2p + 1``
(K 16p+8 .. 16p+15), so the production half2 dot (``int4_gemv._dot_asm``: 2 words -> one fp32) takes one word of
each, and one scale row (``16p // group``) serves the pair. A K prefix is a shorter view: TMA fills rows past it
with zeros and the activations there are masked to zero; an N prefix likewise (the stores are masked).

``staged_residual`` is the o GEMV's shape (residual add, s * w and sums of s^2 for the next norm, as
``int4_matmul.int4_residual``), ``norm=`` the q|k|v GEMV's prologue (1 / rms from those sums, as ``int4_matmul``'s).
On the engine's decode path only under ``UNIQL_GEMV_STAGED=1`` (queued, stop 50: ``int4_residual`` routes a one-row o
projection here through ``staged_residual_if_served``); its sm_90 builds are checked in CI
(``benchmarks/sass_staged.py``), its GPU tests are written and have not run yet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .int4_format import PACK, unpack
from .int4_gemv import _ASM_X_F16, _ASM_X_F16_SCALED, _dot_asm, _x_bf16_asm
from .int4_matmul import _check as _check_int4_call
from .pdl import pdl_mode

_ASM_DOT = gl.constexpr(_dot_asm(1))  # 2 words x 8 codes -> sum of (q - 8) / 16 * x in fp32
_CON_DOT = gl.constexpr("=r" + ",r" * 10)
_ASM_X_BF16 = gl.constexpr(_x_bf16_asm(False))  # 8 bf16 (4 int32) -> fp16 pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7)
_ASM_X_F16 = gl.constexpr(_ASM_X_F16.value)  # fp16 activations: the same pairs by PRMTs
_CON_X = gl.constexpr("=r,=r,=r,=r,r,r,r,r")
# with an RMSNorm's 1 / rms (fp32 bits, ``$8``) applied to each activation before its fp16 rounding
_ASM_XS_BF16 = gl.constexpr(_x_bf16_asm(True))
_ASM_XS_F16 = gl.constexpr(_ASM_X_F16_SCALED.value)
_CON_XS = gl.constexpr("=r,=r,=r,=r,r,r,r,r,r")
# triton 3.6 (the lent H100's) names the TMA load async_copy_global_to_shared; 3.9 only async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

PAIR_K = 2 * PACK  # K values of one pair of packed rows
SMEM_BYTES = 227 * 1024  # an sm_90 SM's shared memory for blocks
MAX_BOX_ROWS = 256  # a TMA box's rows
# at most 128 registers a thread: two programs of 8 warps (this layer's and the next's) fit an SM's 64 K (the residual
# epilogue takes 137 unbounded with triton 3.9, and spills nothing at 128)
MAX_REGISTERS = 128


@dataclass(frozen=True)
class StagedConfig:
    block_n: int = 32  # output columns a program
    warps: int = 8
    chunk_rows: int = 256  # pairs of packed rows a TMA box (a power of two, <= 256)


@gluon.jit
def _x_pairs(x_ptr, pair, live, rs_bits, F16: gl.constexpr, HALF: gl.constexpr, NORM: gl.constexpr):
    """The fp16 pairs of the 8 activations of pair ``pair``'s even (HALF 0) or odd (1) packed row; 0 where dead.
    NORM: each activation times the fp32 ``rs_bits`` (int32 bits, one a row) first."""
    base = pair * 8 + HALF * 4  # int32 (two activations each) before it
    w0 = gl.load(x_ptr + base, mask=live, other=0)
    w1 = gl.load(x_ptr + base + 1, mask=live, other=0)
    w2 = gl.load(x_ptr + base + 2, mask=live, other=0)
    w3 = gl.load(x_ptr + base + 3, mask=live, other=0)
    if NORM:
        if F16:
            return gl.inline_asm_elementwise(_ASM_XS_F16, _CON_XS, [w0, w1, w2, w3, rs_bits],
                                             dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
        return gl.inline_asm_elementwise(_ASM_XS_BF16, _CON_XS, [w0, w1, w2, w3, rs_bits],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
    if F16:
        return gl.inline_asm_elementwise(_ASM_X_F16, _CON_X, [w0, w1, w2, w3],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
    return gl.inline_asm_elementwise(_ASM_X_BF16, _CON_X, [w0, w1, w2, w3],
                                     dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)


@gluon.jit
def _scales(s_ptr, pair, cols, col_live, PAIRS, S_STRIDE, G16: gl.constexpr):
    """The scale of each (pair, column): row 16 pair // group of the fp16 scales; 0 past the prefixes."""
    mask = gl.expand_dims(pair < PAIRS, 1) & gl.expand_dims(col_live, 0)
    return gl.load(s_ptr + gl.expand_dims(pair // G16, 1) * S_STRIDE + gl.expand_dims(cols, 0), mask=mask, other=0.0)


@gluon.jit
def _griddep(WAIT: gl.constexpr):
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    else:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _staged_gemv_kernel(x_ptr, wa_desc, wb_desc, s_ptr, out_ptr, N, PAIRS, S_STRIDE, res_ptr, g_ptr, sg_ptr,
                        sums_out_ptr, sums_in_ptr, n_parts, inv_k, eps, CHUNKS: gl.constexpr, RB: gl.constexpr,
                        BN: gl.constexpr, G16: gl.constexpr, SPT: gl.constexpr, TN: gl.constexpr,
                        WARPS: gl.constexpr, F16: gl.constexpr, PDL: gl.constexpr, RES: gl.constexpr,
                        NORM: gl.constexpr, PARTS_P: gl.constexpr):
    """out[n0 : n0 + BN] = x @ W[:PAIRS * 16, n0 : n0 + BN]; x as int32 (activation pairs), W as its even / odd
    packed rows in CHUNKS boxes of RB, all staged before the wait. NORM: x holds s * w of an RMSNorm whose sums of
    s^2 come in ``n_parts`` parts. RES: out = residual + x @ W, plus s * g and this tile's sum of s^2 for the next
    norm (``gemv_norm._residual_tile``'s contract)."""
    L: gl.constexpr = gl.BlockedLayout([1, SPT], [32 // TN, TN], [WARPS, 1], [1, 0])
    n0 = gl.program_id(0) * BN
    wa_s = gl.allocate_shared_memory(gl.int32, [CHUNKS, RB, BN], wa_desc.layout)
    wb_s = gl.allocate_shared_memory(gl.int32, [CHUNKS, RB, BN], wb_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [CHUNKS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CHUNKS):  # the weights depend on no kernel: queued before the wait
        mbarrier.init(bars.index(c), count=1)
        mbarrier.expect(bars.index(c), 2 * RB * BN * 4)
        _tma_load(wa_desc, [c * RB, n0], bars.index(c), wa_s.index(c))
        _tma_load(wb_desc, [c * RB, n0], bars.index(c), wb_s.index(c))
    rows = gl.arange(0, RB, layout=gl.SliceLayout(1, L))
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, L))
    col_live = cols < N
    if RES:  # written two or more kernels back: complete before this one starts (kernels/pdl.py's contract)
        residual = gl.load(res_ptr + cols, mask=col_live, other=0.0)
    scale = _scales(s_ptr, rows, cols, col_live, PAIRS, S_STRIDE, G16)  # the first chunk's: they depend on no kernel
    if PDL:
        _griddep(True)
        _griddep(False)
    rs = 1.0
    if NORM:
        parts = gl.arange(0, PARTS_P, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
        part_sums = gl.load(sums_in_ptr + parts, mask=parts < n_parts, other=0.0)
        rs = 1.0 / gl.sqrt(gl.sum(part_sums, axis=0) * inv_k + eps)
    rs_bits = (gl.zeros([RB], gl.float32, gl.SliceLayout(1, L)) + rs).to(gl.int32, bitcast=True)
    acc = gl.zeros([RB, BN], gl.float32, L)
    for c in gl.static_range(CHUNKS):
        pair = c * RB + rows
        live = pair < PAIRS
        xa0, xa1, xa2, xa3 = _x_pairs(x_ptr, pair, live, rs_bits, F16, 0, NORM)
        xb0, xb1, xb2, xb3 = _x_pairs(x_ptr, pair, live, rs_bits, F16, 1, NORM)
        mbarrier.wait(bars.index(c), 0)
        dot = gl.inline_asm_elementwise(
            _ASM_DOT, _CON_DOT,
            [wa_s.index(c).load(L), wb_s.index(c).load(L), gl.expand_dims(xa0, 1), gl.expand_dims(xa1, 1),
             gl.expand_dims(xa2, 1), gl.expand_dims(xa3, 1), gl.expand_dims(xb0, 1), gl.expand_dims(xb1, 1),
             gl.expand_dims(xb2, 1), gl.expand_dims(xb3, 1)],
            dtype=gl.float32, is_pure=True, pack=1)
        acc += dot * scale.to(gl.float32)
        if c + 1 < CHUNKS:
            scale = _scales(s_ptr, pair + RB, cols, col_live, PAIRS, S_STRIDE, G16)
    for c in gl.static_range(CHUNKS):
        mbarrier.invalidate(bars.index(c))
    y = gl.sum(acc, axis=0) * 16.0  # the dot's (q - 8) / 16 keeps fp16 sums in range
    if RES:
        s = (residual.to(gl.float32) + y).to(out_ptr.dtype.element_ty)  # rounded like torch's add
        gl.store(out_ptr + cols, s, mask=col_live)
        s32 = gl.where(col_live, s.to(gl.float32), 0.0)
        g = gl.load(g_ptr + cols, mask=col_live, other=0.0).to(gl.float32)
        gl.store(sg_ptr + cols, (s32 * g).to(out_ptr.dtype.element_ty), mask=col_live)
        gl.store(sums_out_ptr + gl.program_id(0), gl.sum(s32 * s32, axis=0))
    else:
        gl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_live)


def staged_constexprs(config: StagedConfig, k: int, group_size: int) -> dict:
    """The kernel's tile constexprs for a K prefix of ``k`` (ValueError where the config does not tile)."""
    bn, warps, rb = config.block_n, config.warps, config.chunk_rows
    spt = min(8, bn)
    tn = bn // spt
    if bn % spt or tn > 32 or rb > MAX_BOX_ROWS or rb & (rb - 1) or rb < (32 // tn) * warps:
        raise ValueError(f"{config}: the layout does not tile (BN {bn}, {warps} warps, {rb} rows a chunk)")
    if k % PAIR_K or group_size % PAIR_K:
        raise ValueError(f"K {k} and the group size {group_size} must be multiples of {PAIR_K}")
    return {"CHUNKS": math.ceil(k // PAIR_K / rb), "RB": rb, "BN": bn, "G16": group_size // PAIR_K, "SPT": spt,
            "TN": tn, "WARPS": warps}


def staged_smem_bytes(config: StagedConfig, k: int) -> int:
    """Shared memory a program stages: every chunk of the even and the odd rows."""
    return math.ceil(k / PAIR_K / config.chunk_rows) * 2 * config.chunk_rows * config.block_n * 4


def staged_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> StagedConfig | None:
    """The staged GEMV's config for a launch, or None where it does not serve: more than one activation row, a CPU
    or pre-sm_90 device, the interpreter, a K or group not a multiple of 16, or a weight slice too large to sit in
    shared memory next to the next layer's (K > 4096 at 32 columns; the ring of chunks that would serve it lost)."""
    if m != 1 or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    if torch.cuda.get_device_capability(device)[0] < 9 or k < PAIR_K or k % PAIR_K or group_size % PAIR_K or n < 1:
        return None
    rows = min(MAX_BOX_ROWS, max(8, 1 << math.ceil(math.log2(k // PAIR_K))))  # a box covers a prefix's pairs
    config = StagedConfig(warps=max(1, min(8, rows // 8)), chunk_rows=rows)  # 8 rows of threads a warp at 32 columns
    return config if 2 * staged_smem_bytes(config, k) <= SMEM_BYTES else None


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, n: int, k: int) -> None:
    """``int4_matmul``'s checks on the first k activations, then what this kernel adds: fp16 / bf16 only, a
    contiguous weight whose odd rows start 16-byte aligned (N a multiple of 4), an N prefix."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be fp16 or bf16, got {x.dtype}")
    if x.numel() < k:
        raise ValueError(f"k {k} is outside x ({x.numel()} activations)")
    _check_int4_call(x.reshape(-1)[:k], qweight, scales, group_size, k)
    n_stored = qweight.shape[1]
    if not qweight.is_contiguous() or not 0 < n <= n_stored or n_stored % 4:
        raise ValueError(f"n {n} must be within a contiguous stored weight of N = {n_stored}, a multiple of 4 (the "
                         "odd rows' view must start 16-byte aligned)")


def _served(config: StagedConfig | None, x: torch.Tensor, k: int, n: int) -> StagedConfig:
    if config is None:
        raise ValueError(f"the staged GEMV does not serve [{k}, {n}] on {x.device} (see staged_config)")
    return config


def _launch(x, qweight, scales, group_size, n, k, config: StagedConfig, out, res=None, norm=None) -> None:
    consts = staged_constexprs(config, k, group_size)
    n_stored = qweight.shape[1]
    box = [consts["RB"], consts["BN"]]
    layout = gl.NVMMASharedLayout.get_default_for(box, gl.int32)
    even = TensorDescriptor(qweight, [k // PAIR_K, n], [2 * n_stored, 1], box, layout)
    odd = TensorDescriptor(qweight[1:], [k // PAIR_K, n], [2 * n_stored, 1], box, layout)
    x32 = x.reshape(-1)[:k].contiguous().view(torch.int32)
    res_args = res if res is not None else (out, out, out, out)  # residual, g, s * g, sums out
    parts = norm[0].shape[1] if norm is not None else 1
    norm_args = (norm[0], parts, 1.0 / k, float(norm[1])) if norm is not None else (out, 1, 1.0, 0.0)
    pdl = pdl_mode(x.device, 1) > 0
    _staged_gemv_kernel[(triton.cdiv(n, consts["BN"]),)](
        x32, even, odd, scales, out, n, k // PAIR_K, n_stored, *res_args, *norm_args, **consts,
        F16=x.dtype == torch.float16, PDL=pdl, RES=res is not None, NORM=norm is not None,
        PARTS_P=triton.next_power_of_2(parts), num_warps=consts["WARPS"], maxnreg=MAX_REGISTERS, launch_pdl=pdl)


def _check_norm(norm, x: torch.Tensor) -> None:
    if norm is not None and (len(norm) != 2 or norm[0].dtype != torch.float32 or norm[0].dim() != 2
                             or norm[0].shape[0] != 1 or not norm[0].is_contiguous() or norm[0].device != x.device):
        raise ValueError("norm must be (sums, eps) with sums a contiguous fp32 [1, parts] tensor on x's device")


def staged_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                n: int | None = None, k: int | None = None, config: StagedConfig | None = None,
                norm=None) -> torch.Tensor:
    """``x [1, >= k]`` (or 1-D) times the active prefix ``[k, n]`` of a packed INT4 weight -> ``[1, n]`` in x's
    dtype, on the staged kernel (``staged_config``'s default config; ValueError where none serves). ``norm`` =
    (sums ``[1, P]`` fp32, eps): x holds s * w of an RMSNorm over k; each activation is scaled by its 1 / rms
    (from the P partial sums of s^2) before the fp16 rounding, as ``int4_matmul``'s."""
    k = qweight.shape[0] * PACK if k is None else k
    n = qweight.shape[1] if n is None else n
    _check(x, qweight, scales, group_size, n, k)
    _check_norm(norm, x)
    config = _served(config or staged_config(1, n, k, group_size, x.device), x, k, n)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _launch(x, qweight, scales, group_size, n, k, config, out, norm=norm)
    return out


def staged_residual(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int,
                    residual: torch.Tensor, norm_weight: torch.Tensor, config: StagedConfig | None = None,
                    norm=None):
    """A block's output projection with the residual add and the first half of the next RMSNorm, as
    ``int4_matmul.int4_residual``: ``s = residual + x @ W[:k]`` (every column), ``s * norm_weight`` and the sums of
    s^2 per program ``[1, tiles]`` fp32. Returns ``(s, s * w, sums)``."""
    n = qweight.shape[1]
    _check(x, qweight, scales, group_size, n, k)
    _check_norm(norm, x)
    if residual.numel() != n or residual.dtype != x.dtype or norm_weight.shape != (n,) \
            or residual.device != x.device or norm_weight.device != x.device:
        raise ValueError(f"residual must be one row of {n} in x's dtype and norm_weight [{n}], on x's device")
    config = _served(config or staged_config(1, n, k, group_size, x.device), x, k, n)
    res = residual.reshape(1, n).contiguous()
    s, sg = torch.empty_like(res), torch.empty_like(res)
    sums = torch.empty(1, triton.cdiv(n, config.block_n), dtype=torch.float32, device=x.device)
    _launch(x, qweight, scales, group_size, n, k, config, s, res=(res, norm_weight.contiguous(), sg, sums), norm=norm)
    return s, sg, sums


def staged_residual_if_served(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                              k: int, residual: torch.Tensor, norm_weight: torch.Tensor, norm=None):
    """``int4_residual``'s route under ``UNIQL_GEMV_STAGED=1``: ``staged_residual`` for one row where
    ``staged_config`` serves the shape (o at every rung of an 8B model; not down: K > 4096), else None."""
    config = staged_config(1, qweight.shape[1], k, group_size, x2.device) if x2.shape[0] == 1 else None
    if config is None:
        return None
    return staged_residual(x2, qweight, scales, group_size, k, residual, norm_weight, config=config, norm=norm)


def staged_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                          n: int | None = None, k: int | None = None, norm=None) -> torch.Tensor:
    """The kernel's sum in torch, fp32: over pairs p, (even row's 8 codes . x[16p:16p+8] + odd row's . x[16p+8:
    16p+16]) times scale row 16p // group; equal to the dequantized product up to fp32 rounding -> ``[1, n]``.
    ``norm``: x times 1 / sqrt(sum(sums) / k + eps) first (rounded to fp16 as the kernel's pairs are)."""
    k = qweight.shape[0] * PACK if k is None else k
    n = qweight.shape[1] if n is None else n
    codes = unpack(qweight[: k // PACK, :n]).float() - 8  # [k, n]
    xs = x.reshape(-1)[:k].float()
    if norm is not None:
        xs = (xs / torch.sqrt(norm[0].float().sum() / k + norm[1])).half().float()
    pairs = k // PAIR_K
    per_pair = (codes.reshape(pairs, PAIR_K, n) * xs.reshape(pairs, PAIR_K, 1)).sum(1)  # [pairs, n]
    rows = torch.arange(pairs, device=qweight.device) * PAIR_K // group_size
    return (per_pair * scales[rows, :n].float()).sum(0, keepdim=True)


def staged_residual_reference(x, qweight, scales, group_size: int, k: int, residual, norm_weight,
                              block_n: int = 32, norm=None):
    """``staged_residual`` in torch: s rounded to the residual's dtype, s * w, sums of s^2 per ``block_n`` columns."""
    n = qweight.shape[1]
    y = staged_gemv_reference(x, qweight, scales, group_size, n=n, k=k, norm=norm)
    s = (residual.reshape(1, n).float() + y).to(residual.dtype)
    s32 = s.float()
    pad = torch.nn.functional.pad(s32 * s32, (0, -n % block_n))
    return s, (s32 * norm_weight.float()).to(residual.dtype), pad.reshape(1, -1, block_n).sum(-1)
