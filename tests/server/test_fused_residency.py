"""Residency over fused q|k|v / gate|up tensors (the CUDA layout), checked on any device.

A release re-lays every fused tensor with each member cut to its own resident prefix: the members' starts move,
and the kernels must read each segment at its new offset. Outputs at every resident rung must be bit-identical
to the never-released model's, through the torch path and through the Triton kernel (interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch

from uniql.runtime.checkpoint import load_checkpoint
from uniql.runtime.fusion import fuse_projections
from uniql.server.residency import ResidencyManager
from uniql.server.weights import ElasticWeights

IDS = torch.tensor([[5, 17, 99, 3, 250, 1024, 77]])
RELEASED = 5


@pytest.fixture
def fused_model(portable_tiny_ckpt):
    model = load_checkpoint(portable_tiny_ckpt)[0]
    assert fuse_projections(model) == 2 * model.spec.num_layers
    return model


def outputs(model, rungs) -> dict[int, torch.Tensor]:
    with torch.inference_mode():
        return {rung: model(IDS, rung=rung) for rung in rungs}


def test_release_relays_each_member_to_its_prefix_and_reload_restores_it(fused_model, portable_tiny_ckpt):
    store = ElasticWeights(fused_model, portable_tiny_ckpt)
    top = len(store.rung_bytes) - 1
    want = outputs(fused_model, range(top + 1))
    assert store.resident_bytes() == store.rung_bytes[0] and all(len(groups) == 2 for groups in store.fused)
    held = [store.resident_bytes()]
    for layer in range(store.num_layers):
        store.release_layer(layer, RELEASED)
        held.append(store.resident_bytes())
    assert held == sorted(held, reverse=True) and store.resident_bytes() == store.rung_bytes[RELEASED]
    attn = fused_model.layers[0].attn
    widths = tuple(store.shapes[0][p][RELEASED][0] for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj"))
    assert attn.qkv.widths == widths and attn.qkv.qweight.shape[1] == sum(widths)
    assert attn.qkv.starts == [0, widths[0], widths[0] + widths[1]]
    base = attn.qkv.qweight.untyped_storage().data_ptr()  # members are views of the new fused tensor
    assert all(m.qweight.untyped_storage().data_ptr() == base for m in attn.qkv.members)
    got = outputs(fused_model, range(RELEASED, top + 1))
    assert all(torch.equal(got[r], want[r]) for r in got)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not resident"):
        fused_model(IDS, rung=0)  # never a silent read of the neighbouring member's columns

    for layer in range(store.num_layers):
        store.reload_layer(layer, 0)
    assert store.resident_bytes() == store.rung_bytes[0]
    assert attn.qkv.widths == tuple(m.out_features for m in attn.qkv.members)
    got = outputs(fused_model, range(top + 1))
    assert all(torch.equal(got[r], want[r]) for r in got)


def test_the_triton_kernel_reads_the_relaid_segments(fused_model, portable_tiny_ckpt):
    pytest.importorskip("triton")
    from uniql.kernels.int4_matmul import int4_matmul, int4_matmul_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)
    mlp = fused_model.layers[1].mlp
    store = ElasticWeights(fused_model, portable_tiny_ckpt)
    keep = store.shapes[1]["mlp.gate_proj"][RELEASED][0]
    x = torch.randn(3, mlp.gate_up.qweight.shape[0] * 8, generator=torch.Generator().manual_seed(0))
    members = [(m.qweight.clone(), m.scales.clone()) for m in mlp.gate_up.members]
    want = torch.cat([int4_matmul_reference(x, q, s, mlp.gate_up.group_size, n=keep) for q, s in members], dim=1)
    store.release_layer(1, RELEASED)
    fused = mlp.gate_up
    segments = list(zip(fused.starts, (keep, keep), strict=True))
    got = int4_matmul(x.to(device), fused.qweight.to(device), fused.scales.to(device), fused.group_size,
                      segments=segments)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_a_residency_pass_runs_whole_inside_exclusive():
    from test_controller import WEIGHTS, FakeStore

    store, seen = FakeStore(), []

    def exclusive(change):
        seen.append(len(store.calls))
        change()
        seen.append(len(store.calls))

    mgr = ResidencyManager(store, reserve_bytes=0, exclusive=exclusive)
    assert mgr.apply(4) and mgr.resident_bytes == WEIGHTS[4]
    assert seen == [0, 3] and store.calls[-1] == ("settle",)  # every layer inside, settle after
    mgr.apply(0)
    assert seen[2:] == [4, 7] and mgr.floor == 0
