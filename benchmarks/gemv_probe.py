# ruff: noqa: B023  (each timing lambda runs inside the loop iteration that builds it)
"""Probe (the H200 study behind kernels/int4_gemv.py): where does the batch-1 INT4 GEMV lose time?

Load-only bound, the default config (`ours_us`), the half2 kernel at several tilings, the tensor-core GEMM at M=1.
(The committed results/gemv_probe_h200.json came from this script's first version, when `ours_us` was the fp32-math
kernel and the script carried its own copy of the half2 kernel before it moved to kernels/int4_gemv.py: same
arithmetic, 256-column tiles without K masks.)

    python benchmarks/gemv_probe.py --json results/gemv_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl
from graph_timing import graph_us as time_us

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_config import Int4Config
from uniql.kernels.int4_format import dequantize

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
ROTATE = 256 * 2**20

@triton.jit
def _load_only_kernel(qw_ptr, out_ptr, N, K, stride_qw, tiles_per_split, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    rows_k = K // 8
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(rows_k, BLOCK_R))
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.int32)
    for t in range(t0, t1):
        rows = t * BLOCK_R + offs_r
        acc ^= tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                       mask=(rows < rows_k)[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(acc, axis=0), mask=mask_n)


def gemv_h2(x, qw, sc, group, block_n=256, block_r=8, split=None, warps=4):
    """The production half2 GEMV (kernels/int4_gemv.py) at one tiling: ``block_r`` packed rows per tile."""
    k, n = qw.shape[0] * 8, qw.shape[1]
    k_tiles = triton.cdiv(k // 8, block_r)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    split = split or max(1, min(math.ceil(8 * sms / triton.cdiv(n, block_n)), k_tiles // 2))
    return im.int4_matmul(x, qw, sc, group, config=Int4Config("gemv", block_n, 8 * block_r, split, warps, 1))


def load_only(qw, out, block_n=128, block_r=8, split=None, warps=4):
    k, n = qw.shape[0] * 8, qw.shape[1]
    k_tiles = triton.cdiv(k // 8, block_r)
    blocks = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(qw.device).multi_processor_count
    split = split or max(1, min(math.ceil(8 * sms / blocks), k_tiles // 2))
    per = triton.cdiv(k_tiles, split)
    _load_only_kernel[(blocks, triton.cdiv(k_tiles, per))](qw, out, n, k, qw.stride(0), per, BLOCK_N=block_n,
                                                           BLOCK_R=block_r, num_warps=warps)


def main():
    # (the timing lambdas are called inside the iteration that builds them)
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = args.group
    src = torch.empty(2**30 // 4, dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    copy_tbps = 2 * src.numel() * 4 / time_us([lambda: dst.copy_(src)]) / 1e6
    print(f"copy {copy_tbps:.2f} TB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k // 2 + n * (k // g) * 2
        copies = max(2, math.ceil(ROTATE / nbytes))
        bufs = [(torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device=dev),
                 (torch.rand(k // g, n, device=dev) * 1e-2 + 5e-3).half()) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ dequantize(*bufs[0], g, k, n)
        err = (gemv_h2(x, *bufs[0], g).float() - ref).abs().max().item() / ref.abs().max().item()
        row = {"layer": name, "N": n, "K": k, "bytes": nbytes, "h2_rel_err": err}
        sink = torch.zeros(n, dtype=torch.int32, device=dev)
        row["ours_us"] = time_us([lambda qw=qw, sc=sc: im.int4_matmul(x, qw, sc, g) for qw, sc in bufs])
        cfg = im.pick_config(1, n, k, g, dev)
        row["ours_cfg"] = str(cfg)
        row["load_only_us"] = time_us([lambda qw=qw: load_only(qw, sink, 128, 8, warps=4) for qw, _ in bufs])
        for bn, br, w, waves in ((256, 8, 4, 8), (256, 8, 4, 4), (256, 8, 4, 16), (256, 4, 4, 8), (128, 8, 4, 8),
                                 (128, 4, 2, 8), (512, 8, 8, 8), (512, 8, 4, 8), (256, 8, 8, 8)):
            if br * 8 > g:
                continue
            blocks = math.ceil(n / bn)
            split = max(1, min(math.ceil(waves * 132 / blocks), k // (8 * br) // 2))
            row[f"h2_{bn}x{br}w{w}s{split}_us"] = time_us(
                [lambda qw=qw, sc=sc, bn=bn, br=br, w=w, sp=split: gemv_h2(x, qw, sc, g, bn, br, sp, warps=w)
                 for qw, sc in bufs])
        gcfg = Int4Config("gemm", 64, 64, max(1, math.ceil(264 / math.ceil(n / 64))), 4, 16, 3)
        row["gemm_m1_us"] = time_us([lambda qw=qw, sc=sc: im.int4_matmul(x, qw, sc, g, config=gcfg)
                                     for qw, sc in bufs])
        row["copy_us"] = nbytes / (copy_tbps * 1e6)
        rows.append(row)
        print({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
        del bufs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
