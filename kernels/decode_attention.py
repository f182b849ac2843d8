"""Batched decode attention over per-request KV caches (flash-decoding split over positions), GQA, pruned dims.

Each request of a decode batch owns its own cache (``runtime/cache.KVCache``: K ``[1, kv_heads, cap, qk]`` and
V ``[1, kv_heads, cap, vo]``, ``cap`` = that request's max length, dims = its rung's kept sizes). The kernel
reads them through tables of base addresses (``k_ptrs``/``v_ptrs`` int64 ``[B]``) and capacities, so a batch
mixes requests of any length without gathering caches into one tensor, and a CUDA graph stays valid as long
as the tables (static buffers) are refreshed when the batch changes.

The new token's K/V come in as tensors: the split that holds the last position scores it from registers and
writes it into the cache for later steps, so one launch both appends and attends (no separate cache write).

Pass 1, grid ``(B, kv_heads, splits)``: each program scores its positions for the ``rep = heads / kv_heads``
query heads of its group (padded to 16 rows for ``tl.dot``) with an online softmax and parks
``(acc[vo], max, sum)`` per head. Pass 2 combines the used splits and writes the output rank-major
(``out[b, j * heads + h]``), the order ``o_proj``'s columns are stored in, as its own launch, grid ``(B, heads, vo
chunks)``. (Merging inside pass 1, in the last split of each group to finish, saved the launch but ran the merge
serially in one program per group: 14-23 % slower decode steps on the H100, slower on the H200 too; removed, stop 35,
docs/performance-log.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import attention_prewait, early_loads, pdl_enter, pdl_mode, pdl_release, pdl_wait
from .rope import _check as rope_check

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_rotated(ptr, s_head, s_chan, head, live_h, dq, live_q, cos_ptr, sin_ptr, idx_ptr, ROPE: tl.constexpr):
    """Rows ``head [R]`` of channels ``dq`` as ``[R, D_QK]``; with ROPE the pairs (2m, 2m+1) are rotated by the
    angle of frequency ``idx[m]`` first (fp32 math, rounded back to the input dtype: what ``rope.py`` stores)."""
    mask = live_h[:, None] & live_q[None, :]
    x = tl.load(ptr + head[:, None] * s_head + dq[None, :] * s_chan, mask=mask, other=0.0)
    if ROPE:
        partner = tl.load(ptr + head[:, None] * s_head + (dq ^ 1)[None, :] * s_chan, mask=mask, other=0.0)
        freq = tl.load(idx_ptr + dq // 2, mask=live_q, other=0)
        cos = tl.load(cos_ptr + freq, mask=live_q, other=0.0)[None, :]
        sin = tl.load(sin_ptr + freq, mask=live_q, other=0.0)[None, :]
        sign = tl.where(dq % 2 == 0, -1.0, 1.0)[None, :]
        x = (x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin).to(x.dtype)
    return x


@triton.jit
def _split_kernel(q_ptr, kn_ptr, vn_ptr, kp_ptr, vp_ptr, cap_ptr, len_ptr, ws_ptr, cos_ptr, sin_ptr, idx_ptr,
                  sq_b, sq_h, sq_c, skn_b, skn_g, skn_c, svn_b, svn_g, svn_d, s_cos, s_idx, n_heads, n_splits, scale,
                  REP: tl.constexpr, REP_P: tl.constexpr, QK: tl.constexpr, VO: tl.constexpr,
                  D_QK: tl.constexpr, D_VO: tl.constexpr, MIN_SPLIT: tl.constexpr, DOUBLINGS: tl.constexpr,
                  BLOCK_T: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
                  EARLY: tl.constexpr, PRELOAD: tl.constexpr, LOOP: tl.constexpr, PRE_WAIT: tl.constexpr):
    """A split's positions follow the request's length (``_length_split``), not the grid's bound: a graph sized for a
    long context runs a short one on as many programs as a graph sized for it.
    EARLY: every load that does not wait for the q|k|v GEMV (cache bases, q, the new k / v and their RoPE
    tables, the length; with PRELOAD, the split's first block of K / V, bounded by the capacity and selected once
    the length is known) is issued at once, and each block's V with its K, so a program waits about
    two memory round trips instead of five (length -> bases -> rope tables -> K -> V); same bits. LOOP: a split
    may hold more than one block (the grid's bound allows it): with PRELOAD the first is the preloaded one, the
    others come in the loop in the plain order, K then V (with V loaded along with K, 128-position splits took
    27.4 us a layer against 12.0 at rate 0, results/attention_probe_h100.json; holding the next block ahead
    spilled registers at 128-wide heads).
    PRE_WAIT (with EARLY; ``pdl.attention_prewait``): the cache bases, the length and the preloaded block
    come before the PDL wait: no kernel of the chain before this one writes them (the lengths are copied at the
    step's start, the cache is this layer's own), and a kernel runs only once its predecessor passed its own wait,
    so everything two or more kernels back is done."""
    b, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dq, dv = tl.arange(0, D_QK), tl.arange(0, D_VO)
    live_q, live_v = dq < QK, dv < VO
    if PRE_WAIT:
        length, split = _length_split(len_ptr + b, n_splits, MIN_SPLIT, DOUBLINGS)
        k_base, v_base, cap, k0, v0 = _cache_ahead(kp_ptr, vp_ptr, cap_ptr, b, g, s * split, dq, dv, live_q, live_v,
                                                   QK, VO, BLOCK_T, kn_ptr.dtype.element_ty, PRELOAD)
    pdl_wait(PDL)
    r = tl.arange(0, REP_P)
    live_r = r < REP
    cos_b, sin_b, idx_g = cos_ptr + b * s_cos, sin_ptr + b * s_cos, idx_ptr + g * s_idx
    if EARLY:
        if not PRE_WAIT:  # the length and the bases load side by side; a split's block needs both
            length, split = _length_split(len_ptr + b, n_splits, MIN_SPLIT, DOUBLINGS)
            k_base, v_base, cap, k0, v0 = _cache_ahead(kp_ptr, vp_ptr, cap_ptr, b, g, s * split, dq, dv, live_q,
                                                       live_v, QK, VO, BLOCK_T, kn_ptr.dtype.element_ty, PRELOAD)
        q = _load_rotated(q_ptr + b * sq_b, sq_h, sq_c, g * REP + r, live_r, dq, live_q, cos_b, sin_b, idx_g, ROPE)
        kn, vn = _new_kv(kn_ptr + b * skn_b, skn_g, skn_c, vn_ptr + b * svn_b + g * svn_g, svn_d, g, dq, live_q,
                         dv, live_v, cos_b, sin_b, idx_g, ROPE)
    else:
        length, split = _length_split(len_ptr + b, n_splits, MIN_SPLIT, DOUBLINGS)
    start = s * split
    if start < length:
        if not EARLY:
            k_base, v_base, cap = _cache_bases(kp_ptr, vp_ptr, cap_ptr, b, g, QK, VO, kn_ptr.dtype.element_ty)
            q = _load_rotated(q_ptr + b * sq_b, sq_h, sq_c, g * REP + r, live_r, dq, live_q, cos_b, sin_b, idx_g,
                              ROPE)  # [REP_P, D_QK]
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, D_VO], tl.float32)
        end = tl.minimum(start + split, length - 1)  # cached positions; the new token is added below
        if PRELOAD:  # the split's first block, loaded above, then (LOOP) the rest: the loop's blocks, same bits
            if start < end:  # as the loop: a split of only the new token has no cached block (all -inf: NaN)
                m_i, l_i, acc = _block(q, k0, v0, start, end, m_i, l_i, acc, scale, BLOCK_T, PRECISION)
            if LOOP:  # each block's V after its softmax: 130 registers a thread, not 168 (sm_90, 128-wide heads)
                m_i, l_i, acc = _attend(q, k_base, v_base, start + BLOCK_T, end, dq, dv, live_q, live_v, m_i, l_i,
                                        acc, scale, QK, VO, BLOCK_T, PRECISION, False)
        else:
            m_i, l_i, acc = _attend(q, k_base, v_base, start, end, dq, dv, live_q, live_v, m_i, l_i, acc, scale,
                                    QK, VO, BLOCK_T, PRECISION, EARLY)
        last = length - 1
        if last < start + split:  # this split holds the new token: score it, then append it to the cache
            if not EARLY:
                kn, vn = _new_kv(kn_ptr + b * skn_b, skn_g, skn_c, vn_ptr + b * svn_b + g * svn_g, svn_d, g, dq,
                                 live_q, dv, live_v, cos_b, sin_b, idx_g, ROPE)
            score = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
            m_new = tl.maximum(m_i, score)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(score - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
            m_i = m_new
            tl.store(k_base + last * QK + dq, kn, mask=live_q)
            tl.store(v_base + last * VO + dv, vn, mask=live_v)
        pdl_release(PDL)  # mode 2: the combine launches while the partials are stored
        row = ((b * n_heads + g * REP + r) * n_splits + s) * (D_VO + 2)  # ws [B, heads, splits, D_VO + 2]
        tl.store(ws_ptr + row[:, None] + dv[None, :], acc, mask=live_r[:, None])
        tl.store(ws_ptr + row + D_VO, m_i, mask=live_r)
        tl.store(ws_ptr + row + D_VO + 1, l_i, mask=live_r)


@triton.jit
def _cache_bases(kp_ptr, vp_ptr, cap_ptr, b, g, QK: tl.constexpr, VO: tl.constexpr, dtype: tl.constexpr):
    """Where group ``g``'s K and V rows of request ``b`` start in its own cache, and its capacity (positions)."""
    cap = tl.load(cap_ptr + b).to(tl.int64)
    k_base = tl.load(kp_ptr + b).to(tl.pointer_type(dtype)) + g * cap * QK
    v_base = tl.load(vp_ptr + b).to(tl.pointer_type(dtype)) + g * cap * VO
    return k_base, v_base, cap


@triton.jit
def _cache_ahead(kp_ptr, vp_ptr, cap_ptr, b, g, start, dq, dv, live_q, live_v, QK: tl.constexpr, VO: tl.constexpr,
                 BLOCK_T: tl.constexpr, dtype: tl.constexpr, PRELOAD: tl.constexpr):
    """What the split pass loads ahead of the q|k|v GEMV: group ``g``'s cache bases and capacity, and with PRELOAD
    the first block of its split at ``start`` (``k0``, ``v0``; without it they stand for nothing and go unused)."""
    k_base, v_base, cap = _cache_bases(kp_ptr, vp_ptr, cap_ptr, b, g, QK, VO, dtype)
    k0, v0 = k_base, v_base
    if PRELOAD:  # a block is never longer than a split (MIN_SPLIT): no other split's positions
        k0, v0 = _kv_block(k_base, v_base, start, cap, dq, dv, live_q, live_v, QK, VO, BLOCK_T)
    return k_base, v_base, cap, k0, v0


@triton.jit
def _length_split(len_row, n_splits, MIN_SPLIT: tl.constexpr, DOUBLINGS: tl.constexpr):
    """A request's ``length`` (tokens including the new one) and the positions each of ``n_splits`` splits covers
    (``split_len`` on the host): the least power of two from MIN_SPLIT on that covers the length, at most DOUBLINGS
    doublings (the grid's bound; 0: always MIN_SPLIT, the constant the compiler folds)."""
    length = tl.load(len_row)
    split = length * 0 + MIN_SPLIT
    for _ in tl.static_range(DOUBLINGS):
        split = tl.where(split * n_splits < length, split * 2, split)
    return length, split


@triton.jit
def _new_kv(kn_row, skn_g, skn_c, vn_row, svn_d, g, dq, live_q, dv, live_v, cos_b, sin_b, idx_g, ROPE: tl.constexpr):
    """The new token's k (rotated) and v of group ``g``, as ``[D_QK]`` / ``[D_VO]``."""
    g_row = g + tl.arange(0, 1)  # this group's k as a one-row tile
    kn = tl.sum(_load_rotated(kn_row, skn_g, skn_c, g_row, g_row >= 0, dq, live_q, cos_b, sin_b, idx_g, ROPE), 0)
    vn = tl.load(vn_row + dv * svn_d, mask=live_v, other=0.0)
    return kn, vn


@triton.jit
def _kv_block(k_base, v_base, t0, end, dq, dv, live_q, live_v, QK: tl.constexpr, VO: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """Positions ``t0 .. t0 + BLOCK_T`` (before ``end``) of the cache: K ``[BLOCK_T, D_QK]``, V ``[BLOCK_T, D_VO]``."""
    t = t0 + tl.arange(0, BLOCK_T)
    live_t = t < end
    k = tl.load(k_base + t[:, None] * QK + dq[None, :], mask=live_t[:, None] & live_q[None, :], other=0.0)
    v = tl.load(v_base + t[:, None] * VO + dv[None, :], mask=live_t[:, None] & live_v[None, :], other=0.0)
    return k, v


@triton.jit
def _attend(q, k_base, v_base, start, end, dq, dv, live_q, live_v, m_i, l_i, acc, scale, QK: tl.constexpr,
            VO: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, EARLY: tl.constexpr):
    """Online softmax of the cached positions ``start .. end`` a block at a time; EARLY: each block's K and V
    loaded together at its top, else K there and V after its softmax."""
    for t0 in range(start, end, BLOCK_T):
        if EARLY:
            k, v = _kv_block(k_base, v_base, t0, end, dq, dv, live_q, live_v, QK, VO, BLOCK_T)
            m_i, l_i, acc = _block(q, k, v, t0, end, m_i, l_i, acc, scale, BLOCK_T, PRECISION)
        else:
            t = t0 + tl.arange(0, BLOCK_T)
            live_t = t < end
            k = tl.load(k_base + t[:, None] * QK + dq[None, :], mask=live_t[:, None] & live_q[None, :], other=0.0)
            p, alpha, m_i, l_i = _softmax_step(q, k, live_t, m_i, l_i, scale, PRECISION)
            v = tl.load(v_base + t[:, None] * VO + dv[None, :], mask=live_t[:, None] & live_v[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_i, l_i, acc


@triton.jit
def _softmax_step(q, k, live_t, m_i, l_i, scale, PRECISION: tl.constexpr):
    """A block's scores into the running softmax: (its weights p, the rescale alpha of what came before, the new
    running max and sum). Positions not ``live_t`` weigh 0 whatever their K holds."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [REP_P, BLOCK_T]
    scores = tl.where(live_t[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _block(q, k, v, t0, end, m_i, l_i, acc, scale, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """One block's online-softmax step from loaded K / V tiles; positions from ``end`` on are selected away (a
    preloaded block may hold anything there, NaN included), so the result equals masked loads' bit for bit."""
    live_t = (t0 + tl.arange(0, BLOCK_T)) < end
    p, alpha, m_i, l_i = _softmax_step(q, k, live_t, m_i, l_i, scale, PRECISION)
    v = tl.where(live_t[:, None], v, 0.0)
    return m_i, l_i, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)


@triton.jit
def _combine_kernel(ws_ptr, len_ptr, out_ptr, so_b, n_heads, n_splits,
                    VO: tl.constexpr, D_VO: tl.constexpr, CHUNK: tl.constexpr, MIN_SPLIT: tl.constexpr,
                    DOUBLINGS: tl.constexpr, SPLITS_P: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    """Grid (B, heads, D_VO / CHUNK): each program merges one CHUNK of one head's output dims over the splits
    (a whole head per program made each thread hold SPLITS_P * D_VO / 32 floats: spills, ~3 us per layer).
    EARLY: every split's partial is loaded together with the length, and the splits past it (stale or never
    written) are selected away after, instead of loading only the used ones once the length is known."""
    pdl_enter(PDL)
    b, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.arange(0, SPLITS_P)
    dv = c * CHUNK + tl.arange(0, CHUNK)
    row = ((b * n_heads + h) * n_splits + s) * (D_VO + 2)
    if EARLY:
        stored = s < n_splits
        m = tl.load(ws_ptr + row + D_VO, mask=stored, other=float("-inf"))
        lsum = tl.load(ws_ptr + row + D_VO + 1, mask=stored, other=0.0)
        acc = tl.load(ws_ptr + row[:, None] + dv[None, :], mask=stored[:, None], other=0.0)
    length, split = _length_split(len_ptr + b, n_splits, MIN_SPLIT, DOUBLINGS)
    live_s = s < tl.cdiv(length, split)
    if EARLY:  # a select, not a product: an unused split may hold NaN from an earlier step or none at all
        m = tl.where(live_s, m, float("-inf"))
        lsum = tl.where(live_s, lsum, 0.0)
        acc = tl.where(live_s[:, None], acc, 0.0)
    else:
        m = tl.load(ws_ptr + row + D_VO, mask=live_s, other=float("-inf"))
        lsum = tl.load(ws_ptr + row + D_VO + 1, mask=live_s, other=0.0)
        acc = tl.load(ws_ptr + row[:, None] + dv[None, :], mask=live_s[:, None], other=0.0)
    w = tl.where(live_s, tl.exp(m - tl.max(m, 0)), 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + b * so_b + dv * n_heads + h, out.to(out_ptr.dtype.element_ty), mask=dv < VO)


COMBINE_CHUNK = 32  # output dims per combine program (benchmarks/fusion_probe.py times the alternatives)


MIN_SPLIT = 32  # the fewest positions a split covers (a power of two)


def split_count(max_len: int, programs_per_split: int, target_programs: int = 512) -> int:
    """The grid's splits: up to ``target_programs`` programs, no more splits than ``MIN_SPLIT``-position ones
    the batch's upper bound ``max_len`` needs."""
    return max(1, min(triton.cdiv(max_len, MIN_SPLIT), target_programs // programs_per_split))


def split_len(length: int, n_splits: int) -> int:
    """Positions a split covers for a request of ``length`` tokens (the kernels' ``_length_split``): the least power
    of two from ``MIN_SPLIT`` on with which ``n_splits`` splits cover the length. A 1288-token bound at batch 1 with
    8 KV heads: 41 splits of 32 positions; a 131072 bound: 64 splits, of 32 positions up to 2048 tokens, of 2048 at
    131072 (before, the bound set the split: 256 of 512 positions at every length, 3 programs a group busy at 1280)."""
    split = MIN_SPLIT
    while split * n_splits < length:
        split *= 2
    return split


def _check(q, k_new, v_new, k_ptrs, v_ptrs, caps, lengths, out, n_kv: int, contiguous_qk: bool = True) -> None:
    b, n_heads, _ = q.shape
    if q.dtype not in FLOAT_DTYPES or k_new.dtype != q.dtype or v_new.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"q, k_new, v_new and out must share one float dtype, got {q.dtype}, {k_new.dtype}, "
                         f"{v_new.dtype}, {out.dtype}")
    if n_heads % n_kv or k_new.shape[:2] != (b, n_kv) or v_new.shape[:2] != (b, n_kv):
        raise ValueError(f"q [B, heads, qk] with heads a multiple of kv heads, k_new/v_new [B, kv_heads, *]: got "
                         f"{tuple(q.shape)}, {tuple(k_new.shape)}, {tuple(v_new.shape)} for {n_kv} kv heads")
    if k_new.shape[2] != q.shape[2] or (contiguous_qk and (q.stride(2) != 1 or k_new.stride(2) != 1)):
        raise ValueError("q and k_new need the same qk dim, contiguous in its last dim")
    for name, t, dtype in (("k_ptrs", k_ptrs, torch.int64), ("v_ptrs", v_ptrs, torch.int64),
                           ("caps", caps, torch.int32), ("lengths", lengths, torch.int32)):
        if t.dtype != dtype or t.shape != (b,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape ({b},)")
    tensors = {"q": q, "k_new": k_new, "v_new": v_new, "k_ptrs": k_ptrs, "v_ptrs": v_ptrs, "caps": caps,
               "lengths": lengths, "out": out}  # one device: a kernel cannot read another device's memory
    if any(t.device != q.device for t in tensors.values()):
        raise ValueError(f"all inputs must be on q's device {q.device}, got "
                         f"{ {name: str(t.device) for name, t in tensors.items()} }")
    if out.shape != (b, n_heads * v_new.shape[2]) or out.stride(1) != 1:
        raise ValueError(f"out must be [B, heads * vo] = ({b}, {n_heads * v_new.shape[2]}), contiguous rows")


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_ptrs: torch.Tensor,
                     v_ptrs: torch.Tensor, caps: torch.Tensor, lengths: torch.Tensor, scale: float, max_len: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention for a batch; appends ``k_new``/``v_new`` to each request's cache.

    q ``[B, heads, qk]`` (rotated), k_new ``[B, kv_heads, qk]``, v_new ``[B, kv_heads, vo]`` (any strides but
    contiguous qk), ``k_ptrs``/``v_ptrs`` int64 base addresses of each request's ``[kv_heads, cap, *]`` cache,
    ``caps`` int32 capacities, ``lengths`` int32 tokens INCLUDING the new one (<= cap), ``max_len`` a static
    upper bound of ``lengths`` (sets the grid, so graphs stay valid). Returns ``out [B, heads * vo]`` rank-major.
    Addresses and lengths are trusted: the runner builds them from live caches.
    """
    b, n_heads, qk = q.shape
    n_kv, vo = k_new.shape[1], v_new.shape[2]
    if out is None:
        out = torch.empty(b, n_heads * vo, dtype=q.dtype, device=q.device)
    _check(q, k_new, v_new, k_ptrs, v_ptrs, caps, lengths, out, n_kv)
    _launch(q, (q.stride(0), q.stride(1), 1), k_new, (k_new.stride(0), k_new.stride(1), 1), v_new, None,
            (n_heads, n_kv, qk, vo), k_ptrs, v_ptrs, caps, lengths, scale, max_len, out)
    return out


def decode_attention_rope(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, rope_index: torch.Tensor, n_heads: int, k_ptrs: torch.Tensor,
                          v_ptrs: torch.Tensor, caps: torch.Tensor, lengths: torch.Tensor, scale: float,
                          max_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``decode_attention`` with the RoPE of ``rope.py`` done inside (one launch less per layer): q ``[B,
    heads*qk]`` and k_new ``[B, kv*qk]`` UNROTATED in the projection's rank-major order (channel ``c`` of head
    ``h`` at ``c * heads + h``), cos/sin ``[B, head_dim/2]`` fp32 tables in original frequency order, rope_index
    ``[kv, >= qk/2]`` the kept pairs' frequencies; v_new ``[B, kv_heads, vo]`` as in ``decode_attention``."""
    b, n_kv = q.shape[0], v_new.shape[1]
    qk, vo = q.shape[1] // n_heads, v_new.shape[2]
    rope_check(q, k_new, cos, sin, rope_index, n_heads, n_kv, qk)
    if out is None:
        out = torch.empty(b, n_heads * vo, dtype=q.dtype, device=q.device)
    _check(q.view(b, qk, n_heads).transpose(1, 2), k_new.view(b, qk, n_kv).transpose(1, 2), v_new, k_ptrs, v_ptrs,
           caps, lengths, out, n_kv, contiguous_qk=False)
    _launch(q, (q.stride(0), 1, n_heads), k_new, (k_new.stride(0), 1, n_kv), v_new, (cos, sin, rope_index),
            (n_heads, n_kv, qk, vo), k_ptrs, v_ptrs, caps, lengths, scale, max_len, out)
    return out


def _launch(q, q_strides, k_new, k_strides, v_new, rope, dims, k_ptrs, v_ptrs, caps, lengths, scale, max_len, out):
    """Both passes; ``q_strides``/``k_strides`` = (row, head, channel) element strides, ``rope`` None or
    (cos, sin, rope_index)."""
    b = q.shape[0]
    n_heads, n_kv, qk, vo = dims
    rep = n_heads // n_kv
    n_splits = split_count(max_len, b * n_kv)
    max_split = split_len(max_len, n_splits)
    splits = dict(MIN_SPLIT=MIN_SPLIT, DOUBLINGS=(max_split // MIN_SPLIT).bit_length() - 1)
    d_qk, d_vo = (max(16, triton.next_power_of_2(d)) for d in (qk, vo))
    ws = torch.empty(b * n_heads * n_splits * (d_vo + 2), dtype=torch.float32, device=q.device)
    cos, sin, idx = rope if rope is not None else (ws, ws, lengths)  # unused without ROPE
    mode = pdl_mode(q.device, b)  # the split pass may release its dependents late (mode 2); the combine is short
    pdl = mode > 0
    early = early_loads(b)
    # with early loads (batch 1) a block is MIN_SPLIT positions: the preloaded block is a whole short split, and the
    # kernel of a long bound takes 130 registers a thread on sm_90 at 128-wide heads (231 with 64-position blocks:
    # 2 programs an SM instead of 4, where a graph sized for a long context runs short requests)
    block_t = min(MIN_SPLIT if early else max_split, 64)
    _split_kernel[(b, n_kv, n_splits)](
        q, k_new, v_new, k_ptrs, v_ptrs, caps, lengths, ws, cos, sin, idx, *q_strides, *k_strides, v_new.stride(0),
        v_new.stride(1), v_new.stride(2), cos.stride(0) if rope else 0, idx.stride(0) if rope else 0, n_heads,
        n_splits, scale, REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), QK=qk,
        VO=vo, D_QK=d_qk, D_VO=d_vo, **splits, BLOCK_T=block_t, ROPE=rope is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=mode, EARLY=early, PRELOAD=early,
        LOOP=max_split > block_t, PRE_WAIT=early and attention_prewait(), num_warps=4,
        launch_pdl=pdl)
    chunk = min(d_vo, COMBINE_CHUNK)
    _combine_kernel[(b, n_heads, d_vo // chunk)](ws, lengths, out, out.stride(0), n_heads, n_splits, VO=vo,
                                                 D_VO=d_vo, CHUNK=chunk, **splits,
                                                 SPLITS_P=triton.next_power_of_2(n_splits), PDL=pdl,
                                                 EARLY=early, num_warps=2 if n_splits > 16 else 1,
                                                 launch_pdl=pdl)


def decode_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                               k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], lengths: list[int],
                               scale: float) -> torch.Tensor:
    """Plain torch, one request at a time: write the new K/V at ``lengths[i] - 1``, attend, rank-major out."""
    b, n_heads, _ = q.shape
    n_kv, vo = k_new.shape[1], v_new.shape[2]
    rows = []
    for i in range(b):
        end = lengths[i]
        k_caches[i][:, end - 1] = k_new[i]
        v_caches[i][:, end - 1] = v_new[i]
        k = k_caches[i][:, :end].float().repeat_interleave(n_heads // n_kv, 0)  # [heads, T, qk]
        v = v_caches[i][:, :end].float().repeat_interleave(n_heads // n_kv, 0)
        probs = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)  # [heads, 1, T]
        rows.append((probs @ v)[:, 0].T.reshape(vo * n_heads))  # [vo, heads] flattened = rank-major
    return torch.stack(rows).to(q.dtype)
