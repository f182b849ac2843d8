"""Pieces every W4A16 Triton kernel shares: segment lookup, output write, the split-K fixup and its workspace.

Split K: partial sums go to a workspace and the LAST program of each output tile (an atomic counter per tile)
adds them in split order and writes the output: one launch, no zero-fill, and a deterministic result (the same
bits whatever order programs finish in).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .switches import switch


@triton.jit
def _segment(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, NUM_SEG: tl.constexpr):
    """Program id along N -> (block within its segment, first stored column, active columns, first output column).

    Segment ``i`` (stored columns ``s_i .. s_i + l_i``) owns ``nb_i`` consecutive programs; its output columns
    follow the earlier segments' (q|k|v, gate|up, Mamba's z|x|B|C|dt)."""
    if NUM_SEG == 1:
        return pid_n, s0, l0, 0
    blk, col0, n_len, out0 = _next_segment(pid_n, pid_n, s0, l0, 0, nb0, s1, l1, l0)
    if NUM_SEG > 2:
        blk, col0, n_len, out0 = _next_segment(pid_n, blk, col0, n_len, out0, nb0 + nb1, s2, l2, l0 + l1)
    if NUM_SEG > 3:
        blk, col0, n_len, out0 = _next_segment(pid_n, blk, col0, n_len, out0, nb0 + nb1 + nb2, s3, l3,
                                               l0 + l1 + l2)
    if NUM_SEG > 4:
        blk, col0, n_len, out0 = _next_segment(pid_n, blk, col0, n_len, out0, nb0 + nb1 + nb2 + nb3, s4, l4,
                                               l0 + l1 + l2 + l3)
    return blk, col0, n_len, out0


@triton.jit
def _columns(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, NUM_SEG: tl.constexpr,
             BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, PAIRED: tl.constexpr):
    """Program ``pid_n``'s BLOCK_N columns: (its block within its segment, their stored columns, which are live,
    their output columns), the last three ``[BLOCK_N]``. PAIRED (a GLU's two segments in one program,
    ``glu_paired``): the first half are channels ``blk * BLOCK_N / 2 ...`` of the gate segment, the second half
    the same channels of the up segment, so one program holds both factors of its silu(gate) * up."""
    j = tl.arange(0, BLOCK_N)
    if PAIRED:
        up = j // (BLOCK_N // 2)
        chan = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        return pid_n, s0 + up * (s1 - s0) + chan, chan < l0, up * l0 + chan
    blk, col0, n_len, out0 = _segment(pid_n, s0, s1, s2, s3, s4, l0, l1, l2, l3, l4, nb0, nb1, nb2, nb3, NUM_SEG)
    if ALIGNED:  # segment starts and lengths are multiples of 16: 16-byte weight loads
        col0 = tl.multiple_of(col0, 16)
        n_len = tl.multiple_of(n_len, 16)
    offs_n = blk * BLOCK_N + j
    return blk, col0 + offs_n, offs_n < n_len, out0 + offs_n


@triton.jit
def _next_segment(pid_n, blk, col0, n_len, out0, first_program, start, length, first_out):
    """Move to the next segment when ``pid_n`` is at or past its first program."""
    inside = pid_n >= first_program
    return (tl.where(inside, pid_n - first_program, blk), tl.where(inside, start, col0),
            tl.where(inside, length, n_len), tl.where(inside, first_out, out0))


@triton.jit
def _write(acc, out_ptr, stride_om, bias_ptr, offs_m, mask_m, ocol, mask_n, HAS_BIAS: tl.constexpr):
    """Store the tile (bias added) in the output dtype; returns the stored values as fp32."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ocol, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + ocol[None, :]
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(ptrs, stored, mask=mask_m[:, None] & mask_n[None, :])
    return stored.to(tl.float32)


