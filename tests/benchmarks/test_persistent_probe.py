"""benchmarks/persistent_probe.py: the persistent chain kernel (tickets in dependency order, per-layer done counters,
atomically summed outputs) computes the same chain as the fp32 torch reference and as the production GEMV, in one
launch and launched per layer, at grids of one program (the interpreter's order: one program does every task) and
more; on a GPU, at a real size, where programs really wait for each other."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import persistent_probe as pp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("schedule", "programs", "block_n", "rows", "per_launch"),
                         [("tickets", 1, 32, 4, None), ("tickets", 3, 32, 8, None), ("tickets", 2, 64, 4, 1),
                          ("tickets", 2, 32, 2, None),  # a tile of half a scale group
                          ("tickets", 5, 16, 8, 2), ("static", 1, 32, 4, None), ("static", 1, 16, 8, 2),
                          ("static", 2, 32, 4, 1), ("static_once", 1, 32, 4, None), ("static_once", 2, 32, 4, 1)])
@pytest.mark.parametrize("dims", [[64] * 4, [64, 96, 32, 64, 160]], ids=["square", "mixed"])
def test_chain_matches_the_reference(schedule, programs, block_n, rows, per_launch, dims):
    """Square layers and mixed ones (N 96 / 160: partial column blocks; K 96: a partial K split at 8 rows). The
    interpreter runs programs one after another: a static grid of several programs runs here one layer a launch."""
    x, layers = pp.random_chain(dims, 32, DEV, seed=1)
    ref = pp.chain_reference(layers, x, 32)
    got = pp.chain_persistent(pp.plan_chain(layers, 32, block_n, rows), x, programs, per_launch, check=True,
                              schedule=schedule)
    assert got.shape == (dims[-1],) and ref.abs().max() > 0.1  # the chain keeps the activations' scale
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    prod = pp.chain_launches(layers, x, 32)
    torch.testing.assert_close(prod.float(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_chain_refuses_what_it_cannot_run():
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(ValueError, match="takes a \\[64\\] input"):
        pp.chain_persistent(pp.plan_chain(layers, 32), x[:32], 1)
    for bad in ({"rows": 12}, {"block_n": 48}, {"group": 48}):
        with pytest.raises(ValueError, match="powers of two"):
            pp.plan_chain(layers, **{"group": 32, **bad})
    with pytest.raises(ValueError, match="schedule must be"):
        pp.chain_persistent(pp.plan_chain(layers, 32), x, 1, schedule="greedy")
    with pytest.raises(ValueError, match="at most 4 programs"):  # 2 column blocks x 2 K splits a layer
        pp.chain_persistent(pp.plan_chain(layers, 32, 32, 4), x, 5, schedule="static")
    _, other = pp.random_chain([32, 64], 32, DEV)
    with pytest.raises(ValueError, match="layer 1: .* do not follow a layer with 64 outputs"):
        pp.plan_chain([layers[0], other[0]], 32)


@pytest.mark.skipif(DEV == "cuda", reason="the interpreter's order: a GPU waits instead")
def test_a_static_task_that_would_read_an_unfinished_input_is_caught():
    """In one launch, program 0 reaches layer 1 before program 1 has run its part of layer 0: on a GPU it would
    wait; the interpreter counts it, so the check (the probe's guard against a broken dependency order) raises."""
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(RuntimeError, match="ran before their input was complete"):
        pp.chain_persistent(pp.plan_chain(layers, 32, 32, 4), x, 2, check=True, schedule="static")


@pytest.fixture(scope="module")
def real_chain():
    """An MLP pair and three o-sized layers on the GPU: input, layers, fp32 reference, SM count."""
    if not torch.cuda.is_available():
        pytest.skip("programs wait for each other only on a GPU")
    x, layers = pp.random_chain([4096, 14336, 4096, 4096, 4096], 128, "cuda")
    return x, layers, pp.chain_reference(layers, x, 128), torch.cuda.get_device_properties(0).multi_processor_count


def test_static_chain_on_the_gpu_at_a_real_size(real_chain):
    x, layers, ref, sms = real_chain
    plan = pp.plan_chain(layers, 128)
    for programs, schedule in itertools.product((sms, 2 * sms), ("static", "static_once")):
        got = pp.chain_persistent(plan, x, programs, check=True, schedule=schedule)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    with pytest.raises(ValueError, match="do not fit on the GPU at once"):  # it would wait forever: refused
        # 32 x 8 tiles: 8192 tasks in the smallest layer, 20 programs an SM (at most 16 of 4 warps fit)
        pp.chain_persistent(pp.plan_chain(layers, 128, 32, 8), x, 20 * sms, schedule="static")


def test_chain_on_the_gpu_at_a_real_size(real_chain):
    x, layers, ref, sms = real_chain
    plan = pp.plan_chain(layers, 128)
    for programs in (sms, 8 * sms, 40 * sms):  # more than fit at once too: tickets keep it deadlock-free
        got = pp.chain_persistent(plan, x, programs, check=True)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4


COMPILE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import persistent_probe as pp
types = {"acts_ptr": "*fp32", "qw_ptr": "*i32", "sc_ptr": "*fp16", "start_ptr": "*i32", "meta_ptr": "*i64",
         "ticket_ptr": "*i32", "done_ptr": "*i32", "err_ptr": "*i32"}
for kernel, rows, block_n in ((pp._chain_kernel, 8, 128), (pp._chain_kernel, 16, 256),
                              (pp._static_chain_kernel, 16, 128)):
    consts = {"GROUP": 128, "BLOCK_N": block_n, "ROWS": rows, "WAIT": True}
    if kernel is pp._static_chain_kernel:
        consts["ONCE"] = True
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
    done = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})
    print("ok", rows, block_n, done.n_regs if hasattr(done, "n_regs") else "")
"""


def test_chain_kernel_compiles_for_hopper():
    """The interpreter accepts what the compiler refuses (a plain module global inside the kernel; inline PTX it never
    runs): compile the probe's kernels ahead of time for sm_90, without a GPU, so a device call does not find out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(Path(pp.__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 3
