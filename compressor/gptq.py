"""GPTQ (Frantar et al. 2022) into the packed INT4 format: group-wise, 1 % damping, no act-order, lazy batches.

Columns are quantized in stored order, which after sorting is importance order. GPTQ moves each column's
rounding error onto the columns AFTER it only, so for a K-pruned layer (down_proj, o_proj) a prefix never
depends on the columns a rung drops, and no rung needs re-quantization (the reference code re-rounds
o_proj/out_proj per rate with plain rounding). A prefix does lose the compensation that went into the dropped
tail, so GPTQ's advantage over RTN shrinks with deeper K cuts (tests/compressor/test_quantize.py pins the trend;
benchmarks/results/quant_smollm2.json measures it per projection type and rung).

``rung_weighted_hessian`` turns that around (uniql-method.md, "GPTQ compatible with truncation"): GPTQ on
sum_r a_r [H restricted to rung r's prefix] minimises the rungs' weighted output errors together, so no rung
leans on compensation that only the columns it drops would carry.
"""

from __future__ import annotations

import torch

from uniql.kernels import int4_format


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 (damped), and the mask of dead input columns."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True), dead


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]``, ``hessian [K, K]`` (sum of x x^T of the layer's inputs) -> (qweight, scales)."""
    n, k = weight.shape
    int4_format.check_shape(n, k, group_size)
    block = max(group_size, block - block % group_size)  # whole groups per block: scales use updated weights
    u, dead = _inverse_hessian_factor(hessian.to(weight.device), damp)
    w = weight.float().clone()
    w[:, dead] = 0
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(k // group_size, n, dtype=torch.float16, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w_blk, err_blk, u_blk = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, device=w.device), u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                scales[col // group_size] = int4_format.symmetric_scales(w_blk[:, i:i + group_size])
            s = scales[col // group_size].float()
            q = int4_format.quantize_codes(w_blk[:, i], s)
            codes[:, col] = q
            err = (w_blk[:, i] - (q.float() - int4_format.ZERO) * s) / u_blk[i, i]
            w_blk[:, i:] -= err[:, None] * u_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]  # lazy batch update of the columns after this block
    return int4_format.pack(codes), scales


def rung_weighted_hessian(hessian: torch.Tensor, prefixes, weights=None) -> torch.Tensor:
    """sum_r w_r * (``hessian`` with rows and columns >= prefixes[r] zeroed), i.e. H_ij * c(max(i, j)) where c(j)
    sums the weights of the rungs that keep input column j. tr(D M D^T) = sum_r w_r * (rung r's output error)."""
    k = hessian.shape[0]
    weights = [1.0] * len(prefixes) if weights is None else weights
    col = torch.arange(k, device=hessian.device)
    kept_weight = sum(w * (col < p).to(hessian.dtype) for w, p in zip(weights, prefixes, strict=True))
    return hessian * kept_weight[torch.maximum(col[:, None], col[None, :])]


def weighted_error(weight: torch.Tensor, qweight, scales, group_size: int, hessian: torch.Tensor,
                   k: int | None = None) -> float:
    """tr((W - Q) H (W - Q)^T) on the first ``k`` input columns: the layer's output error on calibration data."""
    k = weight.shape[1] if k is None else k
    delta = weight[:, :k].double() - int4_format.dequantize(qweight, scales, group_size, k).T.double()
    return (delta @ hessian[:k, :k].double().to(delta.device) * delta).sum().item()
