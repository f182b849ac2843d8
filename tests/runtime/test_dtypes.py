"""`--dtype`: how `auto` resolves per device, and what a checkpoint loaded in bfloat16 holds and allocates.

The CUDA branch of `auto` is exercised without a GPU by patching torch.cuda's capability probe: only the
resolution, nothing is allocated there. The loaded models are the tiny INT4 checkpoints `uniql compress` writes
(float32 float parts): cast once at load, the float parts, the CPU runner's dequantized copies and the KV / conv
caches take the dtype, the packed INT4 tensors, RoPE frequencies and SSM states do not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_tiny_int4_ckpt, make_data_dir

from uniql.runtime.dtypes import DTYPE_CHOICES, check_dtype_name, load_for_inference, resolve_dtype
from uniql.runtime.linear import Int4Linear
from uniql.runtime.request import Request, SamplingParams
from uniql.runtime.runner import ModelRunner

PROMPT = [5, 17, 99, 3, 250, 1024, 77, 12]
MODELS = Path(__file__).resolve().parents[2] / "models"


def _fake_cuda(monkeypatch, bf16: bool) -> list:
    """torch.cuda as a box of 2 GPUs with (or without) native bf16 would answer (cuda:1 exists: device indices are
    checked); records how the probe was asked."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return asked


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_auto_is_bfloat16_on_a_gpu_with_native_bf16(monkeypatch, device):
    asked = _fake_cuda(monkeypatch, bf16=True)
    assert resolve_dtype("auto", device) is torch.bfloat16
    assert asked == [False]  # native support only: emulated bf16 would be slower than fp16


def test_auto_is_float16_on_a_gpu_without_bf16(monkeypatch):
    _fake_cuda(monkeypatch, bf16=False)
    assert resolve_dtype("auto", "cuda") is torch.float16


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_is_bfloat16_where_the_int4_kernel_is_vectorised_else_float32(monkeypatch, fast):
    from uniql.kernels import int4_cpu

    asked = _fake_cuda(monkeypatch, bf16=False)  # a GPU elsewhere in the box changes nothing for the CPU
    monkeypatch.setattr(int4_cpu, "fast", lambda: fast)
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if fast else torch.float32) and asked == []


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_dtype_is_what_it_says_on_any_device(monkeypatch, device):
    asked = _fake_cuda(monkeypatch, bf16=False)
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    assert {name: resolve_dtype(name, device) for name in want} == want and asked == []
    assert set(DTYPE_CHOICES) == {"auto", *want}


@pytest.mark.parametrize("name", ["half", "fp16", "bf16", "Float32", ""])
def test_an_unknown_dtype_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"--dtype must be one of auto, bfloat16, float16, float32"):
        check_dtype_name(name)
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype(name, "cpu")


@pytest.fixture(scope="module")
def repo_tokenizer():
    """SmolLM2's tokenizer as committed beside the tiny SSM models (no GGUF package needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODELS / "mamba2-tiny"), local_files_only=True)


@pytest.fixture(scope="module")
def llama_ckpt(repo_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype-llama")
    return build_tiny_int4_ckpt(root / "src", root / "ckpt", make_data_dir(root / "data"), repo_tokenizer, seed=3)


@pytest.fixture(scope="module")
def mamba_ckpt(repo_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype-mamba2")
    return build_tiny_int4_ckpt(root / "src", root / "ckpt", make_data_dir(root / "data"), repo_tokenizer,
                                family="mamba2")


def _runner_and_prefill(ckpt, dtype: str):
    model, _ = load_for_inference(ckpt, "cpu", dtype)
    runner = ModelRunner(model)
    req = Request(list(PROMPT), SamplingParams(max_tokens=24), rung=0)
    return runner, req, runner.prefill(req)


def test_bfloat16_casts_the_float_parts_once_and_keeps_the_format_dtypes(llama_ckpt):
    model, manifest = load_for_inference(llama_ckpt, "cpu", "bfloat16")
    assert manifest["tensors"]["norm.weight"]["dtype"] == "float32"  # the checkpoint is fp32; the load casts
    floats = {n: p.dtype for n, p in model.named_parameters()}
    assert floats and set(floats.values()) == {torch.bfloat16}  # norms (and biases, float tables if any)
    packed = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert {m.qweight.dtype for m in packed} == {torch.int32} and {m.scales.dtype for m in packed} == {torch.float16}
    assert model.inv_freq.dtype == torch.float32  # bf16 RoPE angles would drift by radians
    from uniql.kernels import int4_cpu

    auto = load_for_inference(llama_ckpt, "cpu", "auto")[0].norm.weight.dtype  # the CPU default
    assert auto == (torch.bfloat16 if int4_cpu.fast() else torch.float32)


def test_bfloat16_halves_the_kv_cache_and_reads_int4_on_cpu(llama_ckpt):
    runners = {}
    for dtype in ("float32", "bfloat16"):
        runner, req, logits = _runner_and_prefill(llama_ckpt, dtype)
        cache = runner.caches[req.request_id]
        assert runner.cache_dtype == cache.k[0].dtype == cache.v[-1].dtype == runner.model.norm.weight.dtype
        assert cache.nbytes() == runner.cache_bytes_at(0, req.max_len)  # admission counts what is allocated
        host = runner.model.layers[0].mlp.down_proj.host
        assert host.dtype == runner.model.norm.weight.dtype  # the CPU runner's host form follows too
        from uniql.kernels import int4_cpu

        assert type(host).__name__ == ("Int4Host" if dtype == "bfloat16" and int4_cpu.fast() else "DenseHost")
        runners[dtype] = (runner, logits)
    (r32, l32), (r16, l16) = runners["float32"], runners["bfloat16"]
    rungs = range(len(r32.model.ladder.rates))
    assert [2 * r16.cache_bytes_at(r, 100) for r in rungs] == [r32.cache_bytes_at(r, 100) for r in rungs]
    assert l16.dtype == torch.float32  # the runner hands fp32 logits to the sampler whatever the model runs in
    cosine = torch.nn.functional.cosine_similarity(l16.double(), l32.double(), dim=0).item()
    assert cosine > 0.999, cosine  # the same model, rounded


def test_mamba_float_parts_and_conv_state_follow_the_dtype_ssm_state_stays_fp32(mamba_ckpt):
    sizes = {}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        runner, req, logits = _runner_and_prefill(mamba_ckpt, dtype)
        layer = next(i for i, layer in enumerate(runner.model.layers) if layer.mamba is not None)
        mixer = runner.model.layers[layer].mamba
        assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch_dtype
        conv, ssm = runner.caches[req.request_id].ssm_states(layer)
        assert conv.dtype == torch_dtype and ssm.dtype == torch.float32  # the recurrence accumulates in fp32
        assert runner.caches[req.request_id].nbytes() == runner.cache_bytes_at(0, req.max_len)
        assert torch.isfinite(logits).all()
        sizes[dtype] = (conv.numel() * conv.element_size(), ssm.numel() * ssm.element_size())
    assert sizes["bfloat16"][0] * 2 == sizes["float32"][0] and sizes["bfloat16"][1] == sizes["float32"][1]
