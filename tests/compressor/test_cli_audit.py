"""A demanding user's audit of the CLI: flags silently ignored, reports that misstate the checkpoint, bad data found
only after the calibration it was meant to feed, writes into the model being read. Each test failed before its fix."""

import json
import shutil

import pytest
from helpers import SMALL_FINETUNE_FLAGS, TINY_CALIB_FLAGS, build_tiny_int4_ckpt, cli_data, cli_sorted_ckpt, cli_source

from uniql.cli import main

CALIB = TINY_CALIB_FLAGS
SMALL_FT = SMALL_FINETUNE_FLAGS

source_fixture = pytest.fixture(scope="module", name="source")(cli_source)
data_fixture = pytest.fixture(autouse=True, name="data")(cli_data)
sorted_ckpt_fixture = pytest.fixture(scope="module", name="sorted_ckpt")(cli_sorted_ckpt)


def _fails(capsys, argv, message):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("uniql ")]
    assert "Traceback" not in err and len(lines) == 1 and message in lines[0], err


@pytest.fixture(scope="module")
def ssm_ckpts(tmp_path_factory, tokenizer):
    """INT4 checkpoints of a tiny Mamba2 (no attention, no MLP) and a tiny Bamba (mamba+mlp, attn+mlp, mamba+mlp)."""
    from helpers import make_data_dir

    root = tmp_path_factory.mktemp("ssm")
    data = make_data_dir(root / "data")
    return {family: build_tiny_int4_ckpt(root / f"{family}-src", root / family, data, tokenizer, family=family)
            for family in ("mamba2", "bamba")}


def test_info_of_a_mamba2_checkpoint_shows_its_ssm_dims_not_zero_heads(ssm_ckpts, capsys):
    """Before: "heads 0/0x0, mlp 0" and "mean kept mlp 0, qk 0.0, vo 0.0" at every rung while the weights shrank:
    the dims that were pruned were never shown."""
    assert main(["info", str(ssm_ckpts["mamba2"])]) == 0
    out = capsys.readouterr().out
    assert "heads 0/0" not in out and "mlp 0" not in out and "qk" not in out
    assert "ssm 8 heads x16, state 16" in out.splitlines()[0]
    assert all("ssm_p" in line and "ssm_n" in line for line in out.splitlines() if line.startswith("  rate"))


