"""Layer-wise pruning-rate allocation from block-importance (BI) scores.

prune_l = L * rate * softmax(-score / eps)_l, capped at ``max_prune``. Unlike the reference, the part cut
off by the cap is handed to the uncapped layers (water-filling), so the mean prune rate equals the target
whenever the target is reachable.
"""

from __future__ import annotations

import math

import torch

from uniql.runtime.ladder import DEFAULT_RATES, DimSteps, LayerSizes, RateLadder


def allocate(scores: list[float], rate: float, eps: float = 0.1, max_prune: float = 0.85) -> list[float]:
    """Per-layer prune rates with mean ``rate``; important layers (high score) are pruned less."""
    if not 0.0 <= rate <= max_prune:
        raise ValueError(f"global rate {rate} must be within [0, {max_prune}]")
    if eps <= 0:
        raise ValueError("eps must be positive")
    bad = {i: s for i, s in enumerate(scores) if not math.isfinite(s)}
    if bad:
        raise ValueError(f"block-importance scores are not finite for layers {bad}: the calibration forward overflowed "
                         "or produced NaN there (check the model's weights, or calibrate in float32)")
    logits = -torch.tensor(scores, dtype=torch.float64) / eps
    n = len(scores)
    prune = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    budget = rate * n
    while free.any():
        share = budget * torch.softmax(logits[free], 0)  # softmax over the free layers never underflows to 0/0
        over = share > max_prune
        if not over.any():
            prune[free] = share
            break
        capped = free.nonzero().squeeze(1)[over]
        prune[capped] = max_prune
        free[capped] = False
        budget -= max_prune * len(capped)
    return prune.tolist()


def build_ladder(scores: list[float], full: LayerSizes, steps: DimSteps, rates=DEFAULT_RATES,
                 eps: float = 0.1, max_prune: float = 0.85) -> RateLadder:
    """A ladder whose rung ``r`` prunes layer ``l`` at ``allocate(scores, rates[r], eps, max_prune)[l]``."""
    keep = [[1.0 - p for p in allocate(scores, r, eps, max_prune)] for r in rates]
    return RateLadder.build(full, steps, rates, keep)
