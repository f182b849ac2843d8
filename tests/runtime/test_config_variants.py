"""Configs off the common path, against transformers (fp32, tiny random models): biases, tied / untied heads,
head_dim != hidden / heads, MHA and MQA, vocabularies and MLP widths off every alignment, RoPE scalings, partial
rotary, Nemotron-H layer patterns and Mamba head counts. For each: rate-0 logits equal transformers' (max |diff| <=
1e-4 * max |logit|), UniQL sorting leaves rate 0 unchanged, and the most pruned rung of a ladder runs (finite,
different logits). Also config flags transformers' own modules ignore: the import follows the modules."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_diff, randomize_, sort_with_random_calibration

from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder

TOL = 1e-4
M, A, F = "linear_attention", "full_attention", "mlp"  # Nemotron-H layer types


def _randomized(model):
    """std-0.1 weights (layers matter), norms in [0.5, 1.5], SSM decay / dt / skip spread as in helpers."""
    torch.manual_seed(0)
    return randomize_(model).eval()


def _llama_like(family: str, **overrides):
    import transformers as tf

    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    return _randomized(model_cls(config_cls(**{**base, **overrides})))


def _nemotron_h(pattern, heads=8, head_dim=16, groups=2, **overrides):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    base = dict(vocab_size=320, hidden_size=64, head_dim=16, chunk_size=8, layers_block_type=pattern,
                mamba_num_heads=heads, mamba_head_dim=head_dim, n_groups=groups, ssm_state_size=16, conv_kernel=4,
                expand=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                max_position_embeddings=256)
    return _randomized(NemotronHForCausalLM(NemotronHConfig(**{**base, **overrides})))


def _bamba(**overrides):
    from transformers import BambaConfig, BambaForCausalLM

    base = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, attn_layer_indices=[1], mamba_chunk_size=8,
                mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
                mamba_expand=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                max_position_embeddings=256)
    return _randomized(BambaForCausalLM(BambaConfig(**{**base, **overrides})))


def _rope(rope_type: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **params}}


CASES = {
    "llama-tied": lambda: _llama_like("llama", tie_word_embeddings=True),
    "qwen2-qkv-bias-tied": lambda: _llama_like("qwen2", tie_word_embeddings=True),
    "llama-attention-and-mlp-bias": lambda: _llama_like("llama", attention_bias=True, mlp_bias=True),
    "llama-head-dim-32-of-hidden-64-by-4": lambda: _llama_like("llama", head_dim=32),
    "mistral-head-dim-64-of-hidden-128-by-4": lambda: _llama_like("mistral", hidden_size=128, head_dim=64),
    "qwen2-head-dim-8": lambda: _llama_like("qwen2", head_dim=8),
    "llama-mha": lambda: _llama_like("llama", num_key_value_heads=4),
    "llama-mqa": lambda: _llama_like("llama", num_key_value_heads=1),
    "qwen2-mqa": lambda: _llama_like("qwen2", num_key_value_heads=1),
    "llama-vocab-333-tied": lambda: _llama_like("llama", vocab_size=333, tie_word_embeddings=True),
    "llama-intermediate-200": lambda: _llama_like("llama", intermediate_size=200),
    "llama-rope-llama3": lambda: _llama_like("llama", **_rope("llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0,
                                                              original_max_position_embeddings=64)),
    "llama-rope-linear": lambda: _llama_like("llama", **_rope("linear", factor=2.0)),
    "qwen2-rope-yarn": lambda: _llama_like("qwen2", **_rope("yarn", factor=4.0, original_max_position_embeddings=64)),
    "llama-rope-dynamic": lambda: _llama_like("llama", **_rope("dynamic", factor=2.0)),
    # flags in config.json that these families' transformers modules ignore (their biases are hard-coded)
    "mistral-ignores-attention-and-mlp-bias": lambda: _llama_like("mistral", attention_bias=True, mlp_bias=True),
    "qwen2-ignores-mlp-bias": lambda: _llama_like("qwen2", mlp_bias=True),
    "nemotron-h-mlp-only": lambda: _nemotron_h([F, F]),
    "nemotron-h-attention-only": lambda: _nemotron_h([A, A]),
    "nemotron-h-4-heads-x32": lambda: _nemotron_h([M, F, A, F], heads=4, head_dim=32),
    "nemotron-h-6-heads-3-groups": lambda: _nemotron_h([M, F, A, F], heads=6, groups=3),
    "nemotron-h-12-heads-x8-1-group": lambda: _nemotron_h([M, F, M, A], heads=12, head_dim=8, groups=1),
    "nemotron-h-mqa-biases": lambda: _nemotron_h([M, A, F], num_key_value_heads=1, mlp_bias=True, use_bias=True),
    # transformers' Nemotron-H never ties its head to the table (``_tied_weights_keys`` is empty), whatever the flag
    "nemotron-h-tie-flag": lambda: _nemotron_h([M, A, F], tie_word_embeddings=True),
    "bamba-rotary-quarter": lambda: _bamba(**_rope("default", partial_rotary_factor=0.25)),
    "bamba-rotary-full-yarn": lambda: _bamba(**_rope("yarn", factor=4.0, original_max_position_embeddings=64,
                                                     partial_rotary_factor=1.0)),
    "bamba-mqa-tied-biases": lambda: _bamba(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                            mlp_bias=True, mamba_proj_bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_variant_matches_transformers_sorts_exactly_and_its_pruned_rung_runs(case):
    hf = CASES[case]()
    model = decoder_from_hf(hf)
    ids = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert max_rel_diff(model(ids), ref) <= TOL
    sort_with_random_calibration(model)
    spec = model.spec
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(spec, Alignment(group_size=32)), spec.num_layers)
    with torch.no_grad():
        assert max_rel_diff(model(ids, rung=0), ref) <= TOL
        pruned = model(ids, rung=len(model.ladder.rates) - 1)
    assert torch.isfinite(pruned).all() and max_rel_diff(pruned, ref) > 1e-3


@pytest.mark.parametrize("case, tied", [("llama-tied", True), ("bamba-mqa-tied-biases", True),
                                        ("nemotron-h-tie-flag", False)])
def test_the_head_is_tied_exactly_when_transformers_ties_it(case, tied):
    """The config's tie_word_embeddings is what the model class may do with it: the import reads the modules."""
    hf = CASES[case]()
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == tied
    model = decoder_from_hf(hf)
    assert model.spec.tie_embeddings == tied and (model.lm_head is None) == tied
    if not tied:
        assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_ignored_bias_flags_add_no_biases():
    for hf in (CASES["mistral-ignores-attention-and-mlp-bias"](), CASES["qwen2-ignores-mlp-bias"]()):
        spec = decoder_from_hf(hf).spec
        assert not spec.mlp_bias and not spec.o_bias
        assert spec.qk_bias == spec.v_bias == (spec.family == "qwen2")  # Qwen2's q/k/v biases are always there


def test_partial_rotary_with_attention_scaling_is_refused_at_import():
    with pytest.raises(ValueError, match="partial RoPE with attention scaling"):
        decoder_from_hf(_bamba(**_rope("yarn", factor=4.0, original_max_position_embeddings=64,
                                       partial_rotary_factor=0.5)))
