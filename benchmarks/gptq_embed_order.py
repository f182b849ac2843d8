"""A/B of when the embedding / lm_head tables are quantized relative to GPTQ's calibration (CPU): after it (the
order before 2026-12-05: layer 0's Hessians came from float embeddings) vs before it (method doc 6.1 step 3, the
tree's order). The default model with the `make serve` recipe, built once per order; wikitext2 perplexity at rates
0 and 0.35 on the first ``--windows`` test windows.

    python benchmarks/gptq_embed_order.py [--windows 16] [--work /tmp/gptq_embed_order]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import uniql.compressor.compress as compress_mod
import uniql.compressor.quantize as quantize_mod
from uniql.compressor.evaluate import evaluate
from uniql.runtime.checkpoint import load_checkpoint, load_tokenizer
from uniql.server.default_model import recipe_flags

RESULTS = Path(__file__).parent / "results" / "gptq_embed_order_cpu.json"


@contextlib.contextmanager
def tables_after_calibration():
    """The earlier order: quantize_model quantizes the tables only once GPTQ is done."""
    real_tables, real_model, deferred = quantize_mod.quantize_tables, quantize_mod.quantize_model, []

    def late(model, *args, **kwargs):
        out = real_model(model, *args, **kwargs)
        for table_args in deferred:
            real_tables(*table_args)
        return out

    quantize_mod.quantize_tables = lambda *args: deferred.append(args)
    quantize_mod.quantize_model = compress_mod.quantize_model = late
    try:
        yield
    finally:
        quantize_mod.quantize_tables, quantize_mod.quantize_model = real_tables, real_model
        compress_mod.quantize_model = real_model


def build(out: Path, late: bool) -> None:
    from uniql.cli import main

    if (out / "uniql.json").is_file():
        return
    with tables_after_calibration() if late else contextlib.nullcontext():
        assert main(["compress", "smollm2-135m", "--out", str(out), *recipe_flags().split()]) == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default="/tmp/gptq_embed_order")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rows = []
    for order, late in (("tables_after_gptq", True), ("tables_before_gptq", False)):
        ckpt = Path(args.work) / order
        build(ckpt, late)
        model, _ = load_checkpoint(ckpt)
        for rate in (0.0, 0.35):
            rung = model.ladder.nearest(rate)
            ppl = evaluate(model, load_tokenizer(ckpt), ["wikitext2"], rung=rung, max_windows=args.windows,
                           seqlen=2048)["wikitext2"]["ppl"]
            rows.append({"order": order, "rate": model.ladder.rates[rung], "wikitext2_ppl": ppl})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": "cpu", "recipe": recipe_flags(), "windows": args.windows,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
