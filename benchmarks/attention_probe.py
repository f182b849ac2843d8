"""Batch-1 decode attention alone (GPU): time per layer of ``kernels/decode_attention.decode_attention`` at the
Llama-3.1-8B shape (32 heads, 8 KV heads, 1024 cached tokens) for several positions-per-split, with and without the
early loads (``UNIQL_EARLY_LOADS``), at rates 0 and 0.35.

Why: in the engine's decode step attention takes ~8.7 us a layer (split pass ~6.5 + combine ~2.2) at every
rate (results/decode_profile_h100.json), while a layer's cache is ~4 MB (1.4 us at the copy rate): it is
bound by latency, and the split size (``split_count`` / ``split_len``: 32 positions a program at this length,
one BLOCK_T iteration each) was never timed against the alternatives on the real shape. One CUDA graph replays the
attention of every layer, each with its own cache (32 x 4 MB > L2), as in the model.

    python benchmarks/attention_probe.py --json benchmarks/results/attention_probe_h100.json
    python benchmarks/attention_probe.py --cpu-smoke   # tiny shapes, Triton interpreter
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton reads the flag when a kernel is defined: before any uniql.kernels import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from graph_timing import graph_median_us, run_probes  # noqa: E402

from uniql.kernels import decode_attention as att  # noqa: E402

HEADS, KV_HEADS, LAYERS, CONTEXT = 32, 8, 32, 1024
RUNGS = {0.0: (128, 128), 0.35: (84, 84)}  # (qk, vo) kept per head: runtime/ladder.py at keep 1.0 / 0.65
# (positions a split or None for split_count / split_len's choice, early loads: UNIQL_EARLY_LOADS)
CONFIGS = [(None, False), (None, True), (16, True), (64, False), (64, True), (128, False), (128, True), (256, True)]


def _layers(qk: int, vo: int, heads: int, kv: int, layers: int, context: int, device):
    """Per layer: its caches (cap = context + 64, as the engine sizes them) and address tables; shared q/k/v."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16 if device == "cuda" else torch.float16)

    cap = context + 64
    q, k_new, v_new = rand(1, heads, qk), rand(1, kv, qk), rand(1, kv, vo)
    caches = [(rand(kv, cap, qk), rand(kv, cap, vo)) for _ in range(layers)]
    lengths = torch.tensor([context + 1], dtype=torch.int32, device=device)
    caps = torch.tensor([cap], dtype=torch.int32, device=device)
    tables = [(torch.tensor([k.data_ptr()], dtype=torch.int64, device=device),
               torch.tensor([v.data_ptr()], dtype=torch.int64, device=device)) for k, v in caches]
    return (q, k_new, v_new), caches, tables, caps, lengths, cap


def probe(rate: float, config: tuple[int | None, bool], cuda: bool, repeats: int, smoke: bool) -> dict:
    split, early = config
    os.environ["UNIQL_EARLY_LOADS"] = "1" if early else "0"  # read at each launch
    qk, vo = (16, 12) if smoke else RUNGS[rate]
    heads, kv, layers, context = (4, 2, 2, 40) if smoke else (HEADS, KV_HEADS, LAYERS, CONTEXT)
    (q, k_new, v_new), caches, tables, caps, lengths, cap = _layers(qk, vo, heads, kv, layers, context,
                                                                    "cuda" if cuda else "cpu")
    defaults = att.MIN_SPLIT, att.split_count
    if split is not None:  # every split `split` positions: the least a split covers, and as many as the bound needs
        att.MIN_SPLIT = split
        att.split_count = lambda max_len, programs_per_split, target_programs=512: -(-max_len // split)
    try:
        k_ref, v_ref = [caches[0][0].clone()], [caches[0][1].clone()]
        out = att.decode_attention(q, k_new, v_new, *tables[0], caps, lengths, qk ** -0.5, cap)
        ref = att.decode_attention_reference(q, k_new, v_new, k_ref, v_ref, [context + 1], qk ** -0.5)
        err = (out.float() - ref.float()).abs().max().item()
        if not err <= 3e-2 * ref.float().abs().max().item():
            raise AssertionError(f"split {split} rate {rate}: max abs error {err}")

        def step():
            for k_ptrs, v_ptrs in tables:
                att.decode_attention(q, k_new, v_new, k_ptrs, v_ptrs, caps, lengths, qk ** -0.5, cap, out=out)

        us = graph_median_us(step, cuda, repeats) / layers
        used = att.split_len(context + 1, att.split_count(cap, kv))
    finally:
        att.MIN_SPLIT, att.split_count = defaults
    cache_bytes = 2 * kv * (context + 1) * (qk + vo)  # bf16 K and V read
    return {"rate": rate, "qk": qk, "vo": vo, "split": used, "early": early, "default": split is None and not early,
            "us_per_layer": us, "cache_TBps": cache_bytes / us / 1e6}


def main(argv=None) -> None:
    run_probes(__doc__, "attention_probe.py", RUNGS, CONFIGS, probe,
               lambda r: f"{r['split']} positions a split{', early loads' * r['early']}{' (default)' * r['default']}: "
                         f"{r['us_per_layer']:.2f} us a layer, cache at {r['cache_TBps']:.2f} TB/s",
               {"shape": "llama-3.1-8b", "context": CONTEXT, "layers": LAYERS},
               argv)


if __name__ == "__main__":
    main()
