"""Speed of MLP channel scoring: ridge leverage via Cholesky vs the SVD pseudo-inverse it replaces.

A 14336-channel correlation matrix (Llama-3.1-8B MLP size) is built from SwiGLU activations of random inputs
(synthetic: speed does not depend on the values; agreement is measured on this matrix). Both scorers run on
the same device, dtype and matrix in the same run; we report the time ratio and how many of the top-k
channels (k = kept sizes at rates 0.15 / 0.25 / 0.35) the two select in common.

    python benchmarks/ridge_vs_pinv.py --device cuda [--channels 14336] [--json benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from uniql.compressor.orders import pinv_leverage, ridge_leverage


def swiglu_correlation(channels: int, hidden: int, tokens: int, device, seed: int = 0) -> torch.Tensor:
    """sum over tokens of a a^T with a = silu(x Wg) * (x Wu), x ~ N(0, 1), built in token chunks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w_gate = torch.randn(hidden, channels, device=device, generator=gen) / hidden ** 0.5
    w_up = torch.randn(hidden, channels, device=device, generator=gen) / hidden ** 0.5
    corr = torch.zeros(channels, channels, device=device, dtype=torch.float32)
    for _ in range(0, tokens, 4096):
        x = torch.randn(4096, hidden, device=device, generator=gen)
        a = torch.nn.functional.silu(x @ w_gate) * (x @ w_up)
        corr += a.T @ a
    return corr


def _timed(fn, corr, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(corr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(channels=14336, hidden=4096, tokens=32768, device="cuda", dtype="float32") -> dict:
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    corr = swiglu_correlation(channels, hidden, tokens, device).to(getattr(torch, dtype))
    ridge_leverage(corr[:256, :256]), pinv_leverage(corr[:256, :256])  # warm up the solvers
    ridge, ridge_s = _timed(ridge_leverage, corr, device)
    pinv, pinv_s = _timed(pinv_leverage, corr, device)
    agreement = {}
    for rate in (0.15, 0.25, 0.35):
        k = 128 * round((1 - rate) * channels / 128)
        top_r, top_p = set(ridge.topk(k).indices.tolist()), set(pinv.topk(k).indices.tolist())
        agreement[str(rate)] = len(top_r & top_p) / k
    return {"channels": channels, "tokens": tokens, "dtype": dtype, "device": torch.cuda.get_device_name()
            if device.type == "cuda" else "cpu", "ridge_s": ridge_s, "pinv_s": pinv_s,
            "speedup": pinv_s / ridge_s, "topk_agreement": agreement,
            "max_abs_score_diff": (ridge - pinv).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = run(args.channels, tokens=args.tokens, device=args.device, dtype=args.dtype)
    print(f"{result['channels']} channels on {result['device']} ({result['dtype']}): ridge {result['ridge_s']:.2f} s,"
          f" pinv {result['pinv_s']:.2f} s, speedup {result['speedup']:.1f}x, top-k agreement "
          f"{result['topk_agreement']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
