"""The decode GEMV's causal-conv epilogue (``int4_gemv._gemv_h2_kernel`` with CONV): Mamba2's z|x|B|C|dt
in-projection finishes each x / B / C output column with the conv decode step of ``conv_update.py``, so a Mamba
layer's step loses the conv launch (~1.8 us a layer at both rates on the H100, 56 layers in Mamba2-8B).

The program that writes a tile's final values (the last K split to arrive) holds them in registers as the fp32
of the STORED outputs (what ``conv_update`` would read back), and per row of the batch it does that kernel's
arithmetic for the tile's channels: ``act(bias + sum_k state[c, k] w[c, k] + x[c] w[c, W-1])`` in fp32, stored
to a separate ``[M, ch']`` output, and the state shifted in place (drop the oldest, append x). Output columns of
x | B | C follow z's, so conv channel ``c = column - width(z)``; the weight and bias come as three row segments
(the kept prefixes of conv_x / conv_B / conv_C, contiguous rows), the states as an int64 table of per-request
addresses (``conv_update``'s TABLE mode). Each channel belongs to one tile, so one thread owns its state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .conv_update import _TL_DTYPES, ACTIVATIONS, _activate, _segmented


@triton.jit
def _conv_tile(vals, ocol, mask_n, offs_m, M, first, n0, n1, CH, tab_ptr, w0, w1, w2, b0, b1, b2, w0_r, w1_r,
               w2_r, out_ptr, stride_co, BLOCK_M: tl.constexpr, W: tl.constexpr, ACT: tl.constexpr,
               HAS_BIAS: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """``vals [BLOCK_M, BLOCK_N]``: the tile's stored outputs (fp32) at output columns ``ocol``."""
    c = ocol - first
    live = mask_n & (c >= 0) & (c < CH)
    bias = tl.zeros(c.shape, tl.float32)
    if HAS_BIAS:
        bias = _segmented(b0, b1, b2, 1, 1, 1, 0, c, n0, n1, live)
    for m in tl.static_range(BLOCK_M):
        row_ok = live & ((c * 0 + m) < M)  # a tensor predicate (a Python bool breaks the interpreter's masks)
        x = tl.sum(tl.where(offs_m[:, None] == m, vals, 0.0), axis=0)  # row m of the tile
        base = tl.load(tab_ptr + tl.minimum(m, M - 1)).to(tl.pointer_type(STATE_DTYPE))
        rows = base + c * (W - 1)
        acc = bias
        for k in tl.static_range(W - 1):
            past = tl.load(rows + k, mask=row_ok, other=0.0).to(tl.float32)
            acc += past * _segmented(w0, w1, w2, w0_r, w1_r, w2_r, k, c, n0, n1, live)
            if k > 0:  # column k moves to k-1 (read by this same thread one step earlier)
                tl.store(rows + k - 1, past.to(STATE_DTYPE), mask=row_ok)
        acc += x * _segmented(w0, w1, w2, w0_r, w1_r, w2_r, W - 1, c, n0, n1, live)
        tl.store(rows + W - 2, x.to(STATE_DTYPE), mask=row_ok)
        tl.store(out_ptr + m * stride_co + c, _activate(acc, ACT).to(out_ptr.dtype.element_ty), mask=row_ok)


class ConvStep(NamedTuple):
    """What the in-projection's conv epilogue needs: ``table`` int64 ``[M]`` of per-request ``[ch', W-1]`` state
    addresses (dtype ``state_dtype``), ``weights`` the three kept prefixes ``[rows_i, W]`` (x, B, C), ``biases``
    the same rows or None, ``activation`` as ``conv_update``'s, ``out`` ``[M, ch']`` for the activated conv."""
    table: torch.Tensor
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    activation: str | None
    state_dtype: torch.dtype
    out: torch.Tensor


def check_conv(conv: ConvStep | None, segs: list[tuple[int, int]], m: int, x: torch.Tensor) -> None:
    """The launchers' check: x | B | C are segments 1-3 of at least four, weights match their widths, one state
    address per row, an output of one row each."""
    if conv is None:
        return
    widths = [length for _, length in segs]
    rows = [w.shape[0] for w in conv.weights]
    width = conv.weights[0].shape[1]
    if len(widths) < 4 or rows != widths[1:4] or any(w.shape[1] != width or w.stride(1) != 1 for w in conv.weights):
        raise ValueError(f"a conv epilogue needs segments z | x | B | C (| dt) and three [rows, W] weights whose "
                         f"rows are the x / B / C widths, got segments {widths} and weights "
                         f"{[tuple(w.shape) for w in conv.weights]}")
    if conv.biases is not None and [tuple(b.shape) for b in conv.biases] != [(r,) for r in rows]:
        raise ValueError(f"conv biases must be the x / B / C rows, got {[tuple(b.shape) for b in conv.biases]}")
    if conv.biases is not None and any(b.stride(0) != 1 for b in conv.biases):
        raise ValueError("conv biases must be contiguous")
    if conv.table.dtype != torch.int64 or conv.table.shape != (m,) or conv.state_dtype not in _TL_DTYPES:
        raise ValueError(f"conv states: an int64 table of {m} addresses and a float state dtype, got "
                         f"{conv.table.dtype} {tuple(conv.table.shape)}, {conv.state_dtype}")
    if conv.out.shape != (m, sum(rows)) or conv.out.dtype != x.dtype or conv.out.stride(1) != 1:
        raise ValueError(f"conv out must be [{m}, {sum(rows)}] {x.dtype}, got {tuple(conv.out.shape)} "
                         f"{conv.out.dtype}")
    if conv.activation not in ACTIVATIONS or width < 2:
        raise ValueError(f"conv activation {conv.activation!r} / width {width} not supported")
    tensors = [conv.table, conv.out, *conv.weights, *(conv.biases or ())]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"conv tensors must be on x's device {x.device}")


def conv_args(conv: ConvStep | None, out: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's conv arguments and constexprs (dummies, never read, without a conv)."""
    if conv is None:
        return (out,) * 7 + (0, 0, 0, out, 0), dict(CONV=False, CONV_W=2, CONV_ACT=0, CONV_BIAS=False,
                                                    CONV_DTYPE=tl.float32)
    biases = conv.biases if conv.biases is not None else conv.weights
    args = (conv.table, *conv.weights, *biases, *(w.stride(0) for w in conv.weights), conv.out, conv.out.stride(0))
    return args, dict(CONV=True, CONV_W=conv.weights[0].shape[1], CONV_ACT=ACTIVATIONS[conv.activation],
                      CONV_BIAS=conv.biases is not None, CONV_DTYPE=_TL_DTYPES[conv.state_dtype])
