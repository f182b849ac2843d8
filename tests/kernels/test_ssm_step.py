"""The fused Mamba2 decode step (kernels/ssm_step.py, interpreter on CPU): launch 1 (conv + state update + gate)
and launch 2 (group norm + conv shift) together equal the three unfused kernels' torch references on pruned,
awkward shapes (P', N', ch' not powers of two, G < H, several norm groups, W = 4 and 2, strided xbc, prefix
views of the conv parameters), for stacked states and for per-request states behind address tables; launch 1
leaves the conv state untouched (programs of a group share its B/C rows); bad inputs fail."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels.ssm_step import (  # noqa: E402
    group_norm_shift,
    group_norm_shift_reference,
    ssm_conv_step,
    ssm_conv_step_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU only: the interpreter rounds bf16 differently from torch (as in test_ssm_update.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}

CASES = [  # batch, heads, groups, P', N', norm groups, W, conv bias
    (1, 4, 1, 16, 16, 1, 4, True),
    (3, 6, 2, 6, 24, 2, 4, True),  # P', N' not powers of two; ch' = 36 + 96
    (2, 8, 8, 10, 48, 4, 2, False),  # one head per SSM group, a one-column conv state
    (2, 4, 2, 40, 7, 1, 3, True),  # N' below 16, P' over several tiles, ch' = 188
    (1, 8, 2, 36, 25, 2, 4, True),  # ch' = 388: two shift programs, the second one partly masked
]
KW = dict(dt_softplus=True, dt_limit=(0.01, 2.0))


def _inputs(batch, heads, groups, p, n, norm_groups, width, with_bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    ch = heads * p + 2 * groups * n
    rows = (heads * p, groups * n, groups * n)
    weights = [rand(r + 4, width).to(dtype)[:r] for r in rows]  # kept prefixes of the stored parameters
    biases = [rand(r + 4).to(dtype)[:r] for r in rows] if with_bias else None
    xbc = rand(batch, ch + 5).to(dtype)[:, 2:2 + ch]  # a column slice of the in_proj output
    conv_state = rand(batch, ch, width - 1).to(dtype)
    state = rand(batch, heads, p, n)
    dt = rand(batch, heads).to(dtype)
    A = -torch.rand(heads, generator=gen).to(DEVICE) * 4 - 0.1
    D, dt_bias = rand(heads), rand(heads, scale=0.5)
    z = rand(batch, p * heads).to(dtype).view(batch, p, heads).transpose(1, 2)
    norm_weight = rand(heads * p + 8)
    return dict(xbc=xbc, conv_state=conv_state, weight=weights, bias=biases, state=state, dt=dt, A=A, D=D,
                z=z, dt_bias=dt_bias), norm_weight


def _step_args(inp: dict, heads: int, groups: int) -> dict:
    return dict(inp, activation="silu", heads=heads, groups=groups, **KW)


def _run_fused(inp: dict, norm_weight, heads, groups, norm_groups, width):
    """Both launches over stacked states; asserts launch 1 leaves the conv state as it found it."""
    before = inp["conv_state"].clone()
    y = ssm_conv_step(**_step_args(inp, heads, groups))
    assert torch.equal(inp["conv_state"], before)  # launch 1 only reads the conv state
    out = group_norm_shift(y, norm_weight, norm_groups, 1e-5, inp["xbc"], inp["conv_state"], width)
    return y, out, inp["conv_state"], inp["state"]


def _run_fused_tables(inp: dict, norm_weight, heads, groups, norm_groups, width):
    """Both launches over each row's own contiguous states, addressed through int64 tables."""
    rows = range(len(inp["xbc"]))
    convs = [inp["conv_state"][i:i + 1].clone() for i in rows]
    ssms = [inp["state"][i:i + 1].clone() for i in rows]
    conv_table, ssm_table = (torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEVICE)
                             for ts in (convs, ssms))
    dtype = inp["conv_state"].dtype
    args = {**_step_args(inp, heads, groups), "conv_state": conv_table, "state": ssm_table}
    y = ssm_conv_step(**args, conv_dtype=dtype)
    assert all(torch.equal(c[0], inp["conv_state"][i]) for i, c in zip(rows, convs, strict=True))
    out = group_norm_shift(y, norm_weight, norm_groups, 1e-5, inp["xbc"], conv_table, width, conv_dtype=dtype)
    return y, out, torch.cat(convs), torch.cat(ssms)


