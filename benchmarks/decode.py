"""Decode benchmark: TTFT, TPOT and tokens/s of the UniQL engine per rung, against HF transformers, same run.

CPU mode (this file's current scope): a SmolLM2-135M UniQL checkpoint through ``uniql.runtime.engine.Engine``
at rates 0 / 0.15 / 0.25 / 0.35, once per ``--dtypes`` entry (float32: dense dequantized weights, exact;
bfloat16: the INT4 codes read by aten's CPU int4 GEMM, W4A16 like the GPU path), vs transformers fp32 eager
``generate`` of the original model on the same prompt, greedy, the same number of new tokens. TTFT = time to
the first token; TPOT = median time between later tokens (engine) or (total - TTFT) / (new - 1) (transformers).
Peak memory = the process's peak RSS.

    python benchmarks/decode.py --ckpt out/smollm2-135m-uniql --json benchmarks/results/decode_cpu.json

The GPU mode of the issue (an 8B-shaped checkpoint with CUDA graphs) is ``decode_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="a SmolLM2-135M UniQL checkpoint (e.g. from `make serve`)")
    ap.add_argument("--source", default="smollm2-135m", help="the original model for the transformers anchor")
    ap.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.15, 0.25, 0.35])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"],
                    help="engine activation dtypes, one set of rows each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from uniql.compressor.model_input import load_source
    from uniql.runtime.bench import PROMPT, decode_rows, hf_row
    from uniql.runtime.checkpoint import load_tokenizer
    from uniql.runtime.dtypes import load_for_inference
    from uniql.runtime.engine import Engine

    tokenizer = load_tokenizer(args.ckpt)
    ids = tokenizer(PROMPT)["input_ids"]
    rows = []
    for dtype in args.dtypes:
        model, manifest = load_for_inference(args.ckpt, "cpu", dtype)
        engine = Engine(model, tokenizer, max_num_seqs=1)
        weights = type(model.layers[0].mlp.down_proj.host).__name__
        name = "uniql" if dtype == "bfloat16" else f"uniql_{dtype}"  # bfloat16: the CPU default (dtypes.py)
        rows += [{**row, "engine": name, "dtype": dtype, "weights": weights}
                 for row in decode_rows(engine, tokenizer, args.rates, args.new_tokens)]  # raises if one failed
        del engine, model
    rows.append(hf_row(load_source(args.source).hf_model, ids, args.new_tokens))
    quant = (manifest.get("quantization") or {}).get("method", "fp")
    report = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "model": f"{args.source} UniQL ({quant})",
              "prompt_tokens": len(ids), "rows": rows,
              "notes": "peak_mem_bytes is the process's peak RSS so far (cumulative across rows); weights: the CPU "
                       "runner's host form (DenseHost = dequantized once, CpuInt4 = aten's int4 GEMM on the codes)"}
    for r in rows:
        print(f"{r['engine']:13s} {r['dtype']:8s} rate {r['rate']:.2f}: TTFT {r['ttft_ms']:7.1f} ms  "
              f"TPOT {r['tpot_ms']:6.1f} ms  {r['tokens_per_s']:6.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
