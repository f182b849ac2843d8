"""Structured sorting is a re-parameterisation at rate 0 and puts the most important structure first."""

from functools import partial

import pytest
import torch
from helpers import DATA, max_rel_diff, random_calib_batches, sort_with_random_calibration, tiny_hf_model

from uniql.compressor.calib_data import calibration_batches
from uniql.compressor.calibrate import LayerStats, SortStatsCollector, run_layerwise
from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.orders import (
    _group_pair_scores,
    _row_energy,
    magnitude_orders,
    pinv_leverage,
    random_orders,
    ridge_leverage,
)
from uniql.compressor.sorting import apply_orders
from uniql.runtime.decoder import rotate_pairs
from uniql.runtime.hf_import import decoder_from_hf

TOL = 1e-4  # acceptance: max |logit diff| <= 1e-4 * max |logit| in fp32


# the shared random-token calibration of tests/helpers.py, at this file's sequence length
_batches = partial(random_calib_batches, seqlen=24)
_sort = partial(sort_with_random_calibration, seqlen=24)


@pytest.mark.parametrize("order", ["magnitude", "random"])
def test_baseline_orders_of_a_layer_on_a_device_apply_there(order):
    """magnitude / random orders of a layer that lives on a device (as in ``sort_with_random_calibration``, which
    runs them inside run_layerwise) must be on that device: the V/O permutation matrices were a CPU identity and
    the random draws stayed on the CPU generator's device (gather with the layer's rope_index, einsum with V/O).
    The "meta" device stands in for CUDA (it lets a CPU gather/bmm through, so the orders' device is asserted)."""
    layer = decoder_from_hf(tiny_hf_model("qwen2")).layers[0].to("meta")
    orders = magnitude_orders(layer) if order == "magnitude" else random_orders(layer, torch.Generator().manual_seed(0))
    assert {t.device.type for t in (orders.mlp, orders.qk_pairs, orders.vo_rotation)} == {"meta"}
    apply_orders(layer, orders)
    assert layer.attn.o_proj.weight.device.type == "meta" and layer.attn.rope_index.device.type == "meta"


@pytest.mark.parametrize("order", ["uniql", "magnitude", "random"])
@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_sorted_at_rate0_equals_original(family, tie, order):
    hf = tiny_hf_model(family, tie=tie)
    model = decoder_from_hf(hf)
    _sort(model, order)
    ids = torch.randint(0, 320, (2, 19))
    with torch.no_grad():
        assert max_rel_diff(model(ids), hf(ids).logits) <= TOL


def test_qwen2_v_bias_is_folded_into_o_proj():
    model = decoder_from_hf(tiny_hf_model("qwen2"))
    _sort(model)
    attn = model.layers[0].attn
    assert attn.v_proj.bias is None and attn.o_proj.bias is not None and attn.o_proj.bias.abs().sum() > 0


def test_smollm2_sorted_at_rate0_equals_transformers(smollm2):
    model = decoder_from_hf(smollm2.hf_model)
    cfg = CompressConfig(calib_source=str(DATA / "alpaca_small.json"), calib_samples=8, calib_seqlen=64,
                         bi_source=str(DATA / "wikitext2_small.raw"), bi_samples=2, bi_seqlen=64)
    compress_decoder(model, smollm2.tokenizer, cfg)
    ids = smollm2.tokenizer("Structured sorting must not change a model at rate zero.", return_tensors="pt")
    with torch.no_grad():
        assert max_rel_diff(model(ids.input_ids), smollm2.hf_model(ids.input_ids).logits) <= TOL
        assert max_rel_diff(model(ids.input_ids, rung=3), smollm2.hf_model(ids.input_ids).logits) > 1e-3


