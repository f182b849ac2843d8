"""Quality of the SSM sorting on the two tiny trained models (models/mamba2-tiny, models/hybrid-tiny): wikitext2
perplexity at rungs 0 / 0.15 / 0.25 / 0.35, floating point and W4 GPTQ, for the orders uniql vs random vs
magnitude, all through the elastic decoder (the same ladder of per-layer kept sizes for every order: the block
importance is measured on the original model).

Pipeline per (model, order): transformers checkpoint -> ``decoder_from_hf`` -> ``compress_decoder`` (block
importance on wikitext2 valid, sorting statistics on Alpaca, ladder) -> FP perplexity per rung -> GPTQ INT4
(Hadamard, wikitext2 valid) -> W4 perplexity per rung on the same stored bytes. Perplexity follows
compressor/evaluate.py (raw test, non-overlapping windows) with 1024-token windows, the models' training
length; ``--ppl-windows`` caps the windows (CPU time).

    python benchmarks/ssm_quality.py [--device cpu] [--ppl-windows 24] [--out benchmarks/results/ssm_quality.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.evaluate import wikitext2_ppl
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.hf_import import decoder_from_hf

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mamba2-tiny", "hybrid-tiny")
ORDERS = ("uniql", "random", "magnitude")
RESULTS = ROOT / "benchmarks" / "results" / "ssm_quality.json"


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ROOT / "models" / name
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return decoder_from_hf(hf), AutoTokenizer.from_pretrained(path)


def measure(decoder, tok, rates, args, rows: list, **tags) -> None:
    decoder.to(args.device).eval()
    for rate in rates:
        rung = decoder.ladder.nearest(rate)
        res = wikitext2_ppl(decoder, tok, rung=rung, seqlen=args.seqlen, max_windows=args.ppl_windows,
                            device=args.device)
        rows.append({**tags, "rate": decoder.ladder.rates[rung], "wikitext2_ppl": round(res["ppl"], 3),
                     "tokens": res["tokens"]})
        print(json.dumps(rows[-1]), flush=True)


def run(args) -> dict:
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    meta: dict = {}
    for name in args.models:
        for order in args.orders:
            t0 = time.perf_counter()
            model, tok = load(name)
            cfg = CompressConfig(order=order, calib_samples=args.calib_samples, calib_seqlen=args.seqlen,
                                 bi_samples=args.bi_samples, bi_seqlen=args.seqlen, device=args.device, quant=None)
            model, result = compress_decoder(model, tok, cfg)
            meta[f"{name}/{order}"] = {"ladder_mean_kept": [
                {k: sum(getattr(s, k) for s in sizes) / len(sizes) for k in ("mlp", "qk", "vo", "ssm_p", "ssm_n")}
                for sizes in model.ladder.sizes], "group_size": result["alignment"].group_size}
            if "fp" in args.weights:
                measure(copy.deepcopy(model), tok, rates, args, rows, model=name, order=order, weights="fp")
            if "w4" in args.weights:
                qcfg = QuantConfig(method="gptq", group_size=result["alignment"].group_size,
                                   calib_samples=args.quant_samples, calib_seqlen=args.seqlen)
                quantize_model(model, tok, qcfg, args.device)
                measure(model, tok, rates, args, rows, model=name, order=order, weights="w4_gptq")
            meta[f"{name}/{order}"]["wall_s"] = round(time.perf_counter() - t0, 1)
            write(args, rows, meta)
    return write(args, rows, meta)


def write(args, rows, meta) -> dict:
    report = {"info": {"device": args.device, "seqlen": args.seqlen, "ppl_windows": args.ppl_windows,
                       "calib": {"sort": f"alpaca x {args.calib_samples}", "bi": f"wikitext2 valid x {args.bi_samples}",
                                 "gptq": f"wikitext2 valid x {args.quant_samples}, hadamard"},
                       "ladder": meta},
              "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--orders", nargs="+", default=list(ORDERS))
    ap.add_argument("--weights", nargs="+", default=["fp", "w4"], choices=["fp", "w4"])
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--ppl-windows", type=int, default=24)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--bi-samples", type=int, default=16)
    ap.add_argument("--quant-samples", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    run(args)


if __name__ == "__main__":
    main()
