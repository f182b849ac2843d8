"""``UNIQL_GLU_PAIRED``: the decode GEMV of a fused gate|up with one program per channel block holding both factors
(``int4_tiles._columns`` / ``_glu_tile``) must give the bits of the pair epilogue (``_glu_pair``), which two
programs finish through a counter and a reload."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_diff

triton = pytest.importorskip("triton")

from uniql.kernels import int4_gemv  # noqa: E402
from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402
from uniql.kernels.pdl import glu_gemv_preload  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


class _Spy:
    """Runs the real kernel and records each launch's grid, GLU mode and preload depth."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, kwargs["GLU"], kwargs["PRELOAD"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rows", [1, 3])
def test_paired_glu_gives_the_bits_of_the_pair_epilogue(monkeypatch, rows, split, norm):
    """gate and up stored apart ([gate 100 | pad 12 | up 100]), a rung keeping 90 of each (the last 16-channel half
    block partial), a bias, split K, the RMSNorm scale: both modes write the same act and the same gate|up (the
    kernel still stores it), both right against the torch reference, and leave every counter at zero."""
    gen = torch.Generator().manual_seed(11)
    dtype = torch.bfloat16 if CUDA else torch.float16
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(212, 256, generator=gen), 32))
    x = torch.randn(rows, 248, generator=gen).to(DEV, dtype)
    bias = torch.randn(180, generator=gen).to(DEV)
    segments = [(0, 90), (112, 90)]
    sums = (torch.rand(rows, 2, generator=gen) * 248 + 1).to(DEV) if norm else None
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=split, num_warps=4, block_m=4 if rows > 1 else 1)
    spy = _Spy(int4_gemv._gemv_h2_kernel)
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", spy)
    acts = []
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIQL_GLU_PAIRED", flag)
        acts.append(im.int4_glu(x, qweight, scales, 32, segments, k=248, bias=bias, config=cfg,
                                norm=(sums, 1e-5) if norm else None))
        _, counters = im.workspace(x.device, 0, 0)
        assert int(counters.abs().sum()) == 0  # tile (and pair) counters back at zero for the next replay
    assert [glu for _, glu, _ in spy.calls] == [1, 2]
    assert spy.calls[1][0][0] == 6  # ceil(90 / 16) programs of 16 gate + 16 up channels (unpaired: 3 + 3)
    assert torch.equal(acts[0], acts[1])
    # the gate|up tile a paired program stores (and rounds its factors by) is the plain projection's, bit for bit
    gate_up = torch.full((rows, 180), float("nan"), device=DEV, dtype=dtype)
    act = torch.empty(rows, 90, device=DEV, dtype=dtype)
    im._launch(cfg, x, qweight, scales, 32, 248, segments, bias, gate_up, act, norm=(sums, 1e-5) if norm else None,
               paired=True)
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", spy.kernel)
    plain = im.int4_matmul(x, qweight, scales, 32, k=248, segments=segments, bias=bias, config=cfg,
                           norm=(sums, 1e-5) if norm else None)
    assert torch.equal(gate_up, plain) and torch.equal(act, acts[1])
    xs = x.float() * torch.rsqrt(sums.sum(1, keepdim=True) / 248 + 1e-5) if norm else x.float()
    ref = im.int4_matmul_reference(xs, qweight, scales, 32, k=248, segments=segments, bias=bias).float()
    assert max_rel_diff(acts[1], torch.nn.functional.silu(ref[:, :90]) * ref[:, 90:]) < 2e-2


def test_paired_glu_is_refused_by_typo(monkeypatch):
    monkeypatch.setenv("UNIQL_GLU_PAIRED", "yes")
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(64, 64), 32))
    with pytest.raises(ValueError, match="UNIQL_GLU_PAIRED"):
        im.int4_glu(torch.randn(1, 64, device=DEV).half(), qweight, scales, 32, [(0, 32), (32, 32)])


def test_paired_glu_preload_cap_sets_the_launch_and_its_plan(monkeypatch):
    """UNIQL_GLU_PRELOAD caps the paired launch's preload (the PRELOAD constexpr it gets) without touching other
    GEMVs', and its wave plan follows: 7 programs an SM at 256 columns with the preload (70 registers), 8 without
    (56, as unpaired). Same bits either way."""
    from uniql.kernels import int4_config

    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(128, 256), 32))
    x = torch.randn(1, 256).to(DEV, torch.bfloat16 if CUDA else torch.float16)
    spy = _Spy(int4_gemv._gemv_h2_kernel)
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", spy)
    acts = []
    for cap in ("1", "0"):
        monkeypatch.setenv("UNIQL_GLU_PRELOAD", cap)
        acts.append(im.int4_glu(x, qweight, scales, 32, [(0, 64), (64, 64)]))
        im.int4_matmul(x, qweight, scales, 32)  # an ordinary GEMV keeps UNIQL_GEMV_PRELOAD's
    assert [(glu, preload) for _, glu, preload in spy.calls] == [(2, 1), (0, 1), (2, 0), (0, 1)]
    assert torch.equal(acts[0], acts[1])

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.setenv("UNIQL_GEMV_PIPE", "rows")  # the one-row loop without the look-ahead (72 registers with it: 7)
    n = 9344  # Llama-8B's gate|up at rate 0.35: 73 blocks of 256
    for cap, per_sm in (("1", 7), ("0", 8)):
        monkeypatch.setenv("UNIQL_GLU_PRELOAD", cap)
        with glu_gemv_preload():
            assert int4_config._programs_per_sm(256, True, paired=True) == per_sm
        assert int4_config._programs_per_sm(256, True, paired=True) == 7  # outside the scope: the global preload
    with glu_gemv_preload():
        cfg = im.pick_config(1, 2 * n, 4096, 128, "cuda", widths=(2 * n,), paired=True)
    assert cfg.block_n == 256 and -(-2 * n // 256) * int4_config.launch_split(64, cfg.split_k)[0] <= 8 * 132
