"""Fused (residual add +) RMSNorm and SiLU-mul kernels (interpreter on CPU) vs their torch references and modules."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from uniql.kernels.elementwise import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    group_rms_norm,
    group_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    silu_mul,
    silu_mul_reference,
)
from uniql.runtime.decoder import RMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 100), (5, 4096)])
def test_rms_norm_equals_the_module(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype)
    module = RMSNorm(shape[-1], 1e-5).to(DEVICE, dtype)
    module.weight.data = torch.rand(shape[-1], generator=gen).to(DEVICE, dtype) + 0.5
    want = rms_norm_reference(x, module.weight, 1e-5)
    torch.testing.assert_close(want, module(x), atol=0, rtol=0)  # the reference IS the module's math
    torch.testing.assert_close(rms_norm(x, module.weight, 1e-5), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 100), (2, 4096)])
def test_add_rms_norm_equals_add_then_norm(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    x, delta = ((torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(DEVICE, dtype)
    want_sum, want = add_rms_norm_reference(x, delta, weight, 1e-5)
    got_sum, got = add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)  # the residual stream is rounded like torch's add
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    assert got_sum.shape == x.shape and got.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (4, 2 * 40), (2, 1, 2 * 2500)])
def test_silu_mul_equals_reference(shape, dtype):
    gate_up = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype) * 4
    want = silu_mul_reference(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(want, F.silu(gate) * up)
    torch.testing.assert_close(silu_mul(gate_up), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "p", "groups"), [(8, 6, 2), (6, 16, 3), (4, 10, 1)])
def test_group_rms_norm_equals_the_mixers_torch_tail(heads, p, groups, dtype):
    """Mamba2's gated-norm tail (kept head dim p of a pruned rung, weight a longer rank-major prefix, strided g as
    the state-update kernel returns it) equals the mixer's torch ops, written rank-major."""
    from uniql.runtime.mamba import ElasticMamba

    gen = torch.Generator().manual_seed(3)
    g = (torch.randn(3, p, heads, generator=gen) * 2).to(DEVICE, dtype).transpose(1, 2)  # [B, H, p], strided
    weight = (torch.rand(heads * (p + 2), generator=gen) + 0.5).to(DEVICE, dtype)
    want = group_rms_norm_reference(g, weight, groups, 1e-5)
    mixer = type("M", (), {"norm_groups": groups, "heads": heads, "norm_eps": 1e-5, "norm_weight": weight})()
    torch.testing.assert_close(ElasticMamba.group_rms(mixer, g[:, None], p)[:, 0], want, atol=0, rtol=0)
    got = group_rms_norm(g, weight, groups, 1e-5)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    assert got.shape == (3, p * heads) and got.dtype == dtype


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        rms_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(torch.zeros(2, 8, device=DEVICE), torch.zeros(1, 8, device=DEVICE), torch.ones(8, device=DEVICE),
                     1e-6)


def test_norm_weights_must_be_one_contiguous_row():
    """The kernels read weight[col] at stride 1: a strided or 2-D weight is refused, not misread."""
    x = torch.randn(2, 16, device=DEVICE)
    strided = torch.rand(16, 2, device=DEVICE)[:, 0]
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x, strided, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        add_rms_norm(x, x, strided, 1e-6)
    with pytest.raises(ValueError, match="must match"):
        rms_norm(x, torch.ones(16, 1, device=DEVICE), 1e-6)
    torch.testing.assert_close(rms_norm(x, strided.contiguous(), 1e-6), rms_norm_reference(x, strided, 1e-6))
    g = torch.randn(2, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        group_rms_norm(g, torch.rand(12, 2, device=DEVICE)[:, 0], 2, 1e-6)
    with pytest.raises(ValueError, match="1-D weight"):
        group_rms_norm(g, torch.rand(12, 1, device=DEVICE), 2, 1e-6)


def _rows_past_int32(cols: int, rows: int = 3) -> torch.Tensor:
    """``[rows, cols]`` fp16 whose last row starts past element 2^31 (a strided view of a lazily mapped buffer:
    only the touched pages are ever allocated), as rows of a long prompt's activations would."""
    stride = (1 << 30) + 128
    try:
        big = torch.empty((rows - 1) * stride + cols, dtype=torch.float16)
    except RuntimeError:  # a host that does not overcommit memory
        pytest.skip("no 4 GiB of address space")
    view = big.as_strided((rows, cols), (stride, 1))
    view.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).half())
    return view


@pytest.mark.skipif(DEVICE == "cuda", reason="the 4 GiB view is for the interpreter; the GPU run needs real rows")
def test_row_offsets_past_int32_do_not_wrap():
    """Row * stride in int32 wrapped to a negative offset (a segfault / illegal address before the fix)."""
    gate_up = _rows_past_int32(2 * 64)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_reference(gate_up), atol=2e-3, rtol=2e-3)
    x = _rows_past_int32(96)
    weight = torch.rand(96, dtype=torch.float16) + 0.5
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), atol=2e-3,
                               rtol=2e-3)


def test_add_rms_norm_refuses_a_delta_on_another_device():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="device"):
        add_rms_norm(x, torch.empty(2, 64, device="meta"), torch.ones(64, device=DEVICE), 1e-5)
