"""Greedy picks over the vocabulary: each row's argmax and whether the row is finite, in two small launches.

The decode graph ends with these picks (``runtime/graphs.py``). torch's ``argmax`` and ``isfinite().all()`` over
one 128k-wide row each run as a single-block reduction: ~21 us apiece on an H200 (results/decode_profile_h200.json,
``reduce_kernel``), 2 % of a batch-1 step. Here the row is cut into chunks of ``CHUNK`` values, one program each
(max, its first index, all-finite), then one program per row combines the chunks: the lowest chunk among equal
maxima wins, so ties go to the first index as torch's argmax does. A row that holds a NaN or an infinity is
flagged non-finite; its pick is then unspecified (callers drop such rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _chunk_kernel(x_ptr, val_ptr, idx_ptr, fin_ptr, stride_x, V, n_chunks, CHUNK: tl.constexpr):
    row, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B * V may pass 2^31 (prompt logits)
    cols = blk * CHUNK + tl.arange(0, CHUNK)
    live = cols < V
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
    finite = tl.min(tl.where((x - x) == 0.0, 1, 0), axis=0)  # NaN for NaN and +-inf; 0 past V (other=0)
    ranked = tl.where(live & (x == x), x, float("-inf"))  # NaN and the tail past V never win
    best = tl.argmax(ranked, axis=0, tie_break_left=True)
    slot = row * n_chunks + blk
    tl.store(val_ptr + slot, tl.max(ranked, axis=0))
    tl.store(idx_ptr + slot, blk * CHUNK + best)
    tl.store(fin_ptr + slot, finite)


@triton.jit
def _combine_kernel(val_ptr, idx_ptr, fin_ptr, out_ptr, n_chunks, n_rows, CHUNKS_P: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_P)
    live = c < n_chunks
    vals = tl.load(val_ptr + row * n_chunks + c, mask=live, other=float("-inf"))
    win = tl.argmax(vals, axis=0, tie_break_left=True)
    idx = tl.load(idx_ptr + row * n_chunks + c, mask=live, other=0)
    fin = tl.load(fin_ptr + row * n_chunks + c, mask=live, other=1)
    tl.store(out_ptr + row, tl.sum(tl.where(c == win, idx, 0), axis=0).to(tl.int64))
    tl.store(out_ptr + n_rows + row, tl.min(fin, axis=0).to(tl.int64))


def greedy_picks_reference(logits_bv: torch.Tensor) -> torch.Tensor:
    """int64 ``[2, B]``: argmax of each row (first index on ties) and 1 where every value is finite."""
    return torch.stack((logits_bv.argmax(dim=-1), torch.isfinite(logits_bv).all(dim=-1).long()))


def greedy_picks(logits_bv: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """``greedy_picks_reference`` in two launches (GPU; ``use_kernel`` forces the choice, the tests run the
    kernel in the interpreter). Allocates its small scratch per call (inside a CUDA graph capture it comes from
    the graph's pool)."""
    if logits_bv.dim() != 2 or logits_bv.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V > 0, got {tuple(logits_bv.shape)}")
    if not (logits_bv.is_cuda if use_kernel is None else use_kernel):
        return greedy_picks_reference(logits_bv)
    x = logits_bv if logits_bv.stride(-1) == 1 else logits_bv.contiguous()
    rows, vocab = x.shape
    n_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty(rows * n_chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows * n_chunks, dtype=torch.int32, device=x.device)
    fin = torch.empty(rows * n_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(2, rows, dtype=torch.int64, device=x.device)
    _chunk_kernel[(rows, n_chunks)](x, vals, idx, fin, x.stride(0), vocab, n_chunks, CHUNK=CHUNK, num_warps=8)
    _combine_kernel[(rows,)](vals, idx, fin, out, n_chunks, rows, CHUNKS_P=max(2, triton.next_power_of_2(n_chunks)),
                             num_warps=1)
    return out
