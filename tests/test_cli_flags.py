"""`uniql compress` / `finetune` / `eval` flags that were accepted but meant nothing, or something else: refused
before any work with one error line (exit 2), or reported as what they are."""

import json
import math

import pytest
from helpers import SMALL_FINETUNE_FLAGS, TINY_CALIB_FLAGS, cli_data, cli_sorted_ckpt, cli_source, tiny_hf_model

from uniql.cli import main

CALIB = TINY_CALIB_FLAGS
SMALL_FT = SMALL_FINETUNE_FLAGS


source_fixture = pytest.fixture(scope="module", name="source")(cli_source)
data_fixture = pytest.fixture(autouse=True, name="data")(cli_data)
sorted_ckpt_fixture = pytest.fixture(scope="module", name="sorted_ckpt")(cli_sorted_ckpt)


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model or training fails the test: the flag must be refused before either."""
    import uniql.compressor.compress as compress

    monkeypatch.setattr(compress, "load_source", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(compress, "load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))


def _fails(capsys, argv, message):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("uniql ")]
    assert "Traceback" not in err and len(lines) == 1 and message in lines[0], err


def test_an_unsupported_architecture_is_named_before_its_weights_load(tmp_path, tokenizer, capsys, no_work):
    """Before: the whole model loaded, then "GPT2LMHeadModel is not a causal language model (load it with
    AutoModelForCausalLM)", which it is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    _fails(capsys, ["compress", gpt2, "--out", tmp_path / "out", "--no-quant", *CALIB],
           "model_type 'gpt2' is not supported")
    assert not (tmp_path / "out").exists()


def test_a_window_longer_than_the_context_is_refused_before_the_load(source, tmp_path, capsys, no_work):
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", "--no-quant", *CALIB, "--bi-seqlen", "300"],
           "--bi-seqlen 300 exceeds the model's context of 256")


@pytest.mark.parametrize("device, message", [("gpu", "invalid device 'gpu'"),
                                             ("cpu:1", "device 'cpu:1' does not exist: the CPU is one device")])
@pytest.mark.parametrize("command", ["compress", "finetune"])
def test_a_device_torch_does_not_know_is_refused_before_any_work(source, sorted_ckpt, tmp_path, capsys, command,
                                                                 device, message):
    """Before: a RuntimeError traceback from the first calibration batch; for `finetune`, AFTER the training.
    cpu:1 (a device index that does not exist) ran as cpu, or failed reading the weights, blamed on the checkpoint."""
    argv = (["compress", source, *CALIB, "--quant", "rtn"] if command == "compress"
            else ["finetune", sorted_ckpt, *SMALL_FT, "--quant", "rtn"])
    _fails(capsys, [*argv, "--out", tmp_path / "out", "--device", device], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--quant", "rtn", "--eps", "inf"], "finite eps"),  # before: a checkpoint with a flat allocation
    (["--quant", "gptq", "--quant-seqlen", "64", "--quant-samples", "2", "--gptq-rung0-weight", "nan"],
     "--gptq-rung0-weight must be positive and finite"),  # before: a Cholesky traceback after calibration
], ids=["eps-inf", "rung0-nan"])
def test_non_finite_compress_settings_are_refused(source, tmp_path, capsys, no_work, flags, message):
    _fails(capsys, ["compress", source, "--out", tmp_path / "out", *CALIB, *flags], message)


