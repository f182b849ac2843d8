"""How low can TPOT(0.35) / TPOT(0) go on the Llama-3.1-8B shape? A model from measured figures (issues 5 and 4).

A batch-1 decode step is a chain of dependent stages (each launch of the step's CUDA graph waits for the one
before). Model its time as the bytes it streams at the copy rate plus a fixed latency L for every stage:

    t(rate) = bytes(rate) / copy  +  stages(rate) * L

Every figure comes from a committed result: the bytes (weights and scales of the active prefixes from the kernel
benchmark's shapes, rescaled to the decode run's scale group, plus the KV cache a step reads), the copy rate of the
kernel benchmark, the stages (launches a step in the decode profile's graph), and L: the time a layer of a chain of
512 x 512 GEMVs takes (next to no bytes, so all boundary), the lower of the production GEMV launched a layer in a
graph and the layer-loop probe's one persistent launch (where the boundary is a barrier inside the kernel). The
ratio the model gives is a projection, not a measurement; it binds any design whose stages start streaming bytes
only once their inputs are ready (today's kernels and the persistent probes). ``staged_probe.py`` (stop 50) built one
that streams its weights during the wait (TMA into shared memory): its all-boundary L is modelled too, as if every
stage were one (only q|k|v- and o-sized GEMVs are so far; a projection).

The same model for one batch-1 GEMV (issue 4's kernel table: one stage, its bytes at the copy rate plus L) gives the
fraction of copy a launch can reach and its time ratio between rates 0.35 and 0, next to the measured ones and to
the largest L at which issue 4's targets (>= 65 % of copy on q|k|v and o, >= 80 % on the others; a ratio <= 0.72)
would be reachable.

    python benchmarks/ratio_bound.py --json benchmarks/results/ratio_bound_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import report_data as rd
from kernel_bench import build_case

RESULTS = Path(__file__).resolve().parent / "results"
# Programmatic dependent launch (stop 39) overlaps ~0.5 us of every launch boundary with the launch before it
# (Llama-8B step, H100: 2.237 -> 2.129 ms over ~200 launches, results/pdl_ab_h100.json). The probes' L was measured
# without it, so a kernel table timed with it (its "pdl" flag) is modelled with L less that much.
PDL_BOUNDARY_GAIN_US = 0.5
MODEL = "llama-3.1-8b"
TINY = "tiny 32 x 512"


def kv_bytes(rate: float, tokens: float, group: int, itemsize: int = 2) -> float:
    """KV-cache bytes one batch-1 step reads at ``rate``: every layer's kept K and V dims over ``tokens``."""
    segments = build_case(MODEL, "qkv", rate, group).segments  # (q, k, v) starts and kept widths
    return rd.NUM_LAYERS[MODEL] * (segments[1][1] + segments[2][1]) * tokens * itemsize


def step_bytes(kernels: dict, group: int, tokens: float) -> dict[float, float]:
    """{rate: bytes a step streams}: the kernel benchmark's weight bytes at ``group`` plus the KV cache."""
    return {rate: nbytes + kv_bytes(rate, tokens, group)
            for rate, nbytes in rd.bytes_at_group(kernels, MODEL, group).items()}


def stage_latency_us(probe: dict) -> tuple[float, str]:
    """L: the lowest per-layer time of the all-boundary chain: production launches, or one persistent launch of
    ``layer_loop_probe.py`` (key "loop") or of ``short_path_probe.py`` (key "short"; not its sync-only runs, which
    compute nothing)."""
    row = next((r for r in probe["rows"] if r["chain"] == TINY), None)
    if row is None:
        raise ValueError(f"the probe file has no {TINY!r} chain (layer_loop_probe.py's runs from stop 37 on and "
                         "short_path_probe.py's do)")
    options = [(row["launches_us_a_layer"], "production GEMV a launch")]
    options += [(e["us_a_layer"], f"one launch, {e['programs']} programs") for e in row.get("loop", [])
                if "us_a_layer" in e]
    options += [(e["us_a_layer"], f"shortest path, one launch, {e['block_n']} x {8 * e['rows']} tasks")
                for e in row.get("short", []) if "us_a_layer" in e and not e["sync_only"]]
    return min(options)


def staged_latency_us(probe: dict) -> tuple[float, str]:
    """L of ``staged_probe.py``'s all-boundary chain (32 x 512): its best staged config under PDL, and the production
    GEMV's L in the same run next to it (the probe's anchor)."""
    row = next(r for r in probe["rows"] if r["chain"] == "512")
    best = min((e for e in row["staged"] if "pdl_us_a_layer" in e), key=lambda e: e["pdl_us_a_layer"])
    return best["pdl_us_a_layer"], (f"TMA-staged GEMV a launch, {best['block_n']} columns x {best['warps']} warps "
                                    f"(production GEMV {row['production_us_a_layer']:.2f} us in the same run)")


