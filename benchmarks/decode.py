"""Decode benchmark: TTFT, TPOT and tokens/s of the UniQL engine per rung, against HF transformers, same run.

CPU mode (this file's current scope): a SmolLM2-135M UniQL checkpoint through ``uniql.runtime.engine.Engine``
at rates 0 / 0.15 / 0.25 / 0.35 vs transformers fp32 eager ``generate`` of the original model on the same
prompt, greedy, the same number of new tokens. TTFT = time to the first token; TPOT = median time between
later tokens (engine) or (total - TTFT) / (new - 1) (transformers). Peak memory = the process's peak RSS.

    python benchmarks/decode.py --ckpt out/smollm2-135m-uniql --json benchmarks/results/decode_cpu.json

The GPU mode of the issue (an 8B-shaped checkpoint with CUDA graphs) needs the graph runner; not yet here.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type with an oil-based ink and a screw press. Explain why this mattered:")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def engine_row(engine, ids: list[int], rate: float, new_tokens: int) -> dict:
    from uniql.runtime.request import SamplingParams

    rung = engine.runner.model.ladder.nearest(rate)
    req = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), rung=rung)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.stream(req)]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    total = stamps[-1] - start
    return {"engine": "uniql", "rate": engine.runner.model.ladder.rates[rung], "rung": rung, "batch": 1,
            "ttft_ms": (stamps[0] - start) * 1e3, "tpot_ms": statistics.median(gaps) * 1e3,
            "tokens_per_s": len(req.output_ids) / total, "peak_mem_bytes": peak_rss_bytes(),
            "new_tokens": len(req.output_ids)}


def hf_row(hf_model, ids: list[int], new_tokens: int) -> dict:
    x = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf_model.generate(x, max_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        hf_model.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        hf_model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return {"engine": "hf_eager", "rate": 0.0, "batch": 1, "ttft_ms": ttft * 1e3,
            "tpot_ms": (total - ttft) / (new_tokens - 1) * 1e3, "tokens_per_s": new_tokens / total,
            "peak_mem_bytes": peak_rss_bytes(), "new_tokens": new_tokens, "dtype": "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="a SmolLM2-135M UniQL checkpoint (e.g. from `make serve`)")
    ap.add_argument("--source", default="smollm2-135m", help="the original model for the transformers anchor")
    ap.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.15, 0.25, 0.35])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from uniql.compressor.model_input import load_source
    from uniql.runtime.checkpoint import load_checkpoint, load_tokenizer
    from uniql.runtime.engine import Engine

    model, manifest = load_checkpoint(args.ckpt)
    tokenizer = load_tokenizer(args.ckpt)
    ids = tokenizer(PROMPT)["input_ids"]
    engine = Engine(model, tokenizer, max_num_seqs=1)
    engine_row(engine, ids, 0.0, 4)  # warm-up
    rows = [engine_row(engine, ids, rate, args.new_tokens) for rate in args.rates]
    rows.append(hf_row(load_source(args.source).hf_model, ids, args.new_tokens))
    quant = (manifest.get("quantization") or {}).get("method", "fp")
    report = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "model": f"{args.source} UniQL ({quant})",
              "prompt_tokens": len(ids), "rows": rows,
              "notes": "peak_mem_bytes is the process's peak RSS so far (cumulative across rows)"}
    for r in rows:
        print(f"{r['engine']:9s} rate {r['rate']:.2f}: TTFT {r['ttft_ms']:7.1f} ms  TPOT {r['tpot_ms']:6.1f} ms  "
              f"{r['tokens_per_s']:6.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
