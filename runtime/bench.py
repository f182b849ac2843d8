"""Decode measurements shared by `uniql bench decode` and benchmarks/decode.py: TTFT, TPOT, tokens/s per rung.

TTFT = time to the first token; TPOT = median time between later tokens (engine) or (total - TTFT) / (new - 1)
(transformers' ``generate``, which exposes no per-token timing). Peak memory = the process's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU (reset before each engine row).
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from .request import SamplingParams

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type with an oil-based ink and a screw press. Explain why this mattered:")


def peak_mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak(device: torch.device) -> None:
    """Start a row's GPU peak from what is allocated once queued work is done (the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class RequestFailed(RuntimeError):
    """A timed request did not produce its tokens; the measurement is void."""


def check_finished(reqs, new_tokens: int) -> None:
    """A request the engine failed (a step raised, non-finite logits: the engine ends it with an "error" finish and
    goes on) must not report a speed: every timed request ends by length with exactly ``new_tokens`` tokens."""
    for r in reqs:
        if r.finish_reason != "length" or len(r.output_ids) != new_tokens:
            raise RequestFailed(f"request at rung {r.rung} ended {r.finish_reason!r} after {len(r.output_ids)} of "
                               f"{new_tokens} tokens (the engine logged why)")


def engine_row(engine, ids: list[int], rate: float, new_tokens: int) -> dict:
    """One greedy request through the engine at the rung nearest ``rate``; raises if the engine failed it."""
    ladder = engine.runner.model.ladder
    rung = ladder.nearest(rate) if ladder is not None else 0
    reset_peak(engine.runner.device)
    req = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), rung=rung)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.stream(req)]
    check_finished([req], new_tokens)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)] or [stamps[-1] - start]
    return {"engine": "uniql", "rate": ladder.rates[rung] if ladder is not None else 0.0, "rung": rung,
            "batch": 1, "ttft_ms": (stamps[0] - start) * 1e3, "tpot_ms": statistics.median(gaps) * 1e3,
            "tokens_per_s": len(req.output_ids) / (stamps[-1] - start),
            "peak_mem_bytes": peak_mem_bytes(engine.runner.device), "new_tokens": len(req.output_ids)}


def hf_row(hf_model, ids: list[int], new_tokens: int, name: str = "hf_eager") -> dict:
    """transformers ``generate`` on the same prompt, greedy, exactly ``new_tokens`` tokens."""
    device = next(hf_model.parameters()).device
    x = torch.tensor([ids], device=device)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf_model.generate(x, max_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        hf_model.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        hf_model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return {"engine": name, "rate": 0.0, "batch": 1, "ttft_ms": ttft * 1e3,
            "tpot_ms": (total - ttft) / max(1, new_tokens - 1) * 1e3, "tokens_per_s": new_tokens / total,
            "peak_mem_bytes": peak_mem_bytes(device), "new_tokens": new_tokens,
            "dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch.")}


def decode_rows(engine, tokenizer, rates, new_tokens: int, prompt: str = PROMPT) -> list[dict]:
    """Each rate warmed up first (kernels compiled and, on GPU, its CUDA graphs captured outside the timed row)."""
    ids = tokenizer(prompt)["input_ids"]
    rows = []
    for rate in rates:
        engine_row(engine, ids, rate, 4)
        # the rate asked for kept with the rung it snapped to: `--rates 0.9 0.35` gave two rows "rate 0.35"
        rows.append({**engine_row(engine, ids, rate, new_tokens), "requested_rate": rate})
    return rows
