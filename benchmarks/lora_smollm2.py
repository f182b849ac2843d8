"""Masked LoRA recovery on SmolLM2-135M: W4 GPTQ quality per rung before vs after, same data budget.

The source model is sorted once as the compressor does (uniql order, default calibration); "before" quantizes
the sorted model directly, "after" first runs masked LoRA (compressor/finetune.py: one rung per step drawn from
the ladder, heavier rungs more often), merges it and then quantizes with the same GPTQ settings. Both are
evaluated at rungs 0 / 0.15 / 0.25 / 0.35 on wikitext2 perplexity (raw test, 2048-token windows) and lm-eval
piqa / arc_easy / lambada accuracy on the local files. Writes benchmarks/results/lora_smollm2.json after every
row (schema of issue 8: {"budget": {...}, "rows": [{"stage", "rate", "wikitext2_ppl", "piqa", ...}]}).

    python benchmarks/lora_smollm2.py --device cuda

A run longer than one device call (10 min) goes in pieces with ``--stash DIR`` on a disk that outlives the call
(/tmp of a warm machine): the sorted, fine-tuned and quantized models are pickled there and reused, training
resumes from its adapter checkpoints, finished rows are kept; ``--stop-after`` ends a call at a stage boundary.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.evaluate import evaluate, paired_change, wikitext2_ppl
from uniql.compressor.finetune import FinetuneConfig, finetune_decoder
from uniql.compressor.finetune_state import latest_step
from uniql.compressor.model_input import load_source
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.hf_import import decoder_from_hf

RESULTS = Path(__file__).parent / "results" / "lora_smollm2.json"
ZERO_SHOT = ("piqa", "arc_easy", "lambada")


def cached(stash: Path | None, name: str, build, reused: list | None = None):
    """``build()``, or what an earlier call of this run pickled under ``stash`` (same arguments assumed; its
    name then goes to ``reused``)."""
    path = stash / f"{name}.pt" if stash else None
    if path is not None and path.exists():
        print(f"reusing {path}", flush=True)
        if reused is not None:
            reused.append(name)
        return torch.load(path, weights_only=False)
    obj = build()
    if path is not None:  # written aside and renamed: a call killed mid-write leaves no torn file behind
        torch.save(obj, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return obj


def variant_changes(base, spec: str) -> dict:
    """``"distill=0.5;rung_decay=0"`` -> {"distill": 0.5, "rung_decay": 0.0}, typed like the fields of the
    dataclass ``base`` (FinetuneConfig, QuantConfig) they change."""
    changes = {}
    for item in filter(None, spec.split(";")):
        name, _, value = item.partition("=")
        current = getattr(base, name.strip(), None)
        if not isinstance(current, (str, int, float)) or isinstance(current, bool):
            raise SystemExit(f"{name.strip()!r} is not a str/int/float field of {type(base).__name__}")
        changes[name.strip()] = type(current)(value.strip())
    return changes


def has_row(report: dict, stage: str, rate: float) -> bool:
    return any(r["stage"] == stage and abs(r["rate"] - rate) < 1e-6 for r in report["rows"])


def ppl_rows(models: dict, tok, args, report: dict, save) -> None:
    """Perplexity of both stages at every rate first (cheap), interleaved so a cut-short run still compares."""
    for rate in args.rates:
        for stage, model in models.items():
            rung = model.ladder.nearest(rate)
            if has_row(report, stage, model.ladder.rates[rung]):
                continue
            ppl = wikitext2_ppl(model, tok, rung=rung, max_windows=args.ppl_windows, device=args.device)["ppl"]
            report["rows"].append({"stage": stage, "rate": model.ladder.rates[rung], "rung": rung,
                                   "wikitext2_ppl": ppl})
            print(json.dumps(report["rows"][-1]), flush=True)
            save()


def zero_shot_rows(models: dict, tok, args, report: dict, save) -> None:
    """The rows that decide the acceptance first (pruned rungs, before vs after), the variant last."""
    order = {"before": 0, "after": 0, "after_variant": 1, "before_fp": 2, "after_fp": 2}
    tasks = args.zero_shot_tasks.split(",")
    for row in sorted(report["rows"], key=lambda r: (order[r["stage"]], r["rate"] == 0.0, r["rate"])):
        if all(t in row for t in tasks):
            continue
        start = time.perf_counter()
        full = [t for t in tasks if t in args.zero_shot_full]
        capped = [t for t in tasks if t not in full]
        res = {}
        for names, limit in ((capped, args.zero_shot_limit), (full, None)):
            if names:
                res.update(evaluate(models[row["stage"]], tok, names, rung=row["rung"], limit=limit, batch_size=64,
                                    device=args.device, per_doc=True))
        row.update({t: res[t]["acc"] for t in tasks})
        row["n"] = {t: res[t].get("n") for t in tasks}
        row["correct"] = {t: res[t]["correct"] for t in tasks}  # per document: the paired comparison below
        row["zero_shot_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        save()


def paired_rows(report: dict) -> list[dict]:
    """Each tuned stage vs its untuned twin at each rate, document by document (McNemar): a point of accuracy is
    noise on one run's own, so this says which changes the fine-tuning really made."""
    rows = {(r["stage"], r["rate"]): r for r in report["rows"] if "correct" in r}
    out = []
    for (stage, rate), after in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = "before_fp" if stage == "after_fp" else "before"
        before = rows.get((base, rate))
        if stage.startswith("before") or before is None:
            continue
        for task in sorted(set(after["correct"]) & set(before["correct"])):
            if len(after["correct"][task]) == len(before["correct"][task]):
                change = paired_change(before["correct"][task], after["correct"][task])
                out.append({"stage": stage, "vs": base, "rate": rate, "task": task, **change})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512, help="fine-tuning sequence length")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"),
                    help="bf16 autocast of the fine-tuning (auto: GPU only)")
    ap.add_argument("--rung-decay", type=float, default=0.1)
    ap.add_argument("--data", default="alpaca")
    ap.add_argument("--distill", type=float, default=0.0, help="self-distillation weight (0 = plain NLL)")
    ap.add_argument("--distill-temperature", type=float, default=1.0)
    ap.add_argument("--variant", default=None,
                    help="also fine-tune a variant with these settings changed, stage 'after_variant' "
                         "(e.g. data=alpaca,wikitext2 or distill=0.5;rung_decay=0)")
    ap.add_argument("--calib-samples", type=int, default=128, help="sorting samples (x 2048 tokens)")
    ap.add_argument("--bi-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--quant-samples", type=int, default=32, help="GPTQ calibration samples")
    ap.add_argument("--quant-seqlen", type=int, default=2048)
    ap.add_argument("--quant-options", default="", help='other QuantConfig fields for both stages, like --variant '
                    '(e.g. "gptq_objective=full" or "rung0_weight=2")')
    ap.add_argument("--ppl-windows", type=int, default=None, help="cap wikitext2 windows (smoke runs)")
    ap.add_argument("--where", default=None, help="label for budget.where (default: the device)")
    ap.add_argument("--zero-shot-limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--zero-shot-tasks", default=",".join(ZERO_SHOT), help="comma-separated subset")
    ap.add_argument("--zero-shot-full", default="", help="comma-separated tasks evaluated on all documents "
                                                         "whatever --zero-shot-limit says")
    ap.add_argument("--eval-fp", action="store_true",
                    help="also evaluate both stages unquantized (stages before_fp / after_fp)")
    ap.add_argument("--no-zero-shot", dest="zero_shot", action="store_false")
    ap.add_argument("--stash", default=None, help="directory that keeps models, adapter checkpoints and rows "
                                                  "between calls of one run")
    ap.add_argument("--stop-after", choices=("sort", "train", "quantize"), default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.zero_shot_full = [t for t in args.zero_shot_full.split(",") if t]
    out = Path(args.out)
    t0 = time.perf_counter()
    source = load_source("smollm2-135m")
    tok = source.tokenizer
    cfg = CompressConfig(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         bi_samples=args.bi_samples, bi_seqlen=args.calib_seqlen, device=args.device, quant=None)
    stash = Path(args.stash) if args.stash else None
    if stash:
        stash.mkdir(parents=True, exist_ok=True)

    def sort():
        model, result = compress_decoder(decoder_from_hf(source.hf_model), tok, cfg)
        return model, result["alignment"].group_size

    reused = []  # what this call took from the stash: its timings (training, GPTQ) were taken by earlier calls
    sorted_model, group = cached(stash, "sorted", sort, reused)
    if args.stop_after == "sort":
        return
    qcfg = dict(method="gptq", group_size=group, calib_samples=args.quant_samples,
                calib_seqlen=args.quant_seqlen)
    qcfg.update(variant_changes(QuantConfig(**qcfg), args.quant_options))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), uniql-sorted", "device": device,
              "quantization": {**QuantConfig(**qcfg).manifest(), "calib": "wikitext2 valid"},
              "args": vars(args),
              "sort_calibration": {"sort": [args.calib_samples, args.calib_seqlen],
                                   "block_importance": [args.bi_samples, args.calib_seqlen]},
              "protocol": {"wikitext2": "raw test, 2048-token windows" + (
                  f" (first {args.ppl_windows})" if args.ppl_windows else " (all)"),
                  "zero_shot": "lm-eval task definitions on local files, acc, "
                               + (f"first {args.zero_shot_limit} docs" if args.zero_shot_limit else "full sets")
                               + (f" (full sets: {', '.join(args.zero_shot_full)})" if args.zero_shot_full else "")},
              "budget": None, "rows": []}
    if stash and (stash / "report.json").exists():
        report["rows"] = json.loads((stash / "report.json").read_text())["rows"]

    def save():
        for path in (out, *([stash / "report.json"] if stash else [])):
            path.write_text(json.dumps(report, indent=1))

    ft = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        seqlen=args.seqlen, lr=args.lr, rung_decay=args.rung_decay, data=args.data,
                        distill=args.distill, distill_temperature=args.distill_temperature,
                        mixed_precision=args.mixed_precision,
                        device="cpu" if args.device == "cpu" else None)

    def train(stage: str, config: FinetuneConfig):
        if stash:  # adapter checkpoints every save_every steps; a call cut short continues from the last one
            state = stash / f"{stage}_state"
            config = dataclasses.replace(config, state_dir=str(state), resume=latest_step(state) is not None)
        return cached(stash, stage, lambda: finetune_decoder(copy.deepcopy(sorted_model), tok, config), reused)

    tuned, provenance = train("after", ft)
    models = {"before": sorted_model, "after": tuned}
    if args.variant:
        changes = variant_changes(ft, args.variant)
        models["after_variant"], variant = train("after_variant", dataclasses.replace(ft, **changes))
        report["variant"] = {"changes": changes, "data": variant["data"], "wall_s": variant["wall_s"],
                             "tokens": variant["tokens"], "distill": variant["distill"],
                             "rung_weighting": variant["rung_weighting"], "loss_last_10": variant["loss_last_10"]}
    report["budget"] = {"steps": provenance["steps"], "tokens": provenance["tokens"],
                        "loss_tokens": provenance["loss_tokens"], "wall_s": provenance["wall_s"],
                        "where": args.where or f"{provenance['device']} x{provenance['processes']}, "
                                                f"{provenance['mixed_precision']} autocast",
                        "global_batch": provenance["global_batch"], "seqlen": args.seqlen, "lr": args.lr,
                        "data": provenance["data"], "rung_weighting": provenance["rung_weighting"],
                        "lora": provenance["lora"], "distill": provenance["distill"],
                        "loss_first": provenance["loss_first"],
                        "loss_last_10": provenance["loss_last_10"]}
    print(json.dumps(report["budget"]), flush=True)
    save()
    if args.stop_after == "train":
        return
    # unquantized copies (stages *_fp) tell whether a change comes from the fine-tuning or from GPTQ after it
    full_precision = {f"{stage}_fp": copy.deepcopy(models[stage]).to(args.device)
                      for stage in ("before", "after") if args.eval_fp}
    for stage in list(models):

        def quantize(model=models[stage], stage=stage):
            start = time.perf_counter()
            quantize_model(model, tok, QuantConfig(**qcfg), args.device)
            report.setdefault("gptq_s", {})[stage] = round(time.perf_counter() - start, 1)
            return model

        models[stage] = cached(stash, f"{stage}_w4", quantize, reused).to(args.device)
    if args.stop_after == "quantize":
        return
    models.update(full_precision)
    if reused:  # total_s below then covers this call only
        report["reused_from_stash"] = reused
    ppl_rows(models, tok, args, report, save)
    if args.zero_shot:
        zero_shot_rows(models, tok, args, report, save)
        report["paired"] = paired_rows(report)
        for row in report["paired"]:
            print(f"{row['stage']:>13} vs {row['vs']:<9} rate {row['rate']:.2f} {row['task']:<8} "
                  f"{100 * row['delta']:+5.1f} pts (+{row['gained']} / -{row['lost']} docs, "
                  f"p = {row['p_mcnemar']:.3f})")
    report["total_s"] = round(time.perf_counter() - t0, 1)
    save()


if __name__ == "__main__":
    main()
