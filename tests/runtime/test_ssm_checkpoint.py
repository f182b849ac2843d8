"""INT4 UniQL checkpoints of SSM and hybrid models: `uniql compress` quantizes every projection (Mamba z/x/B/C/dt/out
included) into the packed format, keeps conv/norm/A/D/dt_bias in float, loads back exactly, and the memory formula
matches the tensors held. The Hadamard rotation (GPTQ's default) is exact on Mamba layers too."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build_tiny_int4_ckpt, make_data_dir, max_rel_diff, tiny_ssm_hf_model

from uniql.compressor.hadamard import rotate_hidden
from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.checkpoint import load_checkpoint, read_manifest
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.linear import Int4Linear
from uniql.runtime.memory import rung_bytes

FLOAT_MAMBA = ("conv_x_weight", "conv_B_weight", "conv_C_weight", "conv_x_bias", "norm_weight", "dt_bias", "A_log",
               "D")


@pytest.fixture(scope="module", params=["mamba2", "bamba", "nemotron_h"])
def built(request, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_tiny_int4_ckpt(root / "src", root / "ckpt", make_data_dir(root / "data"), tokenizer,
                                family=request.param)
    return request.param, root / "src", ckpt


def test_projections_are_int4_and_mixer_params_float(built):
    _, _, ckpt = built
    model, manifest = load_checkpoint(ckpt)
    assert manifest["weights"] == "int4" and manifest["calibration"]["order"] == "uniql"  # SSM sorting ran
    for layer in model.layers:
        assert all(isinstance(layer.get_linear(p), Int4Linear) for p in layer.linear_paths)
        if layer.mamba is not None:
            assert {"mamba.z_proj", "mamba.dt_proj", "mamba.out_proj"} <= set(layer.linear_paths)
            for name in FLOAT_MAMBA:
                assert getattr(layer.mamba, name).dtype == torch.float32
    tensors = manifest["tensors"]
    assert tensors["layers.0.mamba.x_proj.qweight"]["dtype"] == "int32"
    assert tensors["layers.0.mamba.A_log"]["dtype"] == "float32"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_loaded_int4_model_equals_quantizing_in_memory(built, tokenizer, monkeypatch):
    """Save + load is exact (rung 0 and the last rung) against sorting (same calibration as the CLI's flags) and
    RTN applied to the same source in memory, and the 4-bit model still tracks the float source."""
    from uniql.compressor.compress import CompressConfig, compress_decoder

    family, _, ckpt = built
    model, _ = load_checkpoint(ckpt)
    hf = tiny_ssm_hf_model(family, vocab=model.spec.vocab_size)
    ref = decoder_from_hf(hf)
    monkeypatch.setenv("UNIQL_DATA_DIR", str(ckpt.parent / "data"))
    compress_decoder(ref, tokenizer, CompressConfig(calib_samples=8, calib_seqlen=64, bi_samples=2, bi_seqlen=64,
                                                    group_size=32, quant=None))
    assert ref.ladder.sizes == model.ladder.sizes
    with torch.no_grad():
        ids = torch.randint(0, model.spec.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
        source = hf(ids).logits
        quantize_model(ref, None, QuantConfig(method="rtn", group_size=32))
        last = len(model.ladder.rates) - 1
        for rung in (0, last):
            assert max_rel_diff(model(ids, rung=rung), ref(ids, rung=rung)) <= 1e-5
        assert _cosine(model(ids, rung=0), source) > 0.9  # a wrong layout gives ~0


def test_rung0_bytes_equal_the_loaded_tensors(built):
    _, _, ckpt = built
    model, _ = load_checkpoint(ckpt)
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    full = [model.full_sizes] * model.spec.num_layers
    assert rung_bytes(model.spec, full, "int4", 32, float_bytes=4)["total_bytes"] == resident


def test_info_reports_ssm_rungs(built):
    from uniql.cli import info_report

    _, _, ckpt = built
    report = info_report(read_manifest(ckpt))
    totals = [r["total_bytes"] for r in report["rungs"]]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]
    model, _ = load_checkpoint(ckpt)
    mamba = model.spec.layers_with("mamba")
    for row, sizes in zip(report["rungs"], model.ladder.sizes, strict=True):  # over the Mamba layers only
        assert row["mean_kept"]["ssm_p"] == sum(sizes[i].ssm_p for i in mamba) / len(mamba)
    assert totals[-1] < totals[0]


@pytest.mark.parametrize("family", ["mamba2", "bamba", "nemotron_h"])
def test_hadamard_rotation_is_exact_on_mamba_layers(family):
    hf = tiny_ssm_hf_model(family)
    model = decoder_from_hf(hf)
    ids = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        rotate_hidden(model, seed=3)
        assert max_rel_diff(model(ids), before) <= 1e-5


def test_gptq_quantizes_a_hybrid(tokenizer, tmp_path, monkeypatch):
    """GPTQ (with the Hadamard rotation) over a Nemotron-H hybrid: one Hessian per shared input, every projection
    packed, and the 4-bit model tracks the float one, with either objective; the rung-weighted one changes the
    K-truncated Mamba out_proj and leaves the N-truncated in_proj parts (z, x) as plain GPTQ made them."""
    from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder

    hf = tiny_ssm_hf_model("nemotron_h", vocab=len(tokenizer))
    model = decoder_from_hf(hf)
    spec = model.spec
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(spec, Alignment(32)), spec.num_layers)
    ids = torch.randint(0, spec.vocab_size, (1, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids)
    monkeypatch.setenv("UNIQL_DATA_DIR", str(make_data_dir(tmp_path)))
    quantized = {}
    for objective in ("full", "rungs"):
        quantized[objective] = copy.deepcopy(model)
        quantize_model(quantized[objective], tokenizer, QuantConfig(method="gptq", group_size=32, calib_samples=4,
                                                                    calib_seqlen=64, gptq_objective=objective))
        assert all(isinstance(layer.get_linear(p), Int4Linear)
                   for layer in quantized[objective].layers for p in layer.linear_paths)
        with torch.no_grad():
            assert _cosine(quantized[objective](ids), ref) > 0.9
    first_mamba = spec.layers_with("mamba")[0]  # the layers before it see the same inputs under both objectives
    full, rungs = (quantized[o].layers[first_mamba] for o in ("full", "rungs"))
    for path, changed in (("mamba.out_proj", True), ("mamba.z_proj", False), ("mamba.x_proj", False)):
        assert torch.equal(full.get_linear(path).qweight, rungs.get_linear(path).qweight) != changed, path
