"""How the batch-1 decode GEMV's time depends on its K split (GPU): every distinct split count of a layer, at the
engine's group size, against the split ``pick_config`` takes, with the compiled kernels' registers (which set
how many programs an SM holds, i.e. how many fit in one wave).

Why: ``pick_config`` aims the wide layers at ONE wave of 8 programs an SM (rounding up left a second wave of a
few dozen programs, results/split_rounding_ab_h100.json) and gives the attention-sized and K-heavy layers the
deepest split (two K tiles a program, from an H200 sweep whose candidates were 2-16 programs an SM rounded up).
The GEMV variants hold 40-64 registers a thread (8-12 programs an SM at 4 warps, results/decode_profile_graph_h100
.json), so one wave can be larger than 8 an SM, and splits in between were never timed. Same timing as
``kernel_bench.py`` (rotated weights, CUDA graph, median); every output is checked against the reference.

    python benchmarks/split_sweep.py [--layers qkv o gate_up down lm_head] [--rates 0 0.35] --json out.json
    python benchmarks/split_sweep.py --cpu-smoke --json /tmp/s.json   # tiny shapes, Triton interpreter (CI-able)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # Triton reads the flag when a kernel is defined: before any uniql.kernels import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from kernel_bench import MODELS, ROTATE_BYTES, Bench, Case, Timer, build_case, int4_buffers, time_ours  # noqa: E402
from sass_gemv import compiled_gemv_registers  # noqa: E402

from uniql.kernels import int4_matmul  # noqa: E402
from uniql.kernels.int4_format import packed_bytes  # noqa: E402


def distinct_splits(k_tiles: int) -> list[int]:
    """Every split count the launcher can run (it trims a split to ``cdiv(k_tiles, cdiv(k_tiles, split))``)."""
    return sorted({triton.cdiv(k_tiles, per) for per in range(1, k_tiles + 1)}, reverse=True)


# Mamba2-8B's projections (d_model 4096, 128 heads of 64, 8 groups of state 128; ssm_decode_gpu.py's shape) at
# rates 0 and 0.35 (P' 42, N' 80: runtime/ladder.py), as one segment of the fused z|x|B|C|dt width
MAMBA2_8B = [Case("mamba2-8b-shape", "in_proj", 0.0, 18560, 4096, 4096, ((0, 18560),)),
             Case("mamba2-8b-shape", "in_proj", 0.35, 18560, 4096, 4096, ((0, 12160),)),
             Case("mamba2-8b-shape", "out_proj", 0.0, 4096, 8192, 8192, ((0, 4096),)),
             Case("mamba2-8b-shape", "out_proj", 0.35, 4096, 8192, 5376, ((0, 4096),))]


def sweep_case(bench: Bench, case: Case, block_ns: list[int]) -> list[dict]:
    model, layer, rate = case.model, case.layer, case.rate
    bufs = int4_buffers(bench, case)
    x = torch.randn(1, case.k_active, dtype=bench.dtype, device=bench.device)
    base = bench.kernel.pick_config(1, case.n_active, case.k_active, bench.group_size, bench.device)
    k_tiles = triton.cdiv(case.k_active, base.block_k)
    rows = []
    for block_n in sorted({base.block_n, *block_ns}):
        blocks = sum(triton.cdiv(n, block_n) for _, n in case.segments)
        for split in distinct_splits(k_tiles):
            if split > max(1, k_tiles // 2) and split != 1:  # a program of one K tile: half the tile pair idle
                continue
            cfg = replace(base, block_n=block_n, split_k=split)
            us = time_ours(bench, case, bufs, x, cfg)
            rows.append({**case.fields(), "block_n": block_n, "block_k": base.block_k, "split": split,
                         "programs": blocks * split, "us": us, "picked": cfg == base,
                         "TBps": packed_bytes(case.k_active, case.n_active, bench.group_size) / us / 1e6})
    best = min(rows, key=lambda r: r["us"])
    picked = next((r for r in rows if r["picked"]), None)
    print(f"{model} {layer} rate {rate}: picked {base.block_n} cols x {base.split_k} splits "
          f"{picked['us'] if picked else float('nan'):.2f} us; best {best['block_n']} x {best['split']} "
          f"({best['programs']} programs) {best['us']:.2f} us", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b"], choices=sorted(MODELS))
    ap.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down", "lm_head"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.35])
    ap.add_argument("--group-size", type=int, default=128, help="the engine's (decode_gpu.py builds g128)")
    ap.add_argument("--block-n", type=int, nargs="*", default=[64, 128, 256], help="column blocks also tried")
    ap.add_argument("--mamba", action="store_true", help="also Mamba2-8B's in_proj / out_proj at rates 0, 0.35")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:  # (TRITON_INTERPRET was set at import, from the command line)
        args.models, args.layers, args.group_size, args.block_n = ["tiny"], ["o", "gate_up"], 32, [64]
    elif not torch.cuda.is_available():
        raise SystemExit("split_sweep.py times GPU kernels: no CUDA device here (--cpu-smoke runs tiny shapes)")
    bench = Bench(int4_matmul, torch.device("cpu" if smoke else "cuda"), torch.float16 if smoke else torch.bfloat16,
                  args.group_size, Timer(not smoke, 1 if smoke else args.repeats),
                  rotate_bytes=0 if smoke else ROTATE_BYTES, sweep=None)
    cases = [build_case(model, layer, rate, args.group_size) for model in args.models for layer in args.layers
             for rate in (args.rates if layer != "lm_head" else [0.0])]
    rows = []
    for case in cases + (MAMBA2_8B if args.mamba and not smoke else []):
        rows += sweep_case(bench, case, args.block_n)
    out = {"device": "cpu (interpreter)" if smoke else torch.cuda.get_device_name(),
           "sms": None if smoke else torch.cuda.get_device_properties(0).multi_processor_count,
           "group_size": args.group_size, "dtype": str(bench.dtype), "batch": 1, "rows": rows,
           "registers": [] if smoke else compiled_gemv_registers(), "notes": bench.timer.notes}
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
