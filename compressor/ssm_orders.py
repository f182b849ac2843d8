"""Importance orders for a Mamba2 mixer (docs/uniql-method.md section 3.5, without the reference's quirks).

Two structured dims are pruned: the channels of every head (x/z rows, the x conv channels, the gated-norm
weight, out_proj's columns; ``P'`` per head) and the state dims of every group (B/C rows and their conv
channels; ``N'`` per group). dt, A, D and dt_bias are per head and never pruned. Orders are over the STORED
layout of runtime/mamba.py: channel ``c`` of head ``h`` is row ``c * H + h``; state ``n`` of group ``g`` is row
``n * G + g``.

UniQL scores (calibration statistics of the mixer's input, real tokens only):
* state dims, delta-aware: ``s[g, n] = sqrt(E C[g,n]^2) * sum_{h in g} sqrt(E (dt_h B[g,n])^2)``, with C/B after
  the conv + activation and dt the TRUE time step (dt_bias, softplus, limit; the reference uses the raw
  projection). ``C_n`` reads state n out; ``dt B_n`` writes it, per head.
* head channels, state-aware: each chunk's local state ``S[c, h, p, n] = sum_{t in c} exp(A sum dt) dt_t B_t[n]
  x_t[h, p]`` (the SSD chunk states, ``kernels/ssm_scan.py``), arranged with rows (chunk, n) and columns
  (p, h); ridge leverage ``diag(K (K + lam I)^-1)`` of ``K = sum M^T M`` (lam relative to its mean diagonal,
  as for the MLP), then sorted per head. The reference uses this for Mamba2/Nemotron-H; here every family does.
Baselines: magnitude (products of the row/column norms that touch a channel) and random permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniql.kernels.ssm_scan import chunk_local_states
from uniql.runtime.mamba import ElasticMamba

from .orders import descending, ridge_leverage


@dataclass
class MambaOrders:
    channels: torch.Tensor  # [H, P] old channel of each head for each new position
    states: torch.Tensor  # [G, N] old state of each group for each new position


@dataclass
class MambaStats:
    """Sums over real calibration tokens (fp64)."""

    tokens: int = 0
    c_sq: torch.Tensor | None = None  # [G, N] sum of C^2
    dtb_sq: torch.Tensor | None = None  # [H, N] sum of (dt_h B_{g(h)})^2
    state_corr: torch.Tensor | None = None  # [P*H, P*H] sum of chunk-state outer products, columns (p, h)

    def add(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


def mixer_signals(mamba: ElasticMamba, u: torch.Tensor):
    """x ``[b,T,H,P]``, B/C ``[b,T,G,N]`` (after conv + act), dt ``[b,T,H]``, A ``[H]`` at full size, fp32."""
    p, n = mamba.head_dim, mamba.state
    _, xbc, dt_raw = mamba.project(u, p, n)
    x, B, C = mamba.split_heads(mamba.conv(xbc, p, n), p, n)
    return x.float(), B.float(), C.float(), mamba.time_step(dt_raw), -torch.exp(mamba.A_log.float())


@torch.no_grad()
def accumulate(stats: MambaStats, mamba: ElasticMamba, u: torch.Tensor, mask: torch.Tensor) -> None:
    """Add one batch (``u [b,T,hidden]`` the mixer input, ``mask [b,T]`` real tokens, right padded)."""
    x, B, C, dt, A = mixer_signals(mamba, u)
    real = mask.bool()
    dt = dt * real[..., None]  # padding writes nothing into any state
    rep = mamba.heads // mamba.groups
    stats.tokens += int(real.sum())
    stats.add("c_sq", C[real].double().pow(2).sum(0))
    dtb = dt[..., None] * B.repeat_interleave(rep, dim=2)  # [b,T,H,N]
    stats.add("dtb_sq", dtb[real].double().pow(2).sum(0))
    local = chunk_local_states(x, dt, A, B, mamba.chunk)  # [b,c,H,P,N]
    rows = local.permute(0, 1, 4, 3, 2).reshape(-1, mamba.head_dim * mamba.heads)  # rows (b,c,n), cols (p,h)
    stats.add("state_corr", (rows.T @ rows).double())


def uniql_mamba_orders(mamba: ElasticMamba, stats: MambaStats, lam_rel: float = 0.1) -> MambaOrders:
    heads, groups = mamba.heads, mamba.groups
    read = stats.c_sq.sqrt()  # [G, N]
    write = stats.dtb_sq.sqrt().view(groups, heads // groups, -1).sum(1)  # [G, N]
    tau = ridge_leverage(stats.state_corr, lam_rel).view(mamba.head_dim, heads).T  # [H, P]
    return MambaOrders(channels=descending_rows(tau), states=descending_rows(read * write))


def descending_rows(scores: torch.Tensor) -> torch.Tensor:
    return torch.stack([descending(row) for row in scores])


def _rows_norm(weight: torch.Tensor, inner: int, outer: int) -> torch.Tensor:
    """Row norms of a stored ``[inner * outer, ...]`` weight (row ``i * outer + o``) as ``[outer, inner]``."""
    return weight.double().norm(dim=1).view(inner, outer).T


def magnitude_mamba_orders(mamba: ElasticMamba) -> MambaOrders:
    heads, p, groups, n = mamba.heads, mamba.head_dim, mamba.groups, mamba.state
    channel = (_rows_norm(mamba.x_proj.weight, p, heads) * _rows_norm(mamba.z_proj.weight, p, heads)
               * _rows_norm(mamba.out_proj.weight.T, p, heads))
    state = _rows_norm(mamba.B_proj.weight, n, groups) * _rows_norm(mamba.C_proj.weight, n, groups)
    return MambaOrders(channels=descending_rows(channel), states=descending_rows(state))


def random_mamba_orders(mamba: ElasticMamba, generator: torch.Generator) -> MambaOrders:
    channels = torch.stack([torch.randperm(mamba.head_dim, generator=generator) for _ in range(mamba.heads)])
    states = torch.stack([torch.randperm(mamba.state, generator=generator) for _ in range(mamba.groups)])
    return MambaOrders(channels=channels, states=states)


def stored_rows(order: torch.Tensor) -> torch.Tensor:
    """Per-unit orders ``[outer, inner]`` -> the stored-row gather index ``[inner * outer]`` (rank-major):
    new row ``i * outer + o`` is old row ``order[o, i] * outer + o``."""
    outer = order.shape[0]
    return (order.T * outer + torch.arange(outer, device=order.device)[None, :]).reshape(-1)