def test_info_averages_each_dim_over_the_layers_that_have_it(ssm_ckpts, capsys):
    """Before: a hybrid's attention width was averaged with its Mamba layers (which have none), so `mean kept qk`
    was neither the attention's kept width nor anything else."""
    from uniql.runtime.checkpoint import read_manifest

    ckpt = ssm_ckpts["bamba"]
    assert main(["info", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sizes = read_manifest(ckpt)["ladder"]["sizes"]
    for row, rung_sizes in zip(report["rungs"], sizes, strict=True):
        assert row["mean_kept"]["qk"] == rung_sizes[1]["qk"]  # layer 1 is the only attention layer
        assert row["mean_kept"]["ssm_p"] == (rung_sizes[0]["ssm_p"] + rung_sizes[2]["ssm_p"]) / 2
        assert set(row["mean_kept"]) == {"mlp", "qk", "vo", "ssm_p", "ssm_n"}


@pytest.mark.parametrize("order", ["random", "magnitude"])
def test_sorting_data_flags_are_refused_with_an_order_that_reads_no_data(source, tmp_path, capsys, order):
    """Before: accepted and ignored, and the manifest said the sorting read them."""
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", "--no-quant", *CALIB, "--order", order],
           "--calib-samples, --calib-seqlen have no effect with --order " + order)
    assert not (tmp_path / "out").exists()


def test_an_order_without_data_records_no_sorting_data(source, tmp_path):
    out = tmp_path / "out"
    argv = ["compress", str(source), "--out", str(out), "--no-quant", "--order", "magnitude", *CALIB[4:]]
    assert main(argv) == 0
    calibration = json.loads((out / "uniql.json").read_text())["calibration"]
    assert calibration["order"] == "magnitude" and calibration["sort_data"] is None


@pytest.mark.parametrize("flag, content, message", [
    ("--calib-data", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("--quant-data", b"too short", "need at least seqlen=64"),
    ("--finetune-data", b'{"x": 1}\n', "neither Alpaca fields nor a 'text' string"),
], ids=["sort", "gptq", "finetune"])
def test_unusable_data_is_found_before_any_calibration(source, tmp_path, capsys, monkeypatch, flag, content,
                                                       message):
    """Before: only the file's existence was checked first; a file it could not use failed after block importance
    and sorting (and fine-tuning), i.e. after the hours of work it was meant to feed."""
    import uniql.compressor.compress as compress

    monkeypatch.setattr(compress, "run_layerwise", lambda *a, **k: pytest.fail("calibration ran first"))
    data = tmp_path / ("bad.jsonl" if flag == "--finetune-data" else "bad.txt")
    data.write_bytes(content)
    quant = ["--quant", "rtn"] if flag == "--calib-data" else ["--quant-samples", "2", "--quant-seqlen", "64"]
    ft = SMALL_FT if flag == "--finetune-data" else []
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", *CALIB, *quant, *ft, flag, data], message)
    assert not (tmp_path / "out").exists()


def test_finetune_reads_the_gptq_data_before_training(sorted_ckpt, tmp_path, capsys, monkeypatch):
    import uniql.compressor.finetune as finetune

    monkeypatch.setattr(finetune, "train_lora", lambda *a, **k: pytest.fail("the training ran first"))
    (tmp_path / "short.txt").write_text("too short")
    _fails(capsys, ["finetune", sorted_ckpt, "--out", tmp_path / "out", "--device", "cpu", *SMALL_FT,
                    "--quant-data", tmp_path / "short.txt", "--quant-samples", "2", "--quant-seqlen", "64"],
           "need at least seqlen=64")


def test_negative_finetune_steps_are_refused(source, tmp_path, capsys):
    """Before: `--finetune-steps -1` meant no fine-tuning, without a word."""
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", "--no-quant", *CALIB, "--finetune-steps", "-1"],
           "--finetune-steps must be >= 0, got -1")


@pytest.mark.parametrize("into", ["input", "inside"])
def test_the_adapter_state_never_goes_into_the_model_being_read(sorted_ckpt, tmp_path, capsys, into):
    """Before: `--finetune-state-dir SORTED_CKPT` wrote latest.json and step-N/ into the checkpoint being read."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sorted_ckpt, ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    state = ckpt if into == "input" else ckpt / "state"
    _fails(capsys, ["finetune", ckpt, "--out", tmp_path / "out", "--device", "cpu", "--no-quant", *SMALL_FT,
                    "--finetune-state-dir", state], "would write into the model being read")
    assert sorted(p.name for p in ckpt.iterdir()) == before and not (tmp_path / "out").exists()


def test_a_data_dir_that_does_not_exist_is_not_silently_replaced(tmp_path, monkeypatch):
    """Before: UNIQL_DATA_DIR with a typo fell back to ../shared/data without a word: an evaluation or a
    calibration on other data than the user named."""
    from uniql.paths import data_dir, has_data_dir

    monkeypatch.setenv("UNIQL_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="typo"):
        data_dir()
    assert not has_data_dir()


@pytest.mark.parametrize("flags, message", [
    (["--limit", "5"], "--limit has no effect without a zero-shot task"),
    (["--batch-size", "4"], "--batch-size has no effect without a zero-shot task"),
    (["--tasks", "piqa", "--max-windows", "1"], "--max-windows has no effect without wikitext2"),
    (["--tasks", "piqa", "--seqlen", "64"], "--seqlen has no effect without wikitext2"),
], ids=["limit", "batch", "windows", "seqlen"])
def test_eval_flags_no_task_reads_are_refused(sorted_ckpt, capsys, monkeypatch, flags, message):
    """Before: `uniql eval CKPT --limit 5` (lm-eval's flag for a quick look) evaluated every wikitext2 window."""
    import uniql.runtime.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    _fails(capsys, ["eval", sorted_ckpt, *flags], message)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_info_verify_checks_the_tokenizer_too(sorted_ckpt, tmp_path, capsys, damage):
    """Before: `checksums OK` for a copy without its tokenizer, which no command could then load."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sorted_ckpt, ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if damage == "missing":
            (ckpt / name).unlink()
        else:
            (ckpt / name).write_text((ckpt / name).read_text()[:100])
    _fails(capsys, ["info", ckpt, "--verify"], "tokenizer")


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(source, tmp_path):
    """Before: a run killed outright while saving (the OOM killer: no `finally` runs) left its half-written
    weights in a hidden staging folder of --out, which every later run kept."""
    import subprocess
    import sys

    from uniql.runtime.checkpoint import WRITE_PROBE_PREFIX

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    stale = out / f"{WRITE_PROBE_PREFIX}staging-{int(gone.stdout)}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(["compress", str(source), "--out", str(out), "--no-quant", *CALIB]) == 0
    assert not stale.exists() and (out / "uniql.json").is_file()


def test_the_default_adapter_state_of_an_out_next_to_a_gguf_is_not_refused(tmp_path, capsys):
    """Before: `compress ./model.gguf --out ./ckpt --finetune-steps N` was refused: its default state dir
    ./ckpt/finetune_state lies below the gguf's folder, and the message named --finetune-state-dir, never passed.
    (The file is no real gguf: the run goes past the check and fails reading it.)"""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a gguf")
    assert main([str(a) for a in ["compress", gguf, "--out", tmp_path / "ckpt", "--no-quant", *CALIB,
                                  "--finetune-steps", "2"]]) != 0
    assert "would write into the model being read" not in capsys.readouterr().err
    # the gguf's own folder still is refused, as prepare_out_dir refuses it for --out
    _fails(capsys, ["compress", gguf, "--out", tmp_path / "ckpt", "--no-quant", *CALIB, "--finetune-steps", "2",
                    "--finetune-state-dir", tmp_path], "would write into the model being read")
