"""Causal depthwise conv1d, decode step: one new input column per request against its last W-1 inputs.

Per channel ``c`` of the step's ``xbc [batch, ch']`` (Mamba2's x | B | C channels), with ``state [ch', W-1]``
holding the previous W-1 inputs, oldest first::

    window = [state[c, 0], ..., state[c, W-2], xbc[c]]          # W values
    out[c] = act(sum_k window[k] * weight[c, k] + bias[c])      # fp32 accumulation, returned in xbc's dtype
    state[c] = window[1:]                                       # in place: drop the oldest, append xbc

Operands (``ch'`` is the rung's kept channel count, any value):
* ``xbc [batch, ch']`` any strides.
* ``weight``: one ``[ch', W]`` tensor or a sequence of up to three row segments ``[rows_i, W]`` whose rows
  concatenate to ``ch'`` (any strides). The runtime passes the three kept PREFIXES of ``conv_x|B|C_weight`` as
  views, so the decode step never concatenates (nor caches a concatenation of) the conv parameters: the prefix
  rule stays zero-copy and a change of the stored weights is seen at once. ``bias`` likewise (or None).
* ``state``: ONE tensor ``[batch, ch', W-1]`` (any strides, any float dtype), or an int64 table ``[batch]`` of
  base addresses, each of a request's own contiguous ``[ch', W-1]`` state of dtype ``state_dtype`` (e.g. a
  request's ``[1, ch', W-1]`` cache tensor). All rows of one call share the rung.
* ``activation``: ``silu`` (= ``swish``), ``relu``, ``gelu`` (erf) or ``None``.

Grid ``(batch, cdiv(ch', BLOCK_C))``; every program walks the W columns of its channels one at a time, so each
channel's state is read and rewritten by the one thread that owns it (no cross-thread read/write hazard on the
in-place shift). Memory bound and tiny (a few KB a layer); its point is to run inside a CUDA graph over
per-request states with no gather/scatter copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {None: 0, "silu": 1, "swish": 1, "relu": 2, "gelu": 3}
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
BLOCK_C = 128  # one channel per thread at 4 warps: no replicated lanes racing on the in-place shift


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = v * tl.sigmoid(v)
    elif ACT == 2:
        v = tl.maximum(v, 0.0)
    elif ACT == 3:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    return v


@triton.jit
def _segmented(p0, p1, p2, r0, r1, r2, col, c, n0, n1, live):
    """fp32 values at channel ``c`` of three concatenated row segments (row strides r*, column offset col)."""
    in0 = live & (c < n0)
    in1 = live & (c >= n0) & (c < n0 + n1)
    in2 = live & (c >= n0 + n1)
    v = tl.load(p0 + tl.where(in0, c, 0) * r0 + col, mask=in0, other=0.0).to(tl.float32)
    v += tl.load(p1 + tl.where(in1, c - n0, 0) * r1 + col, mask=in1, other=0.0).to(tl.float32)
    v += tl.load(p2 + tl.where(in2, c - n0 - n1, 0) * r2 + col, mask=in2, other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_update_kernel(xbc_ptr, state_ptr, out_ptr, w0, w1, w2, b0, b1, b2,
                        x_b, x_c, s_b, s_c, s_k, o_b, o_c, w0_r, w1_r, w2_r, w_k, b0_s, b1_s, b2_s,
                        n0, n1, CH, TABLE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ACT: tl.constexpr, W: tl.constexpr, BLOCK_C: tl.constexpr):
    b, cb = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < CH
    if TABLE:  # noqa: SIM108 (a constexpr branch) this request's own contiguous [ch', W-1] state
        s_base = tl.load(state_ptr + b).to(tl.pointer_type(STATE_DTYPE))
    else:
        s_base = state_ptr + b.to(tl.int64) * s_b
    s_rows = s_base + c * s_c
    x = tl.load(xbc_ptr + b.to(tl.int64) * x_b + c * x_c, mask=live, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += _segmented(b0, b1, b2, b0_s, b1_s, b2_s, 0, c, n0, n1, live)
    for k in tl.static_range(W - 1):
        past = tl.load(s_rows + k * s_k, mask=live, other=0.0).to(tl.float32)
        acc += past * _segmented(w0, w1, w2, w0_r, w1_r, w2_r, k * w_k, c, n0, n1, live)
        if k > 0:  # column k moves to k-1 (column k-1 was read by this same thread one step earlier)
            tl.store(s_rows + (k - 1) * s_k, past.to(STATE_DTYPE), mask=live)
    acc += x * _segmented(w0, w1, w2, w0_r, w1_r, w2_r, (W - 1) * w_k, c, n0, n1, live)
    tl.store(s_rows + (W - 2) * s_k, x.to(STATE_DTYPE), mask=live)
    out = _activate(acc, ACT)
    tl.store(out_ptr + b.to(tl.int64) * o_b + c * o_c, out.to(out_ptr.dtype.element_ty), mask=live)


def _segments(t: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if t is None:
        return []
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _check_params(weights: list[torch.Tensor], biases: list[torch.Tensor], ch: int) -> int:
    """Returns W."""
    if not 1 <= len(weights) <= 3 or any(w.dim() != 2 for w in weights):
        raise ValueError("weight must be one [ch', W] tensor or up to three [rows, W] segments")
    width = weights[0].shape[1]
    if width < 2 or any(w.shape[1] != width for w in weights):
        raise ValueError(f"every weight segment needs the same W >= 2, got {[tuple(w.shape) for w in weights]}")
    if sum(w.shape[0] for w in weights) != ch:
        raise ValueError(f"weight segments hold {sum(w.shape[0] for w in weights)} rows, xbc has {ch} channels")
    if any(w.dtype not in FLOAT_DTYPES for w in weights + biases):
        raise ValueError("conv weight and bias must be float tensors")
    if biases and [b.shape for b in biases] != [w.shape[:1] for w in weights]:
        raise ValueError(f"bias segments {[tuple(b.shape) for b in biases]} must match the weight segments' rows")
    return width


def _check(xbc, state, weights, biases, activation, state_dtype, out) -> int:
    if xbc.dim() != 2 or xbc.dtype not in FLOAT_DTYPES or out.shape != xbc.shape or out.dtype != xbc.dtype:
        raise ValueError(f"xbc and out must be [batch, ch'] of one float dtype, got {tuple(xbc.shape)} "
                         f"{xbc.dtype}, {tuple(out.shape)} {out.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv activation {activation!r} is not supported; one of {sorted(map(str, ACTIVATIONS))}")
    batch, ch = xbc.shape
    width = _check_params(weights, biases, ch)
    if state.dtype == torch.int64:
        if state.shape != (batch,) or not state.is_contiguous():
            raise ValueError(f"a conv state address table must be a contiguous int64 ({batch},) tensor")
        if state_dtype not in FLOAT_DTYPES:
            raise ValueError("a conv state address table needs state_dtype (the states' float dtype)")
    elif state.dtype not in FLOAT_DTYPES or state.shape != (batch, ch, width - 1):
        raise ValueError(f"conv state must be [batch, ch', W-1] = ({batch}, {ch}, {width - 1}) float or an int64 "
                         f"address table, got {state.dtype} {tuple(state.shape)}")
    devices = {t.device for t in [xbc, state, out, *weights, *biases]}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return width


def causal_conv1d_update(xbc: torch.Tensor, state: torch.Tensor,
                         weight: torch.Tensor | Sequence[torch.Tensor],
                         bias: torch.Tensor | Sequence[torch.Tensor] | None = None, activation: str | None = "silu",
                         state_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step (Triton); ``state`` (tensor or address table, see the module doc) is shifted in place.

    Returns ``act(conv) [batch, ch']`` in xbc's dtype. Addresses in a table are trusted (built from live caches).
    """
    weights, biases = _segments(weight), _segments(bias)
    if out is None:
        out = torch.empty_like(xbc, memory_format=torch.contiguous_format)
    width = _check(xbc, state, weights, biases, activation, state_dtype, out)
    table = state.dtype == torch.int64
    s_strides = (0, width - 1, 1) if table else state.stride()
    rows = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    ws = weights + [weights[0]] * (3 - len(weights))  # empty segments: any valid pointer, never read
    bs = (biases + [biases[0]] * (3 - len(biases))) if biases else ws
    b_strides = [b.stride(0) for b in bs] if biases else [0, 0, 0]
    if any(w.stride(1) != weights[0].stride(1) for w in weights):
        raise ValueError("weight segments must share their column stride")
    batch, ch = xbc.shape
    _conv_update_kernel[(batch, triton.cdiv(ch, BLOCK_C))](
        xbc, state, out, *ws, *bs, *xbc.stride(), *s_strides, *out.stride(), *(w.stride(0) for w in ws),
        weights[0].stride(1), *b_strides, rows[0], rows[1], ch, TABLE=table,
        STATE_DTYPE=_TL_DTYPES[state_dtype if table else state.dtype], HAS_BIAS=bool(biases),
        ACT=ACTIVATIONS[activation], W=width, BLOCK_C=BLOCK_C, num_warps=4)
    return out