@triton.jit
def _rows_out(acc0, acc1, acc2, acc3, offs_m, BLOCK_M: tl.constexpr):
    """GEMV accumulators ``[R, BLOCK_N]`` of up to 4 activation rows -> the ``[BLOCK_M, BLOCK_N]`` output tile."""
    out = tl.where(offs_m[:, None] == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
    if BLOCK_M > 1:
        out = tl.where(offs_m[:, None] == 1, tl.sum(acc1, axis=0)[None, :], out)
    if BLOCK_M > 2:
        out = tl.where(offs_m[:, None] == 2, tl.sum(acc2, axis=0)[None, :], out)
        out = tl.where(offs_m[:, None] == 3, tl.sum(acc3, axis=0)[None, :], out)
    return out


@triton.jit
def _finish(acc, tile, split, n_splits, ws_ptr, cnt_ptr, out_ptr, stride_om, bias_ptr, offs_m, mask_m, ocol,
            mask_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
            SUM_STEP: tl.constexpr):
    """Write the tile, or (split K) park the partial and let the tile's last program sum all partials in order.
    Returns (the tile's fp32 values, whether this program wrote them) for epilogues that follow (``_glu_pair``).
    ``SUM_STEP`` (4 or 8): partials loaded per step of that sum; above 8, every partial in one unrolled sweep of
    SUM_STEP (>= the splits) loads (``sum_step``)."""
    total = acc
    if SPLIT:
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_ws = ws_ptr + tile * n_splits * BLOCK_M * BLOCK_N
        tl.store(tile_ws + split * BLOCK_M * BLOCK_N + local, acc)
        tl.debug_barrier()  # every thread's partial is written before one thread releases the counter
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        wrote = arrived == n_splits - 1
        if wrote:
            # SUM_STEP partials in flight per step (a one-at-a-time loop waits an L2 round trip per split, which
            # dominated K-heavy layers split 60+ ways); the adds keep split order (a missing partial adds an exact
            # 0), so the bits are the same for any SUM_STEP and whichever program finishes last
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            step = BLOCK_M * BLOCK_N
            if SUM_STEP > 8:  # unrolled: nothing orders the loads, so they can all be in flight before the adds
                for j in tl.static_range(SUM_STEP):
                    total = total + _part(tile_ws, 0, j, step, local, n_splits)
            else:
                for s in range(0, n_splits, SUM_STEP):
                    p0 = _part(tile_ws, s, 0, step, local, n_splits)
                    p1 = _part(tile_ws, s, 1, step, local, n_splits)
                    p2 = _part(tile_ws, s, 2, step, local, n_splits)
                    p3 = _part(tile_ws, s, 3, step, local, n_splits)
                    if SUM_STEP == 8:  # all eight loads issued before the first add
                        p4 = _part(tile_ws, s, 4, step, local, n_splits)
                        p5 = _part(tile_ws, s, 5, step, local, n_splits)
                        p6 = _part(tile_ws, s, 6, step, local, n_splits)
                        p7 = _part(tile_ws, s, 7, step, local, n_splits)
                    total = (((total + p0) + p1) + p2) + p3
                    if SUM_STEP == 8:
                        total = (((total + p4) + p5) + p6) + p7
            tl.store(cnt_ptr + tile, 0)  # ready for the next launch (graph replays reuse the counters)
            total = _write(total, out_ptr, stride_om, bias_ptr, offs_m, mask_m, ocol, mask_n, HAS_BIAS)
    else:
        wrote = split == 0
        total = _write(acc, out_ptr, stride_om, bias_ptr, offs_m, mask_m, ocol, mask_n, HAS_BIAS)
    return total, wrote


@triton.jit
def _part(tile_ws, s, j: tl.constexpr, step, local, n_splits):
    """Partial ``s + j`` of a tile (zeros past the last one), read past L1 (.cg): other SMs wrote it."""
    return tl.load(tile_ws + (s + j) * step + local, mask=local * 0 + s + j < n_splits, other=0.0,
                   cache_modifier=".cg")


def sum_step(block_m: int, block_n: int, splits: int = 1) -> int:
    """Partials per step of the split-K sum. ``UNIQL_SPLITK_STEP``: ``all`` (default: every partial in one unrolled
    sweep of the next power of two >= ``splits``, at most 64, so the ``splits / 4`` L2 round trips in a row of a
    four-a-step loop become one; eight a step up to 8 splits), 4 or 8 (a loop of that many loads a step), each
    where a partial is at most 256 floats (<= 2 a thread at 4 warps, so the sum needs fewer registers than the K
    loop and the kernel's occupancy stays). The same bits every way (the adds keep split order). Same-machine
    engine A/Bs on the H100 (``SUITE=envab`` / ``envabssm`` in benchmarks/device_suite.sh, two rounds, stop 33):
    ``all`` beat 4 at every rate in both rounds, Llama-8B 2.236 / 1.827 ms vs 2.272 / 1.866 at rates 0 / 0.35,
    Mamba2-8B 2.422 / 1.982 vs 2.470 / 2.035 (results/envab_splitk_conv_h100.json); 8 lost at stop 29 (2.49 vs
    2.41 ms)."""
    raw = switch("UNIQL_SPLITK_STEP")
    if raw == "4" or block_m * block_n > 256:
        return 4
    if raw == "8" or splits <= 8:
        return 8
    return max(16, triton.next_power_of_2(splits)) if splits <= 64 else 8


@triton.jit
def _glu_pair(mine, pair_cnt_ptr, is_gate, out_ptr, stride_om, act_ptr, stride_am, offs_m, mask_m, ocol, acol,
              mask_n, partner_shift):
    """silu(gate) * up for one column block, by the second of its two tiles (gate, up) to be written.

    ``mine`` is this tile's written output (fp32 of the stored values); the partner tile sits ``partner_shift``
    output columns away. Each writer releases a per-pair counter after its stores, so the second one reads the
    partner's stored values from L2. Same rounding as ``elementwise.silu_mul`` on the stored gate|up output."""
    tl.debug_barrier()
    arrived = tl.atomic_add(pair_cnt_ptr, 1, sem="acq_rel")
    if arrived == 1:
        tl.store(pair_cnt_ptr, 0)
        mask = mask_m[:, None] & mask_n[None, :]
        partner = tl.load(out_ptr + offs_m[:, None] * stride_om + (ocol + partner_shift)[None, :], mask=mask,
                          other=0.0, cache_modifier=".cg").to(tl.float32)
        _store_act(tl.where(is_gate, mine, partner), tl.where(is_gate, partner, mine), act_ptr, stride_am, offs_m,
                   mask_m, acol, mask_n)


@triton.jit
def _glu_tile(total, act_ptr, stride_am, offs_m, mask_m, first, l0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """silu(gate) * up of a paired tile (``_columns``): ``total [BLOCK_M, BLOCK_N]`` holds the stored gate values
    of channels ``first ...`` (fp32), then the stored up values of the same channels; no other program involved."""
    gate, up = tl.split(tl.permute(tl.reshape(total, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))
    chan = first + tl.arange(0, BLOCK_N // 2)
    _store_act(gate, up, act_ptr, stride_am, offs_m, mask_m, chan, chan < l0)


@triton.jit
def _store_act(gate, up, act_ptr, stride_am, offs_m, mask_m, acol, mask_n):
    """``silu(gate) * up`` from the STORED (16-bit rounded, here as fp32) gate and up values, rounded as
    ``elementwise.silu_mul`` rounds: the activation once, then the product once."""
    dtype = act_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    # the product of two 16-bit floats is exact in fp32, so this rounds once like a 16-bit multiply (and the
    # interpreter, whose bf16 arithmetic is not native, gets it right too)
    prod = (act.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(act_ptr + offs_m[:, None] * stride_am + acol[None, :], prod, mask=mask_m[:, None] & mask_n[None, :])


def glu_paired() -> bool:
    """Whether the decode GEMV of a fused gate|up computes the same channels' gate and up in one program
    (``UNIQL_GLU_PAIRED=1``, the default since stop 42: x0.95-0.99 a Llama-8B step, H100,
    results/glu_paired_plan_ab_h100.json), so silu(gate) * up is that program's epilogue. Off, each
    column block of gate and of up is its own program and the second of a pair to finish applies it
    (``_glu_pair``): two more L2 round trips (a pair counter, the partner's stored values) on the last program's
    path. Same bits either way. Paired costs registers (``benchmarks/sass_gemv.py``, sm_90): 70 against 56 at 256
    columns (a run-time shift or a [2, BLOCK_N / 2] index the same; 56 without the one-tile preload), 48 against 40 at
    128: 7 programs an SM at 256 columns, which its wave plan counts (``int4_config._programs_per_sm``)."""
    return switch("UNIQL_GLU_PAIRED") == "1"


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (fp32) and per-tile arrival counters (int32, kept at zero between launches), per device.

    Grown on demand; an engine that captures CUDA graphs calls ``reserve_workspace`` first so no allocation
    happens inside a capture. One stream at a time may use a device's workspace.
    """
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        ws = torch.empty(max(floats, 0 if ws is None else ws.numel(), 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel(), 1 << 12), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


def reserve_workspace(device, floats: int = 1 << 22, tiles: int = 1 << 16) -> None:
    workspace(torch.device(device), floats, tiles)


