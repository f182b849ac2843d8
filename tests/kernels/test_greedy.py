"""Greedy picks kernel vs torch's argmax / isfinite (interpreter on CPU, the real kernel on the GPU)."""

from __future__ import annotations

import pytest
import torch

from uniql.kernels import greedy

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows, vocab", [(1, 1), (1, 4096), (3, 4097), (2, 9000), (1, 49152 + 7)])
def test_picks_match_torch_argmax_and_finite_flags(rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen).to(DEV)
    want = greedy.greedy_picks_reference(logits)
    assert torch.equal(greedy.greedy_picks(logits, use_kernel=True), want)
    assert want[1].tolist() == [1] * rows


def test_ties_go_to_the_first_index_across_chunks():
    logits = torch.full((2, 3 * greedy.CHUNK + 5), -1.0)
    logits[0, [greedy.CHUNK + 3, 2 * greedy.CHUNK, 3 * greedy.CHUNK + 4]] = 7.0  # equal maxima in three chunks
    logits[1, [5, 6]] = 2.0  # inside one chunk
    picks = greedy.greedy_picks(logits.to(DEV), use_kernel=True)
    assert picks[0].tolist() == [greedy.CHUNK + 3, 5] == logits.argmax(-1).tolist()


# the kernel tests finiteness as x - x == 0 (NaN for +-inf by design): numpy, under the interpreter, warns about it
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_non_finite_rows_are_flagged_and_minus_inf_is_an_ordinary_low_value():
    logits = torch.randn(4, 5000)
    logits[0, 4999] = float("nan")
    logits[1, 10] = float("inf")
    logits[2, 4096] = float("-inf")
    logits[3, :4999] = float("-inf")  # the only finite-looking winner sits in the tail chunk
    logits[3, 4999] = 0.5
    picks = greedy.greedy_picks(logits.to(DEV), use_kernel=True).cpu()
    assert picks[1].tolist() == [0, 0, 0, 0]
    assert picks[0, 3] == 4999  # -inf elsewhere loses to the one finite value
    assert picks[0, 2] == logits[2].argmax()


def test_strided_rows_and_bad_shapes():
    wide = torch.randn(2, 6000).to(DEV)
    view = wide[:, :5000]  # the graph slices its padded vocabulary this way
    assert torch.equal(greedy.greedy_picks(view, use_kernel=True), greedy.greedy_picks_reference(view))
    with pytest.raises(ValueError, match="B, V"):
        greedy.greedy_picks(torch.zeros(5))


@pytest.mark.skipif(DEV == "cuda", reason="the 4 GiB view is for the interpreter")
def test_rows_past_int32_elements_are_read_where_they_are():
    """Row * stride in int32 wrapped past 2^31 elements (B x V prompt logits): a segfault before the fix."""
    stride, vocab = (1 << 30) + 128, 300
    try:
        big = torch.empty(2 * stride + vocab, dtype=torch.float16)  # lazily mapped: only touched pages exist
    except RuntimeError:  # a host that does not overcommit memory
        pytest.skip("no 4 GiB of address space")
    logits = big.as_strided((3, vocab), (stride, 1))
    logits.copy_(torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)).half())
    assert torch.equal(greedy.greedy_picks(logits, use_kernel=True), greedy.greedy_picks_reference(logits))
