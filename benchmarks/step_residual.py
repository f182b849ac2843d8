"""Where a Llama-3.1-8B decode step's time goes beyond the stage-latency model (CPU, committed results; issue 5).

``ratio_bound.py`` models a step as its bytes at the copy rate plus a fixed latency L for each of its stages; the
measured step sits ~0.35 ms above that model at both rates. This splits the in-graph profile (each kernel's time a
step inside CUDA graph replays, ``decode_profile_stop35_h100.json``) by kernel class, each against its own bytes at
the copy rate and its launches x L. The residual of a class is the time neither its bytes nor its boundaries
explain: a kernel streaming below the copy rate, or work that is neither (the gaps between kernels). A residual that
is the same at rates 0 and 0.35 holds the ratio up as much as a stage does; one that shrinks with the rate does not.
Every figure is a measurement except the model's two terms (projections from the copy rate and L).

    python benchmarks/step_residual.py --json benchmarks/results/step_residual_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ratio_bound as rb
import report_data as rd

POSITIONS = {"gemv0": "qkv", "gemv1": "o", "gemv2": "gate_up", "gemv3": "down"}  # the profile's GEMVs a block
ATTENTION = ("_split_kernel", "_combine_kernel")
GEMV = "_gemv_h2_kernel"


def _row(name: str, measured_us: float, nbytes: float, stages: float, copy_tbps: float, latency_us: float) -> dict:
    bytes_us, stage_us = nbytes / (copy_tbps * 1e6), stages * latency_us
    return {"kernel": name, "measured_us": measured_us, "bytes_us": bytes_us, "stages": stages, "stage_us": stage_us,
            "residual_us": measured_us - bytes_us - stage_us}


def class_rows(run: dict, kernels: dict, group: int, tokens: float, latency_us: float) -> list[dict]:
    """One profiled rate's step by kernel class: the four GEMVs of every block, the head, attention (its split and
    combine kernels against the KV cache's bytes), the other kernels, the gaps between kernels."""
    rate, graph, copy = run["rate"], run["in_graph"], kernels["copy_TBps"]
    layers = rd.NUM_LAYERS[rb.MODEL]
    scale = rd.group_scale(kernels, group)  # the table's group -> the run's
    table = {(r["layer"], r["rate"]): r for r in rd.kernel_rows(kernels, rb.MODEL)}
    missing = [layer for layer in POSITIONS.values() if (layer, rate) not in table]
    if missing or ("lm_head", 0.0) not in table:
        raise ValueError(f"the kernel table has no batch-1 rows of {missing or ['lm_head']} at rate {rate}")
    by_name = {k["kernel"]: k for k in graph["kernels"]}
    rows = [_row(layer, graph["gemv_us_by_position"][pos] * layers, table[(layer, rate)]["bytes"] * scale * layers,
                 layers, copy, latency_us) for pos, layer in POSITIONS.items()]
    rows.append(_row("lm_head", graph["gemv_us_by_position"]["head"], table[("lm_head", 0.0)]["bytes"] * scale, 1,
                     copy, latency_us))
    attention = [by_name[name] for name in ATTENTION]
    rows.append(_row("attention", sum(k["us_per_step"] for k in attention), rb.kv_bytes(rate, tokens, group),
                     sum(k["launches_per_step"] for k in attention), copy, latency_us))
    rest = [k for name, k in by_name.items() if name not in (GEMV, *ATTENTION)]
    rows.append(_row("other kernels", sum(k["us_per_step"] for k in rest), 0.0,
                     sum(k["launches_per_step"] for k in rest), copy, latency_us))
    rows.append(_row("gaps between kernels", graph["gap_us_per_replay"], 0.0, 0, copy, latency_us))
    return rows


def residuals(profile: dict, kernels: dict, group: int, tokens: float, latency_us: float,
              rates=(0.0, 0.35)) -> dict:
    """{rate: {"rows": class rows, "total": their sums, "replay_us": the profiled replay}} at ``rates``."""
    runs = {r["rate"]: r for r in profile["runs"]}
    if missing := [r for r in rates if r not in runs]:
        raise ValueError(f"the profile has no run at rate(s) {missing}")
    out = {}
    for rate in rates:
        rows = class_rows(runs[rate], kernels, group, tokens, latency_us)
        total = {key: sum(r[key] for r in rows) for key in ("measured_us", "bytes_us", "stage_us", "residual_us")}
        out[rate] = {"rows": rows, "total": total, "replay_us": runs[rate]["replay_us"]}
    return out


def print_residuals(res: dict, latency_us: float) -> None:
    lo, hi = sorted(res)
    print(f"a step by kernel class, us: measured = bytes at copy + launches x L ({latency_us:.2f} us) + residual, "
          f"at rates {lo} / {hi}")
    for a, b in zip(res[lo]["rows"], res[hi]["rows"], strict=True):
        print(f"  {a['kernel']:22s} {a['measured_us']:7.1f} / {b['measured_us']:7.1f} = bytes {a['bytes_us']:6.1f} / "
              f"{b['bytes_us']:6.1f} + {a['stages']:3.0f} x L + residual {a['residual_us']:6.1f} / "
              f"{b['residual_us']:6.1f}")
    t0, t1 = res[lo]["total"], res[hi]["total"]
    print(f"  {'step':22s} {t0['measured_us']:7.1f} / {t1['measured_us']:7.1f} (replays {res[lo]['replay_us']:.1f} / "
          f"{res[hi]['replay_us']:.1f}); residual {t0['residual_us']:.1f} / {t1['residual_us']:.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=Path, default=rb.RESULTS / "kernels_h100.json")
    ap.add_argument("--decode", type=Path, default=rb.RESULTS / "decode_h100.json")
    ap.add_argument("--profile", type=Path, default=rb.RESULTS / "decode_profile_stop35_h100.json")
    ap.add_argument("--probe", type=Path, default=rb.RESULTS / "layer_loop_probe_sleep_h100.json")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    inp = rb.load_inputs(args.kernels, args.decode, args.profile, args.probe)
    res = residuals(inp["profile"], inp["kernels"], inp["group"], inp["cache_tokens"], inp["latency_us"])
    print_residuals(res, inp["latency_us"])
    if args.json:
        out = {"device": inp["device"], "latency_us": inp["latency_us"], "latency_from": inp["latency_from"],
               "group": inp["group"], "cache_tokens": inp["cache_tokens"], "rates": {str(k): v for k, v in res.items()}}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
