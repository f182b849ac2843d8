"""End-to-end compression of a large model shape with random weights: wall time per stage and peak GPU memory.

Builds a Llama-3.1-8B-shaped model (random bf16 weights, weights do not change speed or memory), writes it as
safetensors with a tokenizer, then runs the real `uniql compress` pipeline (sort + allocation + GPTQ + save)
on the given device with its default calibration sizes. Stage timings and per-stage peak GPU memory come from
the pipeline's own provenance (`calibration.timings` in the manifest).

    python benchmarks/compress_scale.py --device cuda --workdir /tmp/scale --tokenizer DIR
    python benchmarks/compress_scale.py --shape tiny --device cpu ...      # smoke run of the same code path
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from uniql.compressor.compress import CompressConfig, compress
from uniql.compressor.quantize import QuantConfig
from uniql.runtime.checkpoint import read_manifest

SHAPES = {  # LlamaConfig fields
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
}


def build_source(shape: str, out: Path, tokenizer_dir: str, device: str) -> float:
    """Random-weight HF model directory; returns seconds spent."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the compress stages measure their own peaks; leave them a clean device
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default="/tmp/uniql-scale")
    ap.add_argument("--tokenizer", required=True, help="a local tokenizer directory (any vocab <= the shape's)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--bi-samples", type=int, default=32)
    ap.add_argument("--quant-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    build_s = build_source(args.shape, work / "src", args.tokenizer, args.device)
    cfg = CompressConfig(calib_samples=args.calib_samples, calib_seqlen=args.seqlen, bi_samples=args.bi_samples,
                         bi_seqlen=args.seqlen, device=args.device,
                         quant=QuantConfig(calib_samples=args.quant_samples, calib_seqlen=args.seqlen))
    start = time.perf_counter()
    out = compress(str(work / "src"), work / "ckpt", cfg, dtype="bfloat16")
    total_s = time.perf_counter() - start
    timings = read_manifest(out)["calibration"]["timings"]
    peak = max((t["peak_gpu_bytes"] or 0) for t in timings.values())
    report = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "build_source_s": build_s, "compress_total_s": total_s, "stages": timings, "peak_gpu_bytes": peak,
              "save_s": total_s - sum(t["s"] for t in timings.values()),  # the manifest is written inside "save"
              "calibration": {"sort": [args.calib_samples, args.seqlen], "bi": [args.bi_samples, args.seqlen],
                              "gptq": [args.quant_samples, args.seqlen]}}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
