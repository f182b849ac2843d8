"""SSM and hybrid models in the engine on CPU: batched decode over each request's own SSM state equals a full
forward, greedy generation equals transformers' own greedy generate, and cache accounting counts SSM states."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_ssm_hf_model

from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder
from uniql.runtime.request import Request, SamplingParams
from uniql.runtime.runner import ModelRunner

FAMILIES = ("mamba2", "bamba", "nemotron_h")
VOCAB = 49152  # SmolLM2's tokenizer


def _laddered(hf):
    model = decoder_from_hf(hf)
    spec = model.spec
    steps = spec_dim_steps(spec, Alignment(group_size=32))
    model.ladder = uniform_ladder(model.full_sizes, steps, spec.num_layers, rates=(0.0, 0.25, 0.5))
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def small(request):
    return _laddered(tiny_ssm_hf_model(request.param, vocab=256, seed=5))


def _full_logits(model, req: Request) -> torch.Tensor:
    with torch.inference_mode():
        ids = torch.tensor([req.prompt_ids + req.output_ids], device=model.norm.weight.device)
        return model(ids, rung=req.rung)[0, -1].float()


@pytest.mark.parametrize("rung", [0, 2])
def test_batched_decode_equals_full_forward(small, rung):
    """Three requests of different prompt lengths decode as ONE batch (each its own SSM/conv state and, for
    hybrids, KV cache) and get the logits a full forward of their own tokens gives."""
    _check_batched_decode(ModelRunner(small, cuda_graphs=False), small, rung, torch.Generator().manual_seed(rung))


def test_mamba_decode_runs_in_the_ssm_preload_scope(small, monkeypatch):
    """Each Mamba layer's decode step launches its GEMVs inside ``pdl.ssm_gemv_preload`` (their preload depth is
    ``UNIQL_SSM_GEMV_PRELOAD``'s), the vocab head inside ``pdl.head_gemv_preload``, and nothing else of the step
    opens either."""
    import contextlib

    from uniql.runtime import decoder as decoder_module
    from uniql.runtime import mamba

    entered = []
    monkeypatch.setattr(mamba, "ssm_gemv_preload", lambda: entered.append("ssm") or contextlib.nullcontext())
    monkeypatch.setattr(decoder_module, "head_gemv_preload", lambda: entered.append("head") or contextlib.nullcontext())
    runner = ModelRunner(small, cuda_graphs=False)
    req = Request([3, 1, 4, 1, 5], SamplingParams(max_tokens=2), rung=0)
    req.output_ids.append(int(runner.prefill(req).argmax()))
    assert entered == ["head"]  # prefill is not a decode step; its head is the head
    runner.decode([req])
    mamba_layers = sum(layer.mamba is not None for layer in small.layers)
    assert mamba_layers > 0 and entered == ["head"] + ["ssm"] * mamba_layers + ["head"]


def _check_batched_decode(runner, model, rung: int, gen) -> None:
    """Three requests (prompts of 3, 9, 5 tokens) decode three steps as one batch; every row equals a full
    forward of that request's own tokens."""
    reqs = [Request(torch.randint(1, 256, (n,), generator=gen).tolist(), SamplingParams(max_tokens=4), rung=rung)
            for n in (3, 9, 5)]
    for req in reqs:
        req.output_ids.append(int(runner.prefill(req).argmax()))
    for _ in range(3):
        logits = runner.decode(reqs)
        for req, row in zip(reqs, logits, strict=True):
            full = _full_logits(model, req)
            assert (row - full).abs().max() <= 1e-4 * full.abs().max()
            req.output_ids.append(int(row.argmax()))


def test_cache_bytes_count_ssm_states(small):
    """The admission formula equals the bytes a request's caches really take, and a pruned rung costs less."""
    runner = ModelRunner(small, cuda_graphs=False)
    req = Request([1, 2, 3], SamplingParams(max_tokens=5), rung=0)
    runner.prefill(req)
    assert runner.cache_bytes == runner.cache_bytes_for(req)
    assert runner.cache_bytes_at(2, req.max_len) < runner.cache_bytes_at(0, req.max_len)
    mamba_layers = len(small.spec.layers_with("mamba"))
    assert runner.cache_bytes_at(0, 1) >= mamba_layers * 8 * 16 * 16 * 4  # fp32 [H, P, N] per Mamba layer


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_greedy_at_rung_0(family, tokenizer):
    hf = tiny_ssm_hf_model(family, vocab=VOCAB, seed=3)
    engine = Engine(_laddered(hf), tokenizer, max_num_seqs=2)
    ids = tokenizer("The quick brown fox")["input_ids"]
    req = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    list(engine.stream(req))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10, min_new_tokens=10)
    assert req.output_ids == ref[0, len(ids):].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_on_cuda_equals_full_forward(family):
    """On CUDA: CUDA-graph replays of the conv and state-update kernels over per-request address tables, decode
    attention, fused RoPE (3 requests pad a bucket of 4)."""
    model = _laddered(tiny_ssm_hf_model(family, vocab=256, seed=5)).cuda()
    runner = ModelRunner(model)
    assert runner.graphs is not None  # Mamba models are graphed too
    gen = torch.Generator().manual_seed(1)
    for rung in (0, 2):
        _check_batched_decode(runner, model, rung, gen)
