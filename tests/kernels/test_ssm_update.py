"""Selective state update: the Triton kernel (interpreter on CPU) equals the torch reference on pruned, awkward
shapes (P', N' not powers of two, G < H, strided rank-major x/B/C), for one state tensor and for per-request
states through an address table; the reference equals the Mamba2 recurrence written out by hand."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from uniql.kernels import ops  # noqa: E402
from uniql.kernels.ssm_update import selective_state_update, selective_state_update_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

CASES = [  # batch, heads, groups, P', N'
    (1, 4, 1, 16, 16),
    (3, 6, 2, 6, 24),  # P' and N' not powers of two, 3 heads per group
    (2, 8, 8, 10, 48),  # one head per group
    (2, 4, 2, 40, 7),  # N' below 16 (padded tile), P' split over tiles
]


def _inputs(batch, heads, groups, p, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    # x, z and B/C as the runtime hands them over: views of rank-major / state-major flat channels
    x = rand(batch, p * heads).to(dtype).view(batch, p, heads).transpose(1, 2)
    z = rand(batch, p * heads).to(dtype).view(batch, p, heads).transpose(1, 2)
    bc = rand(batch, 2 * n * groups).to(dtype)
    B = bc[:, :n * groups].view(batch, n, groups).transpose(1, 2)
    C = bc[:, n * groups:].view(batch, n, groups).transpose(1, 2)
    dt = rand(batch, heads).to(dtype)
    A = -torch.rand(heads, generator=gen).to(DEVICE) * 4 - 0.1
    D = rand(heads)
    dt_bias = rand(heads, scale=0.5)
    state = rand(batch, heads, p, n)
    return state, x, dt, A, B, C, D, z, dt_bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(case, dtype):
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(*case, dtype)
    ref_state = state.clone()
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.01, 2.0))
    want = selective_state_update_reference(ref_state, x, dt, A, B, C, **kw)
    got = selective_state_update(state, x, dt, A, B, C, **kw)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


def test_kernel_bare_step_and_strided_state():
    """No D / z / bias / softplus (the runtime passes dt already activated), state a strided view."""
    state, x, dt, A, B, C, *_ = _inputs(2, 6, 3, 12, 20, torch.float32, seed=1)
    dt = F.softplus(dt)
    big = torch.zeros(2, 6, 12, 32, device=DEVICE)
    big[..., :20] = state
    view = big[..., :20]  # stride over N' is 1 but rows are 32 apart
    want = selective_state_update_reference(state, x, dt, A, B, C)
    got = selective_state_update(view, x, dt, A, B, C)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view, state, atol=1e-5, rtol=1e-5)
    assert torch.all(big[..., 20:] == 0)  # nothing written outside the view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_address_table_updates_each_requests_own_state(dtype):
    batch, heads, groups, p, n = 3, 4, 2, 6, 24
    states, x, dt, A, B, C, D, z, dt_bias = _inputs(batch, heads, groups, p, n, dtype, seed=2)
    own = [states[i:i + 1].clone() for i in range(batch)]  # [1, H, P', N'] each, separate allocations
    table = torch.tensor([t.data_ptr() for t in own], dtype=torch.int64, device=DEVICE)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    ref_list = [t.clone() for t in own]
    want = selective_state_update_reference(ref_list, x, dt, A, B, C, **kw)
    got = selective_state_update(table, x, dt, A, B, C, **kw)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for mine, ref in zip(own, ref_list, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_reference_equals_the_recurrence_written_out():
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(2, 4, 2, 3, 5, torch.float32, seed=3)
    expected_state = state.clone()
    ys = torch.empty(2, 4, 3)
    for b in range(2):
        for h in range(4):
            g = h // 2
            step = F.softplus(dt[b, h] + dt_bias[h])
            expected_state[b, h] = state[b, h] * torch.exp(step * A[h]) + step * torch.outer(x[b, h], B[b, g])
            ys[b, h] = (expected_state[b, h] @ C[b, g] + D[h] * x[b, h]) * F.silu(z[b, h])
    y = selective_state_update_reference(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(y, ys.to(DEVICE), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-5)


def test_custom_op_dispatches_and_mutates_state():
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(2, 4, 2, 6, 16, torch.float32, seed=4)
    ref_state = state.clone()
    want = selective_state_update_reference(ref_state, x, dt, A, B, C, D=D, dt_softplus=True)
    got = torch.ops.uniql.ssm_state_update(state, x, dt, A, B, C, D, None, None, True, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    again = ops.ssm_state_update(state.clone(), x, dt, A, B, C, D=D, dt_softplus=True)
    assert again.shape == x.shape


def test_bad_inputs_are_refused():
    state, x, dt, A, B, C, *_ = _inputs(2, 4, 2, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        selective_state_update(state.half(), x, dt, A, B, C)
    with pytest.raises(ValueError, match="multiple of G"):
        selective_state_update(state, x, dt, A, B[:, :1].expand(2, 3, 16), C[:, :1].expand(2, 3, 16))
    with pytest.raises(ValueError, match="address table"):
        selective_state_update(torch.zeros(3, dtype=torch.int64, device=DEVICE), x, dt, A, B, C)
    with pytest.raises(ValueError, match=r"dt \[batch, H\]"):
        selective_state_update(state, x, dt[:, :3], A, B, C)


def test_reference_refuses_what_the_kernel_refuses():
    """The reference (the CPU backend of ``ops.ssm_state_update``) broadcast a ``dt [batch, 1]`` or ``A [1]``
    the kernel refuses, and took a list of states of the wrong size."""
    state, x, dt, A, B, C, D, *_ = _inputs(2, 4, 2, 6, 16, torch.float32)
    with pytest.raises(ValueError, match=r"dt \[batch, H\]"):
        selective_state_update_reference(state.clone(), x, dt[:, :1], A, B, C)
    with pytest.raises(ValueError, match=r"dt \[batch, H\]"):
        ops.ssm_state_update(state.clone(), x, dt, A[:1], B, C)
    with pytest.raises(ValueError, match="D must be"):
        selective_state_update_reference(state.clone(), x, dt, A, B, C, D=D[:1])
    with pytest.raises(ValueError, match="list of states"):
        selective_state_update_reference([s[:, :3].clone() for s in state], x, dt, A, B, C)
    with pytest.raises(ValueError, match="list of states"):
        selective_state_update_reference([state[0].clone()], x, dt, A, B, C)


def test_default_launch_config_is_the_measured_one(monkeypatch):
    """Mamba2-8B at rates 0 and 0.35 (P', N' = 64, 128 and 42, 80): 8 head channels a program, 2 warps, the
    configuration that won the H100 engine A/B (UNIQL_SSM_BLOCK_P=8 there); small states keep bigger tiles."""
    from uniql.kernels import ssm_update

    monkeypatch.delenv("UNIQL_SSM_BLOCK_P", raising=False)
    assert ssm_update.launch_config(64, 128) == (8, 128, 2)
    assert ssm_update.launch_config(42, 80) == (8, 128, 2)
    assert ssm_update.launch_config(64, 16) == (64, 16, 2)
    assert ssm_update.launch_config(64, 64) == (16, 64, 2)


@pytest.mark.parametrize("cap", ["2", "3"])
def test_block_p_cap_splits_heads_and_gives_the_same_result(monkeypatch, cap):
    """UNIQL_SSM_BLOCK_P (an engine A/B switch) caps the head channels a program owns (rounded up to a power of
    two): more programs a head, the same state and output."""
    from uniql.kernels import ssm_update

    case = (2, 4, 2, 10, 24)
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(*case, torch.float32)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    want_state = state.clone()
    want = selective_state_update(want_state, x, dt, A, B, C, **kw)
    monkeypatch.setenv("UNIQL_SSM_BLOCK_P", cap)
    assert ssm_update.launch_config(10, 24)[0] == {"2": 2, "3": 4}[cap]
    got = selective_state_update(state, x, dt, A, B, C, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, want_state, atol=1e-6, rtol=1e-6)
    for bad in ("eight", "0", "\u00b2"):
        monkeypatch.setenv("UNIQL_SSM_BLOCK_P", bad)
        with pytest.raises(ValueError, match="UNIQL_SSM_BLOCK_P must be a positive integer"):
            ssm_update.launch_config(10, 24)
