"""Importance orders for one layer: UniQL's (calibrated) and the magnitude / random baselines.

UniQL (docs/uniql-method.md sections 3.1-3.3, without the reference code's bugs):
* MLP: ridge leverage ``diag(C (C + lam I)^-1)`` of the down_proj input correlation C. ``lam`` is relative to
  the mean channel energy, so it means the same whatever the token count (the paper's absolute lam=1 does not).
* Q/K: whole RoPE pairs, one order per KV group. A pair's energy ``|q_pair|^2`` is invariant under RoPE's
  rotation, so it is computed before RoPE for q and k alike (the reference mixes rotated Q with unrotated K).
  Score = sum over the group's query heads of sqrt(E|q_pair|^2 * E|k_pair|^2), a bound on the pair's share of
  the attention logits.
* V/O: per KV group, the eigenvectors of the V correlation ``W_V^T C W_V`` (= right singular vectors of
  ``C^1/2 W_V``, the whitened SVD of the paper) by descending eigenvalue; the rotation is applied to V and
  O directly, so rate 0 is exact with no whitening inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from uniql.runtime.decoder import DecoderLayer, ElasticAttention

if TYPE_CHECKING:  # calibrate imports ssm_orders, which imports this module
    from .calibrate import LayerStats
    from .ssm_orders import MambaOrders

ORDERS = ("uniql", "magnitude", "random")


@dataclass
class LayerOrders:
    """One order per structured dim of the blocks a layer has (None: the layer has no such block)."""

    mlp: torch.Tensor | None = None  # [I] old channel index for each new position
    qk_pairs: torch.Tensor | None = None  # [groups, head_dim/2] old pair index for each new pair
    vo_rotation: torch.Tensor | None = None  # [groups, head_dim, head_dim] orthogonal, rows = new rank directions
    mamba: MambaOrders | None = None  # head channels and group states of a Mamba2 mixer (ssm_orders.py)


def ridge_leverage(corr: torch.Tensor, lam_rel: float = 0.1) -> torch.Tensor:
    """diag(C (C + lam I)^-1) = 1 - lam * diag((C + lam I)^-1), via Cholesky (no eigendecomposition)."""
    n = corr.shape[0]
    lam = lam_rel * corr.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(n, dtype=corr.dtype, device=corr.device)
    chol = torch.linalg.cholesky(corr + lam * eye)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return 1.0 - lam * chol_inv.pow(2).sum(0)


def pinv_leverage(corr: torch.Tensor, lam_rel: float = 0.1, hermitian: bool = False) -> torch.Tensor:
    """The same scores through an SVD pseudo-inverse, as decomposition-based pipelines (MoDeGPT) compute them.

    Kept for comparison and timing (benchmarks/ridge_vs_pinv.py): same math, an n^3 SVD instead of a Cholesky.
    """
    n = corr.shape[0]
    lam = lam_rel * corr.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(n, dtype=corr.dtype, device=corr.device)
    return (corr @ torch.linalg.pinv(corr + lam * eye, hermitian=hermitian)).diagonal()


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; stable, so ties keep the original order."""
    return torch.sort(scores, descending=True, stable=True).indices


def _pair_energy_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-row energies [P*2*heads] -> per-(pair, head) energies [P, heads]."""
    return rows.view(-1, 2, heads).sum(1)


def _row_energy(weight, bias, stats: LayerStats) -> torch.Tensor:
    """E-sum of (w.x + b)^2 over calibration tokens for every row, from the input's moments."""
    w = weight.double()
    energy = ((w @ stats.attn_in_corr) * w).sum(1)
    if bias is not None:
        b = bias.double()
        energy = energy + 2 * b * (w @ stats.attn_in_sum) + b.pow(2) * stats.tokens
    return energy.clamp_min(0)


