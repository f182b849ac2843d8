"""A/B of versions of the decode GEMV module (``uniql.kernels.int4_gemv``) in ONE process, interleaved.

Version ``a`` is the installed module; every ``--b-file`` (e.g. ``git show HEAD~1:kernels/int4_gemv.py``) is
loaded as a sibling module of the package, named after its file, and swapped into ``int4_matmul`` for its turns.
Same buffers, same configs (``pick_config``), same CUDA-graph timing as ``kernel_bench.py`` (rotated weights,
median of replays); the order reverses every round so drift hits all. Each output is checked against the
reference before timing.

    python benchmarks/gemv_ab.py --b-file /tmp/int4_gemv_old.py /tmp/variant.py --out results/gemv_ab_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from kernel_bench import MODELS, Bench, Timer, build_case, check_output, describe, int4_buffers, packed_bytes
from sass_gemv import load_variant


def time_variant(bench: Bench, launcher, case, bufs, x) -> float:
    bench.kernel.launch_gemv_h2 = launcher  # int4_matmul calls the name it imported
    fns = [partial(bench.kernel.int4_matmul, x, qw, sc, bench.group_size, **case.kernel_kwargs()) for qw, sc in bufs]
    check_output(fns[0](), x, *bufs[0], case, bench.group_size)
    return bench.timer.per_launch_us(fns)


def ab_row(bench: Bench, launchers: dict, model: str, layer: str, rate: float, batch: int, rounds: int) -> dict:
    case = build_case(model, layer, rate, bench.group_size)
    bufs = int4_buffers(bench, case)
    x = torch.randn(batch, case.k_active, dtype=bench.dtype, device=bench.device)
    times, errors = {name: [] for name in launchers}, {}
    for r in range(rounds):
        for name in (list(launchers) if r % 2 == 0 else list(reversed(launchers))):
            if name in errors:
                continue
            try:  # a wrong or failing variant is recorded, not fatal (the tree's own kernel must work)
                times[name].append(time_variant(bench, launchers[name], case, bufs, x))
            except Exception as exc:
                if name == "a":
                    raise
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    us = {name: statistics.median(t) for name, t in times.items() if name not in errors}
    nbytes = packed_bytes(case.k_active, case.n_active, bench.group_size)
    config = describe(bench.kernel.pick_config(batch, case.n_active, case.k_active, bench.group_size, bench.device))
    ratios = {f"{name}_over_a": t / us["a"] for name, t in us.items() if name != "a"}
    row = {**case.fields(), "batch": batch, "bytes": nbytes, "config": config,
           **{f"{name}_us": t for name, t in us.items()}, **ratios, **{f"{n}_error": e for n, e in errors.items()}}
    print(f"{model} {layer} rate {rate} M {batch}: a {us['a']:.2f} us; "
          + ", ".join([f"{k} {v:.3f}" for k, v in ratios.items()] + [f"{n} FAILED" for n in errors]),
          file=sys.stderr, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b-file", type=Path, nargs="+", required=True, help="other int4_gemv.py versions")
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b"], choices=sorted(MODELS))
    ap.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down", "lm_head"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.35])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--rounds", type=int, default=4, help="timings per variant (alternating order)")
    ap.add_argument("--repeats", type=int, default=10, help="graph replays per timing")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_ab.py times CUDA kernels: no GPU here")
    from uniql.kernels import int4_gemv, int4_matmul

    launchers, load_errors = {"a": int4_gemv.launch_gemv_h2}, {}
    for path in args.b_file:
        if path.stem in launchers or path.stem in load_errors:
            raise SystemExit(f"two variants named {path.stem}: rename one file")
        try:  # like a variant that fails to run: recorded, not fatal for the others
            launchers[path.stem] = load_variant(path).launch_gemv_h2
        except Exception as exc:
            load_errors[path.stem] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{path}: cannot load: {load_errors[path.stem]}", file=sys.stderr, flush=True)
    bench = Bench(int4_matmul, torch.device("cuda"), torch.bfloat16, args.group_size,
                  Timer(cuda=True, repeats=args.repeats), rotate_bytes=128 * 2**20, sweep=None)
    torch.manual_seed(0)
    rows = [ab_row(bench, launchers, model, layer, rate, batch, args.rounds)
            for model in args.models for layer in args.layers
            for rate in ([0.0] if layer == "lm_head" else args.rates) for batch in args.batches]
    int4_matmul.launch_gemv_h2 = launchers["a"]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "a": "installed uniql.kernels.int4_gemv", "variants": {p.stem: str(p) for p in args.b_file},
              "group_size": args.group_size, "load_errors": load_errors,
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k in ("layer", "rate", "batch", "a_us") or k.endswith("_over_a")}
                      for r in rows]))


if __name__ == "__main__":
    main()
