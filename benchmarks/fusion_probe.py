"""What removing each small per-layer kernel would save (GPU): the upper bound of a fusion, before writing it.

Builds the 8B-shaped INT4 model of ``decode_gpu.py`` and times graph replay of one decode step (batch 1,
1024-token context) with one kind of small kernel replaced by a launch-free stand-in of the same shape (a view):
RoPE, the attention combine pass, silu(gate)*up, the two add+RMSNorms. The outputs are WRONG with a stand-in;
only the time matters. The difference to the unmodified step is what a perfect fusion of that kernel into its
neighbour could save at most (a real fusion adds work to the neighbour). Fusions that landed are A/B-timed
against the path they replaced (``ALTERNATIVES``, right outputs) in the same run.

    python benchmarks/fusion_probe.py [--json results/fusion_probe_h200.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model
from profile_decode import _time_replay

import uniql.kernels.decode_attention as attn_mod
from uniql.kernels import elementwise, ops
from uniql.runtime import cache as cache_mod
from uniql.runtime.decoder import DecoderLayer, ElasticMLP, RMSNorm
from uniql.runtime.engine import Engine
from uniql.runtime.linear import FusedInt4
from uniql.runtime.request import SamplingParams


def _no_rope(real):
    def run(self, layer, q, k_new, v_new, cos, sin, rope_index, n_heads, scale):
        b, n_kv = q.shape[0], v_new.shape[1]  # the right shapes and strides, unrotated and in the wrong order
        qk = q.shape[1] // n_heads
        return self.attend(layer, q.view(b, n_heads, qk), k_new.view(b, n_kv, qk), v_new, scale)
    return run


class _Skip:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def _unfused_rope(real):
    """The path before RoPE moved into the attention kernel: the rope kernel, then attention on its output."""
    def run(self, layer, q, k_new, v_new, cos, sin, rope_index, n_heads, scale):
        n_kv = v_new.shape[1]
        q, k = ops.rope(q, k_new, cos, sin, rope_index, n_heads, n_kv, q.shape[1] // n_heads)
        return self.attend(layer, q.transpose(0, 1), k.transpose(0, 1), v_new, scale)
    return run


class _Const:
    def __init__(self, value):
        self.value = value

    def __call__(self, real):
        return self.value


def _unfused_glu(real):
    """The path before silu(gate)*up became the gate|up GEMV's epilogue: projection, then the silu_mul kernel."""
    def run(self, x, n):
        return elementwise.silu_mul(self(x, (n, n), cat=True))
    return run


# A/B of real alternatives (right outputs): the separate RoPE kernel; the separate silu_mul kernel; separate
# add+RMSNorm kernels instead of the norm split across the GEMVs; fewer, longer attention splits; one combine program
# per whole head (the combine merged inside the split kernel was timed here too, faster in isolated replays, slower
# in the engine's back-to-back steps: results/decode_combine_ab_h200.json; removed, stop 35)
ALTERNATIVES = {
    "rope_kernel": [(cache_mod.DecodeBatch, "attend_rope", _unfused_rope)],
    "silu_kernel": [(FusedInt4, "glu", _unfused_glu)],
    "norm_kernels": [(DecoderLayer, "takes_prenormed", _Const(property(lambda self: False))),
                     (ElasticMLP, "takes_prenormed", _Const(property(lambda self: False)))],
    "attention_256_programs": [(attn_mod, "split_count", lambda real: lambda m, p: real(m, p, 256))],
    "attention_128_programs": [(attn_mod, "split_count", lambda real: lambda m, p: real(m, p, 128))],
    "combine_whole_head": [(attn_mod, "COMBINE_CHUNK", _Const(1 << 20))],
}

STAND_INS = {
    "rope": [(cache_mod.DecodeBatch, "attend_rope", _no_rope)],
    # the kernel itself, so every attention entry point (decode_attention, decode_attention_rope) skips it
    "combine": [(attn_mod, "_combine_kernel", lambda real: _Skip())],
    "silu_mul": [(FusedInt4, "glu", lambda real: lambda self, x, n: self(x, (n, n))[0])],
    "add_rms_norm": [(RMSNorm, "add_forward", lambda real: lambda self, x, d: (x, x))],
}


@contextlib.contextmanager
def patched(names):
    saved = []
    for name in names:
        for owner, attr, make in {**STAND_INS, **ALTERNATIVES}[name]:
            real = getattr(owner, attr)
            saved.append((owner, attr, real))
            setattr(owner, attr, make(real))
    try:
        yield
    finally:
        for owner, attr, real in reversed(saved):
            setattr(owner, attr, real)


def replay_us(model, rung: int, context: int) -> float:
    engine = Engine(model, NullTokenizer(), max_num_seqs=1, max_model_len=context + 64)
    # stand-ins leave garbage (even NaN) in the logits: take token 0 there instead of failing the request
    engine.fail = lambda reqs, message: [e for r in reqs for e in engine._emit(r, 0, None, None)]
    prompt = torch.randint(0, LLAMA_8B.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    req = engine.add_request(prompt.tolist(), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), rung=rung)
    for _ in range(4):
        engine.step()
    us = _time_replay(engine.runner, rung, [req], repeats=100)
    engine.cancel(req.request_id)
    return us


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = build_model(LLAMA_8B, "int4")
    variants = [[]] + [[n] for n in ALTERNATIVES] + [[]] + [[n] for n in STAND_INS] \
        + [list(STAND_INS)]
    rows = []
    for rate in (0.0, 0.35):
        rung = model.ladder.nearest(rate)
        base = None
        for names in variants:
            with patched(names):
                us = replay_us(model, rung, args.context)
            base = us if not names else base
            label = "+".join(names) or "none"
            rows.append({"rate": rate, "removed": label, "replay_us": us, "saved_us": base - us})
            print(f"rate {rate:.2f}  removed {label:40s} replay {us:8.1f} us  saved {base - us:7.1f} us", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": "llama-3.1-8b shape",
                                               "batch": 1, "context": args.context, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