def _group_pair_scores(attn: ElasticAttention, q_energy, k_energy) -> torch.Tensor:
    """[groups, P]: sum over each group's query heads of sqrt(E_q * E_k)."""
    n, g = attn.n_heads, attn.n_kv
    q = _pair_energy_rows(q_energy, n)  # [P, n]
    k = _pair_energy_rows(k_energy, g)  # [P, g]
    k_per_head = k[:, torch.arange(n) // (n // g)]
    return (q * k_per_head).sqrt().view(-1, g, n // g).sum(-1).T


def _v_group_rows(attn: ElasticAttention) -> torch.Tensor:
    """V weight per group [groups, d, h] (row j = rank j)."""
    return attn.v_proj.weight.double().view(attn.head_dim, attn.n_kv, -1).transpose(0, 1)


def _eig_rotation(cov: torch.Tensor) -> torch.Tensor:
    """[..., d, d] PSD -> orthogonal rows = eigenvectors by descending eigenvalue."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1).transpose(-1, -2)


def _permutation_rotation(order: torch.Tensor) -> torch.Tensor:
    """[groups, d] orders -> permutation matrices [groups, d, d] (row j selects old rank order[j]), on the orders'
    device (a CPU identity indexed by CUDA orders fails)."""
    eye = torch.eye(order.shape[-1], dtype=torch.float64, device=order.device)
    return eye[order]


def uniql_orders(layer: DecoderLayer, stats: LayerStats, lam_rel: float = 0.1) -> LayerOrders:
    orders = LayerOrders()
    attn = layer.attn
    if attn is not None:
        q_e = _row_energy(attn.q_proj.weight, attn.q_proj.bias, stats)
        k_e = _row_energy(attn.k_proj.weight, attn.k_proj.bias, stats)
        v = _v_group_rows(attn)
        v_cov = v @ stats.attn_in_corr @ v.transpose(1, 2)  # [g, d, d]
        orders.qk_pairs = descending(_group_pair_scores(attn, q_e, k_e))
        orders.vo_rotation = _eig_rotation(v_cov)
    if layer.mlp is not None:
        orders.mlp = descending(ridge_leverage(stats.mlp_hidden_corr, lam_rel))
    if layer.mamba is not None:
        from .ssm_orders import uniql_mamba_orders

        orders.mamba = uniql_mamba_orders(layer.mamba, stats.mamba, lam_rel)
    return orders


def magnitude_orders(layer: DecoderLayer) -> LayerOrders:
    """Weight-norm baseline: no calibration data."""
    from .ssm_orders import magnitude_mamba_orders

    orders = LayerOrders()
    attn, mlp = layer.attn, layer.mlp
    if mlp is not None:
        up, down = mlp.up_proj.weight.norm(dim=1), mlp.down_proj.weight.norm(dim=0)
        mlp_score = up * down if mlp.gate_proj is None else mlp.gate_proj.weight.norm(dim=1) * up * down
        orders.mlp = descending(mlp_score.double())
    if attn is not None:
        orders.qk_pairs = descending(_group_pair_scores(attn, attn.q_proj.weight.double().pow(2).sum(1),
                                                        attn.k_proj.weight.double().pow(2).sum(1)))
        n, g, d = attn.n_heads, attn.n_kv, attn.head_dim
        o_norm = attn.o_proj.weight.double().view(-1, d, n).norm(dim=0)  # [rank, head]
        o_group = o_norm.view(d, g, n // g).sum(-1).T  # [g, d]
        vo_score = _v_group_rows(attn).norm(dim=-1) * o_group
        orders.vo_rotation = _permutation_rotation(descending(vo_score))
    if layer.mamba is not None:
        orders.mamba = magnitude_mamba_orders(layer.mamba)
    return orders


def random_orders(layer: DecoderLayer, generator: torch.Generator) -> LayerOrders:
    """Random permutations (drawn in a fixed order: attention, MLP, Mamba, so Llama layers draw as before) from a
    CPU generator, returned on the layer's device (``permute_qk`` gathers the layer's ``rope_index`` with them)."""
    from .ssm_orders import random_mamba_orders

    orders = LayerOrders()
    attn = layer.attn
    device = next(layer.parameters()).device
    if attn is not None:
        g, d = attn.n_kv, attn.head_dim
        orders.qk_pairs = torch.stack([torch.randperm(d // 2, generator=generator) for _ in range(g)]).to(device)
        orders.vo_rotation = _permutation_rotation(
            torch.stack([torch.randperm(d, generator=generator) for _ in range(g)]).to(device))
    if layer.mlp is not None:
        orders.mlp = torch.randperm(layer.mlp.up_proj.weight.shape[0], generator=generator).to(device)
    if layer.mamba is not None:
        orders.mamba = random_mamba_orders(layer.mamba, generator)
    return orders
