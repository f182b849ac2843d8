"""Where a decode step's time goes (GPU): per-kernel GPU time of one eager step (torch.profiler), graph replay
time alone, and the whole engine step (replay + sampling + bookkeeping), for the 8B-shaped model of
``decode_gpu.py`` (or an SSM shape of ``ssm_decode_gpu.py``) at one rung and batch size.

    python benchmarks/profile_decode.py [--model llama-3.1-8b|mamba2-8b-shape|nemotron-h-8b-shape]
                                        [--rates 0,0.35] [--batch 1] [--context 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from decode_gpu import LLAMA_8B, NullTokenizer, build_model
from sass_gemv import compiled_gemv_registers

from uniql.runtime.engine import Engine
from uniql.runtime.request import SamplingParams


def _kernel_table(prof, steps: int) -> list[dict]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[evt.name[:60]]
            entry[0] += _device_us(evt)
            entry[1] += 1
    rows = [{"kernel": k, "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def _gemv_positions(prof, steps: int, layers: int) -> dict[str, float]:
    """Mean GPU time of each GEMV launch by its place in the step: with G GEMVs a layer (the step's launches minus
    the vocab head, over the layers) ``gemv<i>`` is the i-th of each layer, ``head`` the last launch of a step.
    Which projection moves with the rate and which does not (e.g. why a rung decodes no faster than the one
    before it)."""
    events = sorted((evt.time_range.start, _device_us(evt)) for evt in prof.events()
                    if evt.device_type == torch.autograd.DeviceType.CUDA and "gemv" in evt.name)
    per_step = len(events) // steps
    if steps * per_step != len(events) or (per_step - 1) % layers:
        return {}
    per_layer = (per_step - 1) // layers
    sums: dict[str, float] = defaultdict(float)
    for i, (_, us) in enumerate(events):
        pos = i % per_step
        sums["head" if pos == per_step - 1 else f"gemv{pos % per_layer}"] += us
    return {name: total / steps / (1 if name == "head" else layers) for name, total in sums.items()}


def _graph_gaps(prof, replays: int) -> float | None:
    """Idle GPU time per graph replay: the summed gaps between one kernel's end and the next one's start."""
    spans = sorted((evt.time_range.start, evt.time_range.start + _device_us(evt)) for evt in prof.events()
                   if evt.device_type == torch.autograd.DeviceType.CUDA)
    if not spans or replays <= 0:
        return None
    per = len(spans) // replays
    gaps = [max(0.0, spans[i + 1][0] - spans[i][1]) for i in range(len(spans) - 1) if (i + 1) % per]
    return sum(gaps) / replays


def _profile_replays(runner, rung, reqs, layers: int, replays: int = 3) -> dict:
    """Per-kernel GPU time INSIDE graph replays (eager launches may time differently) and the gaps between them."""
    entry = runner.graphs._get(rung, runner.graphs.bucket(len(reqs)))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            entry.graph.replay()
            torch.cuda.synchronize()  # one replay at a time: gaps are measured within a replay only
    return {"kernels": _kernel_table(prof, replays), "gemv_us_by_position": _gemv_positions(prof, replays, layers),
            "gap_us_per_replay": _graph_gaps(prof, replays)}


def _device_us(evt) -> float:
    return evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total


def _build(name: str):
    """(model, vocab size) of a shape: the Llama-3.1-8B of decode_gpu.py or an SSM shape of ssm_decode_gpu.py."""
    if name == "llama-3.1-8b":
        return build_model(LLAMA_8B, "int4"), LLAMA_8B.vocab_size
    from ssm_decode_gpu import build_model as build_ssm
    from ssm_decode_gpu import hf_config

    config = hf_config(name, tiny=False)
    return build_ssm(config, "int4", torch.device("cuda")), config.vocab_size


def _time_replay(runner, rung, reqs, repeats=50) -> float:
    graphs = runner.graphs
    caches = [runner.caches[r.request_id] for r in reqs]
    entry = graphs._get(rung, graphs.bucket(len(reqs)))
    lengths = [c.length + 1 for c in caches]
    graphs.run(rung, [1] * len(reqs), lengths, caches)  # binds the tables, then replays only
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        entry.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def profile_rung(model, vocab: int, rate: float, batch: int, context: int) -> dict:
    """Graph replay time, whole engine step and per-kernel table of one rung (a fresh engine on the same model)."""
    engine = Engine(model, NullTokenizer(), max_num_seqs=max(batch, 1), max_model_len=context + 64)
    rung = model.ladder.nearest(rate)
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    reqs = [engine.add_request(prompt.tolist(), params, rung=rung) for _ in range(batch)]
    for _ in range(4):  # prefill + a few decode steps (captures the graph)
        engine.step()
    runner = engine.runner
    try:
        replay_us = _time_replay(runner, rung, reqs)
        in_graph = _profile_replays(runner, rung, reqs, model.spec.num_layers)
    except (AttributeError, KeyError, TypeError) as exc:  # a runner without per-request caches (SSM state)
        print(f"graph replay not timed: {type(exc).__name__}: {exc}")
        replay_us, in_graph = None, None
    # the whole engine step: replay + logits to the sampler + ids to the host + detokenize + bookkeeping
    stamps = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        stamps.append((time.perf_counter() - t0) * 1e6)
    # per-kernel GPU time of eager steps (same kernels as the graph, launched one by one)
    graphs, runner.graphs = runner.graphs, None
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    runner.graphs = graphs
    for req in reqs:
        engine.cancel(req.request_id)
    return {"rate": model.ladder.rates[rung], "rung": rung, "replay_us": replay_us,
            "step_us": statistics.median(stamps), "kernels": _kernel_table(prof, steps),
            "gemv_us_by_position": _gemv_positions(prof, steps, model.spec.num_layers), "in_graph": in_graph}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b",
                    choices=["llama-3.1-8b", "mamba2-8b-shape", "nemotron-h-8b-shape"])
    ap.add_argument("--rates", default="0.0", help="comma-separated; each profiled on the same model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, vocab = _build(args.model)
    runs = []
    for rate in (float(r) for r in args.rates.split(",")):
        run = profile_rung(model, vocab, rate, args.batch, args.context)
        table = run["kernels"]
        print(f"{args.model} rung {run['rung']} batch {args.batch}: graph replay {run['replay_us']} us, engine step "
              f"{run['step_us']:.1f} us, sum of kernels (eager) {sum(r['us_per_step'] for r in table):.1f} us")
        for r in table[:25]:
            print(f"{r['us_per_step']:9.1f} us  x{r['launches_per_step']:5.0f}  {r['kernel']}")
        print("  GEMV us per launch by place in the layer: "
              + ", ".join(f"{k} {v:.2f}" for k, v in run["gemv_us_by_position"].items()))
        if run["in_graph"]:
            graph = run["in_graph"]
            total = sum(r["us_per_step"] for r in graph["kernels"])
            print(f"  inside the graph: kernels {total:.1f} us, gaps {graph['gap_us_per_replay']} us; GEMV by place: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in graph["gemv_us_by_position"].items()))
        runs.append(run)
    regs = compiled_gemv_registers()
    for row in regs:
        print(f"  compiled GEMV: { {k: v for k, v in row.items() if k != 'key'} }")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch, "context": args.context,
                                               "device": torch.cuda.get_device_name(), "runs": runs,
                                               "compiled_gemvs": regs}, indent=1))


if __name__ == "__main__":
    main()
