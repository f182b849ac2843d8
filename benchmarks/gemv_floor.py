"""Floors under the small batch-1 GEMVs (GPU): what a copy really reaches, what one graph node costs, and how fast
a kernel that only LOADS a small layer's packed bytes can be, as a function of how those loads are issued.

* copy bandwidth measured four ways on 1 GiB (the kernel benchmark's graph of ``copy_``, eager ``copy_`` after a
  warm-up, a kernel copy (``torch.add(src, 0)`` on bf16) and a Triton read-only reduction);
* an empty Triton kernel and a 1-program kernel per graph node: the fixed cost of a launch inside a graph;
* load-only kernels over a layer's int32 codes (rotated copies, > 128 MiB): one tile per program issued at once
  (no loop) vs the looping kernel of ``gemv_probe.py``, at several tile shapes;
* our GEMV (default config) on the same buffers.

``--sweep`` instead times the half2 GEMV at 64/128/256 columns and 1/2/4 K tiles per program (the K split
follows) on the Llama-3.1-8B linears at rate 0 (batch 1), then the best few at rate 0.35 and at batch 4 (tunes
``pick_config``); every timed config's output is checked against the reference first. The committed
``results/gemv_tiles_sweep_h200.json`` came from commit e7ef54b, whose kernel could also load several K tiles per
pass (3-D ``[tiles, SUB_R, BLOCK_N]`` loads, all in flight before any math): that lost at every tiling (o 8.2 us
at best vs 6.5 us for one tile per pass; the load-only kernels above say the bytes alone would allow ~5 us), so it
was reverted; its rows with ``tiles`` 1 are this sweep's configurations.

    python benchmarks/gemv_floor.py --json benchmarks/results/gemv_floor_h200.json
    python benchmarks/gemv_floor.py --sweep --json benchmarks/results/gemv_tiles_sweep_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics

import torch
import triton
import triton.language as tl
from graph_timing import graph_us

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_config import Int4Config

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
ROTATE = 160 * 2**20
GROUP = 64


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Read-only reduction: each program XORs ITERS blocks of BLOCK int32 (16-byte vector loads)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.atomic_xor(out_ptr + pid % 1024, tl.xor_sum(acc, axis=0))


@triton.jit
def _tile_once_kernel(qw_ptr, out_ptr, N, rows_k, stride_qw, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_R, BLOCK_N] tile of codes per program, loaded at once (no loop): the most loads in flight."""
    pid_n, pid_r = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                mask=(rows < rows_k)[:, None] & (offs_n < N)[None, :], other=0, eviction_policy="evict_first")
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(w, axis=0), mask=offs_n < N)


