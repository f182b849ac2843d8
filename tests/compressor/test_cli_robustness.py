"""`uniql compress` / `finetune` given bad or awkward input, or stopped half-way: one error line (exit 2; 130 for
Ctrl-C), no traceback, and never a half-written directory that looks like a checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_CALIB_FLAGS, TINY_RTN_FLAGS, cli_data, cli_sorted_ckpt, cli_source

from uniql.cli import main

CALIB = TINY_CALIB_FLAGS


source_fixture = pytest.fixture(scope="module", name="source")(cli_source)
data_fixture = pytest.fixture(autouse=True, name="data")(cli_data)
sorted_ckpt_fixture = pytest.fixture(scope="module", name="sorted_ckpt")(cli_sorted_ckpt)


def _fails(capsys, argv, message, rc=2):
    """``main(argv)`` returns ``rc`` with ``message`` on one stderr line and no traceback."""
    try:
        assert main([str(a) for a in argv]) == rc
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped main(): the user sees a traceback")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("uniql ")]
    assert "Traceback" not in err and len(lines) == 1 and message in lines[0], err


def _interrupt_the_save(monkeypatch):
    """Ctrl-C while model.safetensors is being written (a partial file is on disk)."""
    import uniql.runtime.checkpoint as checkpoint

    def partial_then_interrupt(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", partial_then_interrupt)


def test_ctrl_c_while_replacing_a_checkpoint_leaves_the_old_one_whole(source, sorted_ckpt, tmp_path, monkeypatch,
                                                                      capsys):
    from uniql.runtime.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    shutil.copytree(sorted_ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt_the_save(monkeypatch)
    _fails(capsys, ["compress", source, "--out", out, *TINY_RTN_FLAGS], "interrupted", rc=130)
    # before: the old manifest stayed over the partial weights, and `uniql info` showed it as a whole checkpoint
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_checkpoint(out)  # sha256 and tensors check out


def test_ctrl_c_during_a_first_save_leaves_nothing_and_a_rerun_works(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new"
    with monkeypatch.context() as mp:
        _interrupt_the_save(mp)
        _fails(capsys, ["compress", source, "--out", out, "--no-quant", *CALIB], "interrupted", rc=130)
    assert not out.exists()  # before: a partial model.safetensors, and the re-run was refused as a foreign folder
    assert main(["compress", str(source), "--out", str(out), "--no-quant", *CALIB]) == 0


def test_replacing_a_checkpoint_drops_the_old_models_tokenizer_files(source, tmp_path, tokenizer, capsys):
    from uniql.runtime.checkpoint import load_tokenizer

    plain = tmp_path / "plain"  # the same model, its tokenizer without a chat template
    shutil.copytree(source, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "ckpt"
    assert main(["compress", str(source), "--out", str(out), "--no-quant", *CALIB]) == 0
    assert load_tokenizer(out).chat_template
    (out / "NOTES.md").write_text("the user's own file")
    assert main(["compress", str(plain), "--out", str(out), "--no-quant", *CALIB]) == 0
    assert not load_tokenizer(out).chat_template  # before: the first model's chat_template.jinja was still read
    assert (out / "NOTES.md").read_text() == "the user's own file"  # only tokenizer files are the model's
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("content, message", [
    ("[]", "holds no records"),  # before: an IndexError traceback from the tokenizer
    ('[{"text": null}]', "nor 'text' (a string)"),
    (b"\xff\xfe\x80 binary", "is not UTF-8 text"),  # before: the codec's message, naming no file
], ids=["empty", "null-text", "binary"])
def test_bad_calibration_files_are_one_error_line(source, tmp_path, capsys, content, message):
    data = tmp_path / ("calib.json" if isinstance(content, str) else "calib.txt")
    data.write_bytes(content.encode() if isinstance(content, str) else content)
    out = tmp_path / "out"
    _fails(capsys, ["compress", source, "--out", out, "--no-quant", *CALIB, "--calib-data", data], message)
    assert not out.exists()  # the --out the run created is gone again


def test_a_model_folder_without_tokenizer_files_is_one_error_line(source, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    # before: transformers' six-line "Couldn't instantiate the backend tokenizer" message
    _fails(capsys, ["compress", bare, "--out", tmp_path / "out", "--no-quant", *CALIB], "has no tokenizer files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--bi-seqlen", "300"], "--bi-seqlen 300 exceeds the model's context of 256"),
    (["--calib-seqlen", "512", "--calib-data", "wikitext2"], "--calib-seqlen 512 exceeds"),
    (["--finetune-steps", "1"], "--finetune-seqlen 512 exceeds"),  # its default
], ids=["bi", "sort", "finetune"])
def test_windows_longer_than_the_models_context_are_refused(source, tmp_path, capsys, flags, message):
    """As `uniql eval` and the engine refuse them; compress calibrated on them without a word."""
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", "--no-quant", *CALIB, *flags], message)


def test_gptq_data_is_found_before_any_work(source, tmp_path, capsys, monkeypatch):
    import uniql.compressor.compress as compress

    monkeypatch.setattr(compress, "load_source", lambda *a: pytest.fail("the model was loaded first"))
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", *CALIB, "--quant-data", tmp_path / "typo.txt"],
           "GPTQ calibration data")


@pytest.mark.parametrize("flags, message", [
    (["--finetune-max-examples", "0"], "--finetune-max-examples must be at least 1"),  # meant: all of them
    (["--finetune-max-examples", "-1"], "--finetune-max-examples must be at least 1"),  # all but the last
    (["--finetune-warmup", "-5"], "must be >= 0"),
    (["--finetune-save-every", "-1"], "must be >= 0"),  # meant: a checkpoint every step
    (["--finetune-state-dir", "{file}"], "is a file"),  # before: a traceback after the training
], ids=["max0", "max-1", "warmup", "save-every", "state-file"])
def test_finetune_settings_that_meant_something_else_are_refused(sorted_ckpt, tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("")
    flags = [f.replace("{file}", str(tmp_path / "file")) for f in flags]
    small = ["--finetune-steps", "1", "--finetune-seqlen", "128", "--finetune-batch-size", "1",
             "--finetune-grad-accum", "1"]  # seconds, where a setting is not refused
    _fails(capsys, ["finetune", sorted_ckpt, "--out", tmp_path / "out", "--device", "cpu", "--no-quant", *small,
                    *flags], message)
    assert not (tmp_path / "out").exists()


def test_a_damaged_adapter_state_is_named(sorted_ckpt, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / "latest.json").write_text("garbage")
    _fails(capsys, ["finetune", sorted_ckpt, "--out", tmp_path / "out", "--device", "cpu", "--no-quant",
                    "--finetune-seqlen", "128", "--finetune-state-dir", state, "--resume"], "latest.json is damaged")


def test_finetune_of_an_int4_checkpoint_creates_no_out(source, tmp_path, capsys):
    int4 = tmp_path / "int4"
    assert main(["compress", str(source), "--out", str(int4), *TINY_RTN_FLAGS]) == 0
    _fails(capsys, ["finetune", int4, "--out", tmp_path / "out", "--device", "cpu"], "holds int4 weights")
    assert not (tmp_path / "out").exists()


def test_an_os_error_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A path that cannot be read or written (permissions, a file where a folder belongs, a full disk)."""
    import uniql.compressor.compress as compress

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(compress, "compress", denied)
    _fails(capsys, ["compress", "m", "--out", tmp_path / "o"], "Permission denied")
