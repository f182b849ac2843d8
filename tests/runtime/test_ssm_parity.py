"""Mamba2, Bamba and Nemotron-H through the generic elastic decoder equal transformers' own models (fp32, torch path).

Acceptance (issue 7): max |logit diff| <= 1e-4 * max |logit| for the full forward and for prefill + decode steps
through the caches; sequence lengths are odd and not multiples of the chunk size (8 in the tiny configs).
"""

import pytest
import torch
from helpers import max_rel_diff, tiny_ssm_hf_model

from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, LayerSizes, spec_dim_steps, uniform_ladder
from uniql.runtime.spec import ArchSpec

TOL = 1e-4
FAMILIES = ("mamba2", "bamba", "nemotron_h")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = tiny_ssm_hf_model(request.param)
    return hf, decoder_from_hf(hf)


@pytest.mark.parametrize("length", [1, 5, 16, 21])
def test_full_forward_matches_transformers(pair, length):
    hf, ours = pair
    ids = torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        assert max_rel_diff(ours(ids), hf(ids).logits) <= TOL


def test_spec_describes_the_family(pair):
    hf, ours = pair
    spec = ours.spec
    expected = {"mamba2": (("mamba",) * 2, 0.0, True), "bamba": (("mamba+mlp", "attn+mlp", "mamba+mlp"), 0.5, True),
                "nemotron_h": (("mamba", "mlp", "attn", "mlp"), 0.0, False)}[spec.family]
    assert (spec.layer_kinds, spec.rotary_fraction, spec.mlp_gated) == expected
    assert (spec.ssm_heads, spec.ssm_head_dim, spec.ssm_groups, spec.ssm_state, spec.ssm_conv) == (8, 16, 2, 16, 4)
    mixer = next(m for m in hf.modules() if hasattr(m, "A_log"))
    assert spec.dt_limit == tuple(float(v) for v in mixer.time_step_limit)  # the mixer's own clamp


@pytest.mark.parametrize("prompt", [3, 11])
def test_prefill_then_decode_matches_full_forward(pair, prompt):
    """Prefill ``prompt`` tokens into a cache, then decode one token at a time: logits equal transformers' full
    forward over the whole sequence (the cache carries exactly the state a longer prefill would)."""
    hf, ours = pair
    ids = torch.randint(0, 320, (1, 19), generator=torch.Generator().manual_seed(prompt))
    with torch.no_grad():
        ref = hf(ids).logits
        cache = ours.new_cache(1, 32)
        steps = [ours(ids[:, :prompt], cache=cache)]
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(prompt, ids.shape[1])]
    assert max_rel_diff(torch.cat(steps, dim=1), ref) <= TOL


def test_decode_matches_transformers_cache(pair):
    """Against transformers' own cached decode (its recurrent step), token by token."""
    hf, ours = pair
    ids = torch.randint(0, 320, (1, 13), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = hf(ids[:, :9], use_cache=True)
        hf_cache, hf_logits = out.cache, [out.logits]
        cache = ours.new_cache(1, 32)
        ours_logits = [ours(ids[:, :9], cache=cache)]
        for t in range(9, 13):
            step = hf(ids[:, t:t + 1], cache=hf_cache, use_cache=True, position_ids=torch.tensor([[t]]))
            hf_cache = step.cache
            hf_logits.append(step.logits)
            ours_logits.append(ours(ids[:, t:t + 1], cache=cache))
    assert max_rel_diff(torch.cat(ours_logits, 1), torch.cat(hf_logits, 1)) <= TOL


def test_pruned_rung_runs_with_caches_of_its_size(pair):
    hf, ours = pair
    spec = ours.spec
    ours.ladder = uniform_ladder(ours.full_sizes, spec_dim_steps(spec, Alignment(group_size=32)), spec.num_layers)
    try:
        rung = len(ours.ladder.rates) - 1
        sizes = ours.ladder.sizes[rung]
        ids = torch.randint(0, 320, (1, 9))
        cache = ours.new_cache(1, 16, rung=rung)
        with torch.no_grad():
            logits = ours(ids, cache=cache)
            logits = ours(ids[:, :1], cache=cache)
        assert torch.isfinite(logits).all()
        for i, s in enumerate(sizes):
            blocks = spec.blocks(i)
            if "mamba" in blocks:
                assert s.ssm_p < spec.ssm_head_dim and s.ssm_p % 2 == 0
                assert cache.ssm[i].shape == (1, 8, s.ssm_p, s.ssm_n) and cache.ssm[i].dtype == torch.float32
                assert cache.conv[i].shape == (1, 8 * s.ssm_p + 2 * 2 * s.ssm_n, 3)
            else:
                assert cache.ssm[i] is None and cache.conv[i] is None
            k_shape = (1, 2, 16, s.qk) if "attn" in blocks else (1, spec.num_kv_heads, 0, 0)
            assert cache.k[i].shape == k_shape
    finally:
        ours.ladder = None


def test_old_manifest_spec_and_sizes_still_parse():
    """Manifests written before SSM support have no SSM fields: they load as attn+mlp everywhere."""
    old = {"family": "llama", "vocab_size": 320, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "head_dim": 16, "intermediate_size": 128, "rms_norm_eps": 1e-5, "tie_embeddings": False, "qk_bias": False,
           "v_bias": False, "o_bias": False, "mlp_bias": False, "act": "silu", "rope_attention_scaling": 1.0,
           "max_position_embeddings": 256}
    spec = ArchSpec.from_dict(old)
    assert spec.blocks(1) == ("attn", "mlp") and spec.ssm_heads == 0
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    assert LayerSizes(**{"mlp": 128, "qk": 16, "vo": 16}).ssm_p == 0
