"""`uniql compress`, `eval`, `info` and `generate` end to end on a tiny model, through the real entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_data_dir, tiny_hf_model

from uniql.cli import main


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A Hugging Face model directory (random tiny Llama + the SmolLM2 tokenizer)."""
    from transformers import AutoTokenizer

    from uniql.paths import smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("src")
    tiny_hf_model("llama", vocab=len(tok), hidden=64, inter=128).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


def _compress(source, data_dir, out, *quant_flags):
    """`uniql compress` with a tiny calibration over the fixture data folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIQL_DATA_DIR", str(data_dir))
        rc = main(["compress", str(source), "--out", str(out), *quant_flags, "--calib-samples", "8",
                   "--calib-seqlen", "64", "--bi-samples", "2", "--bi-seqlen", "64", "--group-size", "32"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def ckpt(tiny_source, data_dir, tmp_path_factory):
    return _compress(tiny_source, data_dir, tmp_path_factory.mktemp("ckpt") / "tiny", "--no-quant")


@pytest.fixture(scope="module")
def int4_ckpt(tiny_source, data_dir, tmp_path_factory):
    return _compress(tiny_source, data_dir, tmp_path_factory.mktemp("ckpt") / "tiny-int4", "--quant", "rtn")


def test_compress_writes_a_checkpoint_with_provenance(ckpt):
    manifest = json.loads((ckpt / "uniql.json").read_text())
    assert manifest["calibration"]["sort_data"] == {"source": "alpaca", "samples": 8, "seqlen": 64}
    assert manifest["ladder"]["rates"][0] == 0.0 and len(manifest["ladder"]["rates"]) == 8
    assert (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file()
    from uniql.runtime.checkpoint import eos_token_ids, load_tokenizer

    # the ids that end generation travel with the checkpoint (the engines of serve / generate stop on each)
    assert load_tokenizer(ckpt).eos_token_id in eos_token_ids(manifest)


def test_eval_snaps_rate_and_prints_json(ckpt, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("UNIQL_DATA_DIR", str(data_dir))
    rc = main(["eval", str(ckpt), "--rate", "0.22", "--tasks", "wikitext2", "--max-windows", "2",
               "--seqlen", "64", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rate"] == pytest.approx(0.2) and report["rung"] == 4
    assert 1.0 < report["tasks"]["wikitext2"]["ppl"] < float("inf")


def test_bad_inputs_are_clear_errors(ckpt, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--tasks", "bogus"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a UniQL checkpoint" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_info_lists_every_rung(ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert out.count("rate 0.") == 8 and "llama" in out


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "uniql"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "compress" in result.stdout and "eval" in result.stdout


@pytest.mark.parametrize("where", ["", "benchmarks"], ids=["root", "benchmarks"])
def test_running_from_the_checkout_does_not_shadow_pypi_packages(where):
    """`python -m uniql.cli` from the repository root (as `accelerate launch -m uniql.cli` does) and the scripts in
    benchmarks/ (their folder is first on sys.path) must not let a checkout folder or file called `kernels`
    stand in for PyPI's `kernels`, which transformers >= 5.25 imports."""
    root = Path(__file__).resolve().parents[1]
    probe = "import uniql, importlib.util as u; s = u.find_spec('kernels'); print('none' if s is None else s.origin)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root / where, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    origin = proc.stdout.strip()
    assert origin == "none" or "site-packages" in Path(origin).parts, origin  # the installed package or none


