"""Structured weight sorting: apply importance orders to a layer so every rung keeps a prefix.

All transforms are re-parameterisations done in fp64: at rate 0 the sorted layer computes the same function
(permutations exactly, the V/O rotation up to float rounding). Layouts are described in runtime/decoder.py.
"""

from __future__ import annotations

import torch
from torch import nn

from uniql.runtime.decoder import DecoderLayer, ElasticAttention, ElasticMLP
from uniql.runtime.mamba import ElasticMamba

from .orders import LayerOrders
from .ssm_orders import MambaOrders, stored_rows


def _assign(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def permute_mlp(mlp: ElasticMLP, order: torch.Tensor) -> None:
    """Intermediate channel ``order[i]`` becomes channel ``i``: gate/up rows and down columns."""
    for proj in (mlp.gate_proj, mlp.up_proj):
        if proj is None:  # Nemotron-H: no gate
            continue
        _assign(proj.weight, proj.weight[order])
        if proj.bias is not None:
            _assign(proj.bias, proj.bias[order])
    _assign(mlp.down_proj.weight, mlp.down_proj.weight[:, order])


def _permute_pair_rows(rows: torch.Tensor, pair_order: torch.Tensor, heads: int) -> torch.Tensor:
    """Rank-major Q/K rows [(P*2*heads), ...] reordered by each head's group pair order [groups, P]."""
    groups, pairs = pair_order.shape
    rest = rows.shape[1:]
    old = rows.reshape(pairs, 2, heads, *rest)
    head_ids = torch.arange(heads)
    src_pair = pair_order[head_ids // (heads // groups)].T  # [P, heads]: old pair for (new pair, head)
    new = old[src_pair, :, head_ids[None, :].expand(pairs, heads)]  # [P, heads, 2, ...]
    return new.transpose(1, 2).reshape(rows.shape)


def permute_qk(attn: ElasticAttention, pair_order: torch.Tensor) -> None:
    """KV group ``g``'s RoPE pair ``pair_order[g, m]`` becomes its pair ``m`` (shared by the group's heads)."""
    for proj, heads in ((attn.q_proj, attn.n_heads), (attn.k_proj, attn.n_kv)):
        for param in (proj.weight, proj.bias):
            if param is not None:
                _assign(param, _permute_pair_rows(param.data, pair_order, heads))
    attn.rope_index.copy_(torch.gather(attn.rope_index, 1, pair_order))


def fold_v_bias(attn: ElasticAttention) -> None:
    """Move the V bias into o_proj: each attention row sums to 1, so the bias reaches o_proj unchanged."""
    if attn.v_proj.bias is None:
        return
    n, g, d = attn.n_heads, attn.n_kv, attn.head_dim
    v_bias = attn.v_proj.bias.double().view(d, g)  # [rank, group]
    o = attn.o_proj.weight.double().view(-1, d, n)  # [h, rank, head]
    per_head_bias = v_bias[:, torch.arange(n) // (n // g)]  # [rank, head]
    folded = torch.einsum("hjq,jq->h", o, per_head_bias)
    old = attn.o_proj.bias.double() if attn.o_proj.bias is not None else torch.zeros_like(folded)
    attn.o_proj.set_bias(old + folded)
    attn.v_proj.set_bias(None)


def rotate_vo(attn: ElasticAttention, rotation: torch.Tensor) -> None:
    """Per KV group, V rank directions become ``rotation[g] @ old`` and o_proj columns follow.

    ``rotation`` [groups, d, d] is orthogonal (a permutation for baseline orders), so W_V W_O is unchanged;
    row ``j`` of ``rotation[g]`` is the group's ``j``-th most important direction. Call ``fold_v_bias`` first.
    """
    if attn.v_proj.bias is not None:
        raise ValueError("fold the V bias into o_proj before rotating V/O")
    n, g, d = attn.n_heads, attn.n_kv, attn.head_dim
    rot = rotation.double()
    v = attn.v_proj.weight.double().view(d, g, -1)  # [rank, group, h]
    _assign(attn.v_proj.weight, torch.einsum("gji,igh->jgh", rot, v).reshape(g * d, -1))
    o = attn.o_proj.weight.double().view(-1, d, n)  # [h, rank, head]
    rot_per_head = rot[torch.arange(n) // (n // g)]  # [head, d, d]
    _assign(attn.o_proj.weight, torch.einsum("qji,hiq->hjq", rot_per_head, o).reshape(-1, d * n))


def _permute_rows(module: nn.Module, names: tuple[str, ...], rows: torch.Tensor) -> None:
    for name in names:
        param = getattr(module, name)
        if param is not None:
            _assign(param, param.data[rows])


def permute_mamba(mamba: ElasticMamba, orders: MambaOrders) -> None:
    """Head ``h``'s channel ``orders.channels[h, c]`` becomes its channel ``c`` (x/z rows, x conv, gated-norm
    weight, out_proj columns); group ``g``'s state ``orders.states[g, n]`` becomes its state ``n`` (B/C rows and
    their conv channels). Channels move inside their head, so the norm groups keep their members."""
    channel_rows = stored_rows(orders.channels)  # rank-major rows c * H + h
    for proj in (mamba.z_proj, mamba.x_proj):
        _permute_rows(proj, ("weight", "bias"), channel_rows)
    _permute_rows(mamba, ("conv_x_weight", "conv_x_bias", "norm_weight"), channel_rows)
    _assign(mamba.out_proj.weight, mamba.out_proj.weight[:, channel_rows])
    state_rows = stored_rows(orders.states)  # state-major rows n * G + g
    for proj in (mamba.B_proj, mamba.C_proj):
        _permute_rows(proj, ("weight", "bias"), state_rows)
    _permute_rows(mamba, ("conv_B_weight", "conv_B_bias", "conv_C_weight", "conv_C_bias"), state_rows)


def apply_orders(layer: DecoderLayer, orders: LayerOrders) -> None:
    """Apply every order the layer's blocks have (a Llama layer: MLP, Q/K pairs, V bias fold, V/O rotation)."""
    if layer.mlp is not None:
        permute_mlp(layer.mlp, orders.mlp)
    if layer.attn is not None:
        permute_qk(layer.attn, orders.qk_pairs)
        fold_v_bias(layer.attn)
        rotate_vo(layer.attn, orders.vo_rotation)
    if layer.mamba is not None:
        permute_mamba(layer.mamba, orders.mamba)
