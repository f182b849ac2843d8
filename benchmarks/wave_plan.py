"""What each batch-1 decode GEMV launches at each rung, offline: programs, K tiles a program, against its bytes.

No GPU: the launch plan comes from ``pick_config`` / ``launch_split`` with an H100's 132 SMs, the shapes from the
8B-shaped models' uniform ladders (the decode benchmarks' models, built on the meta device). In one wave every
program runs at once, so a GEMV lasts about ``F + c x (K tiles a program)``; that count is a small integer that
rounds up, so time can fall slower than the bytes from rate 0 to 0.35. Next to the plan, the per-GEMV times the
H100 profiles measured (``profile_decode.py``), to see how far the rounding explains their ratios.

    python benchmarks/wave_plan.py [--json benchmarks/results/wave_plan_h100.json]
    UNIQL_GEMV_BLOCK_K=32 python benchmarks/wave_plan.py        # the plan with half-size tiles
    UNIQL_WIDE_COLS=256 python benchmarks/wave_plan.py          # without auto's 128-column blocks
    UNIQL_GEMV_PER_SM=regs python benchmarks/wave_plan.py       # waves of 10 programs an SM on 128 columns
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_gpu import LLAMA_8B, RATES  # noqa: E402
from ssm_decode_gpu import hf_config  # noqa: E402

from uniql.kernels import int4_config  # noqa: E402
from uniql.kernels.int4_tiles import glu_paired  # noqa: E402
from uniql.kernels.pdl import glu_gemv_preload  # noqa: E402
from uniql.runtime.decoder import ElasticDecoder  # noqa: E402
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder  # noqa: E402
from uniql.runtime.spec import spec_from_hf_config  # noqa: E402

SMS, GROUP = 132, 128
# measured per-GEMV us by place in a layer (in-graph H100 profiles), and the profile files they come from
PROFILES = {"llama-3.1-8b": "decode_profile_stop35_h100.json", "mamba2-8b-shape": "ssm_decode_profile_stop35_h100.json"}


def layer_gemvs(spec, sizes) -> list[tuple[str, list[int], int, bool]]:
    """(place, output segment widths, K, paired) of one layer's decode GEMVs at a rung's sizes, in launch order; a
    paired gate|up (``UNIQL_GLU_PAIRED=1``, the default) is one segment of both halves, as ``int4_glu`` plans it."""
    if spec.ssm_heads:
        hp, gn = spec.ssm_heads * sizes.ssm_p, spec.ssm_groups * sizes.ssm_n
        return [("gemv0", [hp, hp, gn, gn, spec.ssm_heads], spec.hidden_size, False),
                ("gemv1", [spec.hidden_size], hp, False)]
    q, kv = spec.num_heads * sizes.qk, spec.num_kv_heads * sizes.qk
    paired = glu_paired()
    return [("gemv0", [q, kv, spec.num_kv_heads * sizes.vo], spec.hidden_size, False),
            ("gemv1", [spec.hidden_size], spec.num_heads * sizes.vo, False),
            ("gemv2", [2 * sizes.mlp] if paired else [sizes.mlp, sizes.mlp], spec.hidden_size, paired),
            ("gemv3", [spec.hidden_size], sizes.mlp, False)]


def plan(widths: list[int], k: int, paired: bool) -> dict:
    with glu_gemv_preload() if paired else contextlib.nullcontext():
        cfg = int4_config.pick_config(1, sum(widths), k, GROUP, "cuda", widths=tuple(widths), paired=paired)
    splits, per_split = int4_config.launch_split(triton.cdiv(k, cfg.block_k), cfg.split_k)
    blocks = sum(triton.cdiv(w, cfg.block_n) for w in widths)
    return {"N": sum(widths), "K": k, "block_n": cfg.block_n, "block_k": cfg.block_k, "programs": blocks * splits,
            "k_tiles_a_program": per_split, "weight_bytes": sum(widths) * k // 2}


def model_rows(name: str, spec) -> list[dict]:
    with torch.device("meta"):
        model = ElasticDecoder(spec)
    ladder = uniform_ladder(model.full_sizes, spec_dim_steps(spec, Alignment(group_size=GROUP)), spec.num_layers,
                            rates=RATES)
    layer = next(i for i, layer in enumerate(model.layers) if (layer.mamba is not None) == bool(spec.ssm_heads))
    measured = _measured(name)
    rows = []
    for rung, rate in enumerate(ladder.rates):
        for place, widths, k, paired in layer_gemvs(spec, ladder.sizes[rung][layer]):
            rows.append({"model": name, "rate": rate, "place": place, **plan(widths, k, paired),
                         "measured_us": measured.get((rate, place))})
    base = {(r["model"], r["place"]): r for r in rows if r["rate"] == 0.0}
    for r in rows:
        b = base[(r["model"], r["place"])]
        # a program's share of the weights (tiles x their size: 128-column tiles are half a 256-column one)
        r["tiles_ratio"] = (r["k_tiles_a_program"] * r["block_k"] * r["block_n"]
                            / (b["k_tiles_a_program"] * b["block_k"] * b["block_n"]))
        r["bytes_ratio"] = r["weight_bytes"] / b["weight_bytes"]
        both = r["measured_us"] is not None and b["measured_us"]
        r["measured_ratio"] = r["measured_us"] / b["measured_us"] if both else None
    return rows


def _measured(name: str) -> dict:
    path = HERE / "results" / PROFILES[name]
    if not path.exists():
        return {}
    runs = json.loads(path.read_text())["runs"]
    return {(round(run["rate"], 2), place): us for run in runs
            for place, us in run.get("in_graph", run)["gemv_us_by_position"].items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    int4_config._sm_count = lambda device: SMS  # an H100 SXM, without a GPU
    rows = model_rows("llama-3.1-8b", LLAMA_8B)
    rows += model_rows("mamba2-8b-shape", spec_from_hf_config(hf_config("mamba2-8b-shape", tiny=False)))
    print("| model | place | rate | N x K | programs | K tiles a program (x K x N) | "
          "share / bytes / measured vs rate 0 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        measured = f"{r['measured_ratio']:.2f}" if r["measured_ratio"] is not None else "-"
        print(f"| {r['model']} | {r['place']} | {r['rate']:.2f} | {r['N']} x {r['K']} | {r['programs']} | "
              f"{r['k_tiles_a_program']} x {r['block_k']} x {r['block_n']} | {r['tiles_ratio']:.2f} / "
              f"{r['bytes_ratio']:.2f} / "
              f"{measured} |")
    if args.json:
        args.json.write_text(json.dumps({"sms": SMS, "group": GROUP, "block_k_env": int4_config._tile_k(),
                                         "what": __doc__.splitlines()[0], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
