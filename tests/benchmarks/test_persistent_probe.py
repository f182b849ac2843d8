"""benchmarks/persistent_probe.py: the persistent chain kernel (tickets in dependency order, per-layer done counters,
atomically summed outputs) computes the same chain as the fp32 torch reference and as the production GEMV, in one
launch and launched per layer, at grids of one program (the interpreter's order: one program does every task) and
more; on a GPU, at a real size, where programs really wait for each other."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import persistent_probe as pp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("programs", "block_n", "rows", "per_launch"), [(1, 32, 4, None), (3, 32, 8, None),
                                                                         (2, 64, 4, 1), (5, 16, 8, 2)])
def test_chain_matches_the_reference(programs, block_n, rows, per_launch):
    x, qw, sc = pp.random_chain(3, 64, 32, DEV, seed=1)
    ref = pp.chain_reference(x, qw, sc, 32)
    got = pp.chain_persistent(x, qw, sc, 32, programs, block_n, rows, per_launch)
    assert ref.abs().max() > 0.1  # the chain keeps the activations' scale: the comparison means something
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    prod = pp.chain_launches(x, qw, sc, 32)
    torch.testing.assert_close(prod.float(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_chain_refuses_shapes_it_cannot_run():
    x, qw, sc = pp.random_chain(2, 64, 32, DEV)
    with pytest.raises(ValueError, match="square layers"):
        pp.chain_persistent(x[:32], qw, sc, 32, 1)
    for bad in ({"rows": 12}, {"block_n": 48}):
        with pytest.raises(ValueError, match="powers of two"):
            pp.chain_persistent(x, qw, sc, 32, 1, **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs wait for each other only on a GPU")
def test_chain_on_the_gpu_at_a_real_size():
    x, qw, sc = pp.random_chain(8, 4096, 128, "cuda")
    ref = pp.chain_reference(x, qw, sc, 128)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for programs in (sms, 8 * sms, 40 * sms):  # more than fit at once too: tickets keep it deadlock-free
        got = pp.chain_persistent(x, qw, sc, 128, programs)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