def bound(bytes_by_rate: dict[float, float], copy_tbps: float, stages: dict[float, float], latency_us: float,
          rates=(0.0, 0.35), target: float = 0.75) -> dict:
    """The model's step times and ratio, and the stage latency at which it would reach ``target``."""
    floor = {r: bytes_by_rate[r] / (copy_tbps * 1e12) * 1e3 for r in rates}  # ms
    fixed = {r: stages[r] * latency_us * 1e-3 for r in rates}
    lo, hi = rates
    # t_hi / t_lo = target  <=>  floor_hi + s_hi L = target (floor_lo + s_lo L)
    needed = (floor[hi] - target * floor[lo]) / (target * stages[lo] - stages[hi]) * 1e3
    # or, at this L, the stages (both rates' counts scaled alike) at which the ratio is the target
    scale = (target * floor[lo] - floor[hi]) / ((stages[hi] - target * stages[lo]) * latency_us * 1e-3)
    return {"floor_ms": floor, "fixed_ms": fixed, "model_ms": {r: floor[r] + fixed[r] for r in rates},
            "ratio": (floor[hi] + fixed[hi]) / (floor[lo] + fixed[lo]), "bytes_ratio": floor[hi] / floor[lo],
            "latency_for_target_us": needed, "stages_for_target": scale * stages[lo], "target": target}


def kernel_bounds(kernels: dict, latency_us: float, ratio_target: float = 0.72) -> list[dict]:
    """Each batch-1 shape of the kernel table under the one-stage model, with the L each issue-4 target needs."""
    latency_us -= PDL_BOUNDARY_GAIN_US if kernels.get("pdl") else 0.0
    rows = {(r["model"], r["layer"], r["rate"]): r for r in kernels["rows"] if r["batch"] == 1}
    out = []
    for (model, layer, rate), r0 in rows.items():
        if rate != 0.0:
            continue
        f0 = r0["bytes"] / (kernels["copy_TBps"] * 1e6)  # us at the copy rate
        frac_target = 0.65 if layer in ("qkv", "o") else 0.80
        row = {"model": model, "layer": layer, "latency_us": latency_us, "bytes_us": f0,
               "frac_measured": r0["frac_of_copy"], "frac_model": f0 / (f0 + latency_us), "frac_target": frac_target,
               "latency_for_frac_us": f0 * (1 / frac_target - 1)}
        if (r1 := rows.get((model, layer, 0.35))) is not None:
            f1 = r1["bytes"] / (kernels["copy_TBps"] * 1e6)
            row.update(ratio_measured=r1["ours_us"] / r0["ours_us"], ratio_model=(f1 + latency_us) / (f0 + latency_us),
                       model_us={0.0: f0 + latency_us, 0.35: f1 + latency_us},
                       measured_us={0.0: r0["ours_us"], 0.35: r1["ours_us"]},
                       latency_for_ratio_us=(ratio_target * f0 - f1) / (1 - ratio_target))
        out.append(row)
    return out


def print_kernels(rows: list[dict]) -> None:
    print(f"one batch-1 GEMV as one stage (L = {rows[0]['latency_us']:.2f} us): fraction of copy and t(0.35) / t(0), "
          "measured / model, and the L each target needs")
    for r in rows:
        line = (f"  {r['model']:12s} {r['layer']:8s} copy {r['frac_measured']:.0%} / {r['frac_model']:.0%} "
                f"(>= {r['frac_target']:.0%} needs L <= {r['latency_for_frac_us']:.2f} us)")
        if "ratio_model" in r:
            need = r["latency_for_ratio_us"]
            line += (f"; ratio {r['ratio_measured']:.3f} / {r['ratio_model']:.3f} (<= 0.72 needs L <= "
                     + (f"{need:.2f} us)" if need > 0 else "0: the bytes alone miss it)"))
        print(line)