def _check_reference(xbc, state, weights, biases, activation) -> int:
    """The kernel's checks, with ``state`` also a list of per-request states (``ch' * (W-1)`` elements each)."""
    if isinstance(state, torch.Tensor):
        return _check(xbc, state, weights, biases, activation, None, xbc)
    width = _check(xbc, xbc.new_zeros(xbc.shape[0], dtype=torch.int64), weights, biases, activation, xbc.dtype,
                   xbc)  # a table stands in for the list
    size = xbc.shape[1] * (width - 1)
    if len(state) != xbc.shape[0] or any(t.dtype not in FLOAT_DTYPES or t.numel() != size
                                         or t.device != xbc.device for t in state):
        raise ValueError(f"a list of conv states needs one float state of ch' * (W-1) = {size} elements per row "
                         f"on {xbc.device}, got {[(t.dtype, t.numel(), str(t.device)) for t in state]}")
    return width


_TORCH_ACTS = {None: lambda v: v, "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}


def causal_conv1d_update_reference(xbc: torch.Tensor, state: torch.Tensor | list[torch.Tensor],
                                   weight: torch.Tensor | Sequence[torch.Tensor],
                                   bias: torch.Tensor | Sequence[torch.Tensor] | None = None,
                                   activation: str | None = "silu") -> torch.Tensor:
    """Plain torch, same contract as the kernel; ``state`` is ``[batch, ch', W-1]`` or a list of ``batch``
    per-request states of ``ch' * (W-1)`` elements each (``[1, ch', W-1]`` or ``[ch', W-1]``), shifted in place.
    The CPU backend of the runtime's decode step; checked as the kernel is (broadcasting would take a one-element
    bias the GPU refuses)."""
    _check_reference(xbc, state, _segments(weight), _segments(bias), activation)
    w = torch.cat([t.float() for t in _segments(weight)])  # [ch', W]
    ch, width = w.shape
    past = state if isinstance(state, torch.Tensor) else torch.stack([t.view(ch, width - 1) for t in state])
    window = torch.cat((past.float(), xbc.float()[..., None]), dim=-1)  # [batch, ch', W]
    out = (window * w).sum(-1)
    if bias is not None:
        out = out + torch.cat([t.float() for t in _segments(bias)])
    if isinstance(state, torch.Tensor):
        state.copy_(window[..., 1:])
    else:
        for t, row in zip(state, window[..., 1:], strict=True):
            t.copy_(row.view(t.shape))
    return _TORCH_ACTS[activation](out).to(xbc.dtype)
