"""The whole pipeline on each device this machine has: compress (every order, RTN / GPTQ +- Hadamard, masked LoRA),
save, load, serve through the engine (CUDA graphs on and off, greedy and sampled, logprobs, both ends of the
ladder), elastic residency (release to the top rung, reload) and perplexity, for every architecture family.

On a CPU-only machine the "cuda" cases skip; on the GPU machine they are the check that nothing on these paths
mixes CPU and GPU tensors (``uniql compress --device cuda`` once crashed on every Mamba model that way, and no
CPU test could see it).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DATA, tiny_hf_model, tiny_ssm_hf_model
from transformers import AutoTokenizer

from uniql.compressor.compress import CompressConfig, _finish, compress_decoder
from uniql.compressor.evaluate import wikitext2_ppl
from uniql.compressor.finetune import FinetuneConfig
from uniql.compressor.lora import LoraSettings
from uniql.compressor.quantize import QuantConfig
from uniql.runtime.checkpoint import load_checkpoint
from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.prefill_graphs import DEFAULT_PREFILL_BUCKETS
from uniql.runtime.request import SamplingParams

WIKI, ALPACA = str(DATA / "wikitext2_small.raw"), str(DATA / "alpaca_small.json")
ROOT = DATA.parent.parent
ALL = DEFAULT_PREFILL_BUCKETS[-1]  # the engine's default: prompts up to its largest bucket replay prefill graphs
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# family, tied embeddings, order, quantization (None: float), Hadamard, masked LoRA steps
CASES = [("llama", False, "uniql", "gptq", True, False), ("llama", True, "uniql", "gptq", True, False),
         ("qwen2", False, "magnitude", "rtn", False, False), ("llama", False, "random", None, False, False),
         ("llama", False, "uniql", "gptq", True, True), ("mamba2", False, "uniql", "gptq", True, False),
         ("bamba", False, "magnitude", "rtn", False, False), ("nemotron_h", False, "random", "gptq", False, False),
         ("bamba", False, "uniql", None, False, True)]
PARAMS = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=3,
                         repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, logprobs=True,
                         top_logprobs=3, ignore_eos=True),
          SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, ignore_eos=True)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "models" / "hybrid-tiny")  # SmolLM2's tokenizer, offline


def tiny(family: str, tie: bool, vocab: int):
    if family in ("llama", "qwen2"):
        return decoder_from_hf(tiny_hf_model(family, vocab=vocab, tie=tie))
    return decoder_from_hf(tiny_ssm_hf_model(family, vocab=vocab))


def build(case, device: str, tokenizer, out):
    family, tie, order, quant, hadamard, lora = case
    cfg = CompressConfig(order=order, calib_source=ALPACA, calib_samples=4, calib_seqlen=32, bi_source=WIKI,
                         bi_samples=2, bi_seqlen=32, quant=None, device=device)
    model, result = compress_decoder(tiny(family, tie, len(tokenizer)), tokenizer, cfg)
    q = None if quant is None else QuantConfig(method=quant, hadamard=hadamard, calib_source=WIKI, calib_samples=2,
                                               calib_seqlen=32, batch_size=2)
    ft = None if not lora else FinetuneConfig(steps=2, batch_size=2, grad_accum=1, seqlen=256, data=ALPACA,
                                              max_examples=8, distill=0.5, lora=LoraSettings(rank=4),
                                              state_dir=str(out.parent / "ft"), save_every=1,
                                              device="cpu" if device == "cpu" else None)  # None: accelerate's GPU
    return _finish(model, tokenizer, ft, q, out, {}, device, "float32", alignment=result["alignment"],
                   source={"name": f"tiny-{family}"}, calibration=result["provenance"])


def run_all(engine, ids, rung) -> list:
    reqs = [engine.add_request(ids, p, rung=rung) for p in PARAMS]
    while not all(r.finished for r in reqs):
        engine.step()
    for r, p in zip(reqs, PARAMS, strict=True):
        assert r.finish_reason == "length" and len(r.output_ids) == p.max_tokens, (r.finish_reason, r.output_ids)
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_compress_serve_release_reload_on_the_device(case, device, tokenizer, tmp_path):
    from uniql.server.weights import ElasticWeights

    ckpt = build(case, device, tokenizer, tmp_path / "ckpt")
    ids = tokenizer("Hello there, how are you today?")["input_ids"]
    outputs = {}
    # (CUDA graphs, prompt tokens a prefill graph serves): off; decode graphs alone; both kinds (the engine's default).
    # A prefill graph pads the prompt to its bucket, so its GEMMs run other shapes: close to the eager prefill, not
    # the same bits (tests/runtime/test_prefill_graphs.py), which a tiny model's near-tied logits can turn into
    # other tokens; so only the decode graphs are held to the eager tokens. On CPU there are no graphs of either kind.
    configs = [(False, 0), (True, ALL)] if device == "cpu" else [(False, 0), (True, 0), (True, ALL)]
    for graphs, prefill_tokens in configs:
        model, _ = load_checkpoint(ckpt, device=device)
        top = len(model.ladder.rates) - 1
        engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=128, cuda_graphs=graphs,
                        prefill_graph_tokens=prefill_tokens)
        outputs[graphs, prefill_tokens] = {rung: run_all(engine, ids, rung) for rung in (0, top)}
    decode_graphs = (True, ALL) if device == "cpu" else (True, 0)
    if device == "cpu" or case[3] is not None:  # INT4 kernels give the same bits whatever the batch padding; a
        for rung in (0, top):  # float model's cuBLAS may pick another kernel for a padded batch: tokens may differ
            assert outputs[decode_graphs][rung] == outputs[False, 0][rung]

    weights = ElasticWeights(engine.runner.model, ckpt)
    for layer in range(weights.num_layers):
        weights.release_layer(layer, top)
    engine.runner.reset_graphs()
    assert run_all(engine, ids, top) == outputs[True, ALL][top]  # the top rung never reads a released tail
    for layer in range(weights.num_layers):
        weights.reload_layer(layer, 0)
    weights.settle()
    engine.runner.reset_graphs()
    assert run_all(engine, ids, 0) == outputs[True, ALL][0]  # the reloaded tails are the stored ones

    ppl = wikitext2_ppl(engine.runner.model, tokenizer, rung=top, path=WIKI, seqlen=32, max_windows=2)["ppl"]
    assert math.isfinite(ppl) and ppl > 1
