"""Int4Linear computes x @ W^T on the active prefix of its packed weight, and keeps its format dtypes."""

import pytest
import torch
from torch import nn

from uniql.kernels import int4_format as f4
from uniql.runtime.linear import Int4Linear

G = 32
N, K = 40, 128
GEN = torch.Generator().manual_seed(0)
WEIGHT = torch.randn(N, K, generator=GEN)
BIAS = torch.randn(N, generator=GEN)


def _layer(bias=True) -> Int4Linear:
    qweight, scales = f4.rtn_quantize(WEIGHT, G)
    return Int4Linear.from_packed(qweight, scales, G, BIAS if bias else None)


def _reference_wt(layer: Int4Linear) -> torch.Tensor:
    """W^T [K, N] in float64, decoded bit by bit from the stored words (independent of unpack/dequantize)."""
    q = layer.qweight.long() & 0xFFFFFFFF  # the int32 words as unsigned
    codes = torch.stack([(q >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(K, N)
    scales = layer.scales.double().repeat_interleave(G, 0)
    return (codes.double() - 8) * scales


def _rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n,k", [(None, None), (N, K), (24, K), (N, 72), (24, 40), (16, 8)])
def test_forward_equals_float64_matmul_on_the_prefix(n, k):
    layer = _layer()
    n_, k_ = n or N, k or K
    x = torch.randn(3, 5, k_, generator=GEN)
    out = layer(x, n=n, k=k)
    ref = x.double() @ _reference_wt(layer)[:k_, :n_] + BIAS[:n_].double()
    assert out.shape == (3, 5, n_)
    assert _rel(out, ref) <= 1e-5


def test_forward_without_bias():
    layer = _layer(bias=False)
    x = torch.randn(4, K, generator=GEN)
    assert _rel(layer(x, n=24), x.double() @ _reference_wt(layer)[:, :24]) <= 1e-5


def test_dequantized_weight_is_close_to_the_original():
    assert _rel(_reference_wt(_layer()).T, WEIGHT.double()) < 0.1  # int4, G=32: ~1/15 of a group's max


def test_lookup_returns_rows_of_the_dequantized_table():
    table = Int4Linear.from_packed(*f4.rtn_quantize(WEIGHT, G), G)  # as embedding: vocab N, hidden K
    ids = torch.tensor([[0, 39, 7], [7, 3, 21]])
    rows = table.lookup(ids)
    assert rows.shape == (2, 3, K)
    expected = f4.dequantize(table.qweight, table.scales, G).T[ids]
    assert torch.equal(rows, expected)
    assert _rel(rows, _reference_wt(table).T[ids]) <= 1e-6


def test_cast_to_bfloat16_keeps_packed_dtypes_and_casts_bias():
    model = nn.Sequential(_layer()).to(torch.bfloat16)
    layer = model[0]
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16
    out = layer(torch.randn(2, K, generator=GEN).to(torch.bfloat16), n=24)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 24)


def test_cast_does_not_change_the_packed_values():
    layer = _layer()
    qweight, scales = layer.qweight.clone(), layer.scales.clone()
    layer.half().float().to(torch.bfloat16)
    assert torch.equal(layer.qweight, qweight) and torch.equal(layer.scales, scales)


@pytest.mark.parametrize("n,k", [(None, None), (24, K), (N, 72), (24, 40)])
def test_nbytes_matches_packed_bytes(n, k):
    layer = _layer()
    assert layer.nbytes(n, k) == f4.packed_bytes(k or K, n or N, G)


def test_nbytes_of_the_full_layer_is_its_buffers():
    layer = _layer()
    assert layer.nbytes() == sum(b.numel() * b.element_size() for b in layer.buffers())


def test_constructor_rejects_a_bad_group():
    with pytest.raises(ValueError, match="not a multiple"):
        Int4Linear(in_features=96, out_features=8, group_size=64)


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_cpu_host_forms_give_the_same_outputs_as_views(kind):
    from uniql.kernels import int4_cpu

    if kind == "int4" and not int4_cpu.available():
        pytest.skip("this torch has no CPU int4 GEMM")
    layer = _layer()
    x = torch.randn(3, layer.in_features)
    shapes = ((None, None), (32, 64), (16, 40))
    expected = [layer(x[:, :k], n=n, k=k) for n, k in shapes]
    layer.prepare_host(torch.float32, kind)
    got = [layer(x[:, :k], n=n, k=k) for n, k in shapes]
    for a, b in zip(got, expected, strict=True):
        assert _rel(a, b) < 1e-6
    assert "_host" not in layer.state_dict()
    n, k = layer.out_features, layer.in_features
    assert sum(t.nbytes for t in layer.host.tensors()) == layer.host_bytes(n, k)
    assert type(layer.host).__name__ == {"dense": "DenseHost", "int4": "Int4Host"}[kind]


def test_auto_host_form_is_int4_for_bfloat16_only():
    from uniql.kernels import int4_cpu

    layer = _layer()
    x = torch.randn(2, layer.in_features)
    want = layer(x)  # no host form: the dequantized prefix in fp32
    layer.prepare_host(torch.float32)
    assert type(layer.host).__name__ == "DenseHost"  # fp32 stays exact: aten's int4 GEMM is scalar for fp32
    layer.prepare_host(torch.bfloat16)
    assert type(layer.host).__name__ == ("Int4Host" if int4_cpu.fast() else "DenseHost")
    assert _rel(layer(x.bfloat16()).float(), want) < 2e-2  # bf16 activations and outputs, fp32 accumulation
    with pytest.raises(ValueError, match="host form"):
        layer.prepare_host(torch.float32, "fast")


def test_auto_host_form_stays_dense_where_the_int4_kernel_is_not_vectorised(monkeypatch):
    from uniql.kernels import int4_cpu

    monkeypatch.setattr(int4_cpu, "fast", lambda: False)  # e.g. an ARM host: aten's loop would be the slow path
    layer = _layer()
    layer.prepare_host(torch.bfloat16)
    assert type(layer.host).__name__ == "DenseHost"


def test_int4_host_sends_decode_steps_to_the_int4_gemm_and_prefill_to_the_dense_copy(monkeypatch):
    from uniql.kernels import int4_cpu

    if not int4_cpu.available():
        pytest.skip("this torch has no CPU int4 GEMM")
    layer = _layer()
    layer.prepare_host(torch.bfloat16, "int4")
    want = layer.host.dense.w_t.float()[:, :24]
    calls = []
    for name in ("int4", "dense"):
        form = getattr(layer.host, name)
        monkeypatch.setattr(layer.host, name, lambda *a, _f=form, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    # decode: one position per sequence at any batch (no batch-size switch: results must not depend on the batch)
    shapes = [(1, 1), (8, 1), (64, 1), (16,), (1, 5), (3, 20)]
    for shape in shapes:
        x = torch.randn(*shape, layer.in_features).bfloat16()
        assert _rel(layer(x, n=24).float(), x.float() @ want + layer.bias[:24]) < 2e-2
    assert calls == ["int4", "int4", "int4", "int4", "dense", "dense"]
