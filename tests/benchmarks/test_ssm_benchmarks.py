"""The SSM benchmark scripts run their code paths on CPU: the GPU decode benchmark on tiny shapes of the same
layer kinds (engine per rung + transformers anchor, one JSON), and the training script's configs stay small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_ssm_decode_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "ssm_decode.json"
    cmd = [sys.executable, str(BENCH / "ssm_decode_gpu.py"), "--tiny", "--device", "cpu", "--prompt-tokens", "12",
           "--new-tokens", "4", "--ab-mamba-fold", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    for model in ("mamba2-8b-shape", "nemotron-h-8b-shape"):
        ours = [r for r in rows if r["model"] == model and r["engine"] == "uniql"]
        assert [r["rate"] for r in ours] == [0.0, 0.15, 0.25, 0.35]
        assert all(r["tpot_ms"] > 0 and r["new_tokens"] == 4 for r in ours)
        assert any(r["model"] == model and r["engine"] == "hf_eager" and "tpot_ms" in r for r in rows)
        ab = [r for r in rows if r["model"] == model and r["engine"] == "uniql_mamba_norm_kernels"]
        assert [r["rate"] for r in ab] == [0.0, 0.15, 0.25, 0.35]
    assert set(report["tpot_ratio_035_over_0"]) == {"mamba2-8b-shape", "nemotron-h-8b-shape"}


def test_tiny_ssm_configs_fit_the_repo_budget():
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("train_tiny_ssm", BENCH / "train_tiny_ssm.py")
    train_tiny_ssm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny_ssm)

    params = {}
    for name, config in train_tiny_ssm.model_configs().items():
        model = AutoModelForCausalLM.from_config(config)
        params[name] = sum(p.numel() for p in model.parameters())  # tied: the table counts once
        assert config.tie_word_embeddings and config.vocab_size == 49152
    assert sum(params.values()) * 2 < 32e6  # fp16 weights of both, leaving room for two tokenizers in 40 MB
