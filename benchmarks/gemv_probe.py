# ruff: noqa: B023  (each timing lambda runs inside the loop iteration that builds it)
"""Probe (the H200 study behind kernels/int4_gemv.py): where does the batch-1 INT4 GEMV lose time?

Load-only bound, the fp32-math kernel, the half2 assembly kernel at several tilings, the tensor-core GEMM at M=1.

    python benchmarks/gemv_probe.py --json results/gemv_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import triton
import triton.language as tl

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_config import Int4Config
from uniql.kernels.int4_format import dequantize
from uniql.kernels.int4_matmul import _finish

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
ROTATE = 256 * 2**20

# Two words (16 codes, rows r and r + SUB_R of the tile) times their activations as fp16 pairs (x_j, x_j+4):
# LOP3 with the fp16 exponent of 1024 makes 1024 + q (or 1024 + 16 q); one HFMA2 turns that into (q - 8) / 16
# exactly (the 1/16 keeps 8-product half2 sums far from fp16 overflow: |x| up to ~16k), 8 HFMA2 multiply-add
# the activations, and the half2 sum leaves as one fp32.
_ASM_DOT16 = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, s, a, c0, c1, c2, c3;
.reg .b16 h0, h1;
.reg .f32 f0, f1;
mov.b32 c0, 0x2C002C00;
mov.b32 c1, 0xD408D408;
mov.b32 c2, 0x1C001C00;
mov.b32 c3, 0xC480C480;
lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 s, $1, 8;
lop3.b32 t2, s, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, s, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 t0, t0, c0, c1;
fma.rn.f16x2 t1, t1, c2, c3;
fma.rn.f16x2 t2, t2, c0, c1;
fma.rn.f16x2 t3, t3, c2, c3;
mul.f16x2 a, t0, $3;
fma.rn.f16x2 a, t1, $4, a;
fma.rn.f16x2 a, t2, $5, a;
fma.rn.f16x2 a, t3, $6, a;
lop3.b32 t0, $2, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $2, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 s, $2, 8;
lop3.b32 t2, s, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, s, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 t0, t0, c0, c1;
fma.rn.f16x2 t1, t1, c2, c3;
fma.rn.f16x2 t2, t2, c0, c1;
fma.rn.f16x2 t3, t3, c2, c3;
fma.rn.f16x2 a, t0, $7, a;
fma.rn.f16x2 a, t1, $8, a;
fma.rn.f16x2 a, t2, $9, a;
fma.rn.f16x2 a, t3, $10, a;
mov.b32 {h0, h1}, a;
cvt.f32.f16 f0, h0;
cvt.f32.f16 f1, h1;
add.f32 $0, f0, f1;
}
""")

# 8 bf16 activations as 4 int32 (pairs (x0,x1) .. (x6,x7)) -> fp16 pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7)
_ASM_X_BF16 = tl.constexpr("""
{
.reg .b32 a0, a1, b0, b1;
shl.b32 a0, $4, 16;
shl.b32 b0, $6, 16;
cvt.rn.f16x2.f32 $0, b0, a0;
and.b32 a1, $4, 0xFFFF0000;
and.b32 b1, $6, 0xFFFF0000;
cvt.rn.f16x2.f32 $1, b1, a1;
shl.b32 a0, $5, 16;
shl.b32 b0, $7, 16;
cvt.rn.f16x2.f32 $2, b0, a0;
and.b32 a1, $5, 0xFFFF0000;
and.b32 b1, $7, 0xFFFF0000;
cvt.rn.f16x2.f32 $3, b1, a1;
}
""")
_ASM_X_F16 = tl.constexpr("""
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
""")


