"""Diagnostic (GPU): how the engine decodes one request of the 8B-shaped model: graph replays (``chain`` =
lookahead, ``run``) vs eager forwards per token, with its TPOT, at rates 0 and 0.35. Used to check that a TPOT
above the graph-replay time is GPU time, not a host fallback.

    UNIQL_FUSED_COMBINE=0 python benchmarks/diag_engine.py MAX_NUM_SEQS
"""
import os
import sys
import time

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model, single_row

from uniql.runtime import graphs as graphs_mod
from uniql.runtime.engine import Engine

counts = {"chain": 0, "run": 0, "forward": 0}
for name in ("chain", "run"):
    real = getattr(graphs_mod.DecodeGraphs, name)
    setattr(graphs_mod.DecodeGraphs, name, lambda self, *a, _r=real, _n=name: counts.__setitem__(_n, counts[_n] + 1)
            or _r(self, *a))
model = build_model(LLAMA_8B, "int4")
real_fwd = model.forward
model.forward = lambda *a, **k: (counts.__setitem__("forward", counts["forward"] + 1), real_fwd(*a, **k))[1]
engine = Engine(model, NullTokenizer(), max_num_seqs=int(sys.argv[1]), max_model_len=1024 + 256 + 8)
prompt = torch.randint(0, LLAMA_8B.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
for rate in (0.0, 0.35):
    rung = model.ladder.nearest(rate)
    single_row(engine, "uniql", prompt, rung, rate, 8)
    counts.update({k: 0 for k in counts})
    t = time.perf_counter()
    row = single_row(engine, "uniql", prompt, rung, rate, 128)
    print(os.environ.get("UNIQL_FUSED_COMBINE"), rate, f"tpot {row['tpot_ms']:.3f} ms", counts,
          f"wall {time.perf_counter() - t:.3f}", flush=True)
