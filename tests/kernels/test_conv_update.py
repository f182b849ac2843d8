"""Causal conv1d decode update: the Triton kernel (interpreter on CPU) equals the torch reference on awkward shapes
(ch' not a power of two, W = 4 and 2, strided xbc/state, weight as three prefix segments, bias or none), for one
stacked state and for per-request states through an address table; the reference equals the conv written out
(and the runtime's prefill conv over the same window); the custom op dispatches and mutates; bad inputs fail."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from uniql.kernels import ops  # noqa: E402
from uniql.kernels.conv_update import causal_conv1d_update, causal_conv1d_update_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

CASES = [  # batch, (x rows, B rows, C rows) of the kept channels, W
    (1, (16, 8, 8), 4),
    (3, (90, 24, 24), 4),  # ch' = 138: not a power of two, spans two 128-channel blocks
    (2, (10, 6, 6), 2),  # W = 2: a one-column state
    (4, (200, 40, 40), 3),
]


def _inputs(batch, segs, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ch = sum(segs)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    stored = [rand(rows + 5, width) for rows in segs]  # stored parameters; the kept rows are a prefix of each
    weights = [w[:rows] for w, rows in zip(stored, segs, strict=True)]
    biases = [rand(rows + 5)[:rows] for rows in segs]
    xbc = rand(batch, ch + 7)[:, 3:3 + ch]  # a column slice of a wider projection: row stride ch' + 7
    state = rand(batch, ch, width - 1)
    return xbc, weights, biases, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_stacked_state_equals_reference(case, dtype, with_bias):
    xbc, weights, biases, state = _inputs(*case, dtype)
    biases = biases if with_bias else None
    ref_state = state.clone()
    want = causal_conv1d_update_reference(xbc, ref_state, weights, biases, "silu")
    got = causal_conv1d_update(xbc, state, weights, biases, "silu")
    assert got.shape == xbc.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)  # a shift: values move, never round


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[1:3])
def test_address_table_shifts_each_requests_own_state(case, dtype):
    xbc, weights, biases, stacked = _inputs(*case, dtype, seed=1)
    own = [stacked[i:i + 1].clone() for i in range(len(stacked))]  # [1, ch', W-1] each, separate allocations
    table = torch.tensor([t.data_ptr() for t in own], dtype=torch.int64, device=DEVICE)
    ref = [t.clone() for t in own]
    want = causal_conv1d_update_reference(xbc, ref, weights, biases, "silu")
    got = causal_conv1d_update(xbc, table, weights, biases, "silu", state_dtype=dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for mine, theirs in zip(own, ref, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_table_state_in_a_dtype_other_than_xbc():
    """fp16 activations against fp32 states (the cache dtype is the runner's choice)."""
    xbc, weights, biases, stacked = _inputs(2, (20, 6, 6), 4, torch.float16, seed=2)
    own = [stacked[i:i + 1].float().clone() for i in range(2)]
    table = torch.tensor([t.data_ptr() for t in own], dtype=torch.int64, device=DEVICE)
    ref = [t.clone() for t in own]
    want = causal_conv1d_update_reference(xbc, ref, weights, biases)
    got = causal_conv1d_update(xbc, table, weights, biases, state_dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    for mine, theirs in zip(own, ref, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swish", None])
def test_other_activations(activation):
    xbc, weights, biases, state = _inputs(3, (30, 5, 5), 4, torch.float32, seed=3)
    ref_state = state.clone()
    want = causal_conv1d_update_reference(xbc, ref_state, weights, biases, activation)
    got = causal_conv1d_update(xbc, state, weights, biases, activation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_strided_state_and_one_weight_tensor():
    xbc, weights, biases, state = _inputs(2, (24, 8, 8), 4, torch.float32, seed=4)
    weight, bias = torch.cat(weights), torch.cat(biases)
    ch = state.shape[1]
    big = torch.zeros(2, ch + 3, 5, device=DEVICE)  # the state a strided view: W-1 of 5 columns, rows of 5
    view = big[:, :ch, 1:4]
    view.copy_(state)
    want = causal_conv1d_update_reference(xbc, state, weight, bias)
    got = causal_conv1d_update(xbc, view, weight, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view, state, atol=0, rtol=0)
    assert torch.all(big[..., 0] == 0) and torch.all(big[..., 4] == 0) and torch.all(big[:, ch:] == 0)


def test_reference_equals_the_conv_written_out():
    """One step of the reference == the last output of a causal conv1d over (old state | new input)."""
    xbc, weights, biases, state = _inputs(2, (12, 4, 4), 4, torch.float32, seed=5)
    weight, bias = torch.cat(weights), torch.cat(biases)
    window = torch.cat((state, xbc[..., None]), dim=-1)  # [2, 20, 4]
    full = F.silu(F.conv1d(window, weight[:, None], bias, groups=weight.shape[0]))[..., -1]
    got = causal_conv1d_update_reference(xbc, state, weights, biases)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, window[..., 1:], atol=0, rtol=0)


def test_custom_op_dispatches_and_mutates_state():
    xbc, weights, biases, state = _inputs(2, (12, 4, 4), 4, torch.float32, seed=6)
    ref_state = state.clone()
    want = causal_conv1d_update_reference(xbc, ref_state, weights, biases)
    got = torch.ops.uniql.conv_state_update(xbc, state, weights, biases, "silu", None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)
    if xbc.device.type == "cpu":  # the list-of-states form is the CPU path's (CUDA takes address tables)
        again = ops.conv_state_update(xbc, [s.clone() for s in state], weights, None)
        assert again.shape == xbc.shape


def test_custom_op_traces_under_compile():
    """The fake impl gives shapes, so torch.compile keeps the op in a graph (what CUDA graphs need)."""
    xbc, weights, biases, state = _inputs(2, (12, 4, 4), 4, torch.float32, seed=7)
    ref_state = state.clone()
    want = causal_conv1d_update_reference(xbc, ref_state, weights, biases)

    def step(x, s, w0, w1, w2, b0, b1, b2):
        return ops.conv_state_update(x, s, [w0, w1, w2], [b0, b1, b2]) * 2

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(xbc, state, *weights, *biases)
    torch.testing.assert_close(got, want * 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)


def test_bad_inputs_are_refused():
    xbc, weights, biases, state = _inputs(2, (12, 4, 4), 4, torch.float32)
    with pytest.raises(ValueError, match="rows"):
        causal_conv1d_update(xbc, state, weights[:2], None)
    with pytest.raises(ValueError, match="W-1"):
        causal_conv1d_update(xbc, state[..., :2], weights, None)
    with pytest.raises(ValueError, match="state_dtype"):
        causal_conv1d_update(xbc, torch.zeros(2, dtype=torch.int64, device=DEVICE), weights, None)
    with pytest.raises(ValueError, match="not supported"):
        causal_conv1d_update(xbc, state, weights, None, "tanh")
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d_update(xbc, state, weights, biases[:1])
    with pytest.raises(ValueError, match="W >= 2"):
        causal_conv1d_update(xbc, state[..., :0], [w[:, :1] for w in weights], None)


def test_reference_refuses_what_the_kernel_refuses():
    """The reference (the CPU backend of ``ops.conv_state_update``) broadcast a one-element bias the kernel
    refuses, and took a list of states of the wrong size or count."""
    xbc, weights, biases, state = _inputs(2, (12, 4, 4), 4, torch.float32)
    short = [b[:1] for b in biases]
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d_update_reference(xbc, state.clone(), weights, short)
    with pytest.raises(ValueError, match="bias"):
        ops.conv_state_update(xbc, state.clone(), weights, short)
    with pytest.raises(ValueError, match="list of conv states"):
        causal_conv1d_update_reference(xbc, [state[0].clone()], weights, biases)
    with pytest.raises(ValueError, match="list of conv states"):
        causal_conv1d_update_reference(xbc, [s[:, :2].clone() for s in state], weights, biases)
    with pytest.raises(ValueError, match="rows"):
        causal_conv1d_update_reference(xbc, state.clone(), weights[:2], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_follows_a_table_refreshed_in_place():
    """Captured once over a table buffer, replayed after the table was pointed at other states: the replay shifts
    the new states, as the decode graphs rely on."""
    xbc, weights, biases, stacked = _inputs(2, (40, 12, 12), 4, torch.bfloat16, seed=8)
    first = [stacked[i:i + 1].clone() for i in range(2)]
    second = [torch.randn_like(t) for t in first]
    table = torch.tensor([t.data_ptr() for t in first], dtype=torch.int64, device=DEVICE)
    x_in = xbc.clone()
    causal_conv1d_update(x_in, table, weights, biases, state_dtype=torch.bfloat16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = causal_conv1d_update(x_in, table, weights, biases, state_dtype=torch.bfloat16)
    expected = [t.clone() for t in second]
    want = causal_conv1d_update_reference(x_in, expected, weights, biases)
    untouched = [t.clone() for t in first]
    table.copy_(torch.tensor([t.data_ptr() for t in second], dtype=torch.int64))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    for mine, theirs in zip(second, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    for mine, before in zip(first, untouched, strict=True):
        torch.testing.assert_close(mine, before, atol=0, rtol=0)


COMPILE = r"""
import sys, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from uniql.kernels.conv_update import _conv_update_kernel as kernel

ptrs = dict.fromkeys(("xbc_ptr", "out_ptr", "w0", "w1", "w2", "b0", "b1", "b2"), "*bf16")
for arch in map(int, sys.argv[1:]):
    for table, act, width in ((True, 1, 4), (False, 3, 2), (True, 2, 4)):
        consts = dict(TABLE=table, STATE_DTYPE=tl.bfloat16, HAS_BIAS=True, ACT=act, W=width, BLOCK_C=128)
        sig = {a: "constexpr" if a in consts else dict(ptrs, state_ptr="*i64" if table else "*bf16").get(a, "i32")
               for a in kernel.arg_names}
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": 4, "num_stages": 3 if arch >= 80 else 2})
        print("ok", arch)
"""


def test_kernel_compiles_for_jetson_and_hopper():
    """Ahead of time, no GPU needed (as tests/kernels/test_compile_targets.py does for the other kernels): the
    table form (a dtype-typed pointer from an int64), the stacked form, every activation, sm_86 (A6000), sm_87
    and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, "86", "87", "90"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 9
