"""Diagnostic (GPU): how the engine decodes one request of the 8B-shaped model: graph replays (``chain`` =
lookahead, ``run``) vs model forwards (prefill, eager decode) per request, with its TPOT, at rates 0 and 0.35.
Used to check that a TPOT above the graph-replay time is GPU time, not a host fallback.

    python benchmarks/diag_engine.py [MAX_NUM_SEQS]
"""

import sys

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model, single_row

from uniql.runtime import graphs as graphs_mod
from uniql.runtime.engine import Engine


def counted(fn, counts: dict, key: str):
    """``fn`` that also counts its calls in ``counts[key]``."""
    def wrapper(*args, **kwargs):
        counts[key] += 1
        return fn(*args, **kwargs)
    return wrapper


@torch.inference_mode()
def main() -> None:
    counts = {"chain": 0, "run": 0, "forward": 0}
    for name in ("chain", "run"):
        setattr(graphs_mod.DecodeGraphs, name, counted(getattr(graphs_mod.DecodeGraphs, name), counts, name))
    model = build_model(LLAMA_8B, "int4")
    model.forward = counted(model.forward, counts, "forward")
    max_num_seqs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    engine = Engine(model, NullTokenizer(), max_num_seqs=max_num_seqs, max_model_len=1024 + 256 + 8)
    prompt = torch.randint(0, LLAMA_8B.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    for rate in (0.0, 0.35):
        rung = model.ladder.nearest(rate)
        single_row(engine, "uniql", prompt, rung, rate, 8)  # warm-up: compiles, captures
        counts.update(dict.fromkeys(counts, 0))
        row = single_row(engine, "uniql", prompt, rung, rate, 128)
        print(f"rate {rate}: "
              f"TPOT {row['tpot_ms']:.3f} ms, calls per 128 tokens {counts}", flush=True)


if __name__ == "__main__":
    main()
