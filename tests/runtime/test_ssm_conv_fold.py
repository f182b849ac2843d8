"""UNIQL_SSM_CONV_FOLD=1: Mamba2's causal-conv step runs in the z|x|B|C|dt in-projection's GEMV (the x / B / C
tiles' epilogue, ``kernels/gemv_conv.py``), one launch less a layer. Three decode steps (each reads the conv state
the one before shifted) give the logits of the steps with the conv kernel: bit for bit in the interpreter (the
same fp32 arithmetic on the same stored values). CPU: the Triton kernels in the interpreter, over address tables."""

from __future__ import annotations

import pytest
import torch
from helpers import int4_ssm_decoder, randomize_

import uniql.runtime.cache as cache_module
import uniql.runtime.decoder as decoder_module
from uniql.kernels import ops
from uniql.runtime.cache import DecodeBatch
from uniql.runtime.fusion import fuse_projections

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


def _mamba2_two_groups():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(5)
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=8, num_heads=8, head_dim=16,
                          n_groups=2, state_size=16, conv_kernel=4, expand=2)
    return int4_ssm_decoder(randomize_(Mamba2ForCausalLM(config).eval()))


@pytest.mark.parametrize("rung", [0, 2])
def test_conv_in_the_in_projection_equals_the_conv_kernel(rung, monkeypatch):
    dev = torch.device("cuda" if CUDA else "cpu")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(cache_module, "TRITON_ON_CPU", True)  # address tables, Triton kernels
        monkeypatch.setattr(decoder_module, "_fused_kernels", lambda x: not torch.is_grad_enabled())
    model = _mamba2_two_groups().to(dev, torch.bfloat16)
    assert fuse_projections(model) > 0
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(dev)
    convs = []
    real, real_enabled = ops.conv_state_update, ops.triton_enabled
    monkeypatch.setattr(ops, "conv_state_update", lambda *a, **kw: convs.append(1) or real(*a, **kw))

    def steps(fold: str) -> list[torch.Tensor]:
        monkeypatch.setenv("UNIQL_SSM_CONV_FOLD", fold)
        cache = model.new_cache(1, 10, rung, torch.bfloat16)
        logits = []
        with torch.inference_mode():
            model(prompt, cache=cache)
            if not CUDA:  # both paths' decode GEMVs are the (interpreted) Triton kernels, as on a GPU
                monkeypatch.setattr(ops, "triton_enabled", lambda device: True)
            for i, token in enumerate((5, 17, 3)):
                batch = DecodeBatch(model.sizes_for(rung), 1, 10, dev)
                batch.bind([cache], torch.tensor([7 + i], dtype=torch.int32, device=dev))
                logits.append(model(torch.tensor([[token]], device=dev), cache=batch, logits_to_keep=1).float())
        monkeypatch.setattr(ops, "triton_enabled", real_enabled)
        return logits

    folded = steps("1")
    assert not convs  # no conv kernel ran
    plain = steps("0")
    assert len(convs) == 3 * model.spec.num_layers
    for mine, theirs in zip(folded, plain, strict=True):
        assert torch.isfinite(mine).all()
        if CUDA:  # FMA contraction may differ between the two kernels
            torch.testing.assert_close(mine, theirs, atol=2e-2 * theirs.abs().max().item(), rtol=0)
        else:
            assert torch.equal(mine, theirs)
    monkeypatch.setenv("UNIQL_SSM_CONV_FOLD", "on")
    with pytest.raises(ValueError, match="UNIQL_SSM_CONV_FOLD must be 0 or 1"):
        steps("on")
