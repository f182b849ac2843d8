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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("segments", "col0", "width"), [
    ([(0, 300), (320, 256)], 0, 556),  # both whole
    ([(0, 300), (320, 256)], 256, 128),  # a chunk across the boundary
    ([(5, 37), (64, 70), (200, 3), (300, 90), (500, 100)], 20, 280),  # five narrow, unaligned segments
    ([(0, 96), (96, 32), (128, 32)], 96, 64),  # q|k|v side by side, a chunk of k and v
])
def test_columns_across_segments_are_exact(dtype, segments, col0, width):
    """One launch dequantizes columns of several segments' prefixes, as they lie side by side in the output."""
    qweight, scales = packed(640, 128, 64)
    got = dq.dequantize_columns(qweight, scales, 64, 120, segments, col0, width, dtype)
    ref = torch.cat([dq.dequantize_prefix_reference(qweight[:, a:], scales[:, a:], 64, 120, n, dtype)
                     for a, n in segments], dim=1)[:, col0:col0 + width]
    assert torch.equal(got, ref)


def test_chunk_budget_grows_with_the_device_within_bounds(monkeypatch):
    assert dq.chunk_budget(torch.device("cpu")) == dq.CHUNK_ELEMENTS
    for total, want in [(8 << 30, dq.CHUNK_ELEMENTS), (48 << 30, 96 << 20), (80 << 30, dq.MAX_CHUNK_ELEMENTS)]:
        asked = []
        props = type("P", (), {"total_memory": total})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, p=props, log=asked: log.append(d) or p)
        dq._auto_chunk.cache_clear()  # another "device" each round
        assert dq.chunk_budget(torch.device("cuda")) == dq.chunk_budget(torch.device("cuda")) == want
        assert len(asked) == 1  # looked up once, not once a linear
    dq._auto_chunk.cache_clear()  # no stand-in device's budget left behind


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
    with pytest.raises(ValueError, match="do not fit"):
        dq.dequantize_prefix(qweight, scales, 64, 132, 64, DTYPES[0])
    with pytest.raises(ValueError, match="do not fit"):
        dq.dequantize_prefix(qweight, scales, 64, 128, 65, DTYPES[0])
    with pytest.raises(ValueError, match="do not fit"):  # six segments
        dq.dequantize_columns(qweight, scales, 64, 128, [(i, 1) for i in range(6)], 0, 6, DTYPES[0])
    with pytest.raises(ValueError, match="outside"):
        dq.dequantize_columns(qweight, scales, 64, 128, [(0, 30), (32, 30)], 40, 30, DTYPES[0])


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


@pytest.mark.parametrize("value", ["32", "64", "128"])
def test_the_switch_fixes_the_chunk(value, monkeypatch):
    monkeypatch.setenv("UNIQL_DEQUANT_CHUNK", value)
    assert dq.chunk_budget(torch.device("cpu")) == int(value) << 20
