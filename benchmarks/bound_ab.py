"""Batch-1 decode TPOT with the CUDA graphs sized for several context bounds (``max_model_len``), optionally against
another version of ``kernels/decode_attention.py`` in the same run (GPU).

Why: a decode graph's attention grid is sized for the engine's ``max_model_len``, and a server's default is the
model's context (131072 on Llama-3.1), while ``decode_gpu.py`` sizes it for its prompt (1288 tokens). Until stop 43
the bound also set how many positions a split covers (512 at 131072: 3 busy programs a KV head at 1280 tokens); now
the request's length does (``decode_attention.split_len``). This times one Llama-8B-shaped model (random INT4 codes,
as ``decode_gpu.py``) through engines of each bound, in alternating rounds, with the tree's attention and, given
``--attention-b FILE`` (e.g. ``git show 6dc6675:kernels/decode_attention.py > /tmp/att_old.py``), with that file's
functions swapped in where ``runtime/cache.py`` calls them.

    python benchmarks/bound_ab.py --json benchmarks/results/bound_ab_h100.json [--attention-b /tmp/att_old.py]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch

import uniql.runtime.cache as cache_mod


def load_attention(path: Path) -> ModuleType:
    """``path`` as a module of ``uniql.kernels`` (its relative imports resolve there), apart from the tree's own."""
    spec = importlib.util.spec_from_file_location("uniql.kernels.decode_attention_b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("decode_attention", "decode_attention_rope"):
        if not callable(getattr(module, name, None)):
            raise ValueError(f"{path} has no {name}(): not a version of kernels/decode_attention.py")
    return module


def use_attention(module: ModuleType | None) -> None:
    """Route the decode batch's attention through ``module`` (None: the tree's own) from the next graph capture."""
    source = module or importlib.import_module("uniql.kernels.decode_attention")
    cache_mod.decode_attention, cache_mod.decode_attention_rope = source.decode_attention, source.decode_attention_rope


def main(argv=None) -> None:
    from decode_gpu import LLAMA_8B, NullTokenizer, build_model, single_row  # GPU-only imports

    from uniql.runtime.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bounds", type=int, nargs="+", default=[1288, 131072], help="max_model_len of each engine")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.35])
    ap.add_argument("--attention-b", type=Path, help="another decode_attention.py to time against the tree's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    trees = {"tree": None, **({"b": load_attention(args.attention_b)} if args.attention_b else {})}
    model = build_model(LLAMA_8B, "int4")
    prompt = torch.randint(0, LLAMA_8B.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for bound in args.bounds:
            for tree, module in trees.items():
                use_attention(module)
                engine = Engine(model, NullTokenizer(), max_num_seqs=1, max_model_len=bound)
                for rate in args.rates:
                    rung = model.ladder.nearest(rate)
                    single_row(engine, tree, prompt, rung, rate, 8)  # compiles, captures this bound's graph
                    row = {**single_row(engine, tree, prompt, rung, rate, 256), "bound": bound, "round": round_}
                    rows.append(row)
                    print(f"round {round_} {tree:4s} bound {bound:6d} rate {rate:.2f}: TPOT {row['tpot_ms']:.3f} ms",
                          flush=True)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
    use_attention(None)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": "llama-3.1-8b shape",
                                         "attention_b": str(args.attention_b or ""), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
