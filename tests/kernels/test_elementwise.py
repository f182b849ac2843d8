"""Fused RMSNorm and SiLU-mul kernels (interpreter on CPU) against their torch references and the modules."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from uniql.kernels.elementwise import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference  # noqa: E402
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
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (4, 2 * 40), (2, 1, 2 * 2500)])
def test_silu_mul_equals_reference(shape, dtype):
    gate_up = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype) * 4
    want = silu_mul_reference(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(want, F.silu(gate) * up)
    torch.testing.assert_close(silu_mul(gate_up), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        rms_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), 1e-6)
