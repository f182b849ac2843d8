"""Hadamard rotation of the hidden dim: exact re-parameterisation at every rung, tied tables stay tied."""

import pytest
import torch
from helpers import max_rel_diff, tiny_hf_model

from uniql.compressor.hadamard import hadamard, random_rotation, rotate_hidden
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.checkpoint import load_checkpoint, save_checkpoint
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder
from uniql.runtime.memory import rung_bytes

TOL = 1e-4


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 48, 576, 896, 4096])
def test_hadamard_matrices(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_unsupported_size_falls_back_to_a_random_orthogonal_matrix():
    assert hadamard(4 * 101) is None
    rot, kind = random_rotation(4 * 101)
    assert kind == "random_orthogonal"
    assert torch.allclose(rot @ rot.T, torch.eye(4 * 101, dtype=torch.float64), atol=1e-10)


def _laddered(family, tie, hidden=48):
    model = decoder_from_hf(tiny_hf_model(family, tie=tie, heads=4, kv_heads=2, hidden=hidden, inter=128))
    spec = model.spec
    model.ladder = uniform_ladder(model.full_sizes, dim_steps(4, 2, spec.head_dim, Alignment(16)), spec.num_layers)
    return model


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_rotation_is_exact_at_every_rung(family, tie):
    """Only the hidden axis turns, so truncating pruned axes commutes with it: every rung is unchanged."""
    model = _laddered(family, tie)
    ids = torch.randint(0, 320, (2, 13))
    last = len(model.ladder.rates) - 1
    with torch.no_grad():
        before = [model(ids, rung=r) for r in (0, last)]
        info = rotate_hidden(model)
        after = [model(ids, rung=r) for r in (0, last)]
    assert max_rel_diff(after[0], before[0]) <= TOL and max_rel_diff(after[1], before[1]) <= TOL
    assert info["runtime_rotation"] is tie
    assert (model.lm_head is None) is tie and (model.hidden_rotation is not None) is tie
    assert all(torch.equal(layer.input_norm.weight, torch.ones(48)) for layer in model.layers)


def test_tied_int4_checkpoint_with_rotation_round_trips(tmp_path):
    model = _laddered("llama", True, hidden=64)
    info = quantize_model(model, None, QuantConfig(method="rtn", group_size=32, hadamard=True))
    save_checkpoint(model, tmp_path, alignment=Alignment(32), source={}, calibration={}, quantization=info)
    loaded, manifest = load_checkpoint(tmp_path)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids, rung=3), model(ids, rung=3))
    assert loaded.lm_head is None and manifest["quantization"]["rotation"]["runtime_rotation"]
    plain = rung_bytes(model.spec, model.ladder.sizes[0], "int4", 32)
    rotated = rung_bytes(model.spec, model.ladder.sizes[0], "int4", 32, runtime_rotation=True)
    assert rotated["total_bytes"] - plain["total_bytes"] == 64 * 64 * 4


def _sorted_for_rotation(family):
    """A sorted model (Qwen2: the V bias now an o_proj bias) or an SSM / hybrid one, with a cutting ladder."""
    from helpers import sort_with_random_calibration, tiny_ssm_hf_model

    from uniql.runtime.ladder import spec_dim_steps

    hf = tiny_hf_model(family, hidden=64) if family == "qwen2" else tiny_ssm_hf_model(family)
    model = decoder_from_hf(hf)
    sort_with_random_calibration(model, "random", seqlen=16)
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(model.spec, Alignment(16, n_align=4)),
                                  model.spec.num_layers)
    return model


@pytest.mark.parametrize("family", ["qwen2", "mamba2", "bamba", "nemotron_h"])
def test_rotation_turns_output_biases_and_ssm_projections_too(family):
    """Output-side biases (Qwen2's folded V bias on o_proj: the reference skips Hadamard for Qwen rather than
    rotate it) turn with the stream; Mamba z/x/B/C/dt turn on their input side and out_proj on its output side,
    while the SSM's own axes (heads, channels, states, gated norm) stay put: every rung is unchanged."""
    model = _sorted_for_rotation(family)
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(5))
    last = len(model.ladder.rates) - 1
    with torch.no_grad():
        before = [model(ids, rung=r) for r in (0, last)]
        rotate_hidden(model)
        after = [model(ids, rung=r) for r in (0, last)]
    assert max_rel_diff(after[0], before[0]) <= TOL and max_rel_diff(after[1], before[1]) <= TOL
    assert max_rel_diff(before[1], before[0]) > 1e-2  # the last rung really cuts
    if family == "qwen2":
        assert all(layer.attn.o_proj.bias is not None for layer in model.layers)
