"""The generic elastic decoder equals transformers, runs every rung as views, and decodes with a KV cache."""

import pytest
import torch
from helpers import max_rel_diff, tiny_hf_model

from uniql.runtime.decoder import ElasticDecoder
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder

TOL = 1e-4  # acceptance: max |logit diff| <= 1e-4 * max |logit|, fp32


@pytest.mark.parametrize("family,tie,kv_heads", [("llama", False, 2), ("llama", True, 4), ("qwen2", False, 2),
                                                 ("qwen2", True, 1)])
def test_matches_transformers(family, tie, kv_heads):
    hf = tiny_hf_model(family, tie=tie, kv_heads=kv_heads)
    ours = decoder_from_hf(hf)
    ids = torch.randint(0, 320, (2, 23))
    with torch.no_grad():
        assert max_rel_diff(ours(ids), hf(ids).logits) <= TOL


def test_qwen2_biases_are_used():
    hf = tiny_hf_model("qwen2")
    ours = decoder_from_hf(hf)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        before = ours(ids)
        ours.layers[0].attn.k_proj.bias.add_(1.0)
        assert max_rel_diff(ours(ids), before) > 1e-3


def test_smollm2_matches_transformers(smollm2):
    ours = decoder_from_hf(smollm2.hf_model)
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        ref = smollm2.hf_model(ids.input_ids).logits
        assert max_rel_diff(ours(ids.input_ids), ref) <= TOL


def _laddered(family="llama"):
    model = decoder_from_hf(tiny_hf_model(family, heads=8, kv_heads=4, hidden=64, inter=256))
    spec = model.spec
    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=32))
    model.ladder = uniform_ladder(model.full_sizes, steps, spec.num_layers)
    return model


def test_rung_forward_uses_views_of_stored_weights(monkeypatch):
    """Every matmul at a pruned rung reads a view into the stored weight: no copy, no repack."""
    import uniql.runtime.linear as linear

    model = _laddered()
    stored = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = []
    real_linear = linear.F.linear

    def recording_linear(x, weight, bias=None):
        seen.append((weight.untyped_storage().data_ptr(), tuple(weight.shape)))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(linear.F, "linear", recording_linear)
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 5)), rung=len(model.ladder.rates) - 1)
    assert len(seen) == 7 * model.spec.num_layers + 1  # + lm_head
    assert all(ptr in stored for ptr, _ in seen)
    sizes = model.ladder.sizes[-1][0]
    down_shape = seen[6][1]  # layer 0: q, k, v, o, gate, up, down
    assert down_shape == (model.spec.hidden_size, sizes.mlp) and sizes.mlp < model.spec.intermediate_size


def test_rungs_change_output_and_rung0_is_full():
    model = _laddered()
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        full = model(ids)
        assert torch.equal(model(ids, rung=0), full)
        assert max_rel_diff(model(ids, rung=len(model.ladder.rates) - 1), full) > 1e-3


@pytest.mark.parametrize("rung", [0, 5])
def test_kv_cache_decode_matches_full_forward(rung):
    model = _laddered("qwen2")
    ids = torch.randint(0, 320, (2, 14))
    with torch.no_grad():
        full = model(ids, rung=rung)
        cache = model.new_cache(batch=2, max_len=32, rung=rung)
        steps = [model(ids[:, :9], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 14)]
    assert max_rel_diff(torch.cat(steps, 1), full) <= TOL
    sizes = model.ladder.sizes[rung][0]
    assert cache.k[0].shape == (2, model.spec.num_kv_heads, 32, sizes.qk)
    assert cache.v[0].shape == (2, model.spec.num_kv_heads, 32, sizes.vo)


def test_right_padding_does_not_change_real_tokens():
    model = _laddered()
    ids = torch.randint(0, 320, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, :6])
    assert max_rel_diff(padded[1, :6], alone[0]) <= TOL


