"""GPU decode benchmark of an 8B-shaped model: the UniQL engine per rung vs transformers and dense bf16, same run.

Speed depends on shapes, not weight values, so the model is built on the device with random INT4 codes
(scales chosen so activations stay finite through 32 layers; no calibration) and a uniform rate ladder.
Rows (``benchmarks/results/decode_<gpu>.json``):

* ``uniql``: the engine (INT4 Triton kernels, fused q|k|v and gate|up, CUDA graph per (rung, batch)) at rates
  0 / 0.15 / 0.25 / 0.35, batch 1: TTFT and median TPOT of one greedy request, 1024-token prompt, 256 new tokens;
  batch 4 and 16: tokens/s of that many concurrent requests.
* ``uniql_bf16_dense``: the same engine with dense bf16 weights (cuBLAS), same graphs.
* ``hf_eager`` / ``hf_compiled``: transformers ``generate`` in bf16 (eager; static cache + torch.compile).

    python benchmarks/decode_gpu.py --json benchmarks/results/decode_h200.json [--skip-compiled]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from uniql.kernels.pdl import pdl_enabled
from uniql.kernels.switches import check_switches, set_switches
from uniql.runtime.bench import check_finished, reset_peak
from uniql.runtime.decoder import LINEAR_PATHS, ElasticDecoder
from uniql.runtime.engine import Engine
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder
from uniql.runtime.linear import DenseLinear, Int4Linear
from uniql.runtime.request import SamplingParams
from uniql.runtime.spec import ArchSpec

LLAMA_8B = ArchSpec(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, tie_embeddings=False,
                    qk_bias=False, v_bias=False, o_bias=False, mlp_bias=False, act="silu",
                    rope_attention_scaling=1.0, max_position_embeddings=131072)
RATES = (0.0, 0.15, 0.25, 0.35)
CUDA = torch.device("cuda")


class NullTokenizer:
    """Random token ids have no text; the detokenizer still runs (one char per token)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def _random_int4(k: int, n: int, group: int, device) -> Int4Linear:
    layer = Int4Linear(k, n, group)
    layer.qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    # codes - 8 have std ~4.6: this scale gives outputs of about the input's size
    layer.scales = torch.full((k // group, n), 1.0 / (4.6 * math.sqrt(k)), dtype=torch.float16, device=device)
    return layer


def _random_dense(k: int, n: int, device) -> DenseLinear:
    layer = DenseLinear(k, n)
    layer.weight = torch.nn.Parameter(torch.randn(n, k, device=device, dtype=torch.bfloat16) / math.sqrt(k),
                                      requires_grad=False)
    return layer


def build_model(spec: ArchSpec, weights: str, device="cuda", group: int = 128) -> ElasticDecoder:
    """An 8B-shaped decoder on the device: random INT4 (``int4``) or bf16 (``dense``) weights, uniform ladder."""
    with torch.device("meta"):
        model = ElasticDecoder(spec)
    model.inv_freq = torch.zeros(spec.head_dim // 2, device=device)  # a real tensor: _apply keeps it fp32
    model.to_empty(device=device)  # uninitialised; every linear is replaced next, the rest filled below
    make = ((lambda k, n: _random_int4(k, n, group, device)) if weights == "int4"
            else (lambda k, n: _random_dense(k, n, device)))
    for layer in model.layers:
        for path in LINEAR_PATHS:
            old = layer.get_linear(path)
            layer.set_linear(path, make(old.in_features, old.out_features))
    model.embed, model.lm_head = make(spec.hidden_size, spec.vocab_size), make(spec.hidden_size, spec.vocab_size)
    model.to(torch.bfloat16)
    for norm in [model.norm] + [m for layer in model.layers for m in (layer.input_norm, layer.post_attn_norm)]:
        norm.weight.data.fill_(1.0)
    model.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, spec.head_dim, 2, device=device).float() / spec.head_dim))
    for layer in model.layers:
        layer.attn.rope_index = torch.arange(spec.head_dim // 2, device=device).repeat(spec.num_kv_heads, 1)
    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=group))
    model.ladder = uniform_ladder(model.full_sizes, steps, spec.num_layers, rates=RATES)
    return model.eval()


def single_row(engine, name, prompt, rung, rate, new_tokens) -> dict:
    reset_peak(CUDA)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    req = engine.add_request(prompt, params, rung=rung)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.stream(req)]
    check_finished([req], new_tokens)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"engine": name, "rate": rate, "rung": rung, "batch": 1, "ttft_ms": (stamps[0] - start) * 1e3,
            "tpot_ms": statistics.median(gaps) * 1e3, "tokens_per_s": len(stamps) / (stamps[-1] - start),
            "decode_tokens_per_s": len(gaps) / (stamps[-1] - stamps[0]),
            "peak_mem_bytes": torch.cuda.max_memory_allocated(), "new_tokens": len(stamps)}


