"""benchmarks/short_path_probe.py: the shortest-path chain (weights before the wait, a block's split partials summed in
a fixed order as the next layer's input) computes the fp32 torch reference in one launch and launched per layer, with
block and layer waits; the same input gives the same bits; the interpreter catches a task that would read an
unfinished block; on a GPU programs really wait; the kernel compiles for sm_90 without spills."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import compile_script_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import persistent_probe as pp  # noqa: E402
import short_path_probe as sp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert ref.abs().max() > 0.1 and ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize(("block_n", "rows", "layer_wait", "per_launch"),
                         [(32, 4, False, None), (16, 2, True, None), (32, 2, False, 2), (64, 4, False, 1)])
@pytest.mark.parametrize("shapes", [[(64, 64)] * 3, [(64, 96), (96, 32), (32, 64), (64, 160)],
                                    [(64, 96), (64, 64), (32, 160), (96, 64)]], ids=["square", "mixed", "prefixes"])
def test_chain_matches_the_reference(block_n, rows, layer_wait, per_launch, shapes):
    """Mixed widths: partial column blocks; prefixes: layers that read the start of the output before. 32 x 4 packed
    rows: K slices of 32 inputs, so every layer after the first sums 2-5 split partials as its input."""
    x, layers = pp.random_layers(shapes, 32, DEV, seed=3)
    ref = pp.chain_reference(layers, x, 32)
    plan = sp.plan_short(layers, 32, block_n, rows)
    assert plan.meta[1:, 7].max().item() > 1  # an input made of several splits
    got = sp.chain_short(plan, x, None if DEV == "cuda" else 1, per_launch, layer_wait=layer_wait, check=True)
    assert got.shape == (shapes[-1][1],) and got.dtype == torch.float32
    _close(got, ref)
    again = sp.chain_short(plan, x, None if DEV == "cuda" else 1, per_launch, layer_wait=layer_wait, check=True)
    assert torch.equal(got, again)  # no atomics in the sums: the same bits


@pytest.mark.parametrize(("block_n", "rows"), [(16, 8), (32, 16)])
def test_whole_k_tasks_wait_for_the_whole_layer_before(block_n, rows):
    """Tasks of 64-128 inputs against 16-32 columns (one or two K splits): only a layer wait can run them."""
    shapes = [(64, 96), (96, 32), (32, 128), (128, 64)]
    x, layers = pp.random_layers(shapes, 32, DEV, seed=4)
    plan = sp.plan_short(layers, 32, block_n, rows)
    got = sp.chain_short(plan, x, None if DEV == "cuda" else 1, layer_wait=True, check=True)
    _close(got, pp.chain_reference(layers, x, 32))
    with pytest.raises(ValueError, match="a block wait needs block_n"):
        sp.chain_short(plan, x)


def test_sync_only_runs_the_waits_without_touching_the_partials():
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    plan = sp.plan_short(layers, 32, 32, 4)
    plan.part.fill_(7.0)
    assert sp.chain_short(plan, x, None if DEV == "cuda" else 1, sync_only=True) is None
    assert plan.part[64:].eq(7.0).all()  # nothing stored past the input
    # every task published, each block on its own 128-byte line; no error
    assert plan.sync[:-1:32].tolist() == [2, 2, 2, 2] and plan.sync[:-1].sum().item() == 8 and plan.sync[-1] == 0


def test_the_chain_catches_a_task_that_would_read_an_unfinished_block():
    """Two programs, one launch: program 0 reaches layer 1's first block, whose K slice program 1 has not summed yet
    (a GPU waits; the interpreter counts it and the check raises)."""
    if DEV == "cuda":
        pytest.skip("the interpreter's order: a GPU waits instead")
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(RuntimeError, match="ran before their input was complete"):
        sp.chain_short(sp.plan_short(layers, 32, 32, 4), x, 2, check=True)


def test_the_plan_refuses_what_the_kernel_cannot_run():
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(ValueError, match="a multiple of 8 x rows"):
        sp.chain_short(sp.plan_short(layers, 32, 16, 4), x)
    with pytest.raises(ValueError, match="powers of two"):
        sp.plan_short(layers, 32, 48, 2)
    _, other = pp.random_chain([128, 64], 32, DEV)
    with pytest.raises(ValueError, match="layer 1: .* do not follow a layer with 64 outputs"):
        sp.plan_short([layers[0], other[0]], 32, 32, 2)
    _, deep = pp.random_chain([8192, 64, 64], 32, DEV)  # 8 inputs a task: layer 1 reads 1024 splits
    with pytest.raises(ValueError, match="input has 1024 K splits"):
        sp.plan_short(deep, 32, 64, 1)
    with pytest.raises(ValueError, match="takes a \\[64\\] input"):
        sp.chain_short(sp.plan_short(layers, 32, 32, 2), x[:32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs wait for each other only on a GPU")
def test_chain_on_the_gpu_at_a_real_size():
    x, layers = pp.random_chain([4096, 4096, 1024, 4096, 4096], 128, "cuda")
    ref = pp.chain_reference(layers, x, 128)
    for block_n, rows, layer_wait, sleep in ((128, 16, False, 0), (128, 16, True, 0), (64, 8, False, 0),
                                             (256, 16, False, 256), (256, 32, False, 0), (16, 512, True, 0),
                                             (32, 256, True, 0)):
        plan = sp.plan_short(layers, 128, block_n, rows)
        for _ in range(2):
            _close(sp.chain_short(plan, x, layer_wait=layer_wait, sleep_ns=sleep, check=True), ref, 1e-4)
    with pytest.raises(ValueError, match="do not fit on the GPU at once"):
        sp.chain_short(sp.plan_short(layers, 128, 128, 16), x, 10**5)


COMPILE = r"""
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import short_path_probe as sp
kernel = sp._short_chain_kernel
types = {"part_ptr": "*fp32", "qw_ptr": "*i32", "sc_ptr": "*fp16", "meta_ptr": "*i64", "cnt_ptr": "*i32",
         "err_ptr": "*i32"}
attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in types}
cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for block_n, rows, in_splits, sync_only, warps in ((128, 16, 32, False, 4), (64, 8, 8, False, 4), (128, 16, 4, True, 4),
                                                   (256, 32, 16, False, 8), (16, 512, 2, False, 8)):
    consts = {"GROUP": 128, "BLOCK_N": block_n, "ROWS": rows, "IN_SPLITS": in_splits, "LAYER_WAIT": in_splits == 2,
              "SYNC_ONLY": sync_only, "WAIT": True, "SLEEP": 256 if sync_only else 0}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
    done = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    usage = ""
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(done.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    print("ok", block_n, rows, "usage" if usage else "no-usage", "LOCAL:0" in usage, usage.split("REG:")[-1][:4])
"""


def test_short_kernel_compiles_for_hopper():
    """The interpreter never runs the acquire poll (inline PTX): compile ahead of time for sm_90 without a GPU; where
    the wheel brings cuobjdump, nothing spills."""
    lines = compile_script_lines(COMPILE, Path(sp.__file__).parent)
    assert len(lines) == 5
    for line in lines:
        assert line[3] == "no-usage" or line[4] == "True", line
