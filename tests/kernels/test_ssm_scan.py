"""The SSD chunked scan equals the sequential recurrence (outputs and final state), for lengths that are not a
multiple of the chunk, with an initial state, G < H, pruned P'/N' and strided rank-major x; and chaining two
chunked prefills equals one (the final state carries everything); one scan step equals the decode update."""

import pytest
import torch

from uniql.kernels.ssm_scan import chunked_scan, sequential_scan_reference
from uniql.kernels.ssm_update import selective_state_update_reference

CASES = [  # b, T, H, G, P', N', chunk
    (1, 1, 2, 1, 4, 16, 8),
    (2, 37, 6, 2, 6, 24, 8),  # T not a multiple of the chunk, 3 heads per group
    (1, 64, 4, 4, 10, 16, 16),  # T a multiple of the chunk
    (2, 20, 8, 1, 2, 48, 64),  # one chunk longer than T
]


def _inputs(b, t, heads, groups, p, n, seed=0, initial=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, p * heads, generator=gen).view(b, t, p, heads).transpose(2, 3)  # rank-major channels
    dt = torch.nn.functional.softplus(torch.randn(b, t, heads, generator=gen) - 1)
    A = -torch.rand(heads, generator=gen) * 3 - 0.05
    B = torch.randn(b, t, n * groups, generator=gen).view(b, t, n, groups).transpose(2, 3)
    C = torch.randn(b, t, n * groups, generator=gen).view(b, t, n, groups).transpose(2, 3)
    state = torch.randn(b, heads, p, n, generator=gen) if initial else None
    D = torch.randn(heads, generator=gen)
    return x, dt, A, B, C, state, D


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_equals_sequential(case, initial):
    *dims, chunk = case
    x, dt, A, B, C, state, D = _inputs(*dims, initial=initial)
    y, final = chunked_scan(x, dt, A, B, C, chunk, state, D)
    y_ref, final_ref = sequential_scan_reference(x, dt, A, B, C, state, D)
    assert y.shape == x.shape and final.shape == (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    scale = y_ref.abs().max()
    torch.testing.assert_close(y, y_ref, atol=2e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=2e-5 * final_ref.abs().max(), rtol=1e-4)


def test_two_prefills_chain_through_the_state():
    x, dt, A, B, C, state, D = _inputs(2, 45, 4, 2, 6, 16, seed=1)
    y_all, final_all = chunked_scan(x, dt, A, B, C, 16, state)
    y1, mid = chunked_scan(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], 16, state)
    y2, final = chunked_scan(x[:, 19:], dt[:, 19:], A, B[:, 19:], C[:, 19:], 16, mid)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y_all, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_all, atol=1e-4, rtol=1e-4)


def test_one_step_equals_the_decode_update():
    x, dt, A, B, C, state, D = _inputs(3, 1, 4, 2, 6, 16, seed=2)
    y, final = chunked_scan(x, dt, A, B, C, 8, state, D)
    step_state = state.clone()
    y_step = selective_state_update_reference(step_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D)
    torch.testing.assert_close(y[:, 0], y_step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, step_state, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    x, dt, A, B, C, state, _ = _inputs(1, 5, 4, 2, 6, 16)
    with pytest.raises(ValueError, match="multiple of G"):
        chunked_scan(x, dt, A, B[:, :, :1].expand(1, 5, 3, 16), C[:, :, :1].expand(1, 5, 3, 16), 4)
    with pytest.raises(ValueError, match="initial state"):
        chunked_scan(x, dt, A, B, C, 4, state[..., :8])


def test_chunk_local_states_are_each_chunks_own_scan():
    x, dt, A, B, C, _, _ = _inputs(2, 21, 4, 2, 6, 16, seed=5)
    from uniql.kernels.ssm_scan import chunk_local_states

    local = chunk_local_states(x, dt, A, B, 8)
    assert local.shape == (2, 3, 4, 6, 16)
    for c, (lo, hi) in enumerate([(0, 8), (8, 16), (16, 21)]):
        _, want = sequential_scan_reference(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi])
        torch.testing.assert_close(local[:, c], want, atol=1e-5, rtol=1e-5)


def test_fast_decay_over_a_long_chunk_stays_accurate():
    """dt*A ~ -10 a step over 256-step chunks: cumsums reach -2600, where differences of fp32 sums would lose
    ~3e-4 in every exponent; the scan sums each span on its own."""
    x, dt, A, B, C, state, D = _inputs(1, 300, 2, 1, 4, 16, seed=6)
    dt = dt * 0 + 1.25
    A = torch.tensor([-8.0, -0.01])
    y, final = chunked_scan(x, dt, A, B, C, 256, state, D)
    y_ref, final_ref = sequential_scan_reference(x, dt, A, B, C, state, D)
    torch.testing.assert_close(y, y_ref, atol=1e-5 * y_ref.abs().max(), rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-5 * final_ref.abs().max(), rtol=1e-4)
