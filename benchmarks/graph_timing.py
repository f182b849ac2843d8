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
