"""Linear layers that run on a prefix of their stored weight: ``forward(x, n=N_active, k=K_active)``.

``DenseLinear`` keeps a floating-point ``weight [N, K]`` (the compressor's working form and the FP baseline);
both prefixes are views (``weight[:n, :k]``), so a rung never copies a weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prefix(t: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
    return None if t is None or n is None else t[:n]


class DenseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, n: int | None = None, k: int | None = None) -> torch.Tensor:
        """x [..., k] -> [..., n] with the first ``n`` output rows and ``k`` input columns."""
        weight = self.weight[:n, :k]
        bias = self.bias if n is None or self.bias is None else self.bias[:n]
        return F.linear(x, weight, bias)

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Add, replace or drop the bias (sorting folds a V bias into o_proj)."""
        self.bias = None if bias is None else nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)
