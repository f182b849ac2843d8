"""Masked LoRA through the CLI: `uniql finetune` under `accelerate launch --num_processes 2` on CPU (DDP) and
`uniql compress --finetune-steps N`, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DATA, TINY_RTN_FLAGS, make_data_dir, tiny_hf_model
from safetensors.torch import load_file

from uniql.cli import main
from uniql.compressor.compress import finetune_checkpoint
from uniql.compressor.finetune import FinetuneConfig
from uniql.compressor.lora import LoraSettings

CALIB_FLAGS = TINY_RTN_FLAGS[2:]  # the tiny calibration, without "--quant rtn"
FT_FLAGS = ["--finetune-batch-size", "2", "--finetune-seqlen", "48", "--lora-dropout", "0",
            "--finetune-data", str(DATA / "alpaca_small.json"), "--device", "cpu"]


@pytest.fixture(scope="module")
def sorted_ckpt(tokenizer, tmp_path_factory):
    """A sorted floating-point checkpoint (`uniql compress --no-quant`): what `uniql finetune` starts from."""
    root = tmp_path_factory.mktemp("ft")
    source = root / "src"
    tiny_hf_model("llama", vocab=len(tokenizer), hidden=64, inter=128).save_pretrained(source)
    tokenizer.save_pretrained(source)
    data = make_data_dir(root / "data")
    os.environ["UNIQL_DATA_DIR"] = str(data)
    try:
        assert main(["compress", str(source), "--out", str(root / "sorted"), "--no-quant", *CALIB_FLAGS]) == 0
    finally:
        os.environ.pop("UNIQL_DATA_DIR")
    return root / "sorted", data


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "uniql.json").read_text())


@pytest.mark.slow
def test_two_processes_draw_the_same_rungs_and_end_with_identical_adapters(sorted_ckpt, tmp_path):
    """DDP on 2 CPU processes: every rank draws the same rung per step, adapters agree bit for bit, and the merged
    weights equal one process running the same global batch as 2 accumulated micro-batches."""
    ckpt, data = sorted_ckpt
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "UNIQL_DATA_DIR": str(data), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    # `--cpu --num_processes 2` starts ONE process in accelerate >= 1.x unless MPI is set up; on a host without
    # GPUs `--multi_gpu` goes through torchrun and the processes pair up over gloo (Accelerator(cpu=True) in ours)
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "uniql.cli", "finetune", str(ckpt), "--out", str(tmp_path / "ddp"),
           "--no-quant", "--finetune-steps", "2", "--finetune-grad-accum", "1", *FT_FLAGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft = _manifest(tmp_path / "ddp")["finetune"]
    assert ft["processes"] == 2 and ft["global_batch"] == 4 and ft["steps"] == 2
    ranks = sorted(ft["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]
    assert ranks[0]["rungs"] == ranks[1]["rungs"] and len(ranks[0]["rungs"]) == 2

    single = FinetuneConfig(steps=2, batch_size=2, grad_accum=2, seqlen=48, data=str(DATA / "alpaca_small.json"),
                            lora=LoraSettings(dropout=0.0), device="cpu")
    os.environ["UNIQL_DATA_DIR"] = str(data)
    try:
        finetune_checkpoint(ckpt, tmp_path / "single", single, quant=None)
    finally:
        os.environ.pop("UNIQL_DATA_DIR")
    assert _manifest(tmp_path / "single")["finetune"]["ranks"][0]["rungs"] == ranks[0]["rungs"]
    paths = (tmp_path / "ddp", tmp_path / "single", ckpt)
    ddp_w, single_w, base_w = (load_file(p / "model.safetensors") for p in paths)
    moved = 0
    for name, w in single_w.items():
        torch.testing.assert_close(ddp_w[name], w, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(w, base_w[name])
    assert moved > 0, "fine-tuning changed no weight"


def test_compress_with_finetune_steps_records_provenance(tokenizer, sorted_ckpt, tmp_path):
    """`uniql finetune` of a sorted checkpoint then RTN INT4; the manifest says what was trained, how and where."""
    ckpt, data = sorted_ckpt
    os.environ["UNIQL_DATA_DIR"] = str(data)
    try:
        rc = main(["finetune", str(ckpt), "--out", str(tmp_path / "ft"), "--quant", "rtn", "--finetune-steps", "2",
                   "--rung-weights", "1,1,1,1,1,1,1,1", *FT_FLAGS])
        with pytest.raises(ValueError, match="--no-quant"):  # an INT4 checkpoint cannot be fine-tuned
            finetune_checkpoint(tmp_path / "ft", tmp_path / "again", FinetuneConfig(steps=1), quant=None)
    finally:
        os.environ.pop("UNIQL_DATA_DIR")
    assert rc == 0
    manifest = _manifest(tmp_path / "ft")
    ft = manifest["finetune"]
    assert manifest["weights"] == "int4" and manifest["calibration"]["finetuned_from"] == str(ckpt)
    assert ft["steps"] == 2 and ft["tokens"] > 0 and ft["wall_s"] >= 0 and ft["device"] == "cpu"
    assert ft["rung_weighting"]["probabilities"] == [0.125] * 8
    assert ft["lora"]["rank"] == 8 and ft["lora"]["alpha"] == 16 and "q_proj" in ft["lora"]["targets"]
    assert ft["data"][0]["kind"] == "instruction" and ft["data"][0]["examples"] > 10
    assert (tmp_path / "ft" / "finetune_state" / "latest.json").is_file()


def test_compress_finetune_steps_runs_between_sorting_and_quantization(sorted_ckpt, tmp_path):
    ckpt, data = sorted_ckpt
    os.environ["UNIQL_DATA_DIR"] = str(data)
    try:
        rc = main(["compress", str(ckpt.parent / "src"), "--out", str(tmp_path / "c"), *TINY_RTN_FLAGS,
                   "--finetune-steps", "1", *FT_FLAGS])
    finally:
        os.environ.pop("UNIQL_DATA_DIR")
    manifest = _manifest(tmp_path / "c")
    assert rc == 0 and manifest["weights"] == "int4" and manifest["finetune"]["steps"] == 1
    assert "finetune" in manifest["calibration"]["timings"] and "quantize" in manifest["calibration"]["timings"]
