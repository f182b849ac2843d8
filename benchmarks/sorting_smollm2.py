"""Sorting quality on SmolLM2-135M (floating point, no fine-tuning) + the ridge-vs-pinv scoring speed.

For each order (uniql, magnitude, random) the same source model is calibrated and sorted with the same data,
seed and ladder rule; wikitext2 perplexity (raw test file, 2048-token windows) is measured at each rate, and
lm-eval zero-shot accuracy (piqa, arc_easy, lambada; full sets unless --zero-shot-limit) for uniql at the
zero-shot rates. Writes benchmarks/results/sorting_smollm2.json after every stage.

    python benchmarks/sorting_smollm2.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.evaluate import evaluate, wikitext2_ppl
from uniql.compressor.model_input import load_source
from uniql.runtime.hf_import import decoder_from_hf

RESULTS = Path(__file__).parent / "results" / "sorting_smollm2.json"


def kept_param_fraction(model, rung: int) -> float:
    """Share of the decoder layers' projection weights a rung keeps (embeddings excluded)."""
    s, h = model.spec, model.spec.hidden_size
    n, g = s.num_heads, s.num_kv_heads

    def params(z):
        return h * ((n + g) * z.qk + (g + n) * z.vo + 3 * z.mlp)

    full = params(model.full_sizes) * s.num_layers
    return sum(params(z) for z in model.ladder.sizes[rung]) / full


def sort_and_measure(base, tokenizer, order, args, report) -> object:
    overrides = {k: v for k, v in (("eps", args.eps), ("max_prune", args.max_prune)) if v is not None}
    cfg = CompressConfig(order=order, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         bi_samples=args.bi_samples, bi_seqlen=args.bi_seqlen, device=args.device, **overrides)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    compress_decoder(model, tokenizer, cfg)
    sort_s = time.perf_counter() - start
    model.to(args.device)
    for rate in args.rates:
        rung = model.ladder.nearest(rate)
        ppl = wikitext2_ppl(model, tokenizer, rung=rung, seqlen=2048, max_windows=args.ppl_windows,
                            device=args.device)["ppl"]
        row = {"order": order, "rate": model.ladder.rates[rung], "wikitext2_ppl": ppl,
               "kept_param_fraction": kept_param_fraction(model, rung), "sort_s": sort_s}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    return model.cpu()


def sweep(base, tokenizer, args, report) -> None:
    """Ablation of the ridge lambda (MLP order) and allocation eps (ladder) for uniql, on wikitext2 VALID
    (tokenized split) so that defaults are never picked on the test set."""
    from uniql.compressor.allocation import build_ladder
    from uniql.paths import data_file
    from uniql.runtime.ladder import dim_steps

    report.setdefault("sweep", [])
    for lam in args.sweep_lambdas:
        cfg = CompressConfig(order="uniql", ridge_lambda=lam, calib_samples=args.calib_samples,
                             calib_seqlen=args.calib_seqlen, bi_samples=args.bi_samples, bi_seqlen=args.bi_seqlen,
                             device=args.device)
        model, result = compress_decoder(copy.deepcopy(base), tokenizer, cfg)
        model.to(args.device)
        spec, prov = model.spec, result["provenance"]
        steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, result["alignment"])
        for eps, cap in itertools.product(args.sweep_eps, args.sweep_caps):
            model.ladder = build_ladder(prov["block_importance"], model.full_sizes, steps, cfg.rates, eps, cap)
            for rate in (0.15, 0.25, 0.35):
                ppl = wikitext2_ppl(model, tokenizer, rung=model.ladder.nearest(rate),
                                    path=data_file("wikitext2/wiki.valid.tokens"), max_windows=40,
                                    device=args.device)["ppl"]
                row = {"ridge_lambda_rel": lam, "eps": eps, "max_prune": cap, "rate": rate, "valid_ppl": ppl}
                report["sweep"].append(row)
                print(json.dumps(row), flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--orders", default="uniql,magnitude,random")
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--zero-shot-rates", default="0,0.15")
    ap.add_argument("--zero-shot-limit", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--bi-samples", type=int, default=32)
    ap.add_argument("--bi-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=None, help="cap wikitext2 windows (smoke runs)")
    ap.add_argument("--ridge", action="store_true", help="also run the 14336-channel ridge-vs-pinv timing")
    ap.add_argument("--sweep", action="store_true", help="only the lambda x eps x cap ablation on wikitext2 valid")
    ap.add_argument("--sweep-lambdas", type=_floats, default=[1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--sweep-eps", type=_floats, default=[0.05, 0.1, 0.2, 1.0, 100.0])
    ap.add_argument("--sweep-caps", type=_floats, default=[0.85])
    ap.add_argument("--eps", type=float, default=None, help="allocation temperature (default: compressor's)")
    ap.add_argument("--max-prune", type=float, default=None, help="allocation cap (default: compressor's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)", "device": args.device,
                   "protocol": {"wikitext2": "raw test, '\\n\\n'-joined rows, 2048-token windows",
                                "calibration": vars(args) | {"rates": args.rates},
                                "compress_config": dataclasses.asdict(CompressConfig())}, "rows": []})

    def save():
        out.write_text(json.dumps(report, indent=1))

    source = load_source("smollm2-135m")
    base = decoder_from_hf(source.hf_model)
    tok = source.tokenizer
    if args.sweep:
        sweep(base, tok, args, report)
        save()
        return
    original = wikitext2_ppl(base.to(args.device), tok, seqlen=2048, max_windows=args.ppl_windows,
                             device=args.device)["ppl"]
    report["original_wikitext2_ppl"] = original
    base.cpu()
    save()
    sorted_models = {}
    for order in args.orders.split(","):
        sorted_models[order] = sort_and_measure(base, tok, order, args, report)
        save()
    if args.zero_shot_rates and "uniql" in sorted_models:
        model = sorted_models["uniql"].to(args.device)
        report["zero_shot"] = []
        for rate in (float(r) for r in args.zero_shot_rates.split(",")):
            rung = model.ladder.nearest(rate)
            res = evaluate(model, tok, ["piqa", "arc_easy", "lambada"], rung=rung, limit=args.zero_shot_limit,
                           batch_size=64, device=args.device)
            for task, metrics in res.items():
                row = {"rate": model.ladder.rates[rung], "task": task, **metrics}
                report["zero_shot"].append(row)
                print(json.dumps(row), flush=True)
            save()
    if args.ridge:
        from ridge_vs_pinv import run

        report["ridge_vs_pinv"] = run(device=args.device)
        print(json.dumps(report["ridge_vs_pinv"]), flush=True)
        save()


if __name__ == "__main__":
    main()
