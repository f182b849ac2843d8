"""What elastic residency costs: one release (rung 0 -> the lightest rung) and one reload, on a model of real shape.

Cost depends on bytes and shapes, not values, so the model is ``decode_gpu.build_model``'s (random INT4 codes,
uniform ladder 0 / 0.15 / 0.25 / 0.35), written once as a checkpoint file to reload from (memory-mapped, in the
page cache after the write, as on a server that loaded it). The runner is the server's: on CUDA fused q|k|v and
gate|up inside captured decode graphs, on CPU the dequantized copies. Rows: the pass times (every layer; on CUDA
the graph reset first, as ``EngineBackend.change_weights`` does), the first decode step after a change
(recaptures its graph) against a steady step, bytes freed / reloaded, and an 8B projection from the bytes
(Llama-3.1-8B shapes at the same rates; time scales with the bytes a pass writes).

    python benchmarks/residency_cost.py --device cuda --shape smollm2-135m [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from decode_gpu import LLAMA_8B, build_model  # noqa: E402

from uniql.runtime.memory import rung_bytes  # noqa: E402
from uniql.runtime.request import Request, SamplingParams  # noqa: E402
from uniql.runtime.runner import ModelRunner  # noqa: E402
from uniql.runtime.spec import ArchSpec  # noqa: E402
from uniql.server.weights import WEIGHTS, ElasticWeights  # noqa: E402

SMOLLM2_135M = ArchSpec(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5,
                        tie_embeddings=True, qk_bias=False, v_bias=False, o_bias=False, mlp_bias=False, act="silu",
                        rope_attention_scaling=1.0, max_position_embeddings=8192)
SHAPES = {"smollm2-135m": (SMOLLM2_135M, 64), "llama-8b": (LLAMA_8B, 128)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode_steps(runner: ModelRunner, rung: int, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of one request and the time of each decode step."""
    req = Request(list(range(1, 33)), SamplingParams(max_tokens=steps + 1), rung=rung)
    req.output_ids.append(int(runner.prefill(req).argmax()))
    times = []
    for _ in range(steps):
        dt = timed(lambda: req.output_ids.append(int(runner.decode([req])[0].argmax())), runner.device)
        times.append(dt)
    runner.free(req.request_id)
    return req.output_ids, times


def run_pass(runner: ModelRunner, change, rung: int) -> float:
    def whole():
        if runner.graphs is not None:
            runner.graphs.reset()
        for layer in range(runner.model.spec.num_layers):
            change(layer, rung)
    return timed(whole, runner.device)


def measure(shape: str, device: str, workdir: Path) -> dict:
    spec, group = SHAPES[shape]
    model = build_model(spec, "int4", device="cpu", group=group)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, workdir / WEIGHTS)
    model = model.to(device)
    runner = ModelRunner(model, max_model_len=64)  # fuses (CUDA) or dequantizes (CPU), as the server does
    store = ElasticWeights(model, workdir)
    top = len(store.rung_bytes) - 1
    dev = runner.device
    tokens, steady = decode_steps(runner, top, 8)
    release_s = run_pass(runner, store.release_layer, top)
    settle_s = timed(store.settle, dev)
    after_release, first = decode_steps(runner, top, 8)
    reload_s = run_pass(runner, store.reload_layer, 0)
    store.settle()
    after_reload, _ = decode_steps(runner, top, 8)
    assert after_release == tokens == after_reload, "a residency change altered the greedy tokens"
    assert store.resident_bytes() == store.rung_bytes[0]
    return {"shape": shape, "device": str(dev), "rates": list(model.ladder.rates),
            "resident_bytes": {"rung0": store.rung_bytes[0], "lightest": store.rung_bytes[top]},
            "freed_bytes": store.rung_bytes[0] - store.rung_bytes[top],
            "release_pass_s": release_s, "settle_s": settle_s, "reload_pass_s": reload_s,
            "steady_step_ms": 1e3 * sorted(steady)[len(steady) // 2], "first_step_after_change_ms": 1e3 * first[0],
            "tokens_identical": True}


def project_8b(row: dict, spec: ArchSpec) -> dict:
    """Scale pass times by the weight bytes a pass writes (release: the kept prefixes; reload: every projection)."""
    size = SHAPES[row["shape"]][0]
    small = _weight_bytes(size, SHAPES[row["shape"]][1], row["rates"])
    big = _weight_bytes(spec, 128, row["rates"])
    return {"weight_bytes_rung0": big[0], "weight_bytes_lightest": big[-1],
            "release_pass_s": row["release_pass_s"] * big[-1] / small[-1],
            "reload_pass_s": row["reload_pass_s"] * big[0] / small[0]}


def _weight_bytes(spec: ArchSpec, group: int, rates) -> tuple[int, int]:
    from uniql.runtime.ladder import Alignment, dim_steps, full_layer_sizes, uniform_ladder

    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=group))
    ladder = uniform_ladder(full_layer_sizes(spec), steps, spec.num_layers, rates=tuple(rates))
    sizes = [ladder.sizes[0], ladder.sizes[-1]]
    return tuple(rung_bytes(spec, s, "int4", group)["weight_bytes"] for s in sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.shape, args.device, Path(tmp))
    # on CPU the passes also rewrite the dequantized copies, so INT4 bytes do not scale them: no projection there
    row["projected_llama_8b"] = project_8b(row, LLAMA_8B) if row["device"].startswith("cuda") else None
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
