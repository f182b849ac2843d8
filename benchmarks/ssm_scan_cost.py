"""What the chunked SSD prefill (kernels/ssm_scan.py) costs against the sequential recurrence: wall time and
multiply-adds for one Mamba2 layer's scan, batch 1, at a few lengths, on the tiny models' shape and on a
Mamba2-8B-like head layout (fewer heads so it stays a CPU-sized run).

    python benchmarks/ssm_scan_cost.py [--device cpu|cuda] [--out benchmarks/results/ssm_scan_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from uniql.kernels.ssm_scan import chunked_scan, sequential_scan_reference

SHAPES = {  # name: heads, groups, head dim P, state N, chunk
    "tiny (H8 P32 N64 G2, chunk 128)": (8, 2, 32, 64, 128),
    "8b-like heads (H32 P64 N128 G2, chunk 256)": (32, 2, 64, 128, 256),
}


def _time(fn, device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def macs(t: int, heads: int, groups: int, p: int, n: int, chunk: int) -> dict[str, int]:
    """Multiply-adds: sequential = state update + readout per step; chunked = C.B per group, the masked
    intra-chunk product per head, chunk states, the entering-state readout, and the chunk recurrence."""
    c = -(-t // chunk)
    tp = c * chunk
    chunked = (groups * tp * chunk * n + heads * tp * chunk * p + 2 * heads * tp * p * n
               + heads * (c + 1) ** 2 * p * n)
    return {"sequential": 2 * t * heads * p * n, "chunked": chunked}


def run(device: torch.device, lengths: list[int], repeat: int) -> list[dict]:
    rows = []
    for name, (heads, groups, p, n, chunk) in SHAPES.items():
        for t in lengths:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, t, heads, p, generator=gen).to(device)
            dt = torch.rand(1, t, heads, generator=gen).to(device) * 0.1
            A = -torch.rand(heads, generator=gen).to(device)
            B, C = (torch.randn(1, t, groups, n, generator=gen).to(device) for _ in range(2))
            t_chunk = _time(lambda: chunked_scan(x, dt, A, B, C, chunk), device, repeat)  # noqa: B023
            t_seq = _time(lambda: sequential_scan_reference(x, dt, A, B, C), device, 1)  # noqa: B023
            ops = macs(t, heads, groups, p, n, chunk)
            rows.append({"shape": name, "tokens": t, "chunked_ms": round(t_chunk * 1e3, 2),
                         "sequential_ms": round(t_seq * 1e3, 2), "speedup": round(t_seq / t_chunk, 1),
                         "chunked_macs": ops["chunked"], "sequential_macs": ops["sequential"],
                         "macs_ratio": round(ops["chunked"] / ops["sequential"], 2)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ssm_scan_cpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = run(device, args.lengths, args.repeat)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": 1, "dtype": "float32"}
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
