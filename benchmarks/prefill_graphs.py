"""TTFT with and without the prefill CUDA graphs (``runtime/prefill_graphs.py``), same engine, same run.

The 8B-shaped INT4 engine (random weights, as ``decode_gpu.py``) at each prompt length and rate: the median TTFT of
five one-token requests with the graphs on, then off (each mode's first request captures or compiles; the median
leaves it out). A prompt longer than the largest bucket (1024 tokens; the default lengths end at 2048) runs eagerly
in both modes: an anchor for noise.

    python benchmarks/prefill_graphs.py [--lengths 16 64 128 256 512 1024 2048] [--rates 0 0.35] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model, ttft_samples

from uniql.kernels.switches import check_switches, set_switches
from uniql.runtime.engine import Engine


def rows_for(engine: Engine, lengths, rates) -> list[dict]:
    graphs = engine.runner.prefill_graphs
    if graphs is None:
        raise SystemExit("this engine has no prefill graphs (CPU, a Mamba model, or cuda_graphs off)")
    ladder, rows = engine.runner.model.ladder, []
    for rate in rates:
        rung = ladder.nearest(rate)
        for n in lengths:
            prompt = torch.randint(0, LLAMA_8B.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            row = {"rate": ladder.rates[rung], "prompt_tokens": n, "bucket": graphs.bucket(n)}
            for mode in ("graphs", "eager"):
                engine.runner.prefill_graphs = graphs if mode == "graphs" else None
                row[mode] = ttft_samples(engine, prompt, rung)
            engine.runner.prefill_graphs = graphs
            row["speedup"] = row["eager"]["ttft_median_ms"] / row["graphs"]["ttft_median_ms"]
            print(f"rate {row['rate']:.2f} {n:5d} tokens (bucket {row['bucket']}): TTFT graphs "
                  f"{row['graphs']['ttft_median_ms']:6.1f} ms, eager {row['eager']['ttft_median_ms']:6.1f} ms, "
                  f"x{row['speedup']:.2f}", flush=True)
            rows.append(row)
    return rows


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.35])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    check_switches(strict=True)
    if not torch.cuda.is_available():
        raise SystemExit("prefill graphs need a CUDA device")
    model = build_model(LLAMA_8B, "int4")
    engine = Engine(model, NullTokenizer(), max_num_seqs=1, max_model_len=max(args.lengths) + 8)
    rows = rows_for(engine, args.lengths, args.rates)
    report = {"device": torch.cuda.get_device_name(), "model": "llama-3.1-8b shape, random INT4 weights",
              "torch": torch.__version__, "switches": set_switches(),
              "buckets": list(engine.runner.prefill_graphs.buckets), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