def test_ridge_leverage_matches_eigen_formula_and_pinv():
    torch.manual_seed(0)
    x = torch.randn(500, 40, dtype=torch.float64) * torch.logspace(0, -3, 40, dtype=torch.float64)
    corr = x.T @ x
    lam = 1e-2 * corr.diagonal().mean()
    mu, u = torch.linalg.eigh(corr)
    expected = (u.pow(2) * (mu / (mu + lam))).sum(1)
    assert torch.allclose(ridge_leverage(corr, 1e-2), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(pinv_leverage(corr, 1e-2), expected, rtol=1e-6, atol=1e-9)


def test_uniql_orders_put_importance_first():
    model = decoder_from_hf(tiny_hf_model("llama", heads=4, kv_heads=2))
    stats = _sort(model)[0]  # layer 0's input is unchanged by sorting, so its stats still apply
    attn = model.layers[0].attn
    # V/O: the sorted V correlation is diagonal with descending energies (eigenbasis)
    v = attn.v_proj.weight.double().view(attn.head_dim, attn.n_kv, -1).transpose(0, 1)
    cov = v @ stats.attn_in_corr @ v.transpose(1, 2)
    diag = cov.diagonal(dim1=1, dim2=2)
    assert (cov - torch.diag_embed(diag)).abs().max() <= 1e-8 * diag.abs().max()
    assert (diag[:, 1:] <= diag[:, :-1] * (1 + 1e-9)).all()
    # Q/K: recomputed pair scores are non-increasing within every KV group
    scores = _group_pair_scores(attn, _row_energy(attn.q_proj.weight, None, stats),
                                _row_energy(attn.k_proj.weight, None, stats))
    assert (scores[:, 1:] <= scores[:, :-1] * (1 + 1e-9)).all()
    # RoPE frequency indices are a permutation per group
    assert all(sorted(row.tolist()) == list(range(attn.head_dim // 2)) for row in attn.rope_index)


def test_mlp_leverage_is_descending_after_sorting():
    hf = tiny_hf_model("llama")
    model = decoder_from_hf(hf)
    _sort(model)
    after = {}
    run_layerwise(model, _batches(), [SortStatsCollector(lambda i, layer, s: after.__setitem__(i, s))])
    tau = ridge_leverage(after[1].mlp_hidden_corr)
    assert (tau[1:] <= tau[:-1] + 1e-9).all()


def test_uniql_beats_random_when_truncated():
    """On real text the calibrated order loses less than a random one at the same kept sizes."""
    from transformers import AutoTokenizer

    from uniql.paths import smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = tiny_hf_model("llama", vocab=len(tok), hidden=64, inter=256, layers=2, seed=3)
    batches = calibration_batches(tok, str(DATA / "alpaca_small.json"), 16, 48)
    errors = {}
    ids = batches[0].input_ids[:2, :32]
    with torch.no_grad():
        ref = hf(ids).logits
    for order in ("uniql", "random"):
        model = decoder_from_hf(hf)
        cfg = CompressConfig(order=order, calib_source=str(DATA / "alpaca_small.json"), calib_samples=16,
                             calib_seqlen=48, bi_source=str(DATA / "wikitext2_small.raw"), bi_samples=2,
                             bi_seqlen=48, group_size=32)
        compress_decoder(model, tok, cfg)
        with torch.no_grad():
            errors[order] = (model(ids, rung=len(model.ladder.rates) - 1) - ref).pow(2).mean().item()
    assert errors["uniql"] < errors["random"]


def _biased_llama():
    """Llama with ``attention_bias`` (q/k/v AND o_proj biases) and ``mlp_bias`` (gate/up/down biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, mlp_bias=True, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return hf


@pytest.mark.parametrize("order", ["uniql", "random"])
def test_v_bias_folds_into_an_existing_o_bias_as_a_vector(order):
    """uniql-method.md section 3.3: folding the V bias where o_proj already has one must ADD W_O b_V to it (the
    released code adds a scalar per head). Also: gate/up biases follow their rows, down's bias stays."""
    hf = _biased_llama()
    model = decoder_from_hf(hf)
    assert model.spec.o_bias and model.spec.v_bias and model.spec.mlp_bias
    _sort(model, order)
    assert model.layers[0].attn.v_proj.bias is None
    ids = torch.randint(0, 320, (2, 19))
    with torch.no_grad():
        assert max_rel_diff(model(ids), hf(ids).logits) <= TOL


def _rope_energies(attn, x, inv_freq):
    """E-sums of |q_pair|^2 / |k_pair|^2 AFTER RoPE at the tokens' positions: rows [P*2*heads] as _row_energy."""
    t = x.shape[1]
    cos, sin = attn.rope_cos_sin(inv_freq, torch.arange(t)[None], attn.head_dim // 2, 1.0)  # [1, g, T, P]
    out = []
    for proj, heads in ((attn.q_proj, attn.n_heads), (attn.k_proj, attn.n_kv)):
        pairs = attn._pairs_view(proj(x).double(), heads, attn.head_dim)  # [B, heads, T, P, 2]
        rep = heads // attn.n_kv
        rot = rotate_pairs(pairs, cos.double().repeat_interleave(rep, 1), sin.double().repeat_interleave(rep, 1))
        out.append(rot.pow(2).sum((0, 2)).permute(1, 2, 0).flatten())  # [heads, P, 2] -> rows (m, t, head)
    return out


def test_qk_pair_scores_are_those_of_the_rotated_q_and_k():
    """uniql-method.md bug 13: the reference scores rotated Q against UN-rotated K. Here a pair's energy is
    RoPE-invariant, so the score from the weights' moments must equal the score of the q and k attention really
    sees (after RoPE), biases included."""
    model = decoder_from_hf(tiny_hf_model("qwen2", heads=4, kv_heads=2))
    attn, norm = model.layers[0].attn, model.layers[0].input_norm
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = norm(model.embed_tokens(ids))
        flat = x.reshape(-1, x.shape[-1]).double()
        stats = LayerStats(tokens=flat.shape[0], attn_in_corr=flat.T @ flat, attn_in_sum=flat.sum(0))
        q_rot, k_rot = _rope_energies(attn, x, model.inv_freq)
        from_moments = _group_pair_scores(attn, _row_energy(attn.q_proj.weight, attn.q_proj.bias, stats),
                                          _row_energy(attn.k_proj.weight, attn.k_proj.bias, stats))
    assert max_rel_diff(from_moments, _group_pair_scores(attn, q_rot, k_rot)) <= 1e-6
