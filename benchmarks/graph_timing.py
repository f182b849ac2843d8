"""The GPU probes' timer: median time of one replay of a CUDA graph of the calls timed."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def graph_us(fns, repeats=30, per: int | None = None) -> float:
    """Median microseconds of one CUDA graph that runs every fn once (after an eager warm-up call of each, which
    compiles the kernels), divided by ``per`` (default: one per fn): the GPU probes' timer."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (per or len(fns)))
    return statistics.median(times)


def graph_median_us(step: Callable[[], None], cuda: bool, repeats: int) -> float:
    """``graph_us`` of one ``step()``; on CPU (interpreter smoke runs) one timed call."""
    if cuda:
        return graph_us([step], repeats, per=1)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e6


_HELD: dict[tuple, int] = {}


def programs_held(kernel, args, consts: dict) -> int:
    """How many programs of the Triton ``kernel`` (at ``consts``, ``num_warps`` among them) the GPU holds at once,
    from the compiled kernel's registers and shared memory (the limits of sm_80 / sm_90: 64 K registers, 64 warps and
    32 blocks an SM): what a persistent kernel whose programs wait on each other may launch. Cached: the first call
    (eager, before a graph capture, which cannot load a module) compiles."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, *sorted(consts.items()))
    if key not in _HELD:
        compiled = kernel.warmup(*args, grid=(1,), **consts)
        compiled._init_handles()
        props, warps = torch.cuda.get_device_properties(0), consts["num_warps"]
        per_sm = min(65536 // (-(-compiled.n_regs // 8) * 8 * 32 * warps),
                     props.shared_memory_per_multiprocessor // max(compiled.metadata.shared, 1), 64 // warps, 32)
        _HELD[key] = props.multi_processor_count * per_sm
    return _HELD[key]


def copy_tbps(repeats: int) -> float:
    """The probes' bandwidth anchor (as kernel_bench.py): TB/s (read + write) of a 256 MiB bf16 copy in a graph."""
    big = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    return 2 * 2**28 / graph_us([lambda: torch.add(big[: 2**27], 0, out=big[2**27:])], repeats) / 1e6


def probe_args(doc: str, script: str, argv=None) -> tuple[argparse.Namespace, bool]:
    """A GPU probe's command line (``--repeats``, ``--cpu-smoke``, ``--json``) and whether it runs on CUDA; without
    a GPU and without ``--cpu-smoke`` it exits with a message."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"{script} times a GPU kernel: no CUDA device here (--cpu-smoke runs tiny shapes)")
    return args, cuda


def run_probes(doc: str, script: str, rates, configs, probe: Callable, describe: Callable[[dict], str], meta: dict,
               argv=None) -> list[dict]:
    """The probes' command line: ``--repeats``, ``--cpu-smoke`` (only the first two configs, tiny shapes) and
    ``--json``; ``probe(rate, config, cuda, repeats, smoke)`` returns one row, ``describe(row)`` its line."""
    args, cuda = probe_args(doc, script, argv)
    rows = []
    for rate in rates:
        for config in configs if cuda else configs[:2]:
            rows.append(probe(rate, config, cuda, args.repeats, args.cpu_smoke))
            print(f"rate {rate}: {describe(rows[-1])}", flush=True)
    if args.json:
        device = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
        args.json.write_text(json.dumps({"device": device, **meta, "rows": rows}, indent=1))
    return rows
