"""GPTQ objective for K-truncated projections: full width only vs every rung's prefix (rung-weighted Hessian).

Quantizes one sorted SmolLM2-135M (a stashed model of lora_smollm2.py via ``--model``, else sorted here with a
small calibration) with each objective and records, per projection type and rung, the Hessian-weighted output
error on the rung's own K prefix, summed over layers (each layer on its own calibration inputs).
Writes benchmarks/results/gptq_objective_smollm2.json: rows {proj, rung, rate, error per objective, ratio}.

    python benchmarks/gptq_objective.py --model /tmp/lora/stash400/after.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.model_input import load_source
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.hf_import import decoder_from_hf

RESULTS = Path(__file__).parent / "results" / "gptq_objective_smollm2.json"
K_TRUNCATED = ("attn.o_proj", "mlp.down_proj", "mamba.out_proj")


def load_model(args, source):
    if args.model:  # lora_smollm2.py stashes (model, group) or (model, provenance) tuples
        obj = torch.load(args.model, weights_only=False)
        return obj[0] if isinstance(obj, tuple) else obj
    cfg = CompressConfig(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         bi_samples=args.bi_samples, bi_seqlen=args.calib_seqlen, quant=None)
    return compress_decoder(decoder_from_hf(source.hf_model), source.tokenizer, cfg)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a pickled sorted ElasticDecoder (default: sort here)")
    ap.add_argument("--calib-samples", type=int, default=32, help="sorting samples (when sorting here)")
    ap.add_argument("--bi-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--quant-samples", type=int, default=8, help="GPTQ calibration samples (x 2048 tokens)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rung0-weights", default="1,3", help="rung-0 weights of the rungs objective to compare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    source = load_source("smollm2-135m")
    tok = source.tokenizer
    model = load_model(args, source)
    objectives = {"full": {"gptq_objective": "full"}}
    for w in args.rung0_weights.split(","):
        objectives[f"rungs_w{w}"] = {"gptq_objective": "rungs", "rung0_weight": float(w)}
    errors, seconds = defaultdict(dict), {}
    for name, options in objectives.items():
        log, start = [], time.perf_counter()
        cfg = QuantConfig(group_size=args.group_size, calib_samples=args.quant_samples, **options)
        quantize_model(copy.deepcopy(model), tok, cfg, args.device, error_log=log)
        seconds[name] = round(time.perf_counter() - start, 1)
        for row in log:
            if row["proj"] in K_TRUNCATED:
                key = (row["proj"], row["rung"])
                errors[key][name] = errors[key].get(name, 0.0) + row["gptq"]
    rows = [{"proj": proj, "rung": rung, "rate": model.ladder.rates[rung], **errs,
             **{f"{n}_over_full": errs[n] / errs["full"] for n in errs if n != "full"}}
            for (proj, rung), errs in sorted(errors.items())]
    for row in rows:
        print(f"{row['proj']:<14} rate {row['rate']:.2f} " + " ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_over_full")))
    report = {"model": args.model or "SmolLM2-135M-Instruct, uniql-sorted here", "group_size": args.group_size,
              "quant_calibration": {"source": "wikitext2 valid", "samples": args.quant_samples, "seqlen": 2048},
              "error": "sum over layers of tr((W - Q) H (W - Q)^T) on the rung's K prefix, H from that layer's "
                       "calibration inputs", "seconds": seconds, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
