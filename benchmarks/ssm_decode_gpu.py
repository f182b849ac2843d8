"""GPU decode benchmark of 8B-shaped SSM models: the UniQL engine per rung vs transformers bf16, same run.

Two shapes, built from transformers configs (the spec comes from the same config object, so both sides run
exactly the same architecture): ``mamba2-8b-shape`` (Mamba2-8B: hidden 4096, 56 Mamba2 layers, 128 heads x 64,
8 groups, state 128, vocab 256000) and ``nemotron-h-8b-shape`` (Nemotron-H-8B: hidden 4096, 52 layers = 24
Mamba2 + 4 attention + 24 relu2 MLP, MLP 21504, 32/8 heads x 128, vocab 131072). Speed depends on shapes, not
weight values: the engine's model gets random INT4 codes (benchmarks/decode_gpu.py), sane mixer parameters and
a uniform rate ladder; transformers' models are randomly initialised in bf16 (their torch path: no mamba_ssm
kernels on the machine). Rows like ``results/decode_h200.json`` plus ``"model"``: batch 1, TTFT and median
TPOT of one greedy request (``--prompt-tokens`` prompt, ``--new-tokens`` new), engine at rates 0 / 0.15 /
0.25 / 0.35, ``hf_eager`` at rate 0. On CUDA the engine decodes through one CUDA graph per rung (captured in
each rung's warm-up request; ``"cuda_graphs"`` in the rows says whether it did).

    python benchmarks/ssm_decode_gpu.py --json benchmarks/results/ssm_decode_h200.json
    python benchmarks/ssm_decode_gpu.py --tiny --device cpu      # the same code paths on tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
from decode_gpu import NullTokenizer, _random_dense, _random_int4

from uniql.kernels.switches import check_switches, set_switches
from uniql.runtime.bench import engine_row, hf_row, peak_mem_bytes, reset_peak
from uniql.runtime.decoder import DecoderLayer, ElasticDecoder, RMSNorm
from uniql.runtime.engine import Engine
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder
from uniql.runtime.mamba import ElasticMamba
from uniql.runtime.spec import spec_from_hf_config

RATES = (0.0, 0.15, 0.25, 0.35)
NEMOTRON_H_8B_PATTERN = "M-M-M-M*-" * 4 + "M-" * 8  # 52 layers: 24 M, 4 *, 24 -


def hf_config(name: str, tiny: bool):
    """The transformers config of a shape (``tiny``: same layer kinds, small dims, for CPU checks)."""
    from transformers import Mamba2Config, NemotronHConfig

    if name == "mamba2-8b-shape":
        dims = dict(hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, n_groups=2, state_size=16,
                    vocab_size=512) if tiny else \
            dict(hidden_size=4096, num_hidden_layers=56, num_heads=128, head_dim=64, n_groups=8, state_size=128,
                 vocab_size=256000)
        return Mamba2Config(expand=2, conv_kernel=4, chunk_size=256, tie_word_embeddings=False, **dims)
    pattern = "M-M*-" if tiny else NEMOTRON_H_8B_PATTERN
    dims = dict(hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=512) if tiny else \
        dict(hidden_size=4096, mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
             intermediate_size=21504, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=131072)
    return NemotronHConfig(hybrid_override_pattern=pattern, expand=2, conv_kernel=4, chunk_size=128,
                           tie_word_embeddings=False, max_position_embeddings=8192, **dims)


def _fill_mixer(mamba, device) -> None:
    """Decays and steps in the ranges trained models have (A = -[1, 16], dt = [1e-3, 0.1]), unit skip/norm."""
    heads = mamba.heads
    mamba.A_log.data = torch.log(torch.linspace(1.0, 16.0, heads, device=device))
    dt = torch.exp(torch.linspace(math.log(1e-3), math.log(0.1), heads, device=device))
    mamba.dt_bias.data = dt + torch.log(-torch.expm1(-dt))  # softplus^-1
    mamba.D.data = torch.ones(heads, device=device)
    mamba.norm_weight.data.fill_(1.0)
    for name in ("x", "B", "C"):
        w = getattr(mamba, f"conv_{name}_weight")
        w.data = torch.randn(w.shape, device=device) / math.sqrt(w.shape[1])
        bias = getattr(mamba, f"conv_{name}_bias")
        if bias is not None:
            bias.data.zero_()


def build_model(config, weights: str, device, group: int = 128) -> ElasticDecoder:
    """The engine's model of a shape: random INT4 (``int4``) or bf16 (``dense``) projections, uniform ladder."""
    spec = spec_from_hf_config(config)
    with torch.device("meta"):
        model = ElasticDecoder(spec)
    model.inv_freq = torch.zeros(max(1, spec.head_dim // 2), device=device)  # real, zero: Nemotron-H has no RoPE
    model.to_empty(device=device)
    make = ((lambda k, n: _random_int4(k, n, group, device)) if weights == "int4"
            else (lambda k, n: _random_dense(k, n, device)))
    for layer in model.layers:
        for path in layer.linear_paths:
            old = layer.get_linear(path)
            layer.set_linear(path, make(old.in_features, old.out_features))
        if layer.mamba is not None:
            _fill_mixer(layer.mamba, device)
        if layer.attn is not None:
            layer.attn.rope_index = torch.arange(spec.head_dim // 2, device=device).repeat(spec.num_kv_heads, 1)
    model.embed = make(spec.hidden_size, spec.vocab_size)
    model.lm_head = None if spec.tie_embeddings else make(spec.hidden_size, spec.vocab_size)
    for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
        norm.weight.data.fill_(1.0)
    model.to(torch.bfloat16)
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(spec, Alignment(group_size=group)),
                                  spec.num_layers, rates=RATES)
    return model.eval()


def engine_rows(name, config, prompt, new_tokens, device, weights="int4", label=None) -> list[dict]:
    model = build_model(config, weights, device, group=min(128, config.hidden_size // 2))
    engine = Engine(model, NullTokenizer(), max_num_seqs=1, max_model_len=len(prompt) + new_tokens + 8)
    rows = []
    for rate in RATES:
        engine_row(engine, prompt, rate, 4)  # warm-up: compiles the kernels for this rung's shapes
        row = engine_row(engine, prompt, rate, new_tokens)  # resets the peak; raises if the engine failed it
        engine_name = label or ("uniql" if weights == "int4" else "uniql_bf16_dense")
        rows.append({"model": name, **row, "engine": engine_name,
                     "peak_mem_bytes": peak_mem_bytes(device), "cuda_graphs": engine.runner.graphs is not None})
        _print(rows[-1])
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def hf_rows(name, config, prompt, new_tokens, device) -> list[dict]:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    reset_peak(device)
    try:
        rows = [{"model": name, **hf_row(hf, prompt, new_tokens, "hf_eager")}]
        _print(rows[-1])
    except Exception as exc:  # noqa: BLE001 (report why the anchor is missing, keep the engine rows)
        rows = [{"model": name, "engine": "hf_eager", "error": f"{type(exc).__name__}: {exc}"[:500]}]
        print("hf_eager failed:", rows[-1]["error"], file=sys.stderr)
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def tpot_ratios(rows: list[dict]) -> dict:
    """TPOT(0.35) / TPOT(0) of the engine per model (issue 7's acceptance: <= 0.8)."""
    out = {}
    for name in {r["model"] for r in rows}:
        tpot = {r["rate"]: r["tpot_ms"] for r in rows if r["model"] == name and r["engine"] == "uniql"}
        if 0.0 in tpot and 0.35 in tpot:
            out[name] = tpot[0.35] / tpot[0.0]
    return out


def _print(r) -> None:
    print(f"{r['model']:20s} {r['engine']:17s} rate {r.get('rate', 0):.2f}: TTFT {r['ttft_ms']:8.1f} ms  "
          f"TPOT {r['tpot_ms']:7.3f} ms  peak {r['peak_mem_bytes'] / 2**30:5.1f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mamba2-8b-shape", "nemotron-h-8b-shape"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims of the same layer kinds (CPU check)")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also the engine with dense bf16 weights")
    ap.add_argument("--ab-mamba-fold", action="store_true",
                    help="also the engine with the Mamba blocks' own norm kernels (no RMSNorm split across "
                         "out_proj / in_proj), same run: rows 'uniql_mamba_norm_kernels'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_switches(strict=True)  # an A/B under a misspelt switch would time the default
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        config = hf_config(name, args.tiny)
        prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        rows += engine_rows(name, config, prompt, args.new_tokens, device)
        _write(args, device, rows)  # after every block of rows: a run cut short keeps what it measured
        if args.ab_mamba_fold:
            with _mamba_norm_kernels():
                rows += engine_rows(name, config, prompt, args.new_tokens, device, label="uniql_mamba_norm_kernels")
        if args.dense:
            rows += engine_rows(name, config, prompt, args.new_tokens, device, weights="dense")
        if not args.skip_hf:
            rows += hf_rows(name, config, prompt, args.new_tokens, device)
        _write(args, device, rows)
    print(json.dumps(tpot_ratios(rows)))


@contextlib.contextmanager
def _mamba_norm_kernels():
    """The path before the norm split covered Mamba blocks: their in-projection refuses a begun norm and their
    out_proj does not begin the next one, so both norms around a Mamba block run as their own kernels (attention
    and MLP blocks keep folding into each other)."""
    takes, decode = DecoderLayer.takes_prenormed, ElasticMamba.decode
    DecoderLayer.takes_prenormed = property(lambda self: self.blocks[0] != "mamba" and takes.fget(self))
    ElasticMamba.decode = lambda self, u, sizes, batch, layer, residual=None: decode(self, u, sizes, batch, layer)
    try:
        yield
    finally:
        DecoderLayer.takes_prenormed, ElasticMamba.decode = takes, decode


def _write(args, device, rows) -> None:
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "tiny": args.tiny, "switches": set_switches(), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens,
              "quantization": "INT4 g128 symmetric (random codes), uniform rate ladder; transformers bf16",
              "tpot_ratio_035_over_0": tpot_ratios(rows), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))

if __name__ == "__main__":
    main()
