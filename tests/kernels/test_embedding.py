"""4-bit embedding lookup: reference equals Int4Linear.lookup, the Triton kernel equals the reference
(interpreter on CPU; tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import int4_format as f4  # noqa: E402
from uniql.kernels.embedding import embedding_int4, embedding_int4_reference  # noqa: E402
from uniql.runtime.linear import Int4Linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _table(vocab, hidden, group_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qweight, scales = f4.rtn_quantize(torch.randn(vocab, hidden, generator=gen), group_size)
    qweight[0, 0] = -1  # all codes 15: the sign bit of the word is set
    return qweight, scales


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reference_matches_int4_linear_lookup(dtype):
    qweight, scales = _table(37, 96, 32)
    ids = torch.tensor([[0, 36, 5], [5, 17, 0]])
    expected = Int4Linear.from_packed(qweight, scales, 32).lookup(ids, dtype=dtype)
    got = embedding_int4_reference(ids, qweight, scales, 32, dtype)
    assert got.shape == (2, 3, 96) and got.dtype == dtype
    assert torch.equal(got, expected)  # (code-8)*scale is exact in fp32, so one rounding either way


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,hidden,group_size,ids_shape", [
    (37, 64, 32, (5,)),
    (50, 192, 64, (2, 3)),  # 24 packed rows: BLOCK_R 32, masked tail
    (101, 128, 128, (1, 1)),
    (23, 160, 32, ()),  # a scalar id
])
def test_kernel_matches_reference(dtype, vocab, hidden, group_size, ids_shape):
    qweight, scales = _table(vocab, hidden, group_size, seed=vocab)
    gen = torch.Generator().manual_seed(hidden)
    ids = torch.randint(0, vocab, ids_shape, generator=gen)
    if ids.numel() > 1:
        ids.view(-1)[:2] = torch.tensor([0, vocab - 1])
    qweight, scales, ids = qweight.to(DEVICE), scales.to(DEVICE), ids.to(DEVICE)
    got = embedding_int4(ids, qweight, scales, group_size, dtype)
    expected = embedding_int4_reference(ids, qweight, scales, group_size, dtype)
    assert got.shape == (*ids_shape, hidden) and got.dtype == dtype
    assert torch.equal(got, expected)


def test_kernel_int32_ids_strided_ids_and_vocab_prefix_view():
    qweight, scales = _table(40, 64, 32, seed=3)
    # a vocab prefix is a strided view of the stored tensors (row stride 40 > 30 columns)
    qweight, scales = qweight[:, :30].to(DEVICE), scales[:, :30].to(DEVICE)
    ids = torch.tensor([3, 99, 29, 99, 0, 99], dtype=torch.int32, device=DEVICE)[::2]
    expected = embedding_int4_reference(ids, qweight, scales, 32, torch.float32)
    assert torch.equal(embedding_int4(ids, qweight, scales, 32, torch.float32), expected)
    assert torch.equal(embedding_int4(ids, qweight, scales, 32, torch.float32, check_ids=False), expected)


def test_empty_ids():
    qweight, scales = _table(10, 64, 32)
    ids = torch.zeros(2, 0, dtype=torch.long)
    assert embedding_int4(ids.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), 32).shape == (2, 0, 64)


@pytest.mark.parametrize("bad_id", [-1, 10, 1000])
def test_out_of_range_id_is_named(bad_id):
    qweight, scales = (t.to(DEVICE) for t in _table(10, 64, 32))
    ids = torch.tensor([1, bad_id, 2], device=DEVICE)
    for fn in (embedding_int4, embedding_int4_reference):
        with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range \[0, 10\)"):
            fn(ids, qweight, scales, 32)


@pytest.mark.parametrize("change,match", [
    (dict(group_size=48), "group size must be one of"),
    (dict(group_size=64), "do not match"),
    (dict(qweight="float"), "qweight must be int32"),
    (dict(scales="float"), "scales float16"),
    (dict(ids="float"), "integer tensor"),
    (dict(dtype=torch.int32), "output dtype"),
    (dict(scales="short"), "do not match"),
    (dict(qweight="flat"), "must be 2-D"),
])
def test_bad_inputs_raise(change, match):
    qweight, scales = _table(10, 96, 32)
    args = {"ids": torch.tensor([1, 2]), "qweight": qweight, "scales": scales, "group_size": 32,
            "dtype": torch.float16}
    edits = {"float": lambda t: t.float(), "short": lambda t: t[:-1], "flat": lambda t: t.reshape(-1)}
    for name, how in change.items():
        args[name] = edits[how](args[name]) if isinstance(how, str) else how
    for fn in (embedding_int4, embedding_int4_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_cpu_tensors_without_interpreter_point_to_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qweight, scales = _table(10, 64, 32)
    with pytest.raises(ValueError, match="use embedding_int4_reference on CPU"):
        embedding_int4(torch.tensor([1]), qweight, scales, 32)


@pytest.mark.parametrize(("hidden", "dtype"), [(1024, torch.float16), (96, torch.float32), (4096, torch.float16)])
def test_kernel_begins_the_next_rmsnorm(hidden, dtype):
    """norm_weight: the rows, rows * w rounded like them, and each tile's fp32 sum of the rounded rows' squares
    (what an output GEMV's residual epilogue hands the next GEMV); tiles of 512 values, the last one partial."""
    qweight, scales = (t.to(DEVICE) for t in _table(300, hidden, 32, seed=3))
    ids = torch.tensor([[5, 299, 0]], device=DEVICE)
    weight = (torch.rand(hidden) + 0.5).to(DEVICE, dtype)
    rows, rows_w, sums = embedding_int4(ids, qweight, scales, 32, dtype, norm_weight=weight)
    want = embedding_int4_reference(ids, qweight, scales, 32, dtype)
    assert torch.equal(rows, want) and torch.equal(embedding_int4(ids, qweight, scales, 32, dtype), want)
    assert torch.equal(rows_w, (want.float() * weight.float()).to(dtype))
    tiles = -(-hidden // 512)
    per_tile = torch.nn.functional.pad(want.float().reshape(3, hidden) ** 2, (0, tiles * 512 - hidden))
    assert sums.shape == (3, tiles) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, per_tile.reshape(3, tiles, 512).sum(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm_weight must be a contiguous"):
        embedding_int4(ids, qweight, scales, 32, dtype, norm_weight=weight[:-1])
