"""The CPU backend's INT4 GEMM (aten's CPU int4 kernel over our codes) against the dequantized reference, on the
prefixes rungs take: N not a multiple of its row block, K ending inside a group, stored K prefixes."""

from __future__ import annotations

import pytest
import torch

from uniql.kernels import int4_cpu
from uniql.kernels.int4_format import rtn_quantize

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 GEMM")


def _weight(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(n, k, generator=g), group)


@pytest.mark.parametrize("n_stored, k_stored, group", [(320, 256, 64), (200, 192, 32), (136, 384, 128)])
@pytest.mark.parametrize("rows", [1, 3, 35])
def test_every_prefix_matches_the_dequantized_reference(n_stored, k_stored, group, rows):
    qweight, scales = _weight(n_stored, k_stored, group)
    bias = torch.randn(n_stored)
    layer = int4_cpu.CpuInt4(qweight, scales, group)
    for n, k in [(n_stored, k_stored), (64, k_stored), (n_stored - 8, k_stored), (72, k_stored - group),
                 (n_stored, k_stored - 8), (8, 8)]:  # N below / between row blocks, K inside a group
        x = torch.randn(rows, k)
        got = layer(x, n=n, k=k, bias=bias)
        want = int4_cpu.reference(x, qweight, scales, group, n=n, k=k, bias=bias[:n])
        assert got.shape == (rows, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_stored_k_prefix_that_ends_inside_a_group_is_padded_with_zero_weights():
    qweight, scales = _weight(128, 256, 64)
    cut_q, cut_s = qweight[:200 // 8].clone(), scales[:4].clone()  # a residency release to k = 200
    layer = int4_cpu.CpuInt4(cut_q, cut_s, 64)
    assert (layer.k, layer.k_padded) == (200, 256)
    assert sum(t.nbytes for t in layer.tensors()) == int4_cpu.CpuInt4.bytes_for(128, 200, 64, torch.float32)
    x = torch.randn(2, 200)
    torch.testing.assert_close(layer(x), int4_cpu.reference(x, qweight, scales, 64, k=200), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_keep_their_dtype_and_stay_close(dtype):
    qweight, scales = _weight(192, 128, 32)
    layer = int4_cpu.CpuInt4(qweight, scales, 32, dtype=dtype)
    x = torch.randn(4, 128).to(dtype)
    got = layer(x, n=100)
    want = int4_cpu.reference(x.float(), qweight, scales, 32, n=100)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_row_is_computed_on_its_own_whatever_the_batch(dtype):
    """What the engine relies on to keep a request's tokens independent of its decode batch (host_forms)."""
    qweight, scales = _weight(320, 256, 64, seed=3)
    layer = int4_cpu.CpuInt4(qweight, scales, 64, dtype=dtype)
    x = torch.randn(33, 256).to(dtype)
    alone = torch.cat([layer(x[i:i + 1], n=200) for i in range(33)])
    for batch in (2, 7, 8, 16, 33):
        assert torch.equal(layer(x[:batch], n=200), alone[:batch])


def test_bad_prefixes_and_dtypes_say_what_is_wrong():
    qweight, scales = _weight(64, 64, 32)
    layer = int4_cpu.CpuInt4(qweight, scales, 32)
    with pytest.raises(ValueError, match="prefix"):
        layer(torch.randn(1, 64), n=65)
    with pytest.raises(ValueError, match="prefix"):
        layer(torch.randn(1, 64), k=32)  # x is wider than the k it claims
    with pytest.raises(ValueError, match="activations"):
        int4_cpu.CpuInt4(qweight, scales, 32, dtype=torch.float64)