def _run_reference(inp: dict, norm_weight, heads, groups, norm_groups, width):
    y = ssm_conv_step_reference(**_step_args(inp, heads, groups))
    out = group_norm_shift_reference(y, norm_weight, norm_groups, 1e-5, inp["xbc"], inp["conv_state"])
    return y, out, inp["conv_state"], inp["state"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tables", [False, True], ids=["stacked", "tables"])
def test_fused_step_equals_the_unfused_references(case, dtype, tables):
    batch, heads, groups, p, n, norm_groups, width, with_bias = case
    inp, norm_weight = _inputs(*case, dtype)
    ref_inp = {k: (v.clone() if k in ("conv_state", "state") else v) for k, v in inp.items()}
    run = _run_fused_tables if tables else _run_fused
    y, out, conv, ssm = run(inp, norm_weight, heads, groups, norm_groups, width)
    y_ref, out_ref, conv_ref, ssm_ref = _run_reference(ref_inp, norm_weight, heads, groups, norm_groups, width)
    assert y.shape == (batch, heads, p) and out.shape == (batch, p * heads) and out.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out.float(), out_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # the state sees the conv outputs rounded to the activation dtype (the interpreter rounds bf16 its own way)
    assert (ssm - ssm_ref).abs().max() <= max(1e-5, TOL[dtype]) * ssm_ref.abs().max()
    torch.testing.assert_close(conv, conv_ref, atol=0, rtol=0)  # a shift: values move, never round


def test_two_steps_carry_the_conv_window():
    """Step 2 sees step 1's input in its window: the shift wrote it where the next conv reads."""
    case = CASES[1]
    inp, norm_weight = _inputs(*case, torch.float32, seed=3)
    ref = {k: (v.clone() if k in ("conv_state", "state") else v) for k, v in inp.items()}
    for step in range(2):
        got = _run_fused(inp, norm_weight, *case[1:3], case[5], case[6])
        want = _run_reference(ref, norm_weight, *case[1:3], case[5], case[6])
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=f"step {step}")
        inp["xbc"] = ref["xbc"] = inp["xbc"].flip(0).contiguous()


def test_bad_inputs_are_refused():
    inp, norm_weight = _inputs(*CASES[1], torch.float32)
    step = dict(inp, activation="silu", heads=6, groups=2)
    with pytest.raises(ValueError, match="three segments"):
        ssm_conv_step(**{**step, "weight": [torch.cat(inp["weight"])], "bias": None})
    with pytest.raises(ValueError, match="both be tensors or both"):
        ssm_conv_step(**{**step, "state": torch.zeros(3, dtype=torch.int64, device=DEVICE)})
    with pytest.raises(ValueError, match="heads"):
        ssm_conv_step(**{**step, "heads": 5})
    with pytest.raises(ValueError, match="conv state"):
        group_norm_shift(torch.zeros(3, 6, 6, device=DEVICE), norm_weight, 2, 1e-5, inp["xbc"],
                         inp["conv_state"][:, :-1], 4)


@pytest.mark.parametrize(("change", "match"), [
    ({"dt": lambda t: t[:, :1]}, r"dt \[batch, H\]"),  # a [batch, 1] view of a wider row: read past its shape
    ({"A": lambda t: t[:1]}, r"A \[H\]"),
    ({"state": lambda t: t.half()}, "fp32"),
    ({"D": lambda t: torch.stack([t, t], 1)[:, 0]}, "D must be a contiguous"),
    ({"dt_bias": lambda t: t[:3]}, "dt_bias must be"),
    ({"z": lambda t: t[:, :, :3]}, "z must be shaped"),
])
def test_step_operands_get_the_state_updates_checks(change, match):
    """ssm_conv_step runs the state update inside: its dt, A, D, dt_bias, z and SSM state are checked alike."""
    inp, _ = _inputs(*CASES[1], torch.float32)
    step = dict(inp, activation="silu", heads=6, groups=2)
    step.update({name: edit(inp[name]) for name, edit in change.items()})
    with pytest.raises(ValueError, match=match):
        ssm_conv_step(**step)


def test_group_norm_shift_weight_must_be_contiguous():
    inp, norm_weight = _inputs(*CASES[1], torch.float32)
    strided = torch.stack([norm_weight, norm_weight], 1)[:, 0]
    with pytest.raises(ValueError, match="contiguous"):
        group_norm_shift(torch.zeros(3, 6, 6, device=DEVICE), strided, 2, 1e-5, inp["xbc"], inp["conv_state"], 4)


COMPILE = r"""
import sys, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from uniql.kernels.ssm_step import _conv_step_kernel, _norm_shift_kernel

BF16 = ("xbc_ptr", "wx", "wb", "wc", "bx", "bb", "bc", "dt_ptr", "z_ptr", "out_ptr", "g_ptr")
FP32 = ("a_ptr", "d_ptr", "dtb_ptr", "w_ptr")
FLOATS = ("dt_lo", "dt_hi", "eps")
for arch in map(int, sys.argv[1:]):
    for table, width in ((True, 4), (False, 2)):
        state = "*i64" if table else "*fp32"
        ptrs = {**dict.fromkeys(BF16, "*bf16"), **dict.fromkeys(FP32, "*fp32"), **dict.fromkeys(FLOATS, "fp32"),
                "conv_ptr": "*i64" if table else "*bf16", "state_ptr": state}
        step = dict(TABLE=table, CONV_DTYPE=tl.bfloat16, HAS_CONV_BIAS=True, ACT=1, W=width, HAS_D=True,
                    HAS_Z=True, HAS_DT_BIAS=True, SOFTPLUS=True, CLAMP=True, BLOCK_P=32, BLOCK_N=128)
        norm = dict(TABLE=table, CONV_DTYPE=tl.bfloat16, W=width, BLOCK_H=16, BLOCK_P=64, BLOCK_C=256,
                    BLOCK_W=triton.next_power_of_2(width - 1))
        for kernel, consts in ((_conv_step_kernel, step), (_norm_shift_kernel, norm)):
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.arg_names}
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
            print("ok", arch, kernel.__name__)
"""


def test_kernels_compile_for_jetson_and_hopper():
    """Ahead of time, no GPU needed: both launches, table and stacked forms, sm_86 (A6000), sm_87 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, "86", "87", "90"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 12
