"""Hybrid / SSM rungs: training and serving compute the same function, and truncation is the right function.

Pins uniql-method.md's bugs for hybrids: Bamba's partial-RoPE Q/K truncation (bug 11) and the attention scale
(bug 14) via masked full-size == truncated; the Mamba gated norm over the KEPT channels (bug 10) via "a truncated
mixer == a mixer built at the smaller sizes"; and masked LoRA on Mamba projections via "the LoRA model at a rung ==
its merged copy at that rung, gradients only inside the kept prefixes".
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import sort_with_random_calibration, tiny_ssm_hf_model

from uniql.compressor.lora import LoraSettings, add_lora, lora_modules, merge_lora
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, LayerSizes, spec_dim_steps, uniform_ladder
from uniql.runtime.mamba import ElasticMamba
from uniql.runtime.memory import active_shapes

ALIGN = Alignment(group_size=16, n_align=4)  # small steps so every dim is really cut


def _sorted(family: str, order: str = "random"):
    model = decoder_from_hf(tiny_ssm_hf_model(family))
    sort_with_random_calibration(model, order, seqlen=21)
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(model.spec, ALIGN), model.spec.num_layers)
    return model


def _attn_mlp_cut(full: LayerSizes) -> LayerSizes:
    """Attention and MLP dims cut (qk by whole pairs), Mamba dims full (their masked forward is not truncation)."""
    return dataclasses.replace(full, qk=full.qk - 6, vo=full.vo - 5, mlp=full.mlp - 48)


@pytest.mark.parametrize("family", ["bamba", "nemotron_h"])
def test_attention_and_mlp_masked_full_size_equal_truncated(family):
    """Zeroing what a cut drops and running full size == running the cut: kept Q/K pairs keep their own RoPE
    frequency (Bamba's partial RoPE included) and the softmax scale stays d^-1/2 (bug 14: the reference uses
    r^-1/2 for Bamba / Nemotron-H)."""
    model = _sorted(family)
    cut = _attn_mlp_cut(model.full_sizes)
    masked = copy.deepcopy(model)
    shapes = active_shapes(model.spec, cut)
    for layer in masked.layers:
        for path in layer.linear_paths:
            if path.startswith("mamba."):
                continue
            n, k = shapes[path]
            proj = layer.get_linear(path)
            keep = torch.zeros_like(proj.weight)
            keep[:n, :k] = 1
            proj.weight.data *= keep
            if proj.bias is not None:
                proj.bias.data[n:] = 0
    ids = torch.randint(0, 320, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truncated = model(ids, sizes=[cut] * model.spec.num_layers)
        torch.testing.assert_close(masked(ids), truncated, rtol=1e-5, atol=1e-5)
        assert (truncated - model(ids)).abs().max() > 1e-3  # the cut does change the model


def _built_small(mixer: ElasticMamba, spec, p: int, n: int) -> ElasticMamba:
    """A mixer constructed at head dim ``p`` and state ``n``, holding the kept prefixes of ``mixer``."""
    small = ElasticMamba(dataclasses.replace(spec, ssm_head_dim=p, ssm_state=n)).double()
    hp, gn = mixer.heads * p, mixer.groups * n
    rows = {"z_proj": hp, "x_proj": hp, "B_proj": gn, "C_proj": gn, "dt_proj": mixer.heads}
    with torch.no_grad():
        for name, kept in rows.items():
            getattr(small, name).weight.copy_(getattr(mixer, name).weight[:kept])
        for name, kept in (("x", hp), ("B", gn), ("C", gn)):
            getattr(small, f"conv_{name}_weight").copy_(getattr(mixer, f"conv_{name}_weight")[:kept])
            getattr(small, f"conv_{name}_bias").copy_(getattr(mixer, f"conv_{name}_bias")[:kept])
        small.norm_weight.copy_(mixer.norm_weight[:hp])
        small.out_proj.weight.copy_(mixer.out_proj.weight[:, :hp])
        for name in ("dt_bias", "A_log", "D"):
            getattr(small, name).copy_(getattr(mixer, name))
    return small


def test_truncated_mamba_is_the_mixer_built_at_the_kept_sizes():
    """Bug 10: the reference trains with the gated RMSNorm over the FULL group and serves over the kept channels
    (outputs off by sqrt(P/P') per group). A truncated mixer must be exactly the smaller mixer: norm over kept."""
    model = _sorted("mamba2")
    mixer, spec = model.layers[0].mamba.double(), model.spec
    p, n = spec.ssm_head_dim - 6, spec.ssm_state  # the tiny model's N (16) is one step: kept whole
    small = _built_small(mixer, spec, p, n)
    u = torch.randn(2, 13, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cut = dataclasses.replace(model.full_sizes, ssm_p=p, ssm_n=n)
    with torch.no_grad():
        torch.testing.assert_close(mixer(u, cut), small(u, dataclasses.replace(cut, ssm_p=p)), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_lora_training_at_a_rung_is_what_the_merged_model_serves(family):
    """Masked LoRA on Mamba mixers (and the hybrid's attention / MLP): the training forward at the top rung equals
    the merged model truncated to it, and every gradient lives inside the prefix the kernels read."""
    peft_model = add_lora(_sorted(family), LoraSettings(dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(peft_model).values():
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.2)
    decoder = peft_model.base_model.model
    rung = len(decoder.ladder.rates) - 1
    ids = torch.randint(0, 320, (2, 12), generator=gen)
    with torch.no_grad():
        merged = merge_lora(copy.deepcopy(peft_model))(ids, rung=rung)
    logits = peft_model(ids, rung=rung)
    torch.testing.assert_close(logits.detach(), merged, rtol=1e-5, atol=1e-5)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    modules = lora_modules(peft_model)
    for i, sizes in enumerate(decoder.ladder.sizes[rung]):
        shapes = active_shapes(decoder.spec, sizes)
        for path in decoder.layers[i].linear_paths:
            n, k = shapes[path]
            m = modules[f"base_model.model.layers.{i}.{path}"]
            grad_a, grad_b = m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad
            assert not grad_a[:, k:].any() and not grad_b[n:].any(), (i, path)
            assert grad_a[:, :k].any() and grad_b[:n].any(), (i, path)
