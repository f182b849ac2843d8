"""UNIQL_SSM_NORM_FOLD=1: Mamba2's gated group RMSNorm split across the state update (g * w and partial sums of
g^2) and out_proj's GEMV (each packed row's group 1 / rms): a decode step gives the logits of the step with the
norm kernel, one launch less a layer. CPU: the Triton kernels in the interpreter, over address tables."""

from __future__ import annotations

import pytest
import torch
from helpers import int4_ssm_decoder, randomize_

import uniql.runtime.cache as cache_module
import uniql.runtime.decoder as decoder_module
from uniql.kernels import ssm_update
from uniql.runtime.cache import DecodeBatch
from uniql.runtime.fusion import fuse_projections

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


def _mamba2_one_group():
    """8 heads in one group (the fold needs a multiple of 8 heads a group), INT4 projections, a ladder."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(3)
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=8, num_heads=8, head_dim=16,
                          n_groups=1, state_size=16, conv_kernel=4, expand=2)
    return int4_ssm_decoder(randomize_(Mamba2ForCausalLM(config).eval()))


@pytest.mark.parametrize("rung", [0, 2])
def test_norm_split_across_update_and_out_proj_equals_the_norm_kernel(rung, monkeypatch):
    dev = torch.device("cuda" if CUDA else "cpu")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(cache_module, "TRITON_ON_CPU", True)  # address tables, Triton kernels
        monkeypatch.setattr(decoder_module, "_fused_kernels", lambda x: not torch.is_grad_enabled())
    model = _mamba2_one_group().to(dev, torch.bfloat16)
    assert fuse_projections(model) > 0
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(dev)
    begun = []
    real = ssm_update.selective_state_update
    monkeypatch.setattr(ssm_update, "selective_state_update",
                        lambda *a, **kw: begun.append("norm_weight" in kw) or real(*a, **kw))

    def step(fold: str) -> torch.Tensor:
        monkeypatch.setenv("UNIQL_SSM_NORM_FOLD", fold)
        cache = model.new_cache(1, 8, rung, torch.bfloat16)
        with torch.inference_mode():
            model(prompt, cache=cache)
            batch = DecodeBatch(model.sizes_for(rung), 1, 8, dev)
            batch.bind([cache], torch.tensor([7], dtype=torch.int32, device=dev))
            return model(torch.tensor([[5]], device=dev), cache=batch, logits_to_keep=1).float()

    folded = step("1")
    assert begun == [True] * model.spec.num_layers
    plain = step("0")
    assert begun[model.spec.num_layers:] == [False] * model.spec.num_layers
    assert torch.isfinite(folded).all()
    # bf16 rounds g * w before the 1 / rms here, after it in the norm kernel: 0.6 % of the largest logit on CPU;
    # a group scale 13 % off moved them 1.6 %
    torch.testing.assert_close(folded, plain, atol=1.1e-2 * plain.abs().max().item(), rtol=0)
    assert not torch.equal(folded, plain)
    monkeypatch.setenv("UNIQL_SSM_NORM_FOLD", "yes")
    with pytest.raises(ValueError, match="UNIQL_SSM_NORM_FOLD must be 0 or 1"):
        step("yes")