def ttft_samples(engine, prompt, rung, repeats: int = 5) -> dict:
    """TTFT of ``repeats`` one-token requests (prefill + first pick): median and spread. One request's TTFT varied
    2.6x between rungs in a run (76-200 ms), more than the prefill's bytes can explain; a median tells."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats):
        req = engine.add_request(prompt, params, rung=rung)
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in engine.stream(req)]
        check_finished([req], 1)
        times.append((stamps[0] - start) * 1e3)
    return {"ttft_median_ms": statistics.median(times), "ttft_min_ms": min(times), "ttft_max_ms": max(times)}


def batch_row(engine, name, prompt, rung, rate, batch, new_tokens) -> dict:
    """``batch`` concurrent greedy requests: generated tokens / wall time, and decode-only steps per second."""
    reset_peak(CUDA)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    reqs = [engine.add_request(prompt, params, rung=rung) for _ in range(batch)]
    start = time.perf_counter()
    engine.step()  # prefills (the scheduler admits all of them)
    first = time.perf_counter()
    steps = 0
    while any(not r.finished for r in reqs):
        engine.step()
        steps += 1
    end = time.perf_counter()
    for r in reqs:
        engine.streams.pop(r.request_id, None)
        engine.requests.pop(r.request_id, None)
    check_finished(reqs, new_tokens)
    total = sum(len(r.output_ids) for r in reqs)
    return {"engine": name, "rate": rate, "rung": rung, "batch": batch, "ttft_ms": (first - start) * 1e3,
            "tpot_ms": (end - first) / max(1, steps) * 1e3, "tokens_per_s": total / (end - start),
            "peak_mem_bytes": torch.cuda.max_memory_allocated(), "new_tokens": new_tokens}


def engine_rows(weights: str, prompt, new_tokens: int, batches, rates=RATES) -> list[dict]:
    name = "uniql" if weights == "int4" else "uniql_bf16_dense"
    model = build_model(LLAMA_8B, weights)
    engine = Engine(model, NullTokenizer(), max_num_seqs=max(batches), max_model_len=len(prompt) + new_tokens + 8)
    ladder = model.ladder
    rows = []
    for rate in rates:
        rung = ladder.nearest(rate)
        single_row(engine, name, prompt, rung, rate, 8)  # warm-up: compiles kernels, captures the batch-1 graph
        rows.append({**single_row(engine, name, prompt, rung, rate, new_tokens), **ttft_samples(engine, prompt, rung)})
        for b in batches:
            if b > 1:
                batch_row(engine, name, prompt, rung, rate, b, 8)
                rows.append(batch_row(engine, name, prompt, rung, rate, b, new_tokens))
        _print(rows[-1 - sum(b > 1 for b in batches):])
    del engine, model
    torch.cuda.empty_cache()
    return rows


def hf_rows(prompt, new_tokens: int, compiled: bool, compile_mode: str = "reduce-overhead") -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from uniql.runtime.bench import hf_row

    s = LLAMA_8B
    config = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, rope_theta=500000.0, max_position_embeddings=8192)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    rows = []
    reset_peak(CUDA)
    rows.append(hf_row(hf, prompt, new_tokens, "hf_eager"))
    _print(rows[-1:])
    if compiled:
        try:
            hf.generation_config.cache_implementation = "static"
            hf.forward = torch.compile(hf.forward, mode=compile_mode, fullgraph=False)
            # warm up at the timed length: generate sizes the static cache as max(prompt + max_new_tokens, the
            # largest earlier one), so hf_row's short warm-up leaves the timed 256-token call a bigger cache, i.e.
            # new shapes, and torch.compile recompiled inside the timed region (decode_hf_h200.json's 470 ms/token)
            with torch.inference_mode():
                hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            reset_peak(CUDA)
            rows.append({**hf_row(hf, prompt, new_tokens, "hf_compiled"), "compile_mode": compile_mode})
            _print(rows[-1:])
        except Exception as exc:  # noqa: BLE001 (report why the anchor is missing, keep the other rows)
            rows.append({"engine": "hf_compiled", "error": f"{type(exc).__name__}: {exc}"[:500]})
            print("hf_compiled failed:", rows[-1]["error"], file=sys.stderr)
    del hf
    torch.cuda.empty_cache()
    return rows


def _print(rows) -> None:
    for r in rows:
        if "error" in r:
            continue
        print(f"{r['engine']:17s} rate {r.get('rate', 0):.2f} batch {r['batch']:2d}: TTFT {r['ttft_ms']:8.1f} ms  "
              f"TPOT {r['tpot_ms']:7.3f} ms  {r['tokens_per_s']:8.1f} tok/s  "
              f"peak {r['peak_mem_bytes'] / 2**30:5.1f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-engine", action="store_true", help="only the transformers anchors")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of hf_compiled")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_switches(strict=True)  # an A/B under a misspelt switch would time the default
    prompt = torch.randint(0, LLAMA_8B.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    rows = [] if args.skip_engine else engine_rows("int4", prompt, args.new_tokens, args.batches)
    if not args.skip_dense and not args.skip_engine:
        rows += engine_rows("dense", prompt, args.new_tokens, args.batches, rates=(0.0, 0.35))
    if not args.skip_hf:
        rows += hf_rows(prompt, args.new_tokens, not args.skip_compiled, args.compile_mode)
    report = {"device": torch.cuda.get_device_name(), "model": "llama-3.1-8b shape, random weights",
              "torch": torch.__version__, "pdl": pdl_enabled(torch.device("cuda")), "switches": set_switches(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "quantization": "INT4 g128 symmetric (random codes), uniform rate ladder", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
