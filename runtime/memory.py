"""Bytes a rung keeps resident, computed from the architecture, the rung's kept sizes and the weight format.

One function for `uniql info`, benchmarks and (later) the server's controller. Weights = the seven
projections of every layer at the rung's prefixes; total = weights + embedding/head tables + norms + biases +
RoPE tables, i.e. everything that must sit in memory to serve the rung (caches excluded).
"""

from __future__ import annotations

from uniql.kernels.int4_format import packed_bytes

from .ladder import LayerSizes
from .spec import ArchSpec


def _matrix_bytes(k: int, n: int, weights: str, group_size: int, float_bytes: int) -> int:
    return packed_bytes(k, n, group_size) if weights == "int4" else k * n * float_bytes


def active_shapes(spec: ArchSpec, s: LayerSizes) -> dict[str, tuple[int, int]]:
    """(n_active, k_active) of every projection of a layer at kept sizes ``s`` (keys = LINEAR_PATHS)."""
    h, n, g = spec.hidden_size, spec.num_heads, spec.num_kv_heads
    return {"attn.q_proj": (n * s.qk, h), "attn.k_proj": (g * s.qk, h), "attn.v_proj": (g * s.vo, h),
            "attn.o_proj": (h, n * s.vo), "mlp.gate_proj": (s.mlp, h), "mlp.up_proj": (s.mlp, h),
            "mlp.down_proj": (h, s.mlp)}


def layer_weight_bytes(spec: ArchSpec, s: LayerSizes, weights: str, group_size: int, float_bytes: int) -> int:
    return sum(_matrix_bytes(k, n, weights, group_size, float_bytes) for n, k in active_shapes(spec, s).values())


def other_bytes(spec: ArchSpec, weights: str, group_size: int, float_bytes: int,
                runtime_rotation: bool = False) -> int:
    """Tables, norms, biases, RoPE, a runtime hidden rotation (rung-independent; biases at full size)."""
    h, v = spec.hidden_size, spec.vocab_size
    tables = (1 if spec.tie_embeddings else 2) * _matrix_bytes(h, v, weights, group_size, float_bytes)
    d, n, g = spec.head_dim, spec.num_heads, spec.num_kv_heads
    biases = (spec.qk_bias * (n + g) * d + spec.v_bias * g * d + spec.o_bias * h
              + spec.mlp_bias * (2 * spec.intermediate_size + h))
    norms = (2 * spec.num_layers + 1) * h
    rope = d // 2 * 4 + spec.num_layers * spec.num_kv_heads * d // 2 * 8
    rotation = runtime_rotation * h * h * 4
    return tables + (biases + norms) * float_bytes + rope + rotation


def rung_bytes(spec: ArchSpec, sizes: list[LayerSizes], weights: str, group_size: int = 128,
               float_bytes: int = 2, runtime_rotation: bool = False) -> dict:
    weight = sum(layer_weight_bytes(spec, s, weights, group_size, float_bytes) for s in sizes)
    other = other_bytes(spec, weights, group_size, float_bytes, runtime_rotation)
    return {"weight_bytes": weight, "total_bytes": weight + other}


def fp16_bytes(spec: ArchSpec, full: LayerSizes) -> int:
    """The unpruned model in FP16: the reference for memory-reduction factors."""
    return rung_bytes(spec, [full] * spec.num_layers, "float", float_bytes=2)["total_bytes"]
