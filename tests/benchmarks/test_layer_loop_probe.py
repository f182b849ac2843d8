"""benchmarks/layer_loop_probe.py: the persistent layer loop with the production GEMV's task body computes the chain
of the fp32 torch reference (and of the production GEMV a layer) in one launch and launched per layer, over one K
split and several; the interpreter catches a task that would read an unfinished input; on a GPU, at a real size,
where programs really wait for each other; the kernel compiles for sm_90 with its inline PTX."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import compile_script_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import layer_loop_probe as lp  # noqa: E402
import persistent_probe as pp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16
TOL = 2e-2 if DEV == "cuda" else 2e-3  # bf16 activations and outputs: 8 bits of mantissa


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert ref.abs().max() > 0.1 and ((got.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize(("programs", "block_n", "sub_r", "per_launch"),
                         [(1, 32, 2, None), (1, 16, 1, 2), (3, 32, 2, 1), (8, 16, 1, 1)])
@pytest.mark.parametrize("shapes", [[(64, 64)] * 3, [(64, 96), (96, 32), (32, 64), (64, 160)],
                                    [(64, 96), (64, 64), (32, 160), (96, 64)]], ids=["square", "mixed", "prefixes"])
def test_loop_matches_the_reference(programs, block_n, sub_r, per_launch, shapes):
    """Mixed widths: partial column blocks (96, 160 at 32 / 64 columns) and K splits of unequal tile counts;
    prefixes: layers that read the start of the output before (as o reads attention's stand-in in a Llama step).
    The interpreter runs programs one after another: several programs only one layer a launch."""
    x, layers = pp.random_layers(shapes, 32, DEV, seed=2)
    ref = pp.chain_reference(layers, x, 32)
    plan = lp.plan_loop(layers, 32, programs, block_n, sub_r, DTYPE)
    if programs == 8:  # more programs than column blocks: some layers split K, and their partials are summed
        assert plan.meta[:, 2].max().item() > 1
    got = lp.chain_loop(plan, x.to(DTYPE), per_launch, check=True)
    assert got.shape == (shapes[-1][1],) and got.dtype == DTYPE
    _close(got, ref, TOL)
    prod = pp.chain_launches(layers, x.to(DTYPE), 32)  # the same arithmetic a layer at a time
    _close(got, prod.float(), TOL)


def test_the_loop_catches_a_task_that_would_read_an_unfinished_input():
    """Two programs, one launch: program 0 reaches layer 1 before program 1 has stored its block of layer 0 (on a GPU
    it waits; the interpreter counts it and the check raises)."""
    if DEV == "cuda":
        pytest.skip("the interpreter's order: a GPU waits instead")
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(RuntimeError, match="ran before their input was complete"):
        lp.chain_loop(lp.plan_loop(layers, 32, 2, 32, 2, DTYPE), x.to(DTYPE), check=True)


def test_the_llama_step_chain_has_the_steps_gemvs():
    """129 GEMVs at the ladder's active sizes: at rate 0 the full Llama-3.1-8B shapes; at 0.35 o and down read a
    prefix of what q|k|v and gate|up wrote; the head is never pruned."""
    full, pruned = lp.llama_step(0.0, 128), lp.llama_step(0.35, 128)
    assert len(full) == len(pruned) == 129
    assert full[:4] == [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)] and full[-1] == (4096, 128256)
    assert pruned[-1] == full[-1]
    for (_, n_before), (k, _) in zip(pruned, pruned[1:], strict=False):
        assert k <= n_before
    assert pruned[1][0] < pruned[0][1] and pruned[3][0] == pruned[2][1] // 2


def test_the_plan_refuses_what_the_kernel_cannot_run():
    x, layers = pp.random_chain([64, 64, 64], 32, DEV)
    with pytest.raises(ValueError, match="must fit a scale group of 32"):
        lp.plan_loop(layers, 32, 1, 32, sub_r=4)
    with pytest.raises(ValueError, match="multiple of 16"):
        lp.plan_loop(layers, 32, 1, 40)
    _, other = pp.random_chain([128, 64], 32, DEV)  # K 128 after 64 outputs (a shorter K reads their start)
    with pytest.raises(ValueError, match="layer 1: .* do not follow a layer with 64 outputs"):
        lp.plan_loop([layers[0], other[0]], 32, 1, 32, 2)
    _, deep = pp.random_chain([8192, 16], 32, DEV)  # one column block, 512 tiles: 100 programs would split 100 ways
    with pytest.raises(ValueError, match="K splits in a layer"):
        lp.plan_loop(deep, 32, 100, 16, 1)
    with pytest.raises(ValueError, match="takes a \\[64\\] input"):
        lp.chain_loop(lp.plan_loop(layers, 32, 1, 32, 2, DTYPE), x[:32].to(DTYPE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs wait for each other only on a GPU")
def test_loop_on_the_gpu_at_a_real_size():
    x, layers = pp.random_chain([4096, 14336, 4096, 4096, 4096], 128, "cuda")
    ref = pp.chain_reference(layers, x, 128)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for programs, block_n, prefetch, sleep in ((2 * sms, 128, 2, 0), (4 * sms, 256, 0, 256), (8 * sms, 128, 2, 64)):
        plan = lp.plan_loop(layers, 128, programs, block_n)
        for _ in range(2):  # the split-K counters reset themselves: a second run is right too
            _close(lp.chain_loop(plan, x.to(torch.bfloat16), prefetch=prefetch, check=True, sleep_ns=sleep), ref,
                   2e-2)
    with pytest.raises(ValueError, match="do not fit on the GPU at once"):  # it would wait forever: refused
        lp.chain_loop(lp.plan_loop(layers, 128, 40 * sms, 16), x.to(torch.bfloat16))


COMPILE = r"""
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import layer_loop_probe as lp
kernel = lp._layer_loop_kernel
types = {"acts_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "meta_ptr": "*i64", "ws_ptr": "*fp32",
         "cnt_ptr": "*i32", "done_ptr": "*i32", "err_ptr": "*i32"}
attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in types}  # torch's buffers: 16-byte aligned
cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for block_n, prefetch, sleep in ((128, 2, 256), (256, 0, 0)):
    consts = {"GROUP": 128, "BLOCK_N": block_n, "SUB_R": 4, "SUM_STEP": 32, "PREFETCH": prefetch, "X_BF16": True,
              "ASM": True, "WAIT": True, "SLEEP": sleep}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
    done = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    sass = usage = ""
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(done.asm["cubin"])
            f.flush()
            sass, usage = (subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True).stdout
                           for flag in ("-sass", "-res-usage"))
    print("ok", block_n, prefetch, "sass" if sass else "no-sass", "EF.128" in sass, "LOCAL:0" in usage,
          ("NANOSLEEP" in sass) == (sleep > 0))
"""


def test_loop_kernel_compiles_for_hopper():
    """The interpreter never runs the inline PTX (the half2 dot, the L2 prefetch, the acquire load): compile the
    kernel ahead of time for sm_90, without a GPU, with the alignment a launch gets; where the wheel brings
    cuobjdump, the weights load 16 bytes at a time (the alignment hints on the table's offsets hold), nothing
    spills and the polls sleep only where SLEEP says."""
    lines = compile_script_lines(COMPILE, Path(lp.__file__).parent)
    assert len(lines) == 2
    for line in lines:
        assert line[3] == "no-sass" or line[4:] == ["True", "True", "True"], line
