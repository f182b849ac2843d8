"""Launch configurations of the W4A16 kernels: the path by batch size, block sizes and the K split.

``pick_config`` is the default (from H100 sweeps of ``benchmarks/kernels.py --sweep``); ``candidate_configs``
lists what the sweep times.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import triton

from .pdl import gemv_pipe, gemv_preload
from .switches import switch

MAX_SEGMENTS = 5  # q|k|v, gate|up, Mamba's z|x|B|C|dt
GEMV_MAX_M = 4
# UNIQL_WIDE_COLS=auto: 128-column blocks only where a program's share of the bytes falls at least to this (0.75
# won twice on the H100, 0.8 and 0.92 lost: see _wide_block_n)
WIDE_128_SHARE = 0.78
PAIRED_256_PER_SM = 7  # a paired gate|up's 256-column programs an SM (70 registers a thread: _programs_per_sm)
# one-row 256-column programs an SM with the K loop one tile ahead (UNIQL_GEMV_PIPE=1): 72 registers a thread, 79
# with five output segments (Mamba's in-projection); sm_90, benchmarks/sass_gemv.py, stop 48
PIPE_256_PER_SM = 7
PIPE_256_FIVE_SEG_PER_SM = 6
# From here on dequantize + cuBLAS beats the in-loop GEMM. The dequant pass costs ~2.5 bytes per weight (~120 us
# for Llama-8B's gate_up on an H100), the Triton GEMM's tiles cost more per row than cuBLAS's. Was 256 until stop
# 45: in the engine's graphed prefill (H100, results/prefill_graphs_h100.json) 128 rows through the GEMM took
# 18.5 / 15.5 ms (rates 0 / 0.35) against 15.6 / 11.6 ms for 256 rows through dequant + cuBLAS, which at 128 rows
# does the same dequant and a smaller GEMM. Between 64 and 128 rows is not measured yet.
DEQUANT_MIN_M = 128


@dataclass(frozen=True)
class Int4Config:
    path: str  # "gemv" | "gemm" | "dequant"
    block_n: int
    block_k: int  # K values per tile (a multiple of 8; <= the group size on the gemv path)
    split_k: int
    num_warps: int
    block_m: int = 1
    num_stages: int = 2


def choose_path(m: int, n: int = 0) -> str:
    """CUDA-core GEMV up to 4 rows, Triton tensor-core GEMM for small batches, dequantize + cuBLAS for prefill.

    Vocab-sized outputs (``n`` > 65536) leave the GEMV after one row: there the GEMM measured faster at batch 4
    (H100, Llama-3.1-8B lm_head: 257-261 us vs 300-365 us).
    """
    if m < 1:
        raise ValueError(f"batch must be >= 1, got {m}")
    gemv_rows = 1 if n > 65536 else GEMV_MAX_M
    return "gemv" if m <= gemv_rows else "gemm" if m < DEQUANT_MIN_M else "dequant"


def _split_for(n_blocks: int, k_tiles: int, target: int, within: bool = False) -> int:
    """K splits so that ``n_blocks * split`` reaches ``target`` programs (``within``: the most that stay within
    it, i.e. one wave of resident programs), each split >= 2 tiles. The half2 GEMV takes ``within`` (its narrow
    layers at batch 1 too, see ``pick_config``): on its wide layers rounding up left a second wave of a few dozen
    programs on some shapes, and the 8B-shaped gate|up at rate 0.25 (84 blocks x 13 splits = 1092 programs for
    1056 slots) ran as slowly as at rate 0 (26.0 vs 26.3 us a launch in the engine, H100,
    results/decode_profile_h100.json). The other paths keep rounding up (not re-measured).
    Rounding down has a floor: where it would fill under 3/4 of the wave (few, long programs: 4.5 an SM for Qwen2.5's
    152064-wide vocab head, 594 x 1 split), it rounds up instead; that head took 171 us on one split against 118 us
    on two (H100, kernels_h100.json of stops 32 and 27), while gate|up at 0.25 keeps its 12 (1008 programs)."""
    n_blocks = max(1, n_blocks)
    want = target // n_blocks if within else math.ceil(target / n_blocks)
    if within and n_blocks * want < 0.75 * target:
        want += 1
    return max(1, min(max(1, want), k_tiles // 2 if k_tiles >= 4 else 1))


def launch_split(k_tiles: int, split_k: int) -> tuple[int, int]:
    """``(splits, K tiles a split)`` a launch runs for a config's ``split_k``: equal splits, none empty, so the
    splits can be fewer than asked (64 tiles asked 14 ways run as 13 of 5)."""
    per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return triton.cdiv(k_tiles, per_split), per_split


def _blocks(n_total: int, block_n: int, widths: tuple[int, ...] | None) -> int:
    """Column blocks of a launch: each output segment starts its own."""
    return sum(triton.cdiv(w, block_n) for w in widths) if widths else triton.cdiv(n_total, block_n)


def _wave_split(n_total: int, block_n: int, k_tiles: int, sms: int, widths: tuple[int, ...] | None,
                wide: bool = False, paired: bool = False, rows: int = 1, block_k: int = 64) -> int:
    """The batch-1 half2 GEMV's K split that keeps its programs in one wave (``_programs_per_sm`` an SM; ``wide``:
    a launch of the wide path; ``paired``: a gate|up whose programs hold both halves, ``int4_tiles.glu_paired``;
    ``rows``: the activation rows, 2-4 on the wide path; ``block_k``: K values a tile, 32 on the vocab heads)."""
    per_sm = _programs_per_sm(block_n, wide, paired, rows, len(widths) if widths else 1, block_k)
    return _split_for(_blocks(n_total, block_n, widths), k_tiles, per_sm * sms, within=True)


def _rows_split(n_total: int, block_n: int, k_tiles: int, sms: int, widths: tuple[int, ...] | None,
                rows: int) -> int:
    """The K split of a 2-4-row half2 GEMV on attention-sized outputs (and the K-heavy down projection): ~4 programs
    an SM (96-127 registers a thread at 4 rows: 4-5 fit). H100 sweep at batch 4 with ``UNIQL_GEMV_PIPE=1``
    (``kernel_bench.py --sweep-batches 4``, results/kernels_batch4_pipe_sweep_h100.json, stop 47): Llama q|k|v 12.2 us
    at 11 splits, o 9.3 at 17, down 23.4 at 33 on 256 columns, against 15.2 / 11.5 / 25.5 on stop 46's plan (two K
    tiles a program; 8 programs an SM on down), which ``UNIQL_ROWS_PLAN=old`` keeps."""
    if switch("UNIQL_ROWS_PLAN") == "old":
        return max(1, k_tiles // 2) if block_n == 128 else _wave_split(n_total, block_n, k_tiles, sms, widths, True,
                                                                        rows=rows)
    return _split_for(_blocks(n_total, block_n, widths), k_tiles, 4 * sms)


def _wide_cols() -> str:
    """``UNIQL_WIDE_COLS``: the wide batch-1 GEMVs' block columns: ``auto`` (default, ``_wide_block_n``), 256 (the
    stop-33 default) or 128 (lost everywhere)."""
    return switch("UNIQL_WIDE_COLS")


def _wide_block_n(choice: str, n_total: int, k_tiles: int, sms: int, widths: tuple[int, ...] | None,
                  paired: bool = False, block_k: int = 64) -> int:
    """The columns of a wide batch-1 GEMV's blocks. ``auto`` (the default): 128 only where its one-wave split leaves
    each program at most ``WIDE_128_SHARE`` of the weight bytes 256 columns do (a program's K tiles x its columns;
    256 measured faster a byte, so a small saving does not pay). In one wave a GEMV lasts about as long as a
    program's share, a small integer of tiles that rounds up: Mamba2-8B's z|x|B|C|dt at rate 0.35 runs 784 programs
    of 4 tiles x 256 columns, or 1045 of 6 x 128 (0.75 of the bytes; engine A/B, H100: 1.863 / 1.864 ms a step
    against 1.880 / 1.883, both rounds, results/envab_wide_norm_h100.json); Llama-8B's gate|up at rate 0.25 would
    run 11 x 128 against 6 x 256 (0.92: lost, 1.987 / 1.989 against 1.967 / 1.966). On the 8B ladders only the
    Mamba2 launch changes (wave_plan.py). With 10 programs an SM on 128 columns (``UNIQL_GEMV_PER_SM=wide``, the
    default since stop 35) Mamba2's in-projection at rate 0 would run 8 x 128 against 5 x 256 (0.8: lost, 2.430 /
    2.434 against 2.322 / 2.322 ms, results/envab_regs_combine_h100.json), hence a margin under 0.8; at 0.25 it takes
    6 x 128 against 4 x 256 (0.75: won, 1.933 / 1.935 against 1.967 / 1.964)."""
    if choice != "auto":
        return int(choice)

    def share(block_n: int) -> int:  # a program's weight columns x K tiles in the one-wave split
        split = _wave_split(n_total, block_n, k_tiles, sms, widths, True, paired, block_k=block_k)
        return launch_split(k_tiles, split)[1] * block_n

    return 128 if share(128) <= WIDE_128_SHARE * share(256) else 256


def _programs_per_sm(block_n: int, wide: bool = False, paired: bool = False, rows: int = 1,
                     segments: int = 1, block_k: int = 64) -> int:
    """``UNIQL_GEMV_PER_SM``: the programs an SM gets in the half2 GEMV's one wave (``wide``: a launch of the wide
    path). A paired gate|up at 256 columns gets 7 at most: its column mapping with the preload takes 70 registers
    a thread on sm_90 (``sass_gemv.py``; 56 without it), and 7 x 128 threads x 72 is what the 64K register file
    holds. Planned for 8, its Llama-8B launches at rates 0.15 and 0.35 (1045 and 949 programs) left a second wave
    and lost 3 % a step, while rates 0 and 0.25 (896 and 924) fitted and won 5 % (H100 engine A/B, stop 42,
    results/glu_paired_ab_h100.json). Planned for 7: x0.948 / 0.986 / 0.964 / 0.978 at rates 0 / 0.15 / 0.25 / 0.35
    against the pair epilogue (results/glu_paired_plan_ab_h100.json).
    One row with the K loop one tile ahead (``UNIQL_GEMV_PIPE=1``) at 256 columns: 72 registers a thread (7 an SM), 79
    with five segments (6); 32-K tiles (the vocab heads, g32 checkpoints) take 40 (8 an SM), and at 2-4 rows the wide
    path keeps 8 (its ~9 K splits on gate|up won the batch-4 sweep).
    ``wide`` (default since stop 35): ``regs`` on the wide path only, 10 programs an SM where it runs 128 columns, 8
    elsewhere: on the 8B ladders Mamba2's (and Nemotron-H's) in-projection at rates 0.25 / 0.35 and
    Nemotron-H's MLP up-projection at 0.35 (H100 engine A/B, stop 35, two alternating rounds: Mamba2-8B 1.933 / 1.935
    against 1.967 / 1.964 ms at 0.25, 1.833 / 1.835 against 1.845 / 1.840 at 0.35, the other rates' launches the
    same; results/envab_gemv_per_sm_h100.json); 8 (the stop-34 default); 4 (experiment: at 8
    programs of 4 warps and 48-64 registers a thread the register file is full, so a programmatic dependent launch
    found no room for the next kernel's programs; with ``UNIQL_PDL=1`` it lost, 2.63 vs 2.27 ms a step, H100, stop
    33); ``regs`` (experiment; mixed in the engine A/B, stop 34: x0.988 at rate 0.35, x1.012 at 0.15,
    results/envab_wide_norm_h100.json): what the register file holds, 10 programs of 128 columns (48 registers a
    thread on sm_90: the profiles' ``compiled_gemvs``, ``sass_gemv.py``), 8 of 256 (56-64). At 10 an SM Llama-8B's
    down gets 6 K tiles a program instead of 7 at rate 0 and 4 instead of 5 at 0.35 (the H100 split sweep: 14.7 vs
    14.9 and 10.8 vs 11.7 us, results/split_sweep_h100.json); q|k|v and the other rates' downs change too. On
    Mamba2-8B regs lost at rate 0 (x1.047: the in-projection at 8 x 128, see ``_wide_block_n``) and moved out_proj
    at 0.15 for nothing (stop 35, results/envab_regs_combine_h100.json)."""
    raw = switch("UNIQL_GEMV_PER_SM")
    per_sm = (10 if block_n <= 128 and (raw == "regs" or wide) else 8) if raw in ("regs", "wide") else int(raw)
    paired_regs = paired and block_n > 128 and gemv_preload() > 0  # 56 registers without the preload: as unpaired
    if paired_regs:
        per_sm = min(per_sm, PAIRED_256_PER_SM)
    if rows == 1 and block_n > 128 and block_k > 32 and gemv_pipe(1):
        per_sm = min(per_sm, PIPE_256_FIVE_SEG_PER_SM if segments >= 5 else PIPE_256_PER_SM)
    return per_sm


def _tile_k() -> int:
    """``UNIQL_GEMV_BLOCK_K``: K values a tile of the batch-1 half2 GEMVs (64 by default; 32 is an experiment). In one
    wave a GEMV lasts about as long as its programs' tiles each, a small integer: Mamba2's out_proj has 4 a program
    at rate 0 and 3 at 0.35 (0.75, measured 0.77, for 0.66 of the bytes), in_proj 5 and 4. Halving the tile halves
    that rounding step, for twice the per-tile overhead (a scale row, two barriers)."""
    return int(switch("UNIQL_GEMV_BLOCK_K"))


def _narrow_split() -> str:
    """``UNIQL_NARROW_SPLIT``: ``wave`` (default, one wave of programs) or ``deep`` (the stop-28 split, for A/B)."""
    return switch("UNIQL_NARROW_SPLIT")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: any small number keeps the split logic exercised


def pick_config(m: int, n_total: int, k: int, group_size: int, device: torch.device | str = "cuda",
                half2: bool = True, widths: tuple[int, ...] | None = None, paired: bool = False) -> Int4Config:
    """The default launch configuration (block sizes, K split) for one call (benchmarks/kernels.py tunes it).

    ``half2``: the GEMV takes fp16/bf16 activations through ``int4_gemv`` (False: fp32 activations, exact kernel).
    ``widths``: the output segments (q|k|v, z|x|B|C|dt): each starts a column block, so the half2 GEMV's one-wave
    split counts their blocks (Mamba2's in-projection at rate 0.35: 49 blocks, not 12160 / 256 = 48; sized for 48,
    its 22 splits put 22 programs in a second wave). ``paired``: a gate|up whose programs hold both halves
    (``int4_matmul.int4_glu``; ``widths`` then one segment of both): fewer programs an SM at 256 columns.
    """
    sms = _sm_count(torch.device(device))
    path = choose_path(m, n_total)
    if path == "gemv" and half2 and n_total <= 8192 and (m == 1 or k <= 8192):
        # H200 sweep (benchmarks/gemv_floor.py --sweep, results/gemv_tiles_sweep_h200.json): attention-sized
        # outputs (and the K-heavy down projection at batch 1) run fastest on 128 columns. The K split: at most one
        # wave of 8 programs an SM, at most two K tiles a program (H100 sweep of every split, results/
        # split_sweep_h100.json): down 14.9 us at 32 splits vs 17.9 at the deepest (112), 11.7 vs 13.0 at rate
        # 0.35, q|k|v 8.4 vs 9.4, Mamba2's out_proj 10.0 vs 11.6; o and the pruned q|k|v already fit one wave.
        # UNIQL_NARROW_SPLIT=deep: the deepest split at batch 1, as before (same-machine A/B).
        block_k = min(group_size, _tile_k() if m == 1 else 64)
        block_m = 1 if m == 1 else 2 if m == 2 else 4
        k_tiles = triton.cdiv(k, block_k)
        deepest = _narrow_split() == "deep"  # checked at every batch size (it applies to one row)
        if m > 1:
            split = _rows_split(n_total, 128, k_tiles, sms, widths, m)
        elif deepest:
            split = max(1, k_tiles // 2)
        else:
            split = _wave_split(n_total, 128, k_tiles, sms, widths)
        return Int4Config("gemv", 128, block_k, split, num_warps=4, block_m=block_m)
    if path == "gemv" and half2:
        # H200 probe (benchmarks/gemv_probe.py, results/gemv_probe_h200.json): 256 columns, 4 warps and a K split
        # to ~8 programs per SM everywhere; 32-row tiles for the vocab head (long K loops: fewer live registers).
        # Two 64-row tiles per program for the head won the Llama sweep (97 vs 107 us) but measured mixed in the
        # full benchmark (Llama 101 vs 105 us, Qwen2.5 105 vs 90 us): not taken
        # UNIQL_WIDE_COLS (batch 1, not the head): auto, 128 columns where a program's share of the bytes falls to
        # WIDE_128_SHARE or less; 128 everywhere lost the Llama engine A/B (results/envab_wave_h100.json)
        block_k = min(group_size, 32 if n_total > 65536 else _tile_k() if m == 1 else 64)
        block_m = 1 if m == 1 else 2 if m == 2 else 4
        wide_cols = _wide_cols()  # checked wherever this path runs, also where it does not apply
        k_tiles = triton.cdiv(k, block_k)
        block_n = _wide_block_n(wide_cols, n_total, k_tiles, sms, widths, paired, block_k) \
            if m == 1 and n_total <= 65536 else 256
        if m > 1 and n_total <= 8192:  # narrow outputs reach this path at 2-4 rows only when K > 8192: down
            split = _rows_split(n_total, block_n, k_tiles, sms, widths, m)
        else:
            split = _wave_split(n_total, block_n, k_tiles, sms, widths, True, paired, m, block_k)
        return Int4Config("gemv", block_n, block_k, split, num_warps=4, block_m=block_m)
    if path == "gemv":
        # H100 sweeps (benchmarks/results/kernels_h100*.json): 4 warps and ~8 programs per SM everywhere;
        # 64-column blocks (deep K split) for the small attention layers, 128 columns for the wide MLP, the
        # vocab heads (little or no split) and K-heavy down_proj
        block_k = min(group_size, 64)
        k_heavy = k > 8192
        block_n = 64 if n_total <= 8192 and not k_heavy else 128
        block_m = 1 if m == 1 else 2 if m == 2 else 4
        n_blocks = triton.cdiv(n_total, block_n)
        split = _split_for(n_blocks, triton.cdiv(k, block_k), 8 * sms)
        return Int4Config("gemv", block_n, block_k, split, num_warps=4, block_m=block_m)
    if path == "dequant":
        return Int4Config("dequant", block_n=128, block_k=64, split_k=1, num_warps=4)
    if m <= 16:
        return _skinny_gemm(n_total, k, sms)
    if m <= 64:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    else:
        block_m, block_n, block_k, warps = 128, 128, 64, 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n_total, block_n)
    split = _split_for(tiles, triton.cdiv(k, block_k), 2 * sms) if m <= 64 else 1
    return Int4Config("gemm", block_n, block_k, split, warps, block_m, num_stages=4 if m > 64 else 3)


def _skinny_gemm(n_total: int, k: int, sms: int) -> Int4Config:
    """The tensor-core GEMM of 5-16 rows (one 16-row tile): its weights are its bytes, so the K split decides how
    many loads are in flight. H100 sweep at batch 16 (``kernel_bench.py --sweep-batches 16``,
    results/kernels_smallbatch_sweep_h100.json; stop 47): 64 columns and ~4 programs an SM on the attention-sized
    layers (Llama q|k|v 18.7 us at 6 splits, o 13.9 at 9), 128 columns on the K-heavy down (36.8 at 17 splits) and
    ~8 an SM on the wide gate|up (61.0 at 5); the stop-46 plan (64 columns, ~2 an SM: 24.4 / 16.4 / 77.6 / 48.4 us)
    is ``UNIQL_SKINNY_PLAN=old``."""
    if switch("UNIQL_SKINNY_PLAN") == "old":
        block_n, target = 64, 2 * sms
    else:
        block_n = 64 if n_total <= 8192 and k <= 8192 else 128
        target = (8 if n_total > 16384 else 4) * sms
    split = _split_for(triton.cdiv(n_total, block_n), triton.cdiv(k, 64), target)
    return Int4Config("gemm", block_n, 64, split, 4, 16, num_stages=3)


def candidate_configs(m: int, n_total: int, k: int, group_size: int, device="cuda",
                      half2: bool = True) -> list[Int4Config]:
    """Configurations worth timing for one shape (the benchmark's --sweep tunes ``pick_config`` with these)."""
    base = pick_config(m, n_total, k, group_size, device, half2)
    out = {base}
    if base.path == "gemv":
        sms = _sm_count(torch.device(device))
        block_ks = sorted({min(group_size, bk) for bk in (32, 64)}) if half2 else [base.block_k]
        for (bn, warps), bk in itertools.product(((64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (512, 4),
                                                 (512, 8)), block_ks):
            blocks = triton.cdiv(n_total, bn)
            for waves in (2, 4, 8, 16):  # programs per SM the K split aims for
                split = _split_for(blocks, triton.cdiv(k, bk), waves * sms)
                out.add(Int4Config("gemv", bn, bk, split, warps, base.block_m))
    else:  # small batches tune the Triton GEMM; prefill compares dequant + cuBLAS with it
        block_m = base.block_m if base.path == "gemm" else 128
        for bn, bk, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4),
                                      (256, 64, 8, 3), (128, 128, 8, 3)):
            out.add(Int4Config("gemm", bn, bk, base.split_k, warps, block_m, stages))
    if 1 < m <= 16:
        out |= _skinny_gemm_configs(n_total, k, group_size, device)
    return sorted(out, key=lambda c: (c.path, c.block_n, c.block_k, c.num_warps, c.split_k, c.num_stages))


def _skinny_gemm_configs(n_total: int, k: int, group_size: int, device) -> set[Int4Config]:
    """Tensor-core GEMM configs for 2-16 rows (one 16-row tile): the weights are the bytes, so the K split and
    the block width decide how many loads are in flight. The default GEMM config ran the 8B-shaped gate|up at batch
    16 at cuBLAS bf16's speed (76 vs 82 us, H100, results/kernels_h100.json): a quarter of the copy rate its INT4
    bytes allow. Swept at batch 4 too, against the CUDA-core GEMV (``kernel_bench.py --sweep-batches``)."""
    sms = _sm_count(torch.device(device))
    out = set()
    block_k = min(group_size, 64)
    for bn, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4), (256, 8, 3), (256, 8, 4)):
        blocks = triton.cdiv(n_total, bn)
        for waves in (1, 2, 4, 8):  # programs per SM the K split aims for
            split = _split_for(blocks, triton.cdiv(k, block_k), waves * sms)
            out.add(Int4Config("gemm", bn, block_k, split, warps, 16, stages))
    return out
