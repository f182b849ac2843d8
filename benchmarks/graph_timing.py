"""Median time of one call of a step function, replayed from a CUDA graph (the probes' shared timer)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_median_us(step: Callable[[], None], cuda: bool, repeats: int) -> float:
    """Median microseconds of ``step()`` captured once in a CUDA graph (after one warm-up call that compiles the
    kernels); on CPU (interpreter smoke runs) one timed call."""
    if not cuda:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e6
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def run_probes(doc: str, script: str, rates, configs, probe: Callable, describe: Callable[[dict], str], meta: dict,
               argv=None) -> list[dict]:
    """The probes' command line: ``--repeats``, ``--cpu-smoke`` (only the first two configs, tiny shapes) and
    ``--json``; ``probe(rate, config, cuda, repeats, smoke)`` returns one row, ``describe(row)`` its line."""
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"{script} times a GPU kernel: no CUDA device here (--cpu-smoke runs tiny shapes)")
    rows = []
    for rate in rates:
        for config in configs if cuda else configs[:2]:
            rows.append(probe(rate, config, cuda, args.repeats, args.cpu_smoke))
            print(f"rate {rate}: {describe(rows[-1])}", flush=True)
    if args.json:
        device = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
        args.json.write_text(json.dumps({"device": device, **meta, "rows": rows}, indent=1))
    return rows