def test_unknown_rung_is_a_clear_error():
    model = _laddered()
    with pytest.raises(ValueError, match="outside the ladder"):
        model(torch.zeros(1, 3, dtype=torch.long), rung=99)
    bare = ElasticDecoder(model.spec)
    with pytest.raises(ValueError, match="no rate ladder"):
        bare(torch.zeros(1, 3, dtype=torch.long), rung=2)


def test_unpadded_prompt_without_cache_runs_plain_causal_attention(monkeypatch):
    """Nothing padded and nothing cached: no mask tensor (SDPA's is_causal kernels), the same logits as the mask."""
    model = decoder_from_hf(tiny_hf_model("llama"))
    ids = torch.randint(0, 320, (2, 17))
    ones = torch.ones_like(ids)
    assert model.attention_mask(ones, 2, 17, 0, "cpu") is None and model.attention_mask(None, 2, 17, 0, "cpu") is None
    assert model.attention_mask(None, 2, 17, 4, "cpu") is not None  # a cache before: is_causal would align wrong
    padded = ones.clone()
    padded[1, -3:] = 0
    assert model.attention_mask(padded, 2, 17, 0, "cpu") is not None
    with torch.no_grad():
        fast = model(ids, attention_mask=ones)
        causal = torch.ones(17, 17, dtype=torch.bool).tril()[None, None].expand(2, 1, 17, 17)
        monkeypatch.setattr(model, "attention_mask", lambda *args: causal)
        assert max_rel_diff(model(ids, attention_mask=ones), fast) <= 1e-6


@pytest.mark.parametrize("rung", [0, 7])
def test_prefill_rotation_from_the_forwards_tables_equals_the_per_layer_one(rung):
    """The fused path's prefill (CUDA): q and k rotated by ``ops.rope`` from cos/sin tables built once a forward
    (the Triton kernel there, its reference here) equal the torch path's per-layer rotation: batch 2 after a
    cached prefix, at a pruned rung, with an attention scaling."""
    from uniql.kernels.rope import rope_tables

    model = _laddered("qwen2")
    attn, sizes = model.layers[0].attn, model.sizes_for(rung)[0]
    assert rung == 0 or sizes.qk < model.spec.head_dim
    past, steps, scaling = 3, 7, 0.9
    x = torch.randn(2, steps, model.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(past, past + steps).expand(2, steps)
    mask = model.attention_mask(None, 2, steps, past, "cpu")
    prefix = [torch.randn(2, model.spec.num_kv_heads, past, d) for d in (sizes.qk, sizes.vo)]

    def attend(rope):
        cache = model.new_cache(batch=2, max_len=16, rung=rung)
        cache.k[0][:, :, :past], cache.v[0][:, :, :past] = prefix
        cache.length = past
        with torch.inference_mode():
            out = attn(x, sizes, model.inv_freq, positions, mask, scaling, cache=cache, layer=0, rope=rope)
        return out, cache.k[0][:, :, :past + steps]

    tables = rope_tables(model.inv_freq, positions.reshape(-1), scaling)
    (fused, k_fused), (plain, k_plain) = attend(tables), attend(None)
    torch.testing.assert_close(k_fused, k_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_prefill_rope_tables_are_built_on_the_ids_device(monkeypatch):
    """Layer-wise calibration keeps the model on the host and runs each layer on the device: the fused path's
    RoPE tables must follow the ids, not ``inv_freq`` (``uniql compress --device cuda`` crashed on that, stop 45).
    The meta device stands in for the GPU here: an op mixing it with a host tensor raises, as a CUDA one would."""
    import uniql.runtime.decoder as dec

    model = _laddered()
    monkeypatch.setattr(dec, "_fused_kernels", lambda x: True)  # the fused path, as on a GPU
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    cos, sin = model.context(ids)["rope"]
    assert cos.device.type == sin.device.type == "meta" and cos.shape[0] == 10
    assert model.inv_freq.device.type == "cpu"  # the model itself stays where it was
