"""The kernels as ``torch.library`` custom ops, and the device dispatch the runtime calls.

``int4_linear``, ``embedding``, ``rope``, ``ssm_state_update`` and ``conv_state_update`` pick the implementation:
the Triton kernel on CUDA, the plain-torch path elsewhere (the CPU backend). An int64 address table of
per-request states always means the Triton kernel (on CPU only under ``TRITON_INTERPRET=1``, as tests do).
Under ``torch.compile`` they go through the registered ops (``torch.ops.uniql.*``), whose fake implementations
give output shapes without running anything; eagerly they call the function directly, since the custom-op
dispatcher costs microseconds a launch that a batch-1 decode step without CUDA graphs would feel.
"""

from __future__ import annotations

import torch

from . import conv_update as _conv
from . import embedding as _emb
from . import int4_matmul as _mm
from . import rope as _rope
from . import ssm_update as _ssm
from .int4_format import PACK


def triton_enabled(device: torch.device) -> bool:
    """Triton on CUDA; elsewhere the torch path (tests call the kernels directly under the interpreter)."""
    return device.type == "cuda"


def _flat(segments: list[tuple[int, int]]) -> list[int]:
    return [v for seg in segments for v in seg]


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _cpu_matmul(x, qweight, scales, group_size, segments, k, bias):
    """The CPU backend: dequantize each active prefix in the activation dtype and multiply. Checked as the
    Triton launcher checks: slicing would silently clamp a segment past the stored columns (a narrower output
    than the fake's) and accept what the GPU refuses."""
    from .int4_format import dequantize

    segments = _mm.check_call(x, qweight, scales, group_size, k, segments, bias)
    parts = [x @ dequantize(qweight[:, a:a + n], scales[:, a:a + n], group_size, k, None, x.dtype)
             for a, n in segments]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out if bias is None else out + bias.to(out.dtype)


def _matmul(x, qweight, scales, group_size, segments, k, bias):
    if triton_enabled(x.device):
        return _mm.int4_matmul(x, qweight, scales, group_size, k=k, bias=bias, segments=segments)
    return _cpu_matmul(x, qweight, scales, group_size, segments, k, bias)


@torch.library.custom_op("uniql::int4_matmul", mutates_args=())
def int4_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   segments: list[int], k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``segments`` flattened as [start0, n0, start1, n1, ...] (custom ops take flat int lists)."""
    return _matmul(x, qweight, scales, group_size, _pairs(segments), k, bias)


@int4_matmul_op.register_fake
def _int4_matmul_fake(x, qweight, scales, group_size, segments, k, bias=None):
    return x.new_empty(*x.shape[:-1], sum(segments[1::2]))


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                n: int | None = None, k: int | None = None, bias: torch.Tensor | None = None,
                segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``x [..., k] -> [..., n]`` over the active prefix (or ``segments``) of a packed weight, on any device."""
    k = qweight.shape[0] * PACK if k is None else k
    segments = segments or [(0, qweight.shape[1] if n is None else n)]
    if torch.compiler.is_compiling():
        return torch.ops.uniql.int4_matmul(x, qweight, scales, group_size, _flat(segments), k, bias)
    return _matmul(x, qweight, scales, group_size, segments, k, bias)


def _glu(x, qweight, scales, group_size, segments, k, bias):
    if triton_enabled(x.device):
        return _mm.int4_glu(x, qweight, scales, group_size, segments, k=k, bias=bias)
    n = _mm.glu_width(segments)  # as the Triton path (and the fake's output width) requires
    gate, up = _cpu_matmul(x, qweight, scales, group_size, segments, k, bias).split(n, dim=-1)
    return torch.nn.functional.silu(gate) * up


@torch.library.custom_op("uniql::int4_glu", mutates_args=())
def int4_glu_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                segments: list[int], k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _glu(x, qweight, scales, group_size, _pairs(segments), k, bias)


@int4_glu_op.register_fake
def _int4_glu_fake(x, qweight, scales, group_size, segments, k, bias=None):
    return x.new_empty(*x.shape[:-1], segments[1])


