"""Bytes a rung keeps resident, computed from the architecture, the rung's kept sizes and the weight format.

One function for `uniql info`, benchmarks and the server's controller. Weights = the projections each layer
holds (its blocks' linears: attention q/k/v/o, MLP gate/up/down, Mamba z/x/B/C/dt/out) at the rung's prefixes;
total = weights + embedding/head tables + norms + biases + RoPE tables + the Mamba mixers' float parameters
(conv, gated-norm weight, dt_bias, A_log, D, kept at full size), i.e. everything that must sit in memory to
serve the rung (caches excluded: ``ssm_cache.cache_bytes``).
"""

from __future__ import annotations

from uniql.kernels.int4_format import packed_bytes

from .decoder import BLOCK_LINEARS
from .ladder import LayerSizes, full_layer_sizes
from .spec import ArchSpec


def _matrix_bytes(k: int, n: int, weights: str, group_size: int, float_bytes: int) -> int:
    return packed_bytes(k, n, group_size) if weights == "int4" else k * n * float_bytes


def layer_paths(spec: ArchSpec, layer: int) -> tuple[str, ...]:
    """The projections of one layer (what ``DecoderLayer.linear_paths`` holds), from the spec alone."""
    paths = [p for b in spec.blocks(layer) for p in BLOCK_LINEARS[b]]
    return tuple(p for p in paths if spec.mlp_gated or p != "mlp.gate_proj")


def active_shapes(spec: ArchSpec, s: LayerSizes) -> dict[str, tuple[int, int]]:
    """(n_active, k_active) of every projection a layer may hold at kept sizes ``s`` (keys = BLOCK_LINEARS)."""
    h, n, g = spec.hidden_size, spec.num_heads, spec.num_kv_heads
    hp, gn = spec.ssm_heads * s.ssm_p, spec.ssm_groups * s.ssm_n
    return {"attn.q_proj": (n * s.qk, h), "attn.k_proj": (g * s.qk, h), "attn.v_proj": (g * s.vo, h),
            "attn.o_proj": (h, n * s.vo), "mlp.gate_proj": (s.mlp, h), "mlp.up_proj": (s.mlp, h),
            "mlp.down_proj": (h, s.mlp), "mamba.z_proj": (hp, h), "mamba.x_proj": (hp, h), "mamba.B_proj": (gn, h),
            "mamba.C_proj": (gn, h), "mamba.dt_proj": (spec.ssm_heads, h), "mamba.out_proj": (h, hp)}


def layer_weight_bytes(spec: ArchSpec, s: LayerSizes, weights: str, group_size: int, float_bytes: int,
                       layer: int = 0) -> int:
    shapes = active_shapes(spec, s)
    return sum(_matrix_bytes(shapes[p][1], shapes[p][0], weights, group_size, float_bytes)
               for p in layer_paths(spec, layer))


def _layer_float_params(spec: ArchSpec, layer: int) -> int:
    """Norms, biases and Mamba float parameters of one layer (full size: not released per rung)."""
    h, d, n, g = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    blocks = spec.blocks(layer)
    count = len(blocks) * h  # one pre-norm per block
    if "attn" in blocks:
        count += spec.qk_bias * (n + g) * d + spec.v_bias * g * d + spec.o_bias * h
    if "mlp" in blocks:
        count += spec.mlp_bias * ((1 + spec.mlp_gated) * spec.intermediate_size + h)
    if "mamba" in blocks:
        hp, gn, heads = spec.ssm_inner, spec.ssm_groups * spec.ssm_state, spec.ssm_heads
        conv = (hp + 2 * gn) * (spec.ssm_conv + spec.ssm_conv_bias)
        count += conv + hp + 3 * heads + spec.ssm_proj_bias * (2 * hp + 2 * gn + heads + h)
    return count


def other_bytes(spec: ArchSpec, weights: str, group_size: int, float_bytes: int,
                runtime_rotation: bool = False) -> int:
    """Tables, norms, biases, RoPE, Mamba float parameters, a runtime hidden rotation (rung-independent)."""
    h, v = spec.hidden_size, spec.vocab_size
    tables = (1 if spec.tie_embeddings else 2) * _matrix_bytes(h, v, weights, group_size, float_bytes)
    floats = h + sum(_layer_float_params(spec, i) for i in range(spec.num_layers))  # + the final norm
    d = spec.head_dim
    rope = d // 2 * 4 + len(spec.layers_with("attn")) * spec.num_kv_heads * d // 2 * 8
    rotation = runtime_rotation * h * h * 4
    return tables + floats * float_bytes + rope + rotation


def rung_bytes(spec: ArchSpec, sizes: list[LayerSizes], weights: str, group_size: int = 128,
               float_bytes: int = 2, runtime_rotation: bool = False) -> dict:
    weight = sum(layer_weight_bytes(spec, s, weights, group_size, float_bytes, i) for i, s in enumerate(sizes))
    other = other_bytes(spec, weights, group_size, float_bytes, runtime_rotation)
    return {"weight_bytes": weight, "total_bytes": weight + other}


def fp16_bytes(spec: ArchSpec, full: LayerSizes | None = None) -> int:
    """The unpruned model in FP16: the reference for memory-reduction factors."""
    full = full or full_layer_sizes(spec)
    return rung_bytes(spec, [full] * spec.num_layers, "float", float_bytes=2)["total_bytes"]