@pytest.mark.parametrize("flags, message", [
    (["--lora-alpha", "nan"], "finite alpha"),  # before: loss=nan, a NaN checkpoint written with exit 0
    (["--lora-alpha", "inf"], "finite alpha"),
    (["--distill", "0.5", "--distill-temperature", "nan"], "finite temperature"),
    (["--finetune-lr", "inf"], "finite lr"),
    (["--rung-decay", "inf"], "finite lr > 0 and rung_decay"),  # before: refused only once training started
    (["--rung-weights", "1,inf,1,1,1,1,1,1"], "rung weights must be >= 0"),
], ids=["alpha-nan", "alpha-inf", "temperature-nan", "lr-inf", "decay-inf", "weights-inf"])
def test_non_finite_finetune_settings_are_refused(sorted_ckpt, tmp_path, capsys, no_work, flags, message):
    _fails(capsys, ["finetune", sorted_ckpt, "--out", tmp_path / "out", "--device", "cpu", "--quant", "rtn",
                    *SMALL_FT, *flags], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, flags, message", [
    ("compress", ["--no-quant", "--hadamard"], "--[no-]hadamard has no effect with --no-quant"),
    ("compress", ["--no-quant", "--quant", "rtn", "--quant-data", "alpaca"],
     "--quant, --quant-data have no effect with --no-quant; drop them"),
    ("compress", ["--quant", "rtn", "--quant-samples", "16"], "--quant-samples has no effect with --quant rtn"),
    ("compress", ["--gptq-objective", "full", "--gptq-rung0-weight", "2"], "no effect with --gptq-objective full"),
    ("compress", ["--quant", "rtn", "--lora-rank", "16"], "--lora-rank has no effect without --finetune-steps N"),
    ("finetune", ["--quant", "rtn", "--distill-temperature", "2"], "has no effect without --distill W"),
    ("finetune", ["--quant", "rtn", "--rung-weights", "1,1,1,1,1,1,1,1", "--rung-decay", "0.5"],
     "--rung-decay has no effect with --rung-weights"),
], ids=["noquant-hadamard", "noquant-quant", "rtn-gptq", "full-rung0", "lora-nosteps", "temperature", "decay"])
def test_flags_the_run_would_ignore_are_refused(source, sorted_ckpt, tmp_path, capsys, no_work, command, flags,
                                                message):
    """Each was accepted without a word and did nothing: the user believed the checkpoint was built with it."""
    argv = ["compress", source, *CALIB] if command == "compress" else ["finetune", sorted_ckpt, *SMALL_FT,
                                                                       "--device", "cpu"]
    _fails(capsys, [*argv, "--out", tmp_path / "out", *flags], message)
    assert not (tmp_path / "out").exists()


def test_flags_that_do_take_effect_are_accepted(source, tmp_path):
    assert main(["compress", str(source), "--out", str(tmp_path / "a"), *CALIB, "--quant", "rtn", "--hadamard"]) == 0
    assert main(["compress", str(source), "--out", str(tmp_path / "b"), *CALIB, "--no-quant", "--quant", "gptq",
                 "--quant-seqlen", "2048"]) == 0  # the defaults, spelled out: harmless


def test_eval_seqlen_zero_is_refused_not_the_default(sorted_ckpt, capsys):
    """Before: --seqlen 0 silently evaluated at the default window (-5 was refused)."""
    _fails(capsys, ["eval", sorted_ckpt, "--seqlen", "0", "--max-windows", "1"], "seqlen must be at least 2, got 0")


def test_eval_json_stays_json_when_a_metric_is_not_finite(sorted_ckpt, capsys, monkeypatch):
    """A checkpoint whose logits are NaN has ppl NaN: json.dumps printed a bare NaN, which jq rejects."""
    import uniql.compressor.evaluate as evaluate

    calls = []

    def broken(model, tokenizer, tasks, **kw):
        calls.append(list(tasks))
        return {"wikitext2": {"ppl": math.nan, "nll": math.inf, "tokens": 63}}

    monkeypatch.setattr(evaluate, "evaluate", broken)
    assert main(["eval", str(sorted_ckpt), "--tasks", "wikitext2,wikitext2", "--seqlen", "64", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["tasks"]["wikitext2"] == {
        "ppl": None, "nll": None, "tokens": 63}
    assert calls == [["wikitext2"]]  # a repeated task runs once


def test_a_hidden_size_no_int4_group_fits_compresses_in_floating_point(tokenizer, tmp_path, capsys):
    """hidden 72: `compress --no-quant` was refused ("hidden size 72 is not a multiple of 16: no INT4 group size fits
    it"), though a float checkpoint quantizes nothing (its kernels take any width). It now runs at every rung, and
    `finetune` refuses to quantize it before training, where it failed after ("group size must be one of ...")."""
    src, ckpt = tmp_path / "src", tmp_path / "ckpt"
    tiny_hf_model("llama", vocab=len(tokenizer), hidden=72, inter=136).save_pretrained(src)
    tokenizer.save_pretrained(src)
    no_group = CALIB[:CALIB.index("--group-size")]
    assert main(["compress", str(src), "--out", str(ckpt), "--no-quant", *no_group]) == 0
    assert json.loads((ckpt / "uniql.json").read_text())["alignment"]["group_size"] == 16
    assert main(["generate", str(ckpt), "--prompt", "Hi", "--rate", "0.35", "--max-tokens", "2"]) == 0
    assert "rung 7" in capsys.readouterr().err
    _fails(capsys, ["finetune", ckpt, *SMALL_FT, "--device", "cpu", "--quant", "rtn", "--out", tmp_path / "out"],
           "this checkpoint cannot be quantized: its group size 16 is not an INT4 group size")
    assert not (tmp_path / "out").exists()
