"""INT4 quality and memory on SmolLM2-135M: FP sorted vs W4 RTN vs W4 GPTQ (+/- Hadamard) at every rate.

One sorted model (uniql order, default calibration) is quantized four ways; wikitext2 perplexity (raw test,
2048-token windows) is measured at rates 0 / 0.15 / 0.25 / 0.35 on the SAME stored bytes for every rate.
Also: bytes resident per rung vs the FP16 model, and, per projection type and rung, the Hessian-weighted
output error of GPTQ vs RTN on the rung's active prefix (GPTQ must win on K-pruned o/down prefixes too).

    python benchmarks/quant_smollm2.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.evaluate import wikitext2_ppl
from uniql.compressor.model_input import load_source
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.memory import fp16_bytes, rung_bytes

RESULTS = Path(__file__).parent / "results" / "quant_smollm2.json"
# name -> (method, Hadamard, GPTQ objective); the plain GPTQ variants keep the full-width objective of the
# committed table, gptq_hadamard_rungs is the compressor's default since the rung-weighted objective
VARIANTS = {"rtn": ("rtn", False, "full"), "gptq": ("gptq", False, "full"), "rtn_hadamard": ("rtn", True, "full"),
            "gptq_hadamard": ("gptq", True, "full"), "gptq_hadamard_rungs": ("gptq", True, "rungs")}


def error_table(log: list[dict]) -> list[dict]:
    """Sum the per-layer errors by (projection type, rung): one row per pair, with GPTQ/RTN ratio."""
    sums = defaultdict(lambda: {"gptq": 0.0, "rtn": 0.0})
    for row in log:
        key = (row["proj"], row["rung"])
        sums[key]["gptq"] += row["gptq"]
        sums[key]["rtn"] += row["rtn"]
    return [{"proj": p, "rung": r, **v, "gptq_over_rtn": v["gptq"] / v["rtn"]} for (p, r), v in sorted(sums.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--variants", default="rtn,gptq,rtn_hadamard,gptq_hadamard,gptq_hadamard_rungs")
    ap.add_argument("--calib-samples", type=int, default=128, help="sorting samples")
    ap.add_argument("--bi-samples", type=int, default=32)
    ap.add_argument("--quant-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration sequence length (all stages)")
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    source = load_source("smollm2-135m")
    tok = source.tokenizer
    cfg = CompressConfig(calib_samples=args.calib_samples, calib_seqlen=args.seqlen, bi_samples=args.bi_samples,
                         bi_seqlen=args.seqlen, device=args.device, quant=None)
    base, result = compress_decoder(decoder_from_hf(source.hf_model), tok, cfg)
    group = result["alignment"].group_size
    report = {"model": "SmolLM2-135M-Instruct, uniql-sorted", "device": args.device, "group_size": group,
              "quant_calibration": {"source": "wikitext2 valid", "samples": args.quant_samples, "seqlen": args.seqlen},
              "rows": [], "bytes": [], "errors": []}
    out = Path(args.out)

    def measure(model, variant):
        model.to(args.device)
        for rate in rates:
            rung = model.ladder.nearest(rate)
            ppl = wikitext2_ppl(model, tok, rung=rung, max_windows=args.ppl_windows, device=args.device)["ppl"]
            report["rows"].append({"variant": variant, "rate": model.ladder.rates[rung], "wikitext2_ppl": ppl})
            print(json.dumps(report["rows"][-1]), flush=True)
        out.write_text(json.dumps(report, indent=1))

    measure(copy.deepcopy(base), "fp")
    for variant in args.variants.split(","):
        method, hadamard, objective = VARIANTS[variant]
        model = copy.deepcopy(base)
        log = [] if variant == "gptq" else None
        qcfg = QuantConfig(method=method, group_size=group, calib_samples=args.quant_samples,
                           calib_seqlen=args.seqlen, hadamard=hadamard, gptq_objective=objective)
        quantize_model(model, tok, qcfg, args.device, error_log=log)
        if log is not None:
            report["errors"] = error_table(log)
        measure(model, variant)
        model.cpu()
    fp16 = fp16_bytes(base.spec, base.full_sizes)
    fp16_weights = rung_bytes(base.spec, [base.full_sizes] * base.spec.num_layers, "float")["weight_bytes"]
    for rate, sizes in zip(base.ladder.rates, base.ladder.sizes, strict=True):
        row = rung_bytes(base.spec, sizes, "int4", group)
        report["bytes"].append({"rate": rate, **row, "fp16_bytes": fp16, "reduction_vs_fp16": fp16 / row["total_bytes"],
                                "weights_reduction_vs_fp16": fp16_weights / row["weight_bytes"]})
    out.write_text(json.dumps(report, indent=1))
    for row in report["bytes"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
