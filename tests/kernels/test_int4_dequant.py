"""Prefill path: the dequantization kernel equals the reference; chunked dequant + matmul equals the GEMM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import int4_dequant as dq  # noqa: E402
from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float16, torch.float32]


def packed(n: int, k: int, group: int):
    qweight, scales = rtn_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), group)
    return qweight.to(DEV), scales.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_stored", "k_stored", "group", "n", "k"), [
    (200, 192, 64, 200, 192), (200, 192, 64, 37, 136), (130, 256, 32, 130, 8), (64, 384, 128, 50, 376)])
def test_dequantized_prefix_is_exact(dtype, n_stored, k_stored, group, n, k):
    qweight, scales = packed(n_stored, k_stored, group)
    got = dq.dequantize_prefix(qweight, scales, group, k, n, dtype)
    assert torch.equal(got, dq.dequantize_prefix_reference(qweight, scales, group, k, n, dtype))


@pytest.mark.parametrize("chunk_elements", [1 << 30, 128 * 72])  # one chunk; several chunks per segment
def test_chunked_prefill_matches_the_reference(chunk_elements):
    qweight, scales = packed(640, 128, 64)
    x = torch.randn(260, 72, device=DEV).to(DTYPES[0])
    segments = [(0, 300), (320, 256)]
    bias = torch.randn(556, device=DEV)
    out = torch.empty(260, 556, device=DEV, dtype=x.dtype)
    dq.dequant_matmul(x, qweight, scales, 64, 72, segments, bias, out, chunk_elements=chunk_elements)
    ref = im.int4_matmul_reference(x, qweight, scales, 64, k=72, segments=segments, bias=bias)
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err < (1e-5 if x.dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize(("n", "chunk"), [(18944, 9344), (152064, 9344), (300, 128), (128, 128), (1000, 4096)])
def test_column_chunks_cover_the_columns_in_equal_pieces_within_the_bound(n, chunk):
    pieces = dq.column_chunks(n, chunk)
    assert [c0 for c0, _ in pieces] == [sum(w for _, w in pieces[:i]) for i in range(len(pieces))]
    assert sum(w for _, w in pieces) == n
    assert len(pieces) == -(-n // chunk)  # as few as the bound allows
    assert all(w <= chunk and w % 128 == 0 for _, w in pieces[:-1])
    assert pieces[-1][1] >= pieces[0][1] - 128 * (len(pieces) - 1)  # no narrow tail (18944: 6400, 6400, 6144)


def test_bad_prefix_is_refused():
    qweight, scales = packed(64, 128, 64)
    with pytest.raises(ValueError, match="does not fit"):
        dq.dequantize_prefix(qweight, scales, 64, 132, 64, DTYPES[0])
    with pytest.raises(ValueError, match="does not fit"):
        dq.dequantize_prefix(qweight, scales, 64, 128, 65, DTYPES[0])


@pytest.mark.skipif(DEV == "cuda", reason="the tensors are lazily mapped on the host only")
def test_a_prefix_past_2_31_elements_is_refused_not_launched(monkeypatch):
    """The dequant kernel indexes its output in int32: a whole 8192 x 262144 table at once wrapped."""
    k, n = 8192, 1 << 18
    qweight = torch.empty(k // 8, n, dtype=torch.int32)  # never read: lazily mapped
    scales = torch.empty(k // 128, n, dtype=torch.float16)

    def launched(*_, **__):
        raise AssertionError("launched a kernel whose int32 offsets wrap")

    monkeypatch.setattr(dq, "_dequant_kernel", type("K", (), {"__getitem__": lambda *_: launched})())
    with pytest.raises(ValueError, match="int32"):
        dq.dequantize_prefix(qweight, scales, 128, k, n, torch.float16)
