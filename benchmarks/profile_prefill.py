"""Where a prefill's time goes: TTFT of the 8B-shaped engine on INT4 and on dense bf16 weights, and each one's GPU
time by kind of kernel (dequantize, cuBLAS GEMM, attention, the INT4 Triton kernels, the rest).

Why: at stop 44 (H100, ``results/decode_h100.json``) a 1024-token prompt's TTFT was 63 ms (median) on INT4 against
34 ms on the same engine's dense bf16 weights, and the pruned rungs were no faster (67 ms at rate 0.35; dense 49 ms
there, slower than its rate 0). The kernel table puts dequantize + cuBLAS at 1.1-1.27x cuBLAS alone at M = 2048,
which explains a few ms, not 29. This says whether the rest is GPU work (which kernels) or host time between them
(``host_or_idle_ms``: wall TTFT minus the GPU's busy time).

    python benchmarks/profile_prefill.py [--rates 0,0.35] [--prompt-tokens 1024] [--json out.json]
    python benchmarks/profile_prefill.py --tiny --device cpu      # the code path on a small model (CPU: op times)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model, ttft_samples
from profile_decode import _kernel_table

from uniql.kernels.switches import check_switches, set_switches
from uniql.runtime.engine import Engine
from uniql.runtime.request import SamplingParams

TINY = replace(LLAMA_8B, vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
               intermediate_size=512)
# (category, substrings of a kernel's name), first match wins: our Triton kernels before cuBLAS's GEMM names
CATEGORIES = (
    ("dequantize", ("dequant",)),
    ("int4 kernels", ("_gemv", "_gemm_kernel", "int4")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("cublas gemm", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm")),
)


def category(kernel: str) -> str:
    """The category of a kernel (or, on CPU, an aten op) by its name; ``other`` when none matches."""
    low = kernel.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def kernel_table(prof, cuda: bool) -> list[dict]:
    """GPU time per kernel name (CUDA, as ``profile_decode``), or self CPU time per op (CPU), in microseconds,
    largest first."""
    if cuda:
        rows = [(r["kernel"], r["us_per_step"], r["launches_per_step"]) for r in _kernel_table(prof, 1)]
    else:
        rows = [(e.key[:80], e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    table = [{"kernel": k, "us": us, "launches": n, "category": category(k)} for k, us, n in rows]
    return sorted(table, key=lambda r: -r["us"])


def summarize(table: list[dict], wall_ms: float) -> dict:
    """Milliseconds per category, their sum, and the wall time the kernels do not account for."""
    by_cat: dict[str, float] = defaultdict(float)
    for row in table:
        by_cat[row["category"]] += row["us"] / 1e3
    busy = sum(by_cat.values())
    return {"by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])), "busy_ms": busy,
            "wall_ms": wall_ms, "host_or_idle_ms": wall_ms - busy}


def profile_one(engine: Engine, prompt: list[int], rung: int, device: torch.device) -> dict:
    """One one-token request (prefill + first pick) under the profiler, after a warm-up; TTFT medians beside it."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    cuda = device.type == "cuda"
    samples = ttft_samples(engine, prompt, rung)  # also the warm-up: kernels compiled, allocator grown
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        req = engine.add_request(prompt, params, rung=rung)
        for _ in engine.stream(req):
            pass
        if cuda:
            torch.cuda.synchronize()
    table = kernel_table(prof, cuda)
    return {**samples, **summarize(table, samples["ttft_median_ms"]), "kernels": table[:40],
            "host_functions": host_functions(engine, prompt, rung, params, cuda)}


def host_functions(engine: Engine, prompt: list[int], rung: int, params, cuda: bool, top: int = 30) -> list[dict]:
    """One more request under cProfile: the Python functions where the host spends its time issuing the prefill
    (largest own time first), to tell launch overhead from work the host need not do."""
    profiler = cProfile.Profile()
    with profiler:
        req = engine.add_request(prompt, params, rung=rung)
        for _ in engine.stream(req):
            pass
        if cuda:
            torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "own_ms": own * 1e3, "cum_ms": cum * 1e3}
            for (file, line, name), (_, calls, own, cum, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def run(weights: str, spec, rates, prompt_tokens: int, device: torch.device) -> list[dict]:
    model = build_model(spec, weights, device=device)
    engine = Engine(model, NullTokenizer(), max_num_seqs=1, max_model_len=prompt_tokens + 8)
    engine.runner.prefill_graphs = None  # the eager prefill's kernels and host time (prefill_graphs.py times graphs)
    prompt = torch.randint(0, spec.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for rate in rates:
        rung = model.ladder.nearest(rate)
        row = {"weights": weights, "rate": model.ladder.rates[rung], "rung": rung,
               **profile_one(engine, prompt, rung, device)}
        cats = ", ".join(f"{k} {v:.1f}" for k, v in row["by_category_ms"].items())
        print(f"{weights:5s} rate {row['rate']:.2f}: TTFT median {row['ttft_median_ms']:.1f} ms, kernels "
              f"{row['busy_ms']:.1f} ms ({cats}), host or idle {row['host_or_idle_ms']:.1f} ms", flush=True)
        for fn in row["host_functions"][:12]:
            print(f"    host {fn['own_ms']:7.2f} ms own {fn['cum_ms']:7.2f} cum {fn['calls']:6d} calls  "
                  f"{fn['function']}")
        rows.append(row)
    return rows


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0,0.35", help="comma-separated, each on the same model")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--weights", nargs="+", default=["int4", "dense"], choices=["int4", "dense"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (tests, CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    check_switches(strict=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (op times, not kernels)")
    rates = [float(r) for r in args.rates.split(",")]
    spec = TINY if args.tiny else LLAMA_8B
    rows = [row for weights in args.weights for row in run(weights, spec, rates, args.prompt_tokens, device)]
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "model": "tiny llama" if args.tiny else "llama-3.1-8b shape, random weights", "torch": torch.__version__,
              "switches": set_switches(), "prompt_tokens": args.prompt_tokens, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
