"""The Mamba2 decode state update alone (GPU): time per layer of ``kernels/ssm_update.selective_state_update`` at
the Mamba2-8B shape, for several ``(BLOCK_P, num_warps)`` launch configs, at rates 0 and 0.35.

Why: in the engine's decode step the update takes ~5.7 us a layer at rate 0 and still ~5.3 us at 0.35
(results/ssm_decode_profile_h100.json), while its bytes (the fp32 state read and written, 2 x 4 MB at rate 0,
2 x 1.7 MB at 0.35) would take ~2.7 / ~1.1 us at the copy rate: 56 layers of that fixed cost are much of what
holds Mamba2's TPOT(0.35)/TPOT(0) at 0.83. One graph replays the update of every layer (each its own state,
through an address table as in the engine), so states rotate like the model's (56 x 4 MB > L2).

    python benchmarks/ssm_update_probe.py --json benchmarks/results/ssm_update_probe_h100.json
    python benchmarks/ssm_update_probe.py --cpu-smoke   # tiny shapes, Triton interpreter
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton reads the flag when a kernel is defined: before any uniql.kernels import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from graph_timing import graph_median_us, run_probes  # noqa: E402

from uniql.kernels import ssm_update  # noqa: E402

HEADS, GROUPS, LAYERS = 128, 8, 56  # Mamba2-8B (ssm_decode_gpu.py's shape)
RUNGS = {0.0: (64, 128), 0.35: (42, 80)}  # (P', N'): runtime/ladder.py's sizes at keep 1.0 / 0.65
CONFIGS = [(None, None), (4, 2), (4, 4), (8, 2), (8, 4), (16, 2), (16, 4), (32, 4)]  # None: the default (8, 2)


def _operands(p: int, n: int, heads: int, groups: int, layers: int, device):
    """One decode step's inputs (shared) and one state per layer, addressed through int64 tables [1]."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x, z = rand(1, heads, p).bfloat16(), rand(1, heads, p).bfloat16()
    dt, B, C = rand(1, heads, scale=0.5), rand(1, groups, n).bfloat16(), rand(1, groups, n).bfloat16()
    A, D, dt_bias = -torch.rand(heads, generator=gen).to(device) - 0.5, rand(heads), rand(heads, scale=0.1)
    states = [rand(1, heads, p, n, scale=0.1) for _ in range(layers)]
    tables = [torch.tensor([s.data_ptr()], dtype=torch.int64, device=device) for s in states]
    return (x, dt, A, B, C, D, z, dt_bias), states, tables


def probe(rate: float, config, cuda: bool, repeats: int, smoke: bool) -> dict:
    p, n = (8, 16) if smoke else RUNGS[rate]
    heads, groups, layers = (4, 2, 2) if smoke else (HEADS, GROUPS, LAYERS)
    device = "cuda" if cuda else "cpu"
    ops, states, tables = _operands(p, n, heads, groups, layers, device)
    default = ssm_update.launch_config
    block_p, warps = config
    if block_p is not None:
        ssm_update.launch_config = lambda p_, n_: (min(block_p, max(4, 1 << (p_ - 1).bit_length())),
                                                   default(p_, n_)[1], warps)
    try:
        x, dt, A, B, C, D, z, dt_bias = ops
        ref_state = states[0].clone()
        y = ssm_update.selective_state_update(tables[0], x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        ref = ssm_update.selective_state_update_reference(ref_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        err = (y.float() - ref.float()).abs().max().item()
        if not err <= 2e-2 * ref.float().abs().max().item() + 1e-3:
            raise AssertionError(f"config {config} rate {rate}: max abs error {err}")

        def step():
            for table in tables:
                ssm_update.selective_state_update(table, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)

        us = graph_median_us(step, cuda, repeats) / layers
    finally:
        ssm_update.launch_config = default
    used = ssm_update.launch_config(p, n) if block_p is None else (block_p, None, warps)
    state_bytes = 2 * 4 * heads * p * n  # read + write, fp32
    return {"rate": rate, "P": p, "N": n, "block_p": used[0], "num_warps": used[2], "default": block_p is None,
            "us_per_layer": us, "state_TBps": state_bytes / us / 1e6}


def main(argv=None) -> None:
    run_probes(__doc__, "ssm_update_probe.py", RUNGS, CONFIGS, probe,
               lambda r: f"BLOCK_P {r['block_p']} warps {r['num_warps']}{' (default)' * r['default']}: "
                         f"{r['us_per_layer']:.2f} us a layer, state at {r['state_TBps']:.2f} TB/s",
               {"shape": "mamba2-8b", "layers": LAYERS}, argv)


if __name__ == "__main__":
    main()
