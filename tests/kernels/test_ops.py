"""The custom ops: schemas and fake implementations agree with the real ones, and compiled graphs keep them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import ops  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402
from uniql.kernels.int4_matmul import int4_matmul_reference  # noqa: E402
from uniql.kernels.rope import rope_tables  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16 if DEV == "cuda" else torch.float32
CHECKS = ("test_schema", "test_faketensor")


def packed(n: int, k: int, group: int):
    qweight, scales = rtn_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), group)
    return qweight.to(DEV), scales.to(DEV)


def test_int4_matmul_op():
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(2, 120, device=DEV, dtype=DT)
    args = (x, qweight, scales, 64, [0, 40, 48, 16], 120, torch.randn(56, device=DEV))
    torch.library.opcheck(torch.ops.uniql.int4_matmul.default, args, test_utils=CHECKS)
    out = torch.ops.uniql.int4_matmul(*args)
    assert out.shape == (2, 56)


def test_embedding_op():
    qweight, scales = packed(50, 96, 32)  # a [vocab=50, hidden=96] table
    ids = torch.tensor([[3, 49], [0, 7]], device=DEV)
    torch.library.opcheck(torch.ops.uniql.embedding_int4.default, (ids, qweight, scales, 32, DT), test_utils=CHECKS)
    assert ops.embedding(ids, qweight, scales, 32, DT).shape == (2, 2, 96)


def test_rope_op():
    t, heads, kv, qk, head_dim = 3, 4, 2, 6, 8
    q = torch.randn(t, heads * qk, device=DEV, dtype=DT)
    k = torch.randn(t, kv * qk, device=DEV, dtype=DT)
    cos, sin = rope_tables(torch.rand(head_dim // 2), torch.arange(t), 1.0)
    rope_index = torch.stack([torch.randperm(head_dim // 2) for _ in range(kv)]).to(DEV)
    args = (q, k, cos.to(DEV), sin.to(DEV), rope_index, heads, kv, qk)
    torch.library.opcheck(torch.ops.uniql.rope_qk.default, args, test_utils=CHECKS)
    q_rot, k_rot = ops.rope(*args)
    assert q_rot.shape == (heads, t, qk) and k_rot.shape == (kv, t, qk)


def test_compiled_graph_keeps_the_ops_without_breaks():
    qweight, scales = packed(64, 128, 64)
    table_q, table_s = packed(30, 128, 64)  # a [vocab=30, hidden=128] table
    x = torch.randn(1, 128, device=DEV, dtype=DT)
    ids = torch.tensor([1, 5], device=DEV)

    def step(x, ids):
        h = ops.embedding(ids, table_q, table_s, 64, DT)
        return torch.relu(ops.int4_linear(x + h.sum(0), qweight, scales, 64, n=48))

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, ids), step(x, ids))


def test_int4_glu_needs_two_equal_segments_on_every_device():
    """The CPU path refuses what the Triton path refuses (the fake's output width is the first segment's)."""
    qweight, scales = packed(64, 64, 32)
    x = torch.randn(1, 64, device=DEV, dtype=DT)
    with pytest.raises(ValueError, match="two segments of one width"):
        ops.int4_glu(x, qweight, scales, 32, [(0, 40), (48, 16)])
    got = ops.int4_glu(x, qweight, scales, 32, [(0, 24), (32, 24)])
    ref = int4_matmul_reference(x.float(), qweight, scales, 32, segments=[(0, 24), (32, 24)])
    want = torch.nn.functional.silu(ref[:, :24]) * ref[:, 24:]
    assert got.shape == (1, 24)
    # relative to the largest output, as in test_int4_matmul: fp16's elementwise rounding of silu(a) * b where the
    # product is small (measured on the H100: 0.036 at 0.21, 5e-4 of the largest output) is not a wrong column
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < (1e-2 if DEV == "cuda" else 1e-5), err


@pytest.mark.parametrize("segments, k, group, dtype, bias_len, match", [
    ([(48, 32)], 128, 64, DT, None, "outside the stored"),  # sliced to 16 columns before: the fake said 32
    ([(0, 64), (40, 40)], 128, 64, DT, None, "outside the stored"),
    ([(0, 64)], 128, 16, DT, None, "group size"),
    ([(0, 64)], 120, 64, torch.float64, None, "float16, bfloat16 or float32"),
    ([(0, 64)], 128, 64, DT, 1, "bias must have shape"),  # broadcast before
])
def test_int4_linear_refuses_on_every_backend_what_the_launcher_refuses(segments, k, group, dtype, bias_len, match):
    """The CPU path (the op's real implementation there) checked nothing: a segment past the stored columns came
    back narrower than the fake's width, and a group size or bias the Triton path refuses went through."""
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(2, k, device=DEV, dtype=dtype)
    bias = None if bias_len is None else torch.randn(bias_len, device=DEV)
    with pytest.raises(ValueError, match=match):
        ops.int4_linear(x, qweight, scales, group, k=k, bias=bias, segments=segments)
    with pytest.raises(ValueError, match=match):
        torch.ops.uniql.int4_matmul(x, qweight, scales, group, ops._flat(segments), k, bias)