@triton.jit
def _x_pairs(p, mask, X_BF16: tl.constexpr):
    """x[8r .. 8r+7] at int32 pointers ``p [R, 1]`` (to x[8r]) as four fp16-pair int32 tensors [R, 1]."""
    if mask is None:
        v0 = tl.load(p)
        v1 = tl.load(p + 1)
        v2 = tl.load(p + 2)
        v3 = tl.load(p + 3)
    else:
        v0 = tl.load(p, mask=mask, other=0)
        v1 = tl.load(p + 1, mask=mask, other=0)
        v2 = tl.load(p + 2, mask=mask, other=0)
        v3 = tl.load(p + 3, mask=mask, other=0)
    if X_BF16:
        return tl.inline_asm_elementwise(_ASM_X_BF16, "=r,=r,=r,=r,r,r,r,r", [v0, v1, v2, v3],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_ASM_X_F16, "=r,=r,=r,=r,r,r,r,r", [v0, v1, v2, v3],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _gemv_h2_kernel(x_ptr, qw_ptr, sc_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, stride_qw, stride_sc,
                    tiles_per_split, n_splits, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SUB_R: tl.constexpr,
                    SPLIT: tl.constexpr, X_BF16: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, SUB_R)[:, None]
    rows_k = K // 8
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(rows_k, 2 * SUB_R))
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros([SUB_R, BLOCK_N], tl.float32)
    ra = t0 * 2 * SUB_R + offs_r  # the tile's first SUB_R packed rows, then the next SUB_R
    wa_ptr = qw_ptr + ra * stride_qw + offs_n[None, :]
    xa_ptr = x32 + ra * 4
    sc_ptrs = sc_ptr + (t0 * 2 * SUB_R * 8 // GROUP) * stride_sc + offs_n
    for t in range(t0, t1):
        if EVEN:
            wa = tl.load(wa_ptr, eviction_policy="evict_first")
            wb = tl.load(wa_ptr + SUB_R * stride_qw, eviction_policy="evict_first")
            scale = tl.load(sc_ptrs)
            a0, a1, a2, a3 = _x_pairs(xa_ptr, None, X_BF16)
            b0, b1, b2, b3 = _x_pairs(xa_ptr + SUB_R * 4, None, X_BF16)
        else:
            ra = t * 2 * SUB_R + offs_r
            rb = ra + SUB_R
            ma = ra < rows_k
            mb = rb < rows_k
            wa = tl.load(wa_ptr, mask=ma & mask_n[None, :], other=0, eviction_policy="evict_first")
            wb = tl.load(wa_ptr + SUB_R * stride_qw, mask=mb & mask_n[None, :], other=0,
                         eviction_policy="evict_first")
            scale = tl.load(sc_ptrs, mask=mask_n, other=0.0)
            a0, a1, a2, a3 = _x_pairs(xa_ptr, ma, X_BF16)
            b0, b1, b2, b3 = _x_pairs(xa_ptr + SUB_R * 4, mb, X_BF16)
        part = tl.inline_asm_elementwise(_ASM_DOT16, "=r,r,r,r,r,r,r,r,r,r,r", [wa, wb, a0, a1, a2, a3, b0, b1, b2, b3],
                                         dtype=tl.float32, is_pure=True, pack=1)
        acc += part * scale.to(tl.float32)[None, :]
        wa_ptr += 2 * SUB_R * stride_qw
        xa_ptr += 2 * SUB_R * 4
        if (2 * SUB_R * 8) == GROUP:
            sc_ptrs += stride_sc
        else:
            sc_ptrs = sc_ptr + ((t + 1) * 2 * SUB_R * 8 // GROUP) * stride_sc + offs_n
    out = (tl.sum(acc, axis=0) * 16.0)[None, :]
    offs_m = tl.arange(0, 1)
    _finish(out, pid_n, split, n_splits, ws_ptr, cnt_ptr, out_ptr, N, out_ptr, offs_m, offs_m < 1, offs_n,
            mask_n, 1, BLOCK_N, SPLIT, False)


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
    k, n = qw.shape[0] * 8, qw.shape[1]
    k_tiles = triton.cdiv(k // 8, block_r)
    blocks = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    split = split or max(1, min(math.ceil(8 * sms / blocks), k_tiles // 2))
    per = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    ws, cnt = im.workspace(x.device, blocks * split * block_n, blocks)
    _gemv_h2_kernel[(blocks, split)](x, qw, sc, out, ws, cnt, n, k, qw.stride(0), sc.stride(0), per, split,
                                     GROUP=group, BLOCK_N=block_n, SUB_R=block_r // 2, SPLIT=split > 1,
                                     X_BF16=x.dtype == torch.bfloat16, EVEN=n % block_n == 0 and k % (8 * block_r) == 0,
                                     num_warps=warps)
    return out


def load_only(qw, out, block_n=128, block_r=8, split=None, warps=4):
    k, n = qw.shape[0] * 8, qw.shape[1]
    k_tiles = triton.cdiv(k // 8, block_r)
    blocks = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(qw.device).multi_processor_count
    split = split or max(1, min(math.ceil(8 * sms / blocks), k_tiles // 2))
    per = triton.cdiv(k_tiles, split)
    _load_only_kernel[(blocks, triton.cdiv(k_tiles, per))](qw, out, n, k, qw.stride(0), per, BLOCK_N=block_n,
                                                           BLOCK_R=block_r, num_warps=warps)


def time_us(fns, repeats=30):
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / len(fns))
    return statistics.median(times)


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