def load_inputs(kernels_file: Path, decode_file: Path, profile_file: Path, probe_file: Path) -> dict:
    kernels, decode = json.loads(kernels_file.read_text()), json.loads(decode_file.read_text())
    profile, probe = json.loads(profile_file.read_text()), json.loads(probe_file.read_text())
    group = rd.quant_group(decode)
    if group is None:
        raise ValueError(f"{decode_file} names no scale group (g64, g128, ...) in its quantization note")
    tokens = decode["prompt_tokens"] + decode["rows"][0]["new_tokens"] / 2  # the cache's mean length over the run
    measured = {r["rate"]: r["tpot_ms"] for r in decode["rows"] if r["engine"] == "uniql" and r["batch"] == 1}
    stages = {r["rate"]: sum(k["launches_per_step"] for k in r["in_graph"]["kernels"]) for r in profile["runs"]}
    latency, source = stage_latency_us(probe)
    return {"bytes": step_bytes(kernels, group, tokens), "copy_TBps": kernels["copy_TBps"], "stages": stages,
            "latency_us": latency, "latency_from": source, "measured_ms": measured, "group": group,
            "cache_tokens": tokens, "device": decode["device"], "kernels": kernels, "profile": profile}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=Path, default=RESULTS / "kernels_h100.json")
    ap.add_argument("--decode", type=Path, default=RESULTS / "decode_h100.json")
    ap.add_argument("--profile", type=Path, default=RESULTS / "decode_profile_stop35_h100.json")
    ap.add_argument("--probe", type=Path, default=RESULTS / "layer_loop_probe_sleep_h100.json")
    ap.add_argument("--short-probe", type=Path, nargs="*",
                    default=[RESULTS / f"short_path_probe_run{i}_h100.json" for i in (2, 3)],
                    help="short_path_probe.py's results: the step model again at their lowest L (absent: skipped)")
    ap.add_argument("--staged-probe", type=Path, nargs="*",
                    default=[RESULTS / f"staged_probe{run}_h100.json" for run in ("", "_run2")],
                    help="staged_probe.py's results: the step model at its staged stage's L (absent: skipped)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    inp = load_inputs(args.kernels, args.decode, args.profile, args.probe)
    kernels = inp.pop("kernels")
    del inp["profile"]  # step_residual.py's input, not this model's output
    out = {**inp, **bound(inp["bytes"], inp["copy_TBps"], inp["stages"], inp["latency_us"]),
           "kernel_rows": kernel_bounds(kernels, inp["latency_us"])}
    if found := [f for f in args.short_probe if f.exists()]:
        latency, source, name = min(stage_latency_us(json.loads(f.read_text())) + (f.name,) for f in found)
        out["short_path"] = {"latency_us": latency, "latency_from": f"{source}, {name}",
                             **bound(inp["bytes"], inp["copy_TBps"], inp["stages"], latency)}
    if found := [f for f in args.staged_probe if f.exists()]:
        latency, source, name = min(staged_latency_us(json.loads(f.read_text())) + (f.name,) for f in found)
        out["staged"] = {"latency_us": latency, "latency_from": f"{source}, {name}",
                         **bound(inp["bytes"], inp["copy_TBps"], inp["stages"], latency)}
    m = inp["measured_ms"]
    print(f"{inp['device']}: copy {inp['copy_TBps']:.2f} TB/s, stage latency L = {inp['latency_us']:.2f} us "
          f"({inp['latency_from']}, {TINY} chain)")
    for r in (0.0, 0.35):
        print(f"  rate {r:4}: {inp['bytes'][r] / 1e9:.2f} GB -> {out['floor_ms'][r]:.3f} ms at copy + "
              f"{inp['stages'][r]:.0f} stages x L = {out['fixed_ms'][r]:.3f} ms -> model {out['model_ms'][r]:.3f} ms "
              f"(measured {m[r]:.3f})")
    print(f"  ratio: bytes alone {out['bytes_ratio']:.3f}, model {out['ratio']:.3f}, measured {m[0.35] / m[0.0]:.3f};"
          f" the model reaches {out['target']} only at L <= {out['latency_for_target_us']:.2f} us a stage (or "
          f"<= {out['stages_for_target']:.0f} stages)")
    if short := out.get("short_path"):
        print(f"  at the shortest path's L = {short['latency_us']:.2f} us ({short['latency_from']}): model "
              f"{short['model_ms'][0.0]:.3f} / {short['model_ms'][0.35]:.3f} ms, ratio {short['ratio']:.3f}; "
              f"{out['target']} at <= {short['stages_for_target']:.0f} stages")
    if staged := out.get("staged"):
        print(f"  at the staged stage's L = {staged['latency_us']:.2f} us ({staged['latency_from']}): model "
              f"{staged['model_ms'][0.0]:.3f} / {staged['model_ms'][0.35]:.3f} ms, ratio {staged['ratio']:.3f} "
              "(if every stage were one)")
    print_kernels(out["kernel_rows"])
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in out.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
