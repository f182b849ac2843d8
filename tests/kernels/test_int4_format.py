"""The packed INT4 format: lossless packing, RTN error bound, prefix dequantization as views, byte counts."""

import math

import pytest
import torch

from uniql.kernels import int4_format as f4

G = 32
GEN = torch.Generator().manual_seed(0)


def _weight(n=40, k=128):
    return torch.randn(n, k, generator=GEN)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("n,k", [(24, 8), (40, 64), (24, 136), (1, 16)])
def test_pack_unpack_round_trips_every_code(n, k):
    codes = torch.randint(0, 16, (n, k), generator=GEN, dtype=torch.uint8)
    codes[0, :8] = 15  # code 15 in the top nibble sets the sign bit of the int32 word
    qweight = f4.pack(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (k // 8, n)
    assert torch.equal(f4.unpack(qweight), codes.T.int())


def test_pack_puts_code_j_in_bits_4j():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)  # one word: codes 0..7
    assert f4.pack(codes).item() == sum(j << (4 * j) for j in range(8))


def test_pack_refuses_k_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        f4.pack(torch.zeros(4, 12, dtype=torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_error_is_at_most_half_a_scale_except_clamped_maxima(group):
    w = _weight(24, 256)
    w[3, :group] = 0.0  # an all-zero group must not divide by zero
    qweight, scales = f4.rtn_quantize(w, group)
    assert scales.dtype == torch.float16 and scales.shape == (256 // group, 24)
    deq = f4.dequantize(qweight, scales, group)  # [K, N]
    s = scales.float().repeat_interleave(group, 0)
    err = (w.T - deq).abs()
    clamped = w.T / s >= 7.5  # fp16 rounding of max|w|/7.5 can push +max to code 16, clamped to 15
    assert (err[~clamped] <= s[~clamped] / 2 * (1 + 1e-6)).all()
    assert (err[clamped] <= s[clamped]).all()
    assert torch.equal(deq[:group, 3], torch.zeros(group))


# (k, n) prefixes: k inside a group (40, 72), a single word (8), n not a power of two (24, 40)
PREFIXES = [(128, 40), (96, 24), (72, 40), (40, 24), (8, 1), (128, 3)]


@pytest.mark.parametrize("k,n", PREFIXES)
def test_prefix_dequantization_is_the_slice_of_the_full_one(k, n):
    qweight, scales = f4.rtn_quantize(_weight(), G)
    full = f4.dequantize(qweight, scales, G)
    part = f4.dequantize(qweight, scales, G, k=k, n=n)
    assert part.shape == (k, n)
    assert torch.equal(part, full[:k, :n])


@pytest.mark.parametrize("k,n", PREFIXES)
def test_prefix_slices_are_views_of_the_stored_tensors(k, n):
    qweight, scales = f4.rtn_quantize(_weight(), G)
    q_view, s_view = qweight[: k // 8, :n], scales[: math.ceil(k / G), :n]
    assert _storage(q_view) == _storage(qweight) and _storage(s_view) == _storage(scales)
    assert q_view.data_ptr() == qweight.data_ptr() and s_view.data_ptr() == scales.data_ptr()


def test_dequantize_unpacks_a_view_not_a_copy(monkeypatch):
    """What dequantize hands to unpack is the prefix view itself (no repack of the stored words)."""
    qweight, scales = f4.rtn_quantize(_weight(), G)
    seen = []
    real_unpack = f4.unpack

    def recording_unpack(q):
        seen.append((_storage(q), q.data_ptr(), tuple(q.shape)))
        return real_unpack(q)

    monkeypatch.setattr(f4, "unpack", recording_unpack)
    f4.dequantize(qweight, scales, G, k=72, n=24)
    assert seen == [(_storage(qweight), qweight.data_ptr(), (9, 24))]


@pytest.mark.parametrize("n,k,group,match", [(8, 64, 16, "group size"), (8, 64, 48, "group size"),
                                             (8, 96, 64, "not a multiple"), (8, 40, 32, "not a multiple"),
                                             (0, 64, 32, "empty")])
def test_check_shape_rejects_bad_shapes(n, k, group, match):
    with pytest.raises(ValueError, match=match):
        f4.check_shape(n, k, group)


def test_rtn_refuses_k_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="not a multiple"):
        f4.rtn_quantize(torch.randn(8, 96), 64)


@pytest.mark.parametrize("k,n,group", [(128, 40, 32), (72, 24, 32), (40, 24, 32), (8, 1, 128), (4096, 14336, 128)])
def test_packed_bytes_counts_whole_words_and_started_groups(k, n, group):
    expected = math.ceil(k / 8) * n * 4 + math.ceil(k / group) * n * 2
    assert f4.packed_bytes(k, n, group) == expected


def test_packed_bytes_of_the_full_matrix_equals_the_stored_tensors():
    qweight, scales = f4.rtn_quantize(_weight(40, 128), G)
    stored = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
    assert f4.packed_bytes(128, 40, G) == stored
    q, s = qweight[:5, :24], scales[:2, :24]  # the k=40, n=24 prefix reads exactly these elements
    assert f4.packed_bytes(40, 24, G) == q.numel() * 4 + s.numel() * 2


def _pack_by_hand(codes: torch.Tensor) -> torch.Tensor:
    """The documented layout word by word, independent of ``pack``: word (r, n) holds W[n, 8r + j] at bits 4j."""
    n, k = codes.shape
    words = [[sum(int(codes[c, 8 * r + j]) << (4 * j) for j in range(8)) for c in range(n)] for r in range(k // 8)]
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


@pytest.mark.parametrize("segments, k", [([(0, 24)], 96), ([(5, 11), (16, 8)], 72), ([(3, 20)], 8)])
def test_references_equal_a_dequantize_then_matmul_written_out(segments, k):
    """``dequantize``, ``int4_matmul_reference`` and the embedding reference against ``(q - 8) * s`` built from the
    codes and scales directly, on N segments and K prefixes that end inside a group (k = 72, 8 at G = 32)."""
    from uniql.kernels.embedding import embedding_int4_reference
    from uniql.kernels.int4_matmul import int4_matmul_reference

    n_stored, k_stored = 24, 96
    codes = torch.randint(0, 16, (n_stored, k_stored), generator=GEN, dtype=torch.uint8)
    scales = (torch.rand(n_stored, k_stored // G, generator=GEN) + 0.1).half()  # [N, K/G]
    w = (codes.double() - 8) * scales.double().repeat_interleave(G, dim=1)  # W [N, K] by definition
    qweight, scales_kn = _pack_by_hand(codes), scales.T.contiguous()
    x = torch.randn(3, k, generator=GEN, dtype=torch.float64)
    want = torch.cat([x @ w[a:a + n, :k].T for a, n in segments], dim=-1)
    got = int4_matmul_reference(x.float(), qweight, scales_kn, G, k=k, segments=segments)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    a, n = segments[0]
    assert torch.equal(f4.dequantize(qweight[:, a:a + n], scales_kn[:, a:a + n], G, k).double(), w[a:a + n, :k].T)
    ids = torch.tensor([[0, 23], [7, 7]])
    assert torch.equal(embedding_int4_reference(ids, qweight, scales_kn, G).double(), w[ids])
