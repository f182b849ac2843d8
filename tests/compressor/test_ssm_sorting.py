"""SSM sorting (Mamba2 mixers, and the attention/MLP blocks of hybrids) is a re-parameterisation at rate 0:
the sorted elastic decoder equals transformers' own model; the scores put dead channels / states last; the
compressor sorts SSM and hybrid models instead of skipping them."""

from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import DATA, max_rel_diff, random_calib_batches, sort_with_random_calibration, tiny_ssm_hf_model

from uniql.compressor.calibrate import SortStatsCollector, run_layerwise
from uniql.compressor.compress import CompressConfig, compress_decoder
from uniql.compressor.orders import _group_pair_scores, _row_energy, magnitude_orders, uniql_orders
from uniql.compressor.sorting import permute_mamba
from uniql.compressor.ssm_orders import MambaOrders, stored_rows
from uniql.runtime.hf_import import decoder_from_hf

TOL = 1e-4
FAMILIES = ("mamba2", "bamba", "nemotron_h")


# the shared random-token calibration of tests/helpers.py, at this file's sequence length
_batches = partial(random_calib_batches, seqlen=21)
_sort = partial(sort_with_random_calibration, seqlen=21)


@pytest.mark.parametrize("order", ["uniql", "magnitude", "random"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sorted_at_rate0_equals_transformers(family, order):
    hf = tiny_ssm_hf_model(family)
    model = decoder_from_hf(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sort(model, order)
    moved = [k for k, v in model.state_dict().items() if "mamba" in k and not torch.equal(v, before[k])]
    assert any("x_proj" in k for k in moved) and any("B_proj" in k for k in moved)
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_diff(model(ids), hf(ids).logits) <= TOL


def test_dt_A_D_never_move():
    model = decoder_from_hf(tiny_ssm_hf_model("mamba2"))
    mixer = model.layers[0].mamba
    fixed = {n: getattr(mixer, n).clone() for n in ("dt_bias", "A_log", "D")}
    dt_rows = mixer.dt_proj.weight.clone()
    _sort(model, "uniql")
    assert all(torch.equal(getattr(mixer, n), v) for n, v in fixed.items())
    assert torch.equal(mixer.dt_proj.weight, dt_rows)


@pytest.mark.parametrize("order", ["uniql", "magnitude"])
def test_dead_channels_and_states_sort_last(order):
    """Zero the x rows of channel 5 in every head and the B rows of state 3 in group 1: nothing flows through
    them, so both scores must rank them last (their own head's / group's last position)."""
    model = decoder_from_hf(tiny_ssm_hf_model("mamba2"))
    mixer = model.layers[0].mamba
    heads, groups = mixer.heads, mixer.groups
    with torch.no_grad():
        mixer.x_proj.weight[5 * heads:6 * heads] = 0
        mixer.conv_x_bias[5 * heads:6 * heads] = 0
        mixer.z_proj.weight[5 * heads:6 * heads] = 0
        mixer.B_proj.weight[3 * groups + 1] = 0
        mixer.C_proj.weight[3 * groups + 1] = 0
        mixer.conv_B_bias[3 * groups + 1] = 0
        mixer.conv_C_bias[3 * groups + 1] = 0
    captured = {}
    if order == "uniql":
        def on_layer(i, layer, stats):
            if i == 0:
                captured["orders"] = uniql_orders(layer, stats)
        run_layerwise(model, _batches(), [SortStatsCollector(on_layer)])
    else:
        captured["orders"] = magnitude_orders(model.layers[0])
    orders = captured["orders"].mamba
    assert orders.channels.shape == (heads, mixer.head_dim) and orders.states.shape == (groups, mixer.state)
    assert torch.all(orders.channels[:, -1] == 5)
    assert orders.states[1, -1] == 3


def test_stored_rows_is_rank_major():
    order = torch.tensor([[1, 0, 2], [2, 1, 0]])  # 2 units (heads) x 3 channels
    rows = stored_rows(order)  # new row c * 2 + h <- old row order[h, c] * 2 + h
    assert rows.tolist() == [2, 5, 0, 3, 4, 1]


def test_orders_on_the_calibration_device_apply_there():
    """`compress --device cuda` computes the Mamba orders from statistics on the GPU; permute_mamba (stored_rows)
    must index on that device (the "meta" device stands in for CUDA: it fails the same way on a CPU tensor)."""
    mixer = decoder_from_hf(tiny_ssm_hf_model("mamba2")).layers[0].mamba.to("meta")
    channels = torch.stack([torch.randperm(mixer.head_dim) for _ in range(mixer.heads)])
    states = torch.stack([torch.randperm(mixer.state) for _ in range(mixer.groups)])
    orders = MambaOrders(channels=channels.to("meta"), states=states.to("meta"))
    assert stored_rows(orders.channels).device.type == "meta"
    permute_mamba(mixer, orders)
    assert mixer.x_proj.weight.device.type == "meta"


def test_compress_sorts_a_hybrid_and_prunes(tokenizer):
    hf = tiny_ssm_hf_model("bamba", vocab=tokenizer.vocab_size)
    model = decoder_from_hf(hf)
    cfg = CompressConfig(calib_source=str(DATA / "alpaca_small.json"), calib_samples=4, calib_seqlen=32,
                         bi_source=str(DATA / "wikitext2_small.raw"), bi_samples=2, bi_seqlen=32, quant=None)
    model, result = compress_decoder(model, tokenizer, cfg)
    assert result["provenance"]["order"] == "uniql" and result["provenance"]["sorting_skipped"] is None
    ids = torch.randint(0, tokenizer.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_rel_diff(model(ids), hf(ids).logits) <= TOL
        top = len(model.ladder.rates) - 1
        assert any(s.ssm_p < model.full_sizes.ssm_p for s in model.ladder.sizes[top] if s.ssm_p)
        assert max_rel_diff(model(ids, rung=top), hf(ids).logits) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba2-tiny", "hybrid-tiny"])
def test_trained_tiny_model_sorted_beats_random_at_the_top_rung(name):
    """The committed trained models (models/): uniql sorting is exact at rate 0 against transformers and, at the
    ladder's last rung (0.35), gives a lower wikitext2 (fixture) perplexity than a random order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uniql.compressor.evaluate import wikitext2_ppl

    path = Path(__file__).resolve().parents[2] / "models" / name
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
              return_tensors="pt").input_ids
    ppl = {}
    for order in ("uniql", "random"):
        cfg = CompressConfig(order=order, calib_source=str(DATA / "alpaca_small.json"), calib_samples=8,
                             calib_seqlen=128, bi_source=str(DATA / "wikitext2_small.raw"), bi_samples=4,
                             bi_seqlen=128, quant=None)
        model, _ = compress_decoder(decoder_from_hf(hf), tok, cfg)
        with torch.no_grad():
            assert max_rel_diff(model(ids), hf(ids).logits) <= TOL
        top = len(model.ladder.rates) - 1
        ppl[order] = wikitext2_ppl(model, tok, rung=top, path=DATA / "wikitext2_small.raw", seqlen=256,
                                   max_windows=8)["ppl"]
    assert ppl["uniql"] < ppl["random"], ppl


def test_bamba_pass_through_pairs_are_ranked_by_their_own_scores():
    """uniql-method.md bug 12: for partial RoPE the reference ranks the pass-through half with the ROTATED half's
    scores. Here pass-through channels are pairs with frequency 0, scored like any pair: a dead pass-through pair
    sorts last in its KV group, its frequency index travels with it, and every group's pair scores (recomputed on
    the sorted weights) are non-increasing across rotated and pass-through pairs alike."""
    model = decoder_from_hf(tiny_ssm_hf_model("bamba"))
    index = model.spec.layers_with("attn")[0]
    attn = model.layers[index].attn
    n, g, pairs = attn.n_heads, attn.n_kv, attn.head_dim // 2
    dead = pairs - 2  # a pass-through pair (Bamba rotates half of each head: pairs >= pairs/2 have frequency 0)
    assert model.inv_freq[dead] == 0 and model.inv_freq[0] > 0
    with torch.no_grad():  # pair `dead` of KV group 1: its q rows (heads of group 1) and k rows, both members
        for t in (0, 1):
            for head in range(n // g, n):
                attn.q_proj.weight[(2 * dead + t) * n + head] = 0
            attn.k_proj.weight[(2 * dead + t) * g + 1] = 0
    stats = _sort(model)[index]
    assert attn.rope_index[1, -1] == dead
    assert all(sorted(row.tolist()) == list(range(pairs)) for row in attn.rope_index)
    scores = _group_pair_scores(attn, _row_energy(attn.q_proj.weight, None, stats),
                                _row_energy(attn.k_proj.weight, None, stats))
    assert (scores[:, 1:] <= scores[:, :-1] * (1 + 1e-9)).all()