@triton.jit
def _tile_loop_kernel(qw_ptr, out_ptr, N, rows_k, stride_qw, per, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """``per`` consecutive [BLOCK_R, BLOCK_N] tiles per program, one after another (gemv_probe's load-only)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.int32)
    for t in range(split * per, split * per + per):
        rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
        acc ^= tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :],
                       mask=(rows < rows_k)[:, None] & (offs_n < N)[None, :], other=0, eviction_policy="evict_first")
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(acc, axis=0), mask=offs_n < N)


def eager_us(fn, repeats=20) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def copy_rows(dev) -> dict:
    nbytes = 2**30
    src = torch.randint(-(2**31), 2**31, (nbytes // 4,), dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    sink = torch.zeros(1024, dtype=torch.int32, device=dev)
    hb, hd = src.view(torch.bfloat16), dst.view(torch.bfloat16)
    block, iters = 1024, 8
    grid = (triton.cdiv(src.numel(), block * iters),)
    out = {
        "graph_copy_TBps": 2 * nbytes / graph_us([lambda: dst.copy_(src)], 10) / 1e6,
        "eager_copy_TBps": 2 * nbytes / eager_us(lambda: dst.copy_(src)) / 1e6,
        "kernel_copy_TBps": 2 * nbytes / eager_us(lambda: torch.add(hb, 0, out=hd)) / 1e6,
        "read_only_TBps": nbytes / eager_us(
            lambda: _read_kernel[grid](src, sink, src.numel(), BLOCK=block, ITERS=iters, num_warps=4)) / 1e6,
    }
    print(out, flush=True)
    return out


def node_rows(dev) -> dict:
    sink = torch.zeros(1024, dtype=torch.int32, device=dev)
    return {"empty_kernel_us": graph_us([lambda: _empty_kernel[(1,)](sink)] * 64),
            "empty_kernel_1056_programs_us": graph_us([lambda: _empty_kernel[(1056,)](sink)] * 64)}


def layer_row(name: str, n: int, k: int, dev) -> dict:
    nbytes = n * k // 2 + n * (k // GROUP) * 2
    copies = max(2, math.ceil(ROTATE / nbytes))
    bufs = [(torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device=dev),
             (torch.rand(k // GROUP, n, device=dev) * 1e-2 + 5e-3).half()) for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    sink = torch.zeros(n, dtype=torch.int32, device=dev)
    rows_k = k // 8
    row = {"layer": name, "N": n, "K": k, "bytes": nbytes,
           "ours_us": graph_us([lambda qw=qw, sc=sc: im.int4_matmul(x, qw, sc, GROUP) for qw, sc in bufs]),
           "ours_cfg": str(im.pick_config(1, n, k, GROUP, dev))}
    for br, bn, w in ((64, 64, 4), (32, 128, 4), (16, 256, 4), (32, 256, 4), (64, 128, 4), (64, 128, 8),
                      (128, 64, 4), (16, 128, 2), (8, 256, 2)):
        grid = (triton.cdiv(n, bn), triton.cdiv(rows_k, br))
        row[f"once_{br}x{bn}w{w}_us"] = graph_us(
            [lambda qw=qw, g=grid, br=br, bn=bn, w=w: _tile_once_kernel[g](
                qw, sink, n, rows_k, qw.stride(0), BLOCK_R=br, BLOCK_N=bn, num_warps=w) for qw, _ in bufs])
    for br, bn, per in ((8, 256, 2), (8, 256, 4), (16, 256, 2)):
        grid = (triton.cdiv(n, bn), triton.cdiv(triton.cdiv(rows_k, br), per))
        row[f"loop_{br}x{bn}p{per}_us"] = graph_us(
            [lambda qw=qw, g=grid, br=br, bn=bn, per=per: _tile_loop_kernel[g](
                qw, sink, n, rows_k, qw.stride(0), per, BLOCK_R=br, BLOCK_N=bn, num_warps=4) for qw, _ in bufs])
    print({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return row


def tile_configs(m: int) -> list[tuple[Int4Config, int]]:
    """(config, K tiles per program): 64-256 columns of 64-row K tiles, 1, 2 or 4 tiles per program."""
    return [(Int4Config("gemv", bn, 64, 1, 4, m), per) for bn, per in itertools.product((64, 128, 256), (1, 2, 4))]


def _concrete(cfg: Int4Config, per: int, case) -> Int4Config:
    """The K split that gives each program ``per`` tiles of this case."""
    return dataclasses.replace(cfg, split_k=max(1, triton.cdiv(case.k_active, cfg.block_k) // per))


def sweep_case(layer: str, rate: float, m: int, configs, dev) -> list[dict]:
    from kernel_bench import build_case

    case = build_case("llama-3.1-8b", layer, rate, GROUP)
    nbytes = case.n_active * case.k_active // 2 + case.n_active * triton.cdiv(case.k_active, GROUP) * 2
    copies = max(2, math.ceil(ROTATE / nbytes))
    bufs = [(torch.randint(-(2**31), 2**31, (case.k_full // 8, case.n_full), dtype=torch.int32, device=dev),
             (torch.rand(case.k_full // GROUP, case.n_full, device=dev) * 1e-2 + 5e-3).half()) for _ in range(copies)]
    x = torch.randn(m, case.k_active, device=dev, dtype=torch.bfloat16)
    kw = case.kernel_kwargs()
    ref = im.int4_matmul_reference(x.float(), *bufs[0], GROUP, **kw)
    rows = []
    for cfg, per in [(None, 0), *configs]:
        conc = None if cfg is None else _concrete(cfg, per, case)
        out = im.int4_matmul(x, *bufs[0], GROUP, config=conc, **kw)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:
            raise AssertionError(f"{layer} rate {rate} M={m} {conc}: relative error {err}")
        us = graph_us([lambda qw=qw, sc=sc, c=conc: im.int4_matmul(x, qw, sc, GROUP, config=c, **kw)
                       for qw, sc in bufs])
        rows.append({"layer": layer, "rate": rate, "batch": m, "bytes": nbytes, "config": str(conc or "default"),
                     "sweep_key": None if cfg is None else (cfg.block_n, per), "us": us,
                     "TBps": nbytes / us / 1e6})
    best = min(rows, key=lambda r: r["us"])
    print(f"{layer:8s} rate {rate:.2f} M={m}: default {rows[0]['us']:.2f} us, best {best['us']:.2f} us "
          f"({best['TBps']:.2f} TB/s) {best['config']}", flush=True)
    return rows


def sweep(dev, layers, path) -> dict:
    report = {"device": torch.cuda.get_device_name(), "rows": []}
    for layer in layers:
        rows = sweep_case(layer, 0.0, 1, tile_configs(1), dev)
        top = [(Int4Config("gemv", bn, 64, 1, 4, 1), per)
               for bn, per in (r["sweep_key"] for r in sorted(rows[1:], key=lambda r: r["us"])[:4])]
        report["rows"] += rows
        if layer != "lm_head":
            report["rows"] += sweep_case(layer, 0.35, 1, top, dev)
        report["rows"] += sweep_case(layer, 0.0, 4, [(dataclasses.replace(c, block_m=4), p) for c, p in top], dev)
        if path:
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--layers", nargs="+", default=list(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.sweep:
        sweep(dev, args.layers if args.layers != list(SHAPES) else [*SHAPES, "lm_head"], args.json)
        return
    report = {"device": torch.cuda.get_device_name(), "copy": copy_rows(dev), "nodes": node_rows(dev)}
    print(report["nodes"], flush=True)
    report["rows"] = [layer_row(name, *SHAPES[name], dev) for name in args.layers]
    report["copy_again"] = copy_rows(dev)  # clocks settled: the same four numbers after the layer timings
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
