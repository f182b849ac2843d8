"""Fused RoPE: the plain-torch reference equals the decoder's own math, the Triton kernel equals the reference
(interpreter on CPU; tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels.rope import decode_rope_tables, rope_qk, rope_qk_reference, rope_tables  # noqa: E402
from uniql.runtime.decoder import ElasticAttention, rotate_pairs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _case(n_tokens, n_heads, n_kv, head_dim, qk, dtype, seed=0, row_pad=0):
    """Random rank-major q/k (rows strided when row_pad > 0), per-group permuted rope_index, tables."""
    gen = torch.Generator().manual_seed(seed)
    p_full = head_dim // 2
    q_full = torch.randn(n_tokens, n_heads * qk + row_pad, generator=gen)
    k_full = torch.randn(n_tokens, n_kv * qk + row_pad, generator=gen)
    q, k = q_full[:, : n_heads * qk], k_full[:, : n_kv * qk]
    rope_index = torch.stack([torch.randperm(p_full, generator=gen) for _ in range(n_kv)])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(p_full, dtype=torch.float32) * 2 / head_dim))
    positions = torch.randint(0, 4096, (n_tokens,), generator=gen)
    cos, sin = rope_tables(inv_freq, positions, scaling=0.9)
    return SimpleNamespace(q=q.to(DEVICE, dtype), k=k.to(DEVICE, dtype), cos=cos.to(DEVICE), sin=sin.to(DEVICE),
                           rope_index=rope_index.to(DEVICE), inv_freq=inv_freq, positions=positions,
                           args=(n_heads, n_kv, qk))


def _decoder_rope(c):
    """What ElasticAttention.forward does for one batch element: its _pairs_view, rope_cos_sin, rotate_pairs."""
    n_heads, n_kv, qk = c.args
    attn = SimpleNamespace(rope_index=c.rope_index.cpu())
    cos, sin = ElasticAttention.rope_cos_sin(attn, c.inv_freq, c.positions[None], qk // 2, 0.9)
    rep = n_heads // n_kv
    q = ElasticAttention._pairs_view(c.q.cpu()[None], n_heads, qk)
    k = ElasticAttention._pairs_view(c.k.cpu()[None], n_kv, qk)
    q = rotate_pairs(q, cos.repeat_interleave(rep, 1), sin.repeat_interleave(rep, 1)).flatten(-2)
    return q[0], rotate_pairs(k, cos, sin).flatten(-2)[0]


@pytest.mark.parametrize("n_heads,n_kv,qk", [(4, 4, 16), (6, 2, 10), (9, 3, 16)])
def test_reference_matches_decoder_math(n_heads, n_kv, qk):
    c = _case(5, n_heads, n_kv, 16, qk, torch.float32)
    q_dec, k_dec = _decoder_rope(c)
    q_ref, k_ref = rope_qk_reference(c.q, c.k, c.cos, c.sin, c.rope_index, *c.args)
    assert q_ref.shape == (n_heads, 5, qk) and k_ref.shape == (n_kv, 5, qk)
    torch.testing.assert_close(q_ref.cpu(), q_dec, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_ref.cpu(), k_dec, rtol=0, atol=1e-6)


def test_rope_tables_are_the_decoder_angles():
    c = _case(7, 2, 2, 16, 16, torch.float32)
    cos, sin = ElasticAttention.rope_cos_sin(SimpleNamespace(rope_index=torch.arange(8).repeat(2, 1)),
                                             c.inv_freq, c.positions[None], 8, 0.9)
    assert torch.equal(c.cos.cpu(), cos[0, 0]) and torch.equal(c.sin.cpu(), sin[0, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens,n_heads,n_kv,head_dim,qk", [
    (1, 4, 4, 16, 16),  # decode step, unpruned
    (3, 6, 2, 16, 10),  # GQA, pruned: 5 pairs pad to 8
    (7, 9, 3, 24, 12),  # head_dim not a power of 2, pruned
    (2, 9, 3, 24, 24),  # 12 pairs pad to 16
    (3, 2, 1, 8, 2),  # one pair left
])
def test_kernel_matches_reference(dtype, n_tokens, n_heads, n_kv, head_dim, qk):
    c = _case(n_tokens, n_heads, n_kv, head_dim, qk, dtype, seed=n_tokens * 31 + qk, row_pad=3)
    q_rot, k_rot = rope_qk(c.q, c.k, c.cos, c.sin, c.rope_index, *c.args)
    q_ref, k_ref = rope_qk_reference(c.q, c.k, c.cos, c.sin, c.rope_index, *c.args)
    assert q_rot.dtype == dtype and k_rot.dtype == dtype and q_rot.is_contiguous() and k_rot.is_contiguous()
    assert q_rot.shape == (n_heads, n_tokens, qk) and k_rot.shape == (n_kv, n_tokens, qk)
    torch.testing.assert_close(q_rot, q_ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(k_rot, k_ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_kernel_int32_index_and_mixed_dtypes():
    c = _case(2, 4, 2, 16, 12, torch.float32, seed=5)
    q16 = c.q.half()
    q_rot, k_rot = rope_qk(q16, c.k, c.cos, c.sin, c.rope_index.int(), *c.args)
    q_ref, k_ref = rope_qk_reference(q16, c.k, c.cos, c.sin, c.rope_index, *c.args)
    assert q_rot.dtype == torch.float16 and k_rot.dtype == torch.float32
    torch.testing.assert_close(q_rot, q_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k_rot, k_ref, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    c = _case(0, 4, 2, 16, 16, torch.float32)
    q_rot, k_rot = rope_qk(c.q, c.k, c.cos, c.sin, c.rope_index, *c.args)
    assert q_rot.shape == (4, 0, 16) and k_rot.shape == (2, 0, 16)


@pytest.mark.parametrize("change,match", [
    (dict(args=(6, 4, 16)), "multiple of n_kv"),
    (dict(args=(4, 2, 15)), "even"),
    (dict(args=(4, 2, 12)), "do not match"),
    (dict(q="long"), "float16, bfloat16 or float32"),
    (dict(cos="half"), "must be float32"),
    (dict(cos="short"), r"\[T=3, head_dim/2\]"),
    (dict(rope_index="float"), "rope_index must be"),
    (dict(rope_index="narrow"), "rope_index must be"),
    (dict(q="col_strided"), "contiguous last dim"),
    (dict(sin="row_strided"), "share a row stride"),  # the kernel reads sin with cos's row stride
])
def test_bad_inputs_raise(change, match):
    c = _case(3, 4, 2, 16, 16, torch.float32)
    edits = {"long": lambda t: t.long(), "half": lambda t: t.half(), "short": lambda t: t[:2],
             "float": lambda t: t.float(), "narrow": lambda t: t[:, :4],
             "col_strided": lambda t: torch.cat([t, t], 1)[:, ::2],
             "row_strided": lambda t: torch.cat([t, t], 1)[:, :t.shape[1]]}
    for name, how in change.items():
        setattr(c, name, how if name == "args" else edits[how](getattr(c, name)))
    for fn in (rope_qk, rope_qk_reference):
        with pytest.raises(ValueError, match=match):
            fn(c.q, c.k, c.cos, c.sin, c.rope_index, *c.args)


def test_qk_beyond_head_dim_raises():
    c = _case(2, 2, 2, 8, 8, torch.float32)
    q, k = torch.cat([c.q, c.q], 1), torch.cat([c.k, c.k], 1)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        rope_qk(q, k, c.cos, c.sin, c.rope_index, 2, 2, 16)


def test_cpu_tensors_without_interpreter_point_to_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = _case(2, 2, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="use rope_qk_reference on CPU"):
        rope_qk(c.q.cpu(), c.k.cpu(), c.cos.cpu(), c.sin.cpu(), c.rope_index.cpu(), *c.args)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_decode_tables_equal_rope_tables_at_the_last_positions(index_dtype, scaling):
    """One launch for a decode step's tables: ``rope_tables`` at ``lengths - 1``, to the last bits on the GPU
    (both are libdevice's accurate cos / sin); angles up to ~1e5 radians, a pair count that is not a power of two."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 48, 2).float() / 48))  # 24 pairs, as a long-context Llama's
    lengths = torch.tensor([1, 2, 1000, 131072, 77], dtype=index_dtype)
    cos, sin = decode_rope_tables(inv_freq.to(DEVICE), lengths.to(DEVICE), scaling)
    want_cos, want_sin = rope_tables(inv_freq, lengths.long() - 1, scaling)
    assert cos.shape == sin.shape == (5, 24) and cos.dtype == sin.dtype == torch.float32
    tol = 2e-6 if DEVICE == "cuda" else 1e-5  # the interpreter's numpy cos / sin may differ from torch's in a bit
    torch.testing.assert_close(cos.cpu(), want_cos, atol=tol, rtol=0)
    torch.testing.assert_close(sin.cpu(), want_sin, atol=tol, rtol=0)
    assert decode_rope_tables(inv_freq.to(DEVICE), lengths[:0].to(DEVICE))[0].shape == (0, 24)


def test_decode_tables_check_their_inputs(monkeypatch):
    inv_freq = torch.rand(8, device=DEVICE)
    with pytest.raises(ValueError, match="lengths int32/int64"):
        decode_rope_tables(inv_freq, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="inv_freq must be"):
        decode_rope_tables(inv_freq[None], torch.ones(3, dtype=torch.int32, device=DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: rope_tables itself
    lengths = torch.tensor([5, 9])
    assert all(torch.equal(a, b) for a, b in zip(decode_rope_tables(inv_freq.cpu(), lengths, 0.5),
                                                 rope_tables(inv_freq.cpu(), lengths - 1, 0.5), strict=True))


def test_decode_tables_trace_under_torch_compile():
    """torch.compile cannot trace the direct Triton launch: compiled code takes the torch ops, same tables."""
    inv_freq, lengths = torch.rand(8), torch.tensor([3, 40], dtype=torch.int32)
    compiled = torch.compile(lambda f, n: decode_rope_tables(f, n, 0.5), backend="eager", fullgraph=True)
    got, want = compiled(inv_freq, lengths), rope_tables(inv_freq, lengths.long() - 1, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
