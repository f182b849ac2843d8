"""What the import refuses or limits instead of computing wrongly: sliding windows (context capped), RoPE types
whose frequencies move with the length, contexts past the model's limit, non-causal-LM classes; and the dt clamp
Nemotron-H's own mixer applies (fp32, tiny random models)."""

from __future__ import annotations

import pytest
import torch
from helpers import _tiny_ssm_config

from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("overrides, limit", [
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, 16),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, 16),  # only layer 1 slides
    ({"use_sliding_window": False, "sliding_window": 16}, 64),
])
def test_a_sliding_window_caps_the_context_and_inside_it_the_model_is_exact(overrides, limit, tokenizer):
    hf = _qwen2(**overrides)
    model = decoder_from_hf(hf)
    assert model.spec.max_position_embeddings == limit
    ids = torch.randint(0, 320, (1, min(limit, 16)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids), hf(ids).logits) < 1e-4
    with pytest.raises(ValueError, match=f"exceeds the model's context limit {limit}"):
        Engine(model, tokenizer, max_model_len=limit + 1)


def test_rope_types_whose_frequencies_move_are_refused_and_dynamic_is_exact_within_its_limit():
    with pytest.raises(ValueError, match="RoPE type 'longrope'"):
        decoder_from_hf(_llama(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                             "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}))
    hf = _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = decoder_from_hf(hf)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(model(ids), hf(ids).logits) < 1e-4


def test_only_causal_language_models_are_imported():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification is not a causal language model"):
        decoder_from_hf(LlamaForSequenceClassification(cfg))


def test_an_unsupported_family_is_named_as_such_not_as_a_non_causal_model():
    """GPT-2's head class does not end in ForCausalLM: the message blamed the head instead of the family."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="gpt2.*not supported"):
        decoder_from_hf(hf)


def test_nemotron_h_clamps_dt_as_its_own_mixer_does():
    """dt_bias far below zero makes dt = softplus(.) < time_step_min (0.001): only the mixer's own clamp matches."""
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM(_tiny_ssm_config("nemotron_h", 317, 64, 8)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("dt_bias"):
                p.uniform_(-9.0, -6.0, generator=torch.Generator().manual_seed(3))
    model = decoder_from_hf(hf)
    mixer_lo = float(hf.model.layers[0].mixer.time_step_limit[0])
    assert model.spec.ssm_dt_min == mixer_lo
    ids = torch.randint(0, 317, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(model(ids), hf(ids).logits) < 1e-4


def test_an_unsupported_mamba_activation_is_named():
    from transformers import Mamba2ForCausalLM

    cfg = _tiny_ssm_config("mamba2", 317, 64, 8)
    cfg.hidden_act = "gelu_new"
    with pytest.raises(ValueError, match="unsupported Mamba activation 'gelu_new'"):
        decoder_from_hf(Mamba2ForCausalLM(cfg))
