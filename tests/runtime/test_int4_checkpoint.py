"""An INT4 checkpoint round-trips exactly with its format dtypes, and memory.rung_bytes equals the real modules."""

import json

import pytest
import torch
from helpers import tiny_hf_model

from uniql.compressor.quantize import QuantConfig, quantize_model
from uniql.runtime.checkpoint import MANIFEST, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from uniql.runtime.decoder import LINEAR_PATHS
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, LayerSizes, dim_steps, uniform_ladder
from uniql.runtime.linear import Int4Linear
from uniql.runtime.memory import fp16_bytes, rung_bytes
from uniql.runtime.spec import ArchSpec

G = 32
ALIGN = Alignment(group_size=G)
QUANT = QuantConfig(method="rtn", group_size=G)
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    m = decoder_from_hf(tiny_hf_model("llama", heads=8, kv_heads=4, hidden=64, inter=256))
    s = m.spec
    m.ladder = uniform_ladder(m.full_sizes, dim_steps(s.num_heads, s.num_kv_heads, s.head_dim, ALIGN), s.num_layers)
    quantize_model(m, None, QUANT)  # RTN needs no tokenizer
    return m.requires_grad_(False).eval()


def _save(model, path, dtype=torch.float32):
    return save_checkpoint(model, path, alignment=ALIGN, source={"model": "tiny-llama"},
                           calibration={"order": "uniql"}, dtype=dtype, quantization=QUANT.manifest())


@pytest.fixture
def ckpt(model, tmp_path):
    return _save(model, tmp_path / "ckpt")


def _manifest(ckpt):
    return json.loads((ckpt / MANIFEST).read_text())


def test_manifest_says_int4_with_its_quantization(ckpt):
    manifest = _manifest(ckpt)
    assert manifest["weights"] == "int4"
    quant = manifest["quantization"]
    assert quant["group_size"] == G and quant["method"] == "rtn" and quant["bits"] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_tensors_keep_their_format_dtypes_whatever_the_save_dtype(model, tmp_path, dtype):
    tensors = _manifest(_save(model, tmp_path, dtype))["tensors"]
    packed = {k: v["dtype"] for k, v in tensors.items() if k.endswith((".qweight", ".scales"))}
    assert len(packed) == 2 * (7 * model.spec.num_layers + 2)  # projections, embed, lm_head
    assert all(v == ("int32" if k.endswith(".qweight") else "float16") for k, v in packed.items())
    assert tensors["norm.weight"]["dtype"] == str(dtype).removeprefix("torch.")


def test_round_trip_gives_identical_logits(model, ckpt):
    loaded, _ = load_checkpoint(ckpt)
    assert isinstance(loaded.embed, Int4Linear)
    assert all(isinstance(layer.get_linear(p), Int4Linear) for layer in loaded.layers for p in LINEAR_PATHS)
    with torch.no_grad():
        for rung in (0, len(model.ladder.rates) - 1):
            assert torch.equal(loaded(IDS, rung=rung), model(IDS, rung=rung))


def test_loading_as_bfloat16_keeps_the_packed_values(model, ckpt):
    loaded, _ = load_checkpoint(ckpt, dtype=torch.bfloat16)
    proj = loaded.layers[1].mlp.down_proj
    assert proj.qweight.dtype == torch.int32 and proj.scales.dtype == torch.float16
    assert torch.equal(proj.scales, model.layers[1].mlp.down_proj.scales)
    assert loaded.norm.weight.dtype == torch.bfloat16


def test_flipped_byte_is_a_checkpoint_error(ckpt):
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


def _edit(ckpt, **changes):
    (ckpt / MANIFEST).write_text(json.dumps({**_manifest(ckpt), **changes}))


def test_unknown_weights_kind_is_a_checkpoint_error(ckpt):
    _edit(ckpt, weights="int7")
    with pytest.raises(CheckpointError, match="unknown weights kind 'int7'"):
        load_checkpoint(ckpt)


def test_int4_manifest_without_quantization_is_a_checkpoint_error(ckpt):
    _edit(ckpt, quantization=None)
    with pytest.raises(CheckpointError, match="quantization.group_size"):
        load_checkpoint(ckpt)


# ---- memory.rung_bytes --------------------------------------------------------------------------------------


def _module_weight_bytes(model, sizes: list[LayerSizes]) -> int:
    s = model.spec
    total = 0
    for layer, z in zip(model.layers, sizes, strict=True):
        active = {"attn.q_proj": (s.num_heads * z.qk, None), "attn.k_proj": (s.num_kv_heads * z.qk, None),
                  "attn.v_proj": (s.num_kv_heads * z.vo, None), "attn.o_proj": (None, s.num_heads * z.vo),
                  "mlp.gate_proj": (z.mlp, None), "mlp.up_proj": (z.mlp, None), "mlp.down_proj": (None, z.mlp)}
        total += sum(layer.get_linear(p).nbytes(*active[p]) for p in LINEAR_PATHS)
    return total


def test_rung_bytes_equals_the_modules_nbytes_at_every_rung(model):
    for sizes in model.ladder.sizes:
        assert rung_bytes(model.spec, sizes, "int4", G)["weight_bytes"] == _module_weight_bytes(model, sizes)


def test_rung0_total_bytes_equal_the_resident_tensors(model):
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    full = [model.full_sizes] * model.spec.num_layers
    assert rung_bytes(model.spec, full, "int4", G, float_bytes=4)["total_bytes"] == resident  # fp32 norms


def test_weight_bytes_strictly_decrease_when_a_rung_shrinks(model):
    ladder = model.ladder
    weights = [rung_bytes(model.spec, sizes, "int4", G)["weight_bytes"] for sizes in ladder.sizes]
    shrinking = [i for i in range(1, len(weights)) if ladder.sizes[i] != ladder.sizes[i - 1]]
    assert len(shrinking) >= 4
    assert all(weights[i] < weights[i - 1] for i in shrinking)
    assert all(weights[i] == weights[i - 1] for i in range(1, len(weights)) if i not in shrinking)


LLAMA_8B = ArchSpec(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, tie_embeddings=False,
                    qk_bias=False, v_bias=False, o_bias=False, mlp_bias=False, act="silu",
                    rope_attention_scaling=1.0, max_position_embeddings=131072)


def test_int4_llama_8b_is_under_a_third_of_fp16():
    full = LayerSizes(mlp=14336, qk=128, vo=128)
    fp16 = fp16_bytes(LLAMA_8B, full)
    assert fp16 == pytest.approx(16.06e9, rel=1e-3)  # 8.03 B parameters x 2 bytes
    int4 = rung_bytes(LLAMA_8B, [full] * 32, "int4", 128)["total_bytes"]
    assert 3.8 < fp16 / int4 < 4.0  # 3.88x: 4 bits + one fp16 scale per 128 weights = 4.125 bits, fp16 norms


def test_packed_codes_stored_as_floats_are_refused(ckpt):
    """A file (with a manifest agreeing) whose codes are floats would load and then fail inside a kernel."""
    from safetensors.torch import load_file, save_file

    from uniql.runtime.checkpoint import sha256_file

    tensors = load_file(ckpt / WEIGHTS)
    name = next(k for k in tensors if k.endswith(".qweight"))
    tensors[name] = tensors[name].float()
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "uniql"})
    manifest = _manifest(ckpt)
    manifest["tensors"][name]["dtype"] = "float32"
    manifest["files"][WEIGHTS] = sha256_file(ckpt / WEIGHTS)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"'{name}'.*torch.float32.*needs.*torch.int32"):
        load_checkpoint(ckpt)
