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
    eos_token_ids,
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


def test_eos_ids_come_from_the_source_record_and_an_older_checkpoint_has_none():
    assert eos_token_ids({"source": {"eos_token_ids": [2, 0, 128009]}}) == (2, 0, 128009)
    assert eos_token_ids({"source": {"name": "m"}}) == () and eos_token_ids({}) == ()
    assert eos_token_ids({"source": {"eos_token_ids": [2, -1, "3", True]}}) == (2,)  # junk is not an id


def test_generation_eos_ids_join_the_generation_config_and_the_tokenizer():
    from types import SimpleNamespace

    from uniql.compressor.model_input import generation_eos_ids

    llama3 = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128001, 128008, 128009]))
    assert generation_eos_ids(llama3, SimpleNamespace(eos_token_id=128009)) == [128001, 128008, 128009]
    smol = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=0))
    assert generation_eos_ids(smol, SimpleNamespace(eos_token_id=2)) == [0, 2]
    assert generation_eos_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []


def test_the_weights_file_is_readable_as_the_umask_allows(ckpt):
    import os

    umask = os.umask(0)
    os.umask(umask)
    # safetensors alone writes 0600: another user (a container's, a service's) could not read the checkpoint
    assert (ckpt / WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~umask


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


def test_a_file_or_a_missing_path_is_named_as_such(ckpt, tmp_path):
    """The manifest's own path (a natural guess) and a typo both said "uniql.json is missing"."""
    with pytest.raises(CheckpointError, match="is a file: pass the checkpoint's directory"):
        load_checkpoint(ckpt / MANIFEST)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "no-such-ckpt")


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


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/model.safetensors", ".."])
def test_files_outside_the_checkpoint_folder_are_refused(ckpt, name):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = "0" * 64
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lists .* as a checkpoint file"):
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


def _resave(ckpt, change):
    """Rewrite the weights with ``change`` applied, the manifest and sha256 agreeing with the new file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / WEIGHTS)
    change(tensors)
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "uniql"})
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "file": WEIGHTS}
                           for k, v in tensors.items()}
    manifest["files"][WEIGHTS] = sha256_file(ckpt / WEIGHTS)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _pop(path):
    def edit(manifest):
        *parents, last = path
        for key in parents:
            manifest = manifest[key]
        del manifest[last]
    return edit


@pytest.mark.parametrize("damage", [
    _pop(["tensors", "embed.weight", "shape"]), _pop(["ladder", "sizes"]), _pop(["arch", "hidden_size"]),
    lambda m: m.__setitem__("tensors", []), lambda m: m["ladder"].__setitem__("rates", "fast"),
], ids=["tensor_without_shape", "ladder_without_sizes", "arch_without_a_field", "tensors_a_list", "rates_a_string"])
def test_a_damaged_manifest_is_a_checkpoint_error(ckpt, damage):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    damage(manifest)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="damaged|manifest|missing"):
        load_checkpoint(ckpt)


def _set_size(rung, layer, dim, value):
    return lambda m: m["ladder"]["sizes"][rung][layer].__setitem__(dim, value)


@pytest.mark.parametrize("damage, message", [
    (_set_size(3, 1, "mlp", 999999), r"ladder.sizes\[3\]\[1\].mlp is 999999; it must be a whole number in \[1, 128\] "
                                     r"\(arch.intermediate_size is 128\)"),
    (_set_size(2, 0, "vo", 0), r"ladder.sizes\[2\]\[0\].vo is 0; it must be a whole number in \[1, 16\]"),
    (_set_size(1, 0, "qk", "8"), r"ladder.sizes\[1\]\[0\].qk is '8'"),
    (lambda m: m["ladder"]["sizes"][4].pop(), r"ladder.sizes\[4\] lists 1 layers; the architecture has 2"),
    (lambda m: m["ladder"]["rates"].__setitem__(-1, 1.5), r"ladder.rates .* must be pruning rates in \[0, 1\)"),
    (lambda m: m["arch"].__setitem__("num_heads", "four"), "arch.num_heads is 'four'; it must be a whole number"),
    (lambda m: m["arch"].__setitem__("max_position_embeddings", -5), "arch.max_position_embeddings is -5"),
    (lambda m: m["arch"].__setitem__("rms_norm_eps", "x"), "arch.rms_norm_eps is 'x'; it must be a finite number"),
    (lambda m: m["arch"].__setitem__("act", "swoosh"), "arch.act: unsupported MLP activation 'swoosh'"),
], ids=["mlp_past_full", "vo_zero", "qk_a_string", "rung_short_a_layer", "rate_past_1",
        "heads_a_string", "context_negative", "eps_a_string", "unknown_act"])
def test_a_bad_ladder_or_arch_field_is_a_checkpoint_error_naming_it(ckpt, damage, message):
    """Before: a size past the full width loaded (slicing past the end takes the whole weight) and `uniql info`
    showed a rung bigger than the model; a string or a negative arch field was a TypeError traceback, or loaded."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    damage(manifest)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_a_manifest_that_is_not_text_is_a_checkpoint_error(ckpt):
    (ckpt / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("norm.weight", torch.ones(7)), r"'norm.weight' is \[7\].*needs"),
    (lambda t: t.__setitem__("bogus", torch.ones(2)), r"does not have: \['bogus'\]"),
    (lambda t: t.pop("norm.weight"), "lacks tensor 'norm.weight'"),
], ids=["wrong_shape", "extra_tensor", "missing_tensor"])
def test_weights_the_architecture_cannot_take_are_named(ckpt, change, message):
    """File and manifest agree (and the sha256 matches), but the architecture in the manifest needs other tensors."""
    _resave(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_missing_tokenizer_files_are_named(ckpt):
    from uniql.runtime.checkpoint import load_tokenizer

    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(ckpt)  # this fixture was saved without a tokenizer


# ------------------------------------------------------------------------------------------- output directory
def test_out_dir_refuses_what_would_lose_data(tmp_path, ckpt):
    from uniql.runtime.checkpoint import prepare_out_dir

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    source = tmp_path / "hf-model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not empty and is not a UniQL checkpoint"):
        prepare_out_dir(user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    with pytest.raises(CheckpointError, match="not a directory"):
        prepare_out_dir(tmp_path / "afile")
    for out, src in ((source, source), (source / "sub", source), (tmp_path, source), (source, source / "config.json"),
                     (ckpt, ckpt)):  # a model folder, inside, around it; a model file's folder; finetune's input
        with pytest.raises(CheckpointError, match="write over the model being read"):
            prepare_out_dir(out, (src,))


def test_out_dir_takes_new_empty_and_earlier_checkpoints(tmp_path, ckpt):
    from uniql.runtime.checkpoint import FINETUNE_STATE, prepare_out_dir

    resume = tmp_path / "resume"
    (resume / FINETUNE_STATE).mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty", ckpt, resume):
        assert prepare_out_dir(out, (tmp_path / "elsewhere.gguf",)).is_dir()


def test_compress_refuses_a_foreign_directory_before_loading_anything(tmp_path):
    from uniql.compressor.compress import CompressConfig, compress

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        compress("smollm2-135m", tmp_path, CompressConfig(quant=None))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
