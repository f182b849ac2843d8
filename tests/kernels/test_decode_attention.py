"""Batched decode attention: the Triton kernel (interpreter on CPU) equals the torch reference, and the reference
equals plain SDPA; per-request caches of different capacities, lengths and pruned dims in one batch."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from uniql.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    decode_attention_rope,
)
from uniql.kernels.rope import rope_qk_reference, rope_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _batch(lengths, caps, n_heads, n_kv, qk, vo, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    k_caches = [rand(n_kv, cap, qk) for cap in caps]
    v_caches = [rand(n_kv, cap, vo) for cap in caps]
    # q/k_new/v_new as the runner passes them: head-major rope outputs and a rank-major v projection (strided)
    q = rand(n_heads, b, qk).transpose(0, 1)
    k_new = rand(n_kv, b, qk).transpose(0, 1)
    v_new = rand(b, vo, n_kv).transpose(1, 2)
    return q, k_new, v_new, k_caches, v_caches


def _tables(k_caches, v_caches, lengths):
    as_i64 = [c.data_ptr() for c in k_caches], [c.data_ptr() for c in v_caches]
    return (torch.tensor(as_i64[0], dtype=torch.int64, device=DEVICE),
            torch.tensor(as_i64[1], dtype=torch.int64, device=DEVICE),
            torch.tensor([c.shape[1] for c in k_caches], dtype=torch.int32, device=DEVICE),
            torch.tensor(lengths, dtype=torch.int32, device=DEVICE))


CASES = [  # lengths, caps, heads, kv heads, qk, vo
    ([1], [8], 4, 4, 16, 16),
    ([5, 70, 33], [9, 70, 200], 9, 3, 40, 24),  # SmolLM2-like group (rep 3), pruned dims, new token at cap
    ([130], [300], 8, 2, 64, 64),  # several splits
    ([17, 1, 64, 2], [64, 3, 64, 2], 6, 1, 8, 32),  # MQA, tiny qk (padded to 16)
    ([600, 40], [700, 64], 4, 2, 32, 32),  # 19 splits
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference_and_appends(case, dtype):
    lengths, caps, n_heads, n_kv, qk, vo = case
    q, k_new, v_new, k_caches, v_caches = _batch(lengths, caps, n_heads, n_kv, qk, vo, dtype)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    expected = decode_attention_reference(q, k_new, v_new, k_ref, v_ref, lengths, qk ** -0.5)
    out = decode_attention(q, k_new, v_new, *_tables(k_caches, v_caches, lengths), qk ** -0.5, max(caps))
    assert out.shape == (len(lengths), n_heads * vo)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for got, want in zip(k_caches + v_caches, k_ref + v_ref, strict=True):  # the new token landed, nothing else
        assert torch.equal(got, want)


def test_reference_equals_sdpa_with_gqa():
    lengths, caps, n_heads, n_kv, qk, vo = [6, 11], [6, 16], 6, 2, 16, 16
    q, k_new, v_new, k_caches, v_caches = _batch(lengths, caps, n_heads, n_kv, qk, vo, torch.float32, seed=3)
    out = decode_attention_reference(q, k_new, v_new, k_caches, v_caches, lengths, 0.3)
    for i, end in enumerate(lengths):
        k, v = k_caches[i][None, :, :end], v_caches[i][None, :, :end]
        want = F.scaled_dot_product_attention(q[i][None, :, None], k, v, scale=0.3, enable_gqa=True)  # [1,h,1,vo]
        torch.testing.assert_close(out[i], want[0, :, 0].T.reshape(-1), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    q, k_new, v_new, k_caches, v_caches = _batch([3], [4], 4, 2, 16, 16, torch.float32)
    tables = _tables(k_caches, v_caches, [3])
    with pytest.raises(ValueError, match="float dtype"):
        decode_attention(q.half(), k_new, v_new, *tables, 0.25, 4)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k_new, v_new, *tables[:3], tables[3].long(), 0.25, 4)
    with pytest.raises(ValueError, match="kv heads"):
        decode_attention(q[:, :3], k_new, v_new, *tables, 0.25, 4)


ROPE_CASES = [  # lengths, caps, heads, kv heads, qk (kept, even), head_dim, vo
    ([1], [8], 4, 4, 16, 16, 16),
    ([5, 70, 33], [9, 70, 200], 9, 3, 40, 64, 24),  # pruned qk: 20 of 32 pairs, permuted frequencies
    ([130], [300], 8, 2, 64, 64, 64),
    ([17, 2], [64, 2], 6, 1, 6, 8, 32),  # MQA, qk 6 padded to 16
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
def test_fused_rope_equals_rope_then_attention(case, dtype):
    """Unrotated rank-major q/k in, RoPE inside the split pass: same output and same cache writes as the
    reference RoPE (rope_qk_reference) followed by the reference attention."""
    lengths, caps, n_heads, n_kv, qk, head_dim, vo = case
    b = len(lengths)
    _, _, v_new, k_caches, v_caches = _batch(lengths, caps, n_heads, n_kv, qk, vo, dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    # rank-major projections as columns of one wider fused output (rows strided, like the qkv GEMV's)
    fused = torch.randn(b, (n_heads + n_kv) * qk + 8, generator=gen).to(DEVICE, dtype)
    q_flat, k_flat = fused[:, : n_heads * qk], fused[:, n_heads * qk: (n_heads + n_kv) * qk]
    rope_index = torch.stack([torch.randperm(head_dim // 2, generator=gen) for _ in range(n_kv)]).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    positions = torch.tensor(lengths) - 1
    cos, sin = (t.to(DEVICE) for t in rope_tables(inv_freq, positions, scaling=1.1))
    q_rot, k_rot = rope_qk_reference(q_flat, k_flat, cos, sin, rope_index, n_heads, n_kv, qk)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    expected = decode_attention_reference(q_rot.transpose(0, 1), k_rot.transpose(0, 1), v_new, k_ref, v_ref,
                                          lengths, qk ** -0.5)
    out = decode_attention_rope(q_flat, k_flat, v_new, cos, sin, rope_index, n_heads,
                                *_tables(k_caches, v_caches, lengths), qk ** -0.5, max(caps))
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    exact = dtype != torch.float32  # fp32 rotations may differ in the last bit (FMA contraction on the GPU)
    for got, want in zip(k_caches + v_caches, k_ref + v_ref, strict=True):  # the rotated k landed, nothing else
        torch.testing.assert_close(got, want, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)


@pytest.mark.parametrize("split", [None, 256])  # None: one block a split (preloaded); 256: the first block
# preloaded, then a loop of 64-wide blocks (early) or all in the loop
@pytest.mark.parametrize("case", ROPE_CASES)
def test_early_loads_give_the_same_bits(monkeypatch, case, split):
    """Early loads (UNIQL_EARLY_LOADS=all: some cases are batches) issue the split pass's loads in another order
    (all that need no length first: a one-block split's K / V too, bounded by the capacity; each block's V with its
    K) and the combine loads every split's partial before it knows which are used: the output and the cache writes
    must be bit for bit the plain order's, with NaN in every cache slot past the length and in every fresh buffer;
    so must UNIQL_ATTN_PREWAIT's order (the bases, the length and the block before the PDL wait)."""
    from uniql.kernels import decode_attention as att

    if split is not None:
        monkeypatch.setattr(att, "MIN_SPLIT", split)
    lengths, caps, n_heads, n_kv, qk, head_dim, vo = case
    _, _, v_new, k_caches, v_caches = _batch(lengths, caps, n_heads, n_kv, qk, vo, torch.float16, seed=7)
    for cache, length in zip(k_caches + v_caches, lengths + lengths, strict=True):
        cache[:, length - 1:] = float("nan")  # never written yet: a preloaded block reads it and must drop it
    gen = torch.Generator().manual_seed(8)
    q_flat = torch.randn(len(lengths), n_heads * qk, generator=gen).to(DEVICE, torch.float16)
    k_flat = torch.randn(len(lengths), n_kv * qk, generator=gen).to(DEVICE, torch.float16)
    rope_index = torch.stack([torch.randperm(head_dim // 2, generator=gen) for _ in range(n_kv)]).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = (t.to(DEVICE) for t in rope_tables(inv_freq, torch.tensor(lengths) - 1))
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):  # every fresh buffer (the splits' workspace too) starts as NaN: the early
        t = real_empty(*args, **kwargs)  # combine loads partials of unused splits and must select them away
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    runs = []
    for flag, prewait in (("0", "0"), ("all", "0"), ("all", "1")):  # UNIQL_ATTN_PREWAIT: bases, length, block first
        monkeypatch.setenv("UNIQL_EARLY_LOADS", flag)
        monkeypatch.setenv("UNIQL_ATTN_PREWAIT", prewait)
        ks, vs = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
        out = decode_attention_rope(q_flat, k_flat, v_new, cos, sin, rope_index, n_heads,
                                    *_tables(ks, vs, lengths), qk ** -0.5, max(caps))
        runs.append((out, ks + vs))
    out0, caches0 = runs[0]
    assert torch.isfinite(out0).all()
    for out, caches in runs[1:]:
        assert torch.equal(out0, out)
        for a, b in zip(caches0, caches, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_split_plan_follows_the_length():
    """The grid's splits come from the bound, a split's positions from the length: the benchmark's 1288-token
    graph keeps the partition it had (41 x 32 at batch 1; 128 positions at batch 4, 512 at batch 16), and a graph
    sized for a 131072-token context runs a 1280-token request on 40 splits of 32, not 3 of 512."""
    from uniql.kernels.decode_attention import split_count, split_len

    assert (split_count(1288, 8), split_len(1280, 41)) == (41, 32)
    assert (split_count(1288, 4 * 8), split_len(1280, 16)) == (16, 128)
    assert (split_count(1288, 16 * 8), split_len(1280, 4)) == (4, 512)
    assert (split_count(131072, 8), split_len(1280, 64), split_len(131072, 64)) == (64, 32, 2048)
    assert split_count(5, 1000) == 1 and split_len(1, 1) == 32


@pytest.mark.parametrize(("early", "prewait"), [("0", "0"), ("all", "0"), ("all", "1")])
def test_splits_follow_the_length_not_the_bound(monkeypatch, early, prewait):
    """A grid sized for a long bound (four splits of up to 256 positions) attends like the reference at any
    length: 40 tokens take splits of 32 positions, two of them used (without early loads shorter than a block, 64
    positions); 300 tokens splits of 128, three used (with early loads the first 32-position block preloaded, the
    other three in the loop). The combine must use the same splits: the unused ones' partials are NaN (every fresh
    buffer is)."""
    from uniql.kernels import decode_attention as att

    monkeypatch.setattr(att, "split_count", lambda max_len, programs, target=512: 4)
    monkeypatch.setenv("UNIQL_EARLY_LOADS", early)
    monkeypatch.setenv("UNIQL_ATTN_PREWAIT", prewait)
    lengths, caps, n_heads, n_kv, qk, vo = [40, 300], [64, 320], 4, 2, 32, 32
    assert [att.split_len(n, 4) for n in (*lengths, 1024)] == [32, 128, 256]
    q, k_new, v_new, k_caches, v_caches = _batch(lengths, caps, n_heads, n_kv, qk, vo, torch.float32, seed=9)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    expected = decode_attention_reference(q, k_new, v_new, k_ref, v_ref, lengths, qk ** -0.5)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    out = decode_attention(q, k_new, v_new, *_tables(k_caches, v_caches, lengths), qk ** -0.5, 1024)
    torch.testing.assert_close(out, expected, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    for got, want in zip(k_caches + v_caches, k_ref + v_ref, strict=True):
        assert torch.equal(got, want)


def test_fused_rope_refuses_mismatched_tables():
    _, _, v_new, k_caches, v_caches = _batch([3], [4], 4, 2, 16, 16, torch.float32)
    q, k = torch.randn(1, 64, device=DEVICE), torch.randn(1, 32, device=DEVICE)
    cos, sin = rope_tables(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), torch.tensor([2]))
    idx = torch.arange(8, device=DEVICE).repeat(2, 1)
    tables = _tables(k_caches, v_caches, [3])
    with pytest.raises(ValueError, match="head dim 4"):
        decode_attention_rope(q, k, v_new, cos[:, :2].to(DEVICE), sin[:, :2].to(DEVICE), idx, 4, *tables, 0.25, 4)
    with pytest.raises(ValueError, match="rope_index"):
        decode_attention_rope(q, k, v_new, cos.to(DEVICE), sin.to(DEVICE), idx[:1], 4, *tables, 0.25, 4)


def test_fused_rope_refuses_tables_of_different_row_strides():
    """The split pass reads sin with cos's row stride: equal values laid out differently must be refused."""
    _, _, v_new, k_caches, v_caches = _batch([3, 2], [4, 4], 4, 2, 16, 16, torch.float32)
    q, k = torch.randn(2, 64, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)),
                                                  torch.tensor([2, 1])))
    sin_wide = torch.cat([sin, torch.zeros_like(sin)], 1)[:, :8]  # same values, row stride 16 against cos's 8
    idx = torch.arange(8, device=DEVICE).repeat(2, 1)
    with pytest.raises(ValueError, match="share a row stride"):
        decode_attention_rope(q, k, v_new, cos, sin_wide, idx, 4, *_tables(k_caches, v_caches, [3, 2]), 0.25, 4)


@pytest.mark.parametrize("name", ["lengths", "k_ptrs", "out"])
def test_a_tensor_on_another_device_is_refused(name):
    """Nothing compared devices: a table or ``out`` elsewhere went to the kernel (another GPU's memory read as
    this one's, or a CPU pointer dereferenced on the device)."""
    q, k_new, v_new, k_caches, v_caches = _batch([3], [8], 4, 2, 16, 16, torch.float32)
    k_ptrs, v_ptrs, caps, lengths = _tables(k_caches, v_caches, [3])
    args = dict(k_ptrs=k_ptrs, v_ptrs=v_ptrs, caps=caps, lengths=lengths,
                out=torch.empty(1, 4 * 16, device=DEVICE))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match="device"):
        decode_attention(q, k_new, v_new, scale=0.25, max_len=8, **args)