def int4_glu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
             segments: list[tuple[int, int]], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` over the (gate, up) segments of a fused packed weight: one launch on the decode GEMV."""
    k = qweight.shape[0] * PACK
    if torch.compiler.is_compiling():
        return torch.ops.uniql.int4_glu(x, qweight, scales, group_size, _flat(segments), k, bias)
    return _glu(x, qweight, scales, group_size, segments, k, bias)


@torch.library.custom_op("uniql::embedding_int4", mutates_args=())
def embedding_int4_op(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    return _embedding(ids, qweight, scales, group_size, dtype)


@embedding_int4_op.register_fake
def _embedding_fake(ids, qweight, scales, group_size, dtype):
    return ids.new_empty(*ids.shape, qweight.shape[0] * PACK, dtype=dtype)


def _embedding(ids, qweight, scales, group_size, dtype):
    if triton_enabled(ids.device):  # ids were checked where they entered (tokenizer / server), no sync here
        return _emb.embedding_int4(ids, qweight, scales, group_size, dtype, check_ids=False)
    return _emb.embedding_int4_reference(ids, qweight, scales, group_size, dtype)


def embedding(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of a 4-bit table stored as a ``[hidden, vocab]`` packed linear -> ``[*ids.shape, hidden]``."""
    if torch.compiler.is_compiling():
        return torch.ops.uniql.embedding_int4(ids, qweight, scales, group_size, dtype)
    return _embedding(ids, qweight, scales, group_size, dtype)


@torch.library.custom_op("uniql::rope_qk", mutates_args=())
def rope_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_index: torch.Tensor,
               n_heads: int, n_kv: int, qk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_qk(q, k, cos, sin, rope_index, n_heads, n_kv, qk)


@rope_qk_op.register_fake
def _rope_fake(q, k, cos, sin, rope_index, n_heads, n_kv, qk):
    t = q.shape[0]
    return q.new_empty(n_heads, t, qk), k.new_empty(n_kv, t, qk)


def _rope_qk(q, k, cos, sin, rope_index, n_heads, n_kv, qk):
    fn = _rope.rope_qk if triton_enabled(q.device) else _rope.rope_qk_reference
    return fn(q, k, cos, sin, rope_index, n_heads, n_kv, qk)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_index: torch.Tensor,
         n_heads: int, n_kv: int, qk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-major q ``[T, n_heads*qk]`` / k ``[T, n_kv*qk]`` -> rotated, head-major ``[heads, T, qk]`` (see rope.py)."""
    if torch.compiler.is_compiling():
        return torch.ops.uniql.rope_qk(q, k, cos, sin, rope_index, n_heads, n_kv, qk)
    return _rope_qk(q, k, cos, sin, rope_index, n_heads, n_kv, qk)


@torch.library.custom_op("uniql::ssm_state_update", mutates_args=("state",))
def ssm_state_update_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                        dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: list[float] | None
                        ) -> torch.Tensor:
    """``state``: fp32 ``[batch, H, P', N']`` or an int64 table of per-request state addresses (CUDA only); the
    states behind a table are mutated too, which the op's schema cannot name (same as the KV-cache tables)."""
    limit = None if dt_limit is None else (dt_limit[0], dt_limit[1])
    if triton_enabled(x.device) or _ssm.is_table(state):
        return _ssm.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, limit)
    return _ssm.selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, limit)


@ssm_state_update_op.register_fake
def _ssm_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def ssm_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                     dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                     dt_limit: tuple[float, float] | None = None) -> torch.Tensor:
    """One Mamba2 decode step on any device (kernels/ssm_update.py); ``state`` updated in place, returns y."""
    if torch.compiler.is_compiling():
        limit = None if dt_limit is None else [float(v) for v in dt_limit]
        return torch.ops.uniql.ssm_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, limit)
    if triton_enabled(x.device) or _ssm.is_table(state):
        return _ssm.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    return _ssm.selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)


@torch.library.custom_op("uniql::conv_state_update", mutates_args=("state",))
def conv_state_update_op(xbc: torch.Tensor, state: torch.Tensor, weight: list[torch.Tensor],
                         bias: list[torch.Tensor], activation: str | None, state_dtype: torch.dtype | None
                         ) -> torch.Tensor:
    """``weight``/``bias``: row segments (``bias`` empty: none); ``state`` ``[batch, ch', W-1]`` or an int64 table
    of per-request state addresses, whose states are mutated too (the schema cannot name them)."""
    return _conv_update(xbc, state, weight, bias or None, activation, state_dtype)


@conv_state_update_op.register_fake
def _conv_state_update_fake(xbc, state, weight, bias, activation, state_dtype):
    return torch.empty_like(xbc, memory_format=torch.contiguous_format)


def _conv_update(xbc, state, weight, bias, activation, state_dtype):
    if triton_enabled(xbc.device) or _ssm.is_table(state):
        return _conv.causal_conv1d_update(xbc, state, weight, bias, activation, state_dtype)
    return _conv.causal_conv1d_update_reference(xbc, state, weight, bias, activation)


def conv_state_update(xbc: torch.Tensor, state: torch.Tensor | list[torch.Tensor], weight: list[torch.Tensor],
                      bias: list[torch.Tensor] | None = None, activation: str | None = "silu",
                      state_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One causal-conv decode step on any device (kernels/conv_update.py): ``xbc [batch, ch']`` against each
    request's last W-1 inputs (state shifted in place), weight/bias as row segments; returns ``act(conv)``.
    ``state``: a stacked tensor, an int64 address table (then ``state_dtype``) or, CPU only, a list of states."""
    if torch.compiler.is_compiling() and isinstance(state, torch.Tensor):
        return torch.ops.uniql.conv_state_update(xbc, state, list(weight), list(bias or []), activation, state_dtype)
    return _conv_update(xbc, state, weight, bias, activation, state_dtype)
