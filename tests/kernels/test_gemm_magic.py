"""The tensor-core GEMM's code-to-half trick (``_gemm_kernel``'s MAGIC): codes OR-ed into the bits of 1024.0 (fp16)
or 128.0 (bf16), the zero point taken out of the fp32 tile after the dot. Against the torch reference and the
int-to-float path it replaces (CPU: the Triton interpreter, fp16; GPU: bf16 too)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_config import gemm_magic  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_the_trick_is_chosen_for_half_activations_within_one_scale_row(monkeypatch):
    assert gemm_magic(torch.bfloat16, 64, 128) == 0x4300 and gemm_magic(torch.float16, 128, 128) == 0x6400
    assert gemm_magic(torch.float32, 64, 128) == 0  # fp32 activations keep the exact int-to-float path
    assert gemm_magic(torch.float16, 64, 32) == 0  # a tile spanning two scale rows
    monkeypatch.setenv("UNIQL_GEMM_MAGIC", "0")
    assert gemm_magic(torch.bfloat16, 64, 128) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "split", "group"), [(5, 1, 64), (16, 3, 128), (11, 2, 64), (23, 1, 128)])
def test_magic_gemm_matches_the_reference_and_the_converting_path(monkeypatch, dtype, m, split, group):
    g = torch.Generator().manual_seed(m)
    qweight, scales = rtn_quantize(torch.randn(150, 384, generator=g), group)
    qweight, scales = qweight.to(DEV), scales.to(DEV)
    x = (3 * torch.randn(m, 376, generator=g)).to(DEV, dtype)  # K ends inside a tile (and a group)
    bias = torch.randn(70, generator=g).to(DEV)
    segs = [(0, 37), (64, 33)]  # two output segments, widths not multiples of the block
    cfg = im.Int4Config("gemm", block_n=32, block_k=64, split_k=split, num_warps=4, block_m=16)
    ref = im.int4_matmul_reference(x, qweight, scales, group, k=376, bias=bias, segments=segs)
    magic = im.int4_matmul(x, qweight, scales, group, k=376, bias=bias, segments=segs, config=cfg)
    monkeypatch.setenv("UNIQL_GEMM_MAGIC", "0")
    converted = im.int4_matmul(x, qweight, scales, group, k=376, bias=bias, segments=segs, config=cfg)
    limit = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert _rel(magic, ref) < limit and _rel(converted, ref) < limit
    # products of exact integer codes, the scale in fp32 after the dot: no less accurate than rounding each
    # dequantized weight to the activation dtype first
    assert (magic.double() - ref.double()).abs().mean() <= 1.5 * (converted.double() - ref.double()).abs().mean()