def test_info_json_of_an_int4_checkpoint_reports_shrinking_rungs(int4_ckpt, capsys):
    assert main(["info", str(int4_ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format_version"] == 1 and report["weights"] == "int4"
    assert report["quantization"]["method"] == "rtn" and report["quantization"]["group_size"] == 32
    assert report["fp16_bytes"] > 0 and len(report["rungs"]) == 8
    weights = [r["weight_bytes"] for r in report["rungs"]]
    assert weights == sorted(weights, reverse=True) and weights[-1] < weights[0]
    assert all(r["reduction_vs_fp16"] > 1 for r in report["rungs"])


def test_eval_runs_on_an_int4_checkpoint(int4_ckpt, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("UNIQL_DATA_DIR", str(data_dir))
    rc = main(["eval", str(int4_ckpt), "--rate", "0.35", "--tasks", "wikitext2", "--max-windows", "2",
               "--seqlen", "64", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rung"] == 7 and 1.0 < report["tasks"]["wikitext2"]["ppl"] < float("inf")


def test_generate_streams_greedy_text_at_a_rung(int4_ckpt, capsys):
    args = ["generate", str(int4_ckpt), "--prompt", "Hello there", "--rate", "0.25", "--max-tokens", "6"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "rung 5" in first.err and "6 tokens" in first.err and "finish: length" in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out  # greedy: the same text again
    assert main(["generate", str(int4_ckpt), "--prompt", "Hi", "--chat", "--max-tokens", "3",
                 "--temperature", "0.7", "--seed", "1"]) == 0
    assert main(["generate", str(int4_ckpt), "--prompt", "Hi", "--temperature", "3"]) == 2  # clear error, no trace


def test_bench_decode_reports_every_rung(int4_ckpt, capsys):
    assert main(["bench", "decode", str(int4_ckpt), "--rates", "0", "0.35", "--new-tokens", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["rung"] for r in rows] == [0, 7] and all(r["new_tokens"] == 4 and r["tpot_ms"] > 0 for r in rows)


def test_bench_decode_says_which_rate_was_asked_when_it_snaps(int4_ckpt, capsys):
    """0.9 lies past the ladder: its row is the 0.35 rung's, and says it was asked for 0.9 (two rows read
    "rate 0.35" before, with nothing to tell them apart)."""
    assert main(["bench", "decode", str(int4_ckpt), "--rates", "0.9", "0.35", "--new-tokens", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rate")]
    assert lines[0].startswith("rate 0.35 (rung 7, asked 0.90)") and lines[1].startswith("rate 0.35 (rung 7)")


def test_bench_decode_warms_each_rate_up_and_reports_no_speed_for_a_failed_request(int4_ckpt, capsys, monkeypatch):
    from uniql.runtime.engine import Engine
    from uniql.runtime.runner import ModelRunner

    added, add = [], Engine.add_request
    monkeypatch.setattr(Engine, "add_request",
                        lambda self, ids, params, **kw: added.append((kw["rung"], params.max_tokens)) or
                        add(self, ids, params, **kw))
    assert main(["bench", "decode", str(int4_ckpt), "--rates", "0", "0.35", "--new-tokens", "5", "--json"]) == 0
    assert added == [(0, 4), (0, 5), (7, 4), (7, 5)]  # every rate's kernels / graphs warmed outside its timed row
    capsys.readouterr()

    steps, decode = {"n": 0}, ModelRunner.decode_greedy

    def fails_in_the_timed_row(self, *args, **kw):
        steps["n"] += 1
        if steps["n"] == 6:  # warm-up: 3 decode steps, then the timed request's third
            raise RuntimeError("injected step failure")
        return decode(self, *args, **kw)

    monkeypatch.setattr(ModelRunner, "decode_greedy", fails_in_the_timed_row)
    assert main(["bench", "decode", str(int4_ckpt), "--rates", "0", "--new-tokens", "5", "--json"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "uniql bench: error:" in out.err and "'error' after" in out.err


def test_generate_and_bench_run_in_the_dtype_asked_for(int4_ckpt, capsys):
    from uniql.kernels import int4_cpu

    assert main(["generate", str(int4_ckpt), "--prompt", "Hello there", "--max-tokens", "4"]) == 0
    auto = "bfloat16" if int4_cpu.fast() else "float32"  # auto on CPU
    assert f", {auto}, 4 tokens" in capsys.readouterr().err
    for name in ("bfloat16", "float32"):
        assert main(["generate", str(int4_ckpt), "--prompt", "Hello there", "--max-tokens", "4", "--dtype",
                     name]) == 0
        assert f", {name}, 4 tokens" in capsys.readouterr().err
    assert main(["bench", "decode", str(int4_ckpt), "--rates", "0", "--new-tokens", "3", "--dtype", "bfloat16",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["rows"][0]["new_tokens"] == 3


def test_finetune_flags_reach_the_config():
    """--distill and friends end up in the FinetuneConfig the stage runs with, and a bad weight is refused."""
    import argparse

    from uniql.cli_finetune import add_finetune_args, finetune_config

    parser = argparse.ArgumentParser()
    add_finetune_args(parser, steps_default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="out")
    parser.add_argument("--device", default="cpu")
    cfg = finetune_config(parser.parse_args(["--distill", "0.3", "--distill-temperature", "2", "--rung-decay", "0"]))
    assert (cfg.distill, cfg.distill_temperature, cfg.rung_decay, cfg.steps) == (0.3, 2.0, 0.0, 5)
    with pytest.raises(ValueError, match="distillation"):
        finetune_config(parser.parse_args(["--distill", "1.5"])).validate()


def test_info_counts_the_bytes_a_server_holds_at_every_rung(int4_ckpt, capsys):
    """`uniql info`'s per-rung bytes are the bytes of the loaded model's tensors (norms and biases in the
    checkpoint's float dtype, INT4 codes and scales as packed)."""
    from uniql.runtime.checkpoint import load_checkpoint
    from uniql.server.weights import ElasticWeights

    assert main(["info", str(int4_ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    store = ElasticWeights(load_checkpoint(int4_ckpt)[0], int4_ckpt)
    assert [r["total_bytes"] for r in report["rungs"]] == list(store.rung_bytes)


@pytest.mark.parametrize("argv, message", [
    (["generate", "{ckpt}", "--prompt", "Hi", "--max-tokens", "2", "--device", "gpu"], "invalid device 'gpu'"),
    # a device index that does not exist: "model.safetensors cannot be read (device cpu:1 is invalid); re-run
    # `uniql compress`" before, blaming the checkpoint
    (["generate", "{ckpt}", "--prompt", "Hi", "--device", "cpu:1"], "device 'cpu:1' does not exist"),
    (["bench", "decode", "{ckpt}", "--device", "cpu:1", "--dtype", "float32"], "device 'cpu:1' does not exist"),
    (["eval", "{ckpt}", "--device", "cpu:1"], "device 'cpu:1' does not exist"),
    (["bench", "decode", "{ckpt}", "--rates", "0", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["eval", "{ckpt}", "--tasks", ",", "--json"], "no task given"),
    (["eval", "{ckpt}", "--seqlen", "1", "--max-windows", "1"], "seqlen must be at least 2"),
])
def test_bad_cli_input_is_one_error_line(int4_ckpt, capsys, argv, message):
    rc = main([a.replace("{ckpt}", str(int4_ckpt)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_says_so_not_that_the_checkpoint_is_damaged(int4_ckpt, capsys):
    assert main(["generate", str(int4_ckpt), "--prompt", "Hi", "--max-tokens", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "re-run" not in err


def test_a_cuda_index_past_the_last_gpu_is_named_not_blamed_on_the_checkpoint(int4_ckpt, capsys, monkeypatch):
    """cuda:7 on a (pretended) machine with 2 GPUs: refused before any file is read, as cpu:1 is."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for argv in (["generate", str(int4_ckpt), "--prompt", "Hi", "--device", "cuda:7"],
                 ["eval", str(int4_ckpt), "--device", "cuda:7"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "device 'cuda:7' does not exist: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err, err
        assert "re-run" not in err and len(err.splitlines()) == 1


def test_a_ladder_size_past_the_full_width_is_refused_by_info_and_generate(int4_ckpt, tmp_path, capsys):
    """Before: `info` showed the hand-edited rung (bigger than the model) and `generate` ran at it."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int4_ckpt, bad)
    manifest = json.loads((bad / "uniql.json").read_text())
    manifest["ladder"]["sizes"][3][1]["mlp"] = 999999
    (bad / "uniql.json").write_text(json.dumps(manifest))
    for argv in (["info", str(bad)], ["generate", str(bad), "--prompt", "Hi", "--rate", "0.15", "--max-tokens", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "ladder.sizes[3][1].mlp is 999999; it must be a whole number in " \
            "[1, 128] (arch.intermediate_size is 128)" in err, err


def test_info_on_a_damaged_manifest_names_it(int4_ckpt, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int4_ckpt, bad)
    manifest = json.loads((bad / "uniql.json").read_text())
    del manifest["tensors"]["norm.weight"]
    (bad / "uniql.json").write_text(json.dumps(manifest))
    assert main(["info", str(bad)]) == 2
    assert "the manifest is damaged" in capsys.readouterr().err


def test_info_verify_recomputes_the_checksums(int4_ckpt, tmp_path, capsys):
    """Without --verify `info` reads the manifest only; with it, every listed file's sha256 is recomputed: OK, or
    one line per altered or missing file and exit 2."""
    import shutil

    assert main(["info", str(int4_ckpt), "--verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "checksums OK: model.safetensors"
    assert main(["info", str(int4_ckpt), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified_files"] == ["model.safetensors"]
    bad = tmp_path / "bad"
    shutil.copytree(int4_ckpt, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte: the file still parses, only its checksum tells
    weights.write_bytes(bytes(data))
    assert main(["info", str(bad)]) == 0  # the summary alone, as before
    capsys.readouterr()
    for damage in ("does not match its sha256", "is missing"):
        assert main(["info", str(bad), "--verify"]) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"uniql info: error: {weights} {damage}")
        assert captured.out == ""
        weights.unlink(missing_ok=True)
