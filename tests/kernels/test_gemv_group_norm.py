"""The decode GEMV finishing a group RMSNorm (Mamba2's gated norm, ``kernels/gemv_norm.py``): x holds g * w in
the rank-major layout, the sums come per head group in parts; each input is scaled by its group's 1 / rms."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16


def _group_case(heads: int, groups: int, p: int, parts: int, n: int = 40, seed: int = 0):
    """g [heads, p] (fp32), its rank-major g * w, per-group sums of g^2 split into ``parts`` unequal partials."""
    gen = torch.Generator().manual_seed(seed)
    group_of = torch.arange(heads) // (heads // groups)  # groups 1.6x apart: a wrong group's scale shows
    g = torch.randn(heads, p, generator=gen) * (torch.linspace(0.5, 4.0, heads) * 1.6 ** group_of)[:, None]
    w = torch.rand(p * heads, generator=gen) + 0.5
    gw = (g.T.reshape(-1) * w).to(DTYPE)  # flat c * heads + h
    group_ss = (g ** 2).view(groups, -1).sum(1)
    shares = torch.rand(groups, parts, generator=gen)
    sums = (group_ss[:, None] * shares / shares.sum(1, keepdim=True)).reshape(1, groups * parts)
    qweight, scales = rtn_quantize(torch.randn(n, p * heads, generator=gen), 32)
    rstd = torch.rsqrt(group_ss / (heads // groups * p) + 1e-5)
    x_ref = gw.float() * rstd.repeat_interleave(heads // groups).repeat(p)  # each flat channel's group
    want = im.int4_matmul_reference(x_ref[None], qweight, scales, 32)
    return gw[None].to(DEV), sums.to(DEV), qweight.to(DEV), scales.to(DEV), want.to(DEV)


@pytest.mark.parametrize(("heads", "groups", "p", "parts"),
                         [(16, 2, 6, 3), (32, 4, 8, 5), (8, 1, 12, 1), (64, 8, 4, 2)])
def test_gemv_finishes_a_group_norm(heads, groups, p, parts):
    gw, sums, qweight, scales, want = _group_case(heads, groups, p, parts)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=2, num_warps=4, block_m=1)
    out = im.int4_matmul(gw, qweight, scales, 32, config=cfg, norm=(sums, 1e-5, heads, groups, heads // groups * p))
    err = (out.float() - want).abs().max() / want.abs().max()
    assert err < 2e-2, err
    plain = im.int4_matmul(gw, qweight, scales, 32, config=cfg)  # the scales really applied
    assert (plain.float() - want).abs().max() / want.abs().max() > 10 * err


def test_group_norm_needs_one_row_and_whole_packed_rows_a_group():
    gw, sums, qweight, scales, _ = _group_case(16, 2, 6, 3)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=1, num_warps=4, block_m=4)
    with pytest.raises(ValueError, match="group norm in the GEMV"):
        im.int4_matmul(gw.expand(2, -1), qweight, scales, 32, config=cfg, norm=(sums, 1e-5, 16, 2, 48))
    with pytest.raises(ValueError, match="group norm in the GEMV"):  # 4 heads a group: a packed row spans two
        im.int4_matmul(gw, qweight, scales, 32, config=cfg, norm=(sums[:, :4].contiguous(), 1e-5, 16, 4, 24))
    with pytest.raises(ValueError, match="1-8 groups"):  # the kernel picks among at most 8 group scales
        im.int4_matmul(gw, qweight, scales, 32, config=cfg, norm=(torch.ones_like(sums[:, :2]).repeat(1, 8), 1e-5,
                                                                  128, 16, 48))
