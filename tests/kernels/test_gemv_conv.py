"""The decode GEMV's causal-conv epilogue (``kernels/gemv_conv.py``): Mamba2's z|x|B|C|dt in-projection also runs
the conv step on its x / B / C columns. Against the same GEMV without it followed by ``conv_update`` (the unfused
step): the same projection, the same activated conv (bit for bit: the same fp32 arithmetic on the same stored
values) and each request's state shifted the same way; bad arguments are refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.conv_update import causal_conv1d_update  # noqa: E402
from uniql.kernels.gemv_conv import ConvStep  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16


def _case(widths, batch: int, width: int, seed: int, state_dtype, bias: bool, k: int = 64):
    """A fused z|x|B|C|dt weight (each member stored wider than kept), activations, per-request conv states."""
    gen = torch.Generator().manual_seed(seed)
    stored = [w + 8 for w in widths]
    qweight, scales = rtn_quantize(torch.randn(sum(stored), k, generator=gen), 32)
    starts = [sum(stored[:i]) for i in range(len(stored))]
    segments = list(zip(starts, widths, strict=True))
    conv_w = [(torch.randn(w + 3, width, generator=gen) * 0.5)[:w] for w in widths[1:4]]  # kept prefixes
    conv_b = [torch.randn(w + 3, generator=gen)[:w] for w in widths[1:4]] if bias else None
    x = torch.randn(batch, k, generator=gen)
    ch = sum(widths[1:4])
    states = [torch.randn(1, ch, width - 1, generator=gen).to(DEV, state_dtype) for _ in range(batch)]
    move = [t.to(DEV) for t in conv_w], None if conv_b is None else [t.to(DEV) for t in conv_b]
    return (qweight.to(DEV), scales.to(DEV), segments, x.to(DEV, DTYPE), *move, states)


@pytest.mark.parametrize(("widths", "batch", "width", "state_dtype", "bias"), [
    ((48, 48, 32, 32, 6), 1, 4, torch.float32, True),  # Mamba2-like, aligned widths
    ((20, 20, 12, 12, 5), 1, 4, DTYPE, False),  # odd widths: the x / B / C tiles straddle segment ends
    ((24, 24, 16, 16, 3), 3, 3, torch.float32, True),  # three requests, each its own state
])
def test_epilogue_equals_gemv_then_conv_update(widths, batch, width, state_dtype, bias):
    cfg = im.Int4Config("gemv", block_n=16, block_k=32, split_k=2, num_warps=4, block_m=4 if batch > 1 else 1)
    _check_epilogue(_case(widths, batch, width, 7, state_dtype, bias), widths, cfg)


@pytest.mark.parametrize("block_n", [128, 256])
def test_epilogue_at_the_decode_block_widths(block_n):
    """The column blocks the decode step launches (UNIQL_WIDE_COLS=auto: 128 on Mamba2-8B's in-projection at rate
    0.35, else 256), compiled at those widths on a GPU: each segment's last block part-filled, a split K."""
    widths = (200, 200, 40, 40, 8)
    cfg = im.Int4Config("gemv", block_n=block_n, block_k=32, split_k=3, num_warps=4, block_m=1)
    _check_epilogue(_case(widths, 1, 4, 11, torch.float32, True, k=192), widths, cfg)


@pytest.mark.skipif(DEV != "cuda", reason="the real shape: too slow for the interpreter")
@pytest.mark.parametrize("cols", ["auto", "256"])
def test_epilogue_at_mamba2_8b_rate_035(monkeypatch, cols):
    """Mamba2-8B's z|x|B|C|dt at rate 0.35 with the launch config the engine picks (auto: 128 columns)."""
    monkeypatch.setenv("UNIQL_WIDE_COLS", cols)
    widths = (5376, 5376, 640, 640, 128)
    _check_epilogue(_case(widths, 1, 4, 5, torch.float32, True, k=4096), widths, None)


def _check_epilogue(case, widths, cfg) -> None:
    qweight, scales, segments, x, conv_w, conv_b, states = case
    batch, state_dtype = x.shape[0], states[0].dtype
    theirs = [s.clone() for s in states]
    table = torch.tensor([s.data_ptr() for s in theirs], dtype=torch.int64, device=DEV)
    plain = im.int4_matmul(x, qweight, scales, 32, segments=segments, config=cfg)
    z, xbc = widths[0], sum(widths[1:4])
    want = causal_conv1d_update(plain[:, z:z + xbc], table, conv_w, conv_b, "silu", state_dtype=state_dtype)

    mine = torch.tensor([s.data_ptr() for s in states], dtype=torch.int64, device=DEV)
    out = torch.full((batch, xbc), float("nan"), dtype=x.dtype, device=DEV)
    conv = ConvStep(mine, tuple(conv_w), None if conv_b is None else tuple(conv_b), "silu", state_dtype, out)
    got = im.int4_matmul(x, qweight, scales, 32, segments=segments, config=cfg, conv=conv)
    assert torch.equal(got, plain)  # the projection itself is untouched
    if DEV == "cpu":  # the interpreter: the same fp32 arithmetic in the same order
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    for s, t in zip(states, theirs, strict=True):
        assert torch.equal(s, t)  # shifted the same way, x appended as stored


def test_bad_conv_arguments_are_refused():
    qweight, scales, segments, x, conv_w, conv_b, states = _case((20, 20, 12, 12, 5), 1, 4, 7, torch.float32, True)
    table = torch.tensor([states[0].data_ptr()], dtype=torch.int64, device=DEV)
    out = torch.empty(1, 44, dtype=x.dtype, device=DEV)
    cfg = im.Int4Config("gemv", block_n=16, block_k=32, split_k=1, num_warps=4, block_m=1)

    def call(**change):
        fields = dict(table=table, weights=tuple(conv_w), biases=tuple(conv_b), activation="silu",
                      state_dtype=torch.float32, out=out)
        fields.update(change)
        return im.int4_matmul(x, qweight, scales, 32, segments=segments, config=cfg, conv=ConvStep(**fields))

    with pytest.raises(ValueError, match="segments z \\| x \\| B \\| C"):
        call(weights=(conv_w[0], conv_w[2], conv_w[1][:12]) if conv_w[1].shape[0] != 12 else (conv_w[1],) * 3)
    with pytest.raises(ValueError, match="int64 table"):
        call(table=table.to(torch.int32))
    with pytest.raises(ValueError, match="conv out must be"):
        call(out=out[:, :40])
    with pytest.raises(ValueError, match="activation"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="half2 GEMV only"):
        im.int4_matmul(x.float(), qweight, scales, 32, segments=segments, config=cfg,
                       conv=ConvStep(table, tuple(conv_w), tuple(conv_b), "silu", torch.float32, out.float()))
