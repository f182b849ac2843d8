"""A UniQL checkpoint round-trips exactly, and every kind of damage is a clear CheckpointError."""

import json

import pytest
import torch
from helpers import tiny_hf_model

from uniql.runtime.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder

ALIGN = Alignment(group_size=32)
SOURCE = {"model": "tiny-qwen2", "revision": "test"}
CALIBRATION = {"order": "uniql", "seed": 1234}


@pytest.fixture(scope="module")
def model():
    m = decoder_from_hf(tiny_hf_model("qwen2"))
    s = m.spec
    m.ladder = uniform_ladder(m.full_sizes, dim_steps(s.num_heads, s.num_kv_heads, s.head_dim, ALIGN), s.num_layers)
    return m


@pytest.fixture
def ckpt(model, tmp_path):
    return save_checkpoint(model, tmp_path / "ckpt", alignment=ALIGN, source=SOURCE, calibration=CALIBRATION)


IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


def test_round_trip_gives_identical_logits_and_ladder(model, ckpt):
    loaded, _ = load_checkpoint(ckpt)
    last = len(model.ladder.rates) - 1
    with torch.no_grad():
        for rung in (0, last):
            assert torch.equal(loaded(IDS, rung=rung), model(IDS, rung=rung))
    assert loaded.ladder == model.ladder
    assert loaded.spec == model.spec


def test_manifest_describes_the_checkpoint(model, ckpt):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["format"] == "uniql" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["arch"] == model.spec.to_dict()
    assert manifest["ladder"] == model.ladder.to_dict()
    assert manifest["alignment"]["group_size"] == 32
    assert manifest["source"] == SOURCE and manifest["calibration"] == CALIBRATION
    expected = {k: ([*v.shape], str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert {k: (t["shape"], t["dtype"]) for k, t in manifest["tensors"].items()} == expected
    assert manifest["files"] == {WEIGHTS: sha256_file(ckpt / WEIGHTS)}


def test_saving_without_a_ladder_is_refused(tmp_path):
    bare = decoder_from_hf(tiny_hf_model("llama", layers=1))
    with pytest.raises(ValueError, match="ladder"):
        save_checkpoint(bare, tmp_path, alignment=ALIGN, source=SOURCE, calibration=CALIBRATION)


def test_bf16_checkpoint_keeps_fp32_rope_frequencies(model, tmp_path):
    out = save_checkpoint(model, tmp_path, alignment=ALIGN, source=SOURCE, calibration=CALIBRATION,
                          dtype=torch.bfloat16)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tensors"]["inv_freq"]["dtype"] == "float32"
    assert manifest["tensors"]["embed.weight"]["dtype"] == "bfloat16"
    loaded, _ = load_checkpoint(out, dtype=torch.float32)
    assert loaded.embed.weight.dtype == torch.float32
    assert loaded.inv_freq.dtype == torch.float32 and torch.equal(loaded.inv_freq, model.inv_freq)


# ---- damage -------------------------------------------------------------------------------------------------

def _edit_manifest(ckpt, **changes):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_missing_manifest(ckpt):
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a UniQL checkpoint.*missing"):
        load_checkpoint(ckpt)


def test_manifest_not_json(ckpt):
    (ckpt / MANIFEST).write_text('{"format": "uniql", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_manifest_of_another_format(ckpt):
    _edit_manifest(ckpt, format=None)
    with pytest.raises(CheckpointError, match="not a UniQL manifest"):
        load_checkpoint(ckpt)


def test_wrong_format_version(ckpt):
    _edit_manifest(ckpt, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_checkpoint(ckpt)


def test_flipped_byte_fails_the_sha256(ckpt):
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: safetensors alone would load it silently
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(ckpt)


def _truncate(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) - 1000])


def test_truncated_weights_fail_the_sha256(ckpt):
    _truncate(ckpt)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


def test_truncated_weights_fail_without_verification(ckpt):
    _truncate(ckpt)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(ckpt, verify=False)


def test_deleted_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing.*incomplete"):
        load_checkpoint(ckpt)


def test_manifest_shape_disagreeing_with_the_file(ckpt):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["tensors"]["embed.weight"]["shape"] = [1, 2]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'embed.weight'.*manifest says"):
        load_checkpoint(ckpt)


def test_manifest_without_files_table(ckpt):
    _edit_manifest(ckpt, files=None)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
