"""Fuse the projections that share an input (q|k|v, gate|up, Mamba's z|x|B|C|dt) into one packed tensor each.

Done once after the model is on its device (a later ``.to()`` would copy the members' views apart). The
members keep working as views of the fused tensors, so nothing is stored twice and every rung is still a
prefix of each member's columns.
"""

from __future__ import annotations

from .decoder import ElasticDecoder
from .linear import FusedInt4, Int4Linear


def _fusable(members) -> bool:
    first = members[0]
    return all(isinstance(m, Int4Linear) and m.in_features == first.in_features
               and m.group_size == first.group_size for m in members)


def fuse_projections(model: ElasticDecoder) -> int:
    """Fuse every layer's q|k|v, gate|up and Mamba in-projections where they are INT4; returns how many groups
    were fused. At batch 1 a small GEMV costs a fixed few microseconds whatever its width, so Mamba's five
    in-projections (B, C and dt are narrow) are worth one launch."""
    fused = 0
    for layer in model.layers:
        attn, mlp, mamba = layer.attn, layer.mlp, layer.mamba
        mixer_in = [] if mamba is None else [mamba.z_proj, mamba.x_proj, mamba.B_proj, mamba.C_proj, mamba.dt_proj]
        if mixer_in and mamba.in_proj is None and _fusable(mixer_in):
            mamba.in_proj = FusedInt4(mixer_in)
            fused += 1
        qkv = [] if attn is None else [attn.q_proj, attn.k_proj, attn.v_proj]
        if qkv and attn.qkv is None and _fusable(qkv):
            attn.qkv = FusedInt4(qkv)
            fused += 1
        gate_up = [] if mlp is None or mlp.gate_proj is None else [mlp.gate_proj, mlp.up_proj]
        if gate_up and mlp.gate_up is None and _fusable(gate_up):
            mlp.gate_up = FusedInt4(gate_up)
            fused += 1
    return fused
