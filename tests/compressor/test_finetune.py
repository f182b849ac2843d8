"""Masked LoRA: the training forward selects exactly the channels inference truncates to, for every layer kind.

References: a LoRA layer's prefix forward against ``F.linear`` on the truncated merged weight; the LoRA model
against its merged copy at every rung; a masked FULL-SIZE forward (the paper's way of training) against the
truncated forward; gradient supports against ``runtime.memory.active_shapes`` (the sizes the kernels and the server
use); and, in the original HF layout, whole RoPE pairs per KV group (the paper's Q/K mask splits them: the negative
control shows this test would catch it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, tiny_hf_model

from uniql.compressor.finetune import FinetuneConfig, RungLoss, draw_rung, rung_probabilities, train_lora
from uniql.compressor.finetune_data import IGNORE, collate, instruction_example, load_examples
from uniql.compressor.lora import ElasticLoraLinear, LoraSettings, adapter_state, add_lora, lora_modules, merge_lora
from uniql.compressor.orders import random_orders
from uniql.compressor.sorting import apply_orders
from uniql.runtime.decoder import LINEAR_PATHS
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder
from uniql.runtime.linear import DenseLinear
from uniql.runtime.memory import active_shapes

# small steps so the ladder's rungs really cut every dim (qk in whole pairs, vo, mlp)
ALIGN = Alignment(group_size=16, n_align=4)


def sorted_tiny(seed: int = 0, vocab: int = 320):
    """A tiny Llama sorted by random orders (non-trivial RoPE pair indices) with a uniform ladder."""
    model = decoder_from_hf(tiny_hf_model(vocab=vocab, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        apply_orders(layer, random_orders(layer, gen))
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(model.spec, ALIGN), model.spec.num_layers)
    return model


def _shapes(spec, sizes) -> dict:
    """(n, k) the kernels get for each projection of a Llama layer (active_shapes also lists Mamba paths)."""
    shapes = active_shapes(spec, sizes)
    return {path: shapes[path] for path in LINEAR_PATHS}


def randomize_b(peft_model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(peft_model).values():
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.2)


def test_lora_prefix_forward_equals_truncated_merged_weight():
    torch.manual_seed(0)
    dense = DenseLinear(48, 40)
    dense.weight.data.normal_()
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({"proj": dense})])})
    peft_model = add_lora(model, LoraSettings(rank=4, dropout=0.0))
    layer = lora_modules(peft_model)["base_model.model.layers.0.proj"]
    assert isinstance(layer, ElasticLoraLinear)
    layer.lora_B["default"].weight.data.normal_()
    merged = dense.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    x = torch.randn(3, 5, 48)
    for n, k in ((40, 48), (16, 48), (40, 24), (8, 8)):
        got = layer(x[..., :k], n=n, k=k)
        torch.testing.assert_close(got, F.linear(x[..., :k], merged[:n, :k]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rung", [0, 3, 7])
def test_lora_model_equals_merged_model_at_every_rung(rung):
    peft_model = add_lora(sorted_tiny(), LoraSettings(dropout=0.0))
    randomize_b(peft_model)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        wrapped = peft_model(ids, rung=rung)
        merged = merge_lora(copy.deepcopy(peft_model))(ids, rung=rung)
    torch.testing.assert_close(wrapped, merged, rtol=1e-5, atol=1e-5)


def _mask_outside(weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    masked = torch.zeros_like(weight)
    masked[:n, :k] = weight[:n, :k]
    return masked


def test_masked_full_size_forward_equals_truncated_forward():
    """Training by masking (zero what a rung drops, run full size) == inference by truncation, every rung."""
    model = merge_lora(_trained_lora_model())
    ids = torch.randint(0, 320, (2, 12))
    for rung, sizes in enumerate(model.ladder.sizes):
        masked = copy.deepcopy(model)
        for layer, s in zip(masked.layers, sizes, strict=True):
            for path, (n, k) in _shapes(model.spec, s).items():
                proj = layer.get_linear(path)
                proj.weight.data = _mask_outside(proj.weight.data, n, k)
        with torch.no_grad():
            torch.testing.assert_close(masked(ids, rung=None), model(ids, rung=rung), rtol=1e-5, atol=1e-5)


def _trained_lora_model():
    peft_model = add_lora(sorted_tiny(), LoraSettings(dropout=0.0))
    randomize_b(peft_model)
    return peft_model


def _grad_supports(peft_model, rung: int) -> dict:
    """Nonzero-gradient pattern of every base weight (and the LoRA factors) after one loss at ``rung``."""
    for m in lora_modules(peft_model).values():
        m.base_layer.weight.requires_grad_(True)
        m.base_layer.weight.grad = None
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(rung))
    logits = peft_model(ids, rung=rung)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {name: (m.base_layer.weight.grad != 0, m.lora_A["default"].weight.grad != 0,
                   m.lora_B["default"].weight.grad != 0) for name, m in lora_modules(peft_model).items()}


@pytest.mark.parametrize("rung", [0, 2, 5, 7])
def test_training_touches_exactly_the_channels_inference_reads(rung):
    """Every projection kind: gradients live inside the [:n, :k] prefix that active_shapes gives the kernels."""
    peft_model = _trained_lora_model()
    supports = _grad_supports(peft_model, rung)
    spec = peft_model.base_model.model.spec
    for i, sizes in enumerate(peft_model.base_model.model.ladder.sizes[rung]):
        for path, (n, k) in _shapes(spec, sizes).items():
            base, lora_a, lora_b = supports[f"base_model.model.layers.{i}.{path}"]
            inside = base[:n, :k]
            assert inside.float().mean() > 0.99, (rung, path)
            assert base.sum() == inside.sum(), f"rung {rung} {path}: gradient outside the kept [:{n}, :{k}]"
            assert not lora_a[:, k:].any() and not lora_b[n:].any(), (rung, path)
            assert lora_a[:, :k].any() and lora_b[:n].any(), (rung, path)


def _hf_channel(row: int, heads: int, kv_heads: int, head_dim: int, rope_index: torch.Tensor) -> tuple[int, int]:
    """Stored rank-major Q/K row -> (head, channel in the original HF head: t * d/2 + frequency index)."""
    c, head = divmod(row, heads)
    m, t = divmod(c, 2)
    group = head // (heads // kv_heads)
    return head, t * head_dim // 2 + int(rope_index[group, m])


def test_qk_rows_kept_are_whole_rope_pairs_of_each_kv_group():
    """In the HF layout a rung keeps, per head, pairs (i, i + d/2) for the group's first qk/2 stored frequencies."""
    peft_model = _trained_lora_model()
    decoder = peft_model.base_model.model
    spec, rung = decoder.spec, 7
    supports = _grad_supports(peft_model, rung)
    d, half = spec.head_dim, spec.head_dim // 2
    for i, sizes in enumerate(decoder.ladder.sizes[rung]):
        rope_index = decoder.layers[i].attn.rope_index
        for path, heads in (("attn.q_proj", spec.num_heads), ("attn.k_proj", spec.num_kv_heads)):
            rows = supports[f"base_model.model.layers.{i}.{path}"][0].any(dim=1).nonzero().flatten().tolist()
            kept: dict[int, set] = {}
            for r in rows:
                head, ch = _hf_channel(r, heads, spec.num_kv_heads, d, rope_index)
                kept.setdefault(head, set()).add(ch)
            assert sorted(kept) == list(range(heads))
            for head, channels in kept.items():
                group = head // (heads // spec.num_kv_heads)
                freqs = {int(f) for f in rope_index[group, :sizes.qk // 2]}
                assert channels == freqs | {f + half for f in freqs}, (path, head)
            paper_mask = set(range(sizes.qk))  # released code: zero channels >= qk of each sorted HF head
            assert sizes.qk < d and any(ch != paper_mask for ch in kept.values()), "negative control must differ"


def test_merging_an_untrained_adapter_is_bit_identical():
    model = sorted_tiny()
    reference = copy.deepcopy(model)
    merged = merge_lora(add_lora(model, LoraSettings()))
    ids = torch.randint(0, 320, (2, 10))
    assert all(isinstance(layer.get_linear(p), DenseLinear) for layer in merged.layers for p in LINEAR_PATHS)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    with torch.no_grad():
        for rung in (0, 7):
            assert torch.equal(merged(ids, rung=rung), reference(ids, rung=rung))


def test_rung_probabilities_and_draws():
    probs = rung_probabilities(8, decay=0.1)
    assert probs == sorted(probs) and abs(sum(probs) - 1) < 1e-12  # heavier rungs (higher index) more often
    assert probs[-1] / probs[0] == pytest.approx(torch.e ** 0.7)
    assert rung_probabilities(3, weights=[1, 0, 3]) == [0.25, 0.0, 0.75]
    with pytest.raises(ValueError):
        rung_probabilities(3, weights=[1, 1])
    draws = [draw_rung(probs, 1234, s) for s in range(4000)]
    assert draws[:50] == [draw_rung(probs, 1234, s) for s in range(50)]  # a pure function of (seed, step)
    counts = torch.bincount(torch.tensor(draws), minlength=8).float() / len(draws)
    assert torch.allclose(counts, torch.tensor(probs), atol=0.025)
    assert 0 in draws  # rung 0 (no pruning) is trained too


def test_alpaca_labels_cover_the_response_only(tokenizer):
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    ex = instruction_example(tokenizer, record, seqlen=256)
    n_prompt = ex.labels.index(next(label for label in ex.labels if label != IGNORE))
    assert all(label == IGNORE for label in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[n_prompt:-1]) == "Blue."
    batch = collate([ex, instruction_example(tokenizer, {**record, "output": "Dark blue, like the sea."}, 256)],
                    pad_id=0)
    pad = batch.attention_mask == 0
    assert pad.any() and (batch.labels[pad] == IGNORE).all()
    examples, kind = load_examples(tokenizer, str(DATA / "alpaca_small.json"), seqlen=128)
    assert kind == "instruction" and len(examples) > 10
    windows, kind = load_examples(tokenizer, str(DATA / "wikitext2_small.raw"), seqlen=64)
    assert kind == "text" and all(len(w.input_ids) == 64 and w.labels == w.input_ids for w in windows)


def test_resume_continues_at_the_same_step(tokenizer, tmp_path, monkeypatch):
    """Stopped after the step-2 checkpoint and resumed: same step, adapters bit-identical to an unbroken run."""
    import uniql.compressor.finetune as ft

    examples, _ = load_examples(tokenizer, str(DATA / "alpaca_small.json"), seqlen=48)
    cfg = FinetuneConfig(steps=4, batch_size=2, grad_accum=2, seqlen=48, save_every=2, device="cpu",
                         state_dir=str(tmp_path / "unbroken"))

    def run(cfg):
        model = add_lora(sorted_tiny(vocab=len(tokenizer)), cfg.lora)
        prov, record = train_lora(model, examples, tokenizer.eos_token_id, cfg, n_rungs=8)
        return adapter_state(model), prov, record

    unbroken, _, _ = run(cfg)
    broken = FinetuneConfig(**{**cfg.__dict__, "state_dir": str(tmp_path / "broken")})
    real_draw = ft.draw_rung

    def stop_at_2(probs, seed, step):
        if step == 2:
            raise KeyboardInterrupt  # "preempted" right after the step-2 checkpoint
        return real_draw(probs, seed, step)

    monkeypatch.setattr(ft, "draw_rung", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        run(broken)
    monkeypatch.setattr(ft, "draw_rung", real_draw)
    broken.resume = True
    resumed, prov, record = run(broken)
    assert prov["resumed_from_step"] == 2 and record.step == 4 and len(record.rungs) == 4
    for name, tensor in unbroken.items():
        assert torch.equal(resumed[name], tensor), name
    with pytest.raises(ValueError, match="settings differ"):
        run(FinetuneConfig(**{**broken.__dict__, "lr": 1e-3}))


# Self-distillation: KL against the model's own rung-0 predictions WITHOUT adapters, on the label tokens only

def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded tail
    labels = ids.clone()
    labels[:, :4] = IGNORE  # a "prompt" without loss
    labels[mask == 0] = IGNORE
    return ids, mask, labels


def _reference(base, peft_model, ids, mask, labels, rung, weight, temp, denom):
    with torch.no_grad():
        teacher = base(ids, rung=0, attention_mask=mask)[:, :-1]
        student = peft_model(ids, rung=rung, attention_mask=mask)[:, :-1]
    keep = labels[:, 1:] != IGNORE
    nll = F.cross_entropy(student[keep], labels[:, 1:][keep], reduction="sum")
    p_t = F.softmax(teacher[keep] / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(student[keep] / temp, -1))).sum() * temp ** 2
    return ((1 - weight) * nll + weight * kl) / denom


@pytest.mark.parametrize("rung,weight,temp", [(0, 0.5, 1.0), (5, 0.5, 1.0), (7, 1.0, 2.0), (3, 0.0, 1.0)])
def test_distilled_loss_matches_a_hand_computed_reference(rung, weight, temp):
    base = sorted_tiny()
    peft_model = add_lora(copy.deepcopy(base), LoraSettings(dropout=0.0))
    randomize_b(peft_model)  # adapters change the student, never the teacher
    ids, mask, labels = _batch()
    loss = RungLoss(peft_model, weight, temp)(ids, mask, labels, rung, denom=7.0)
    expected = _reference(base, peft_model, ids, mask, labels, rung, weight, temp, denom=7.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_untrained_adapters_at_rung_0_have_zero_kl_and_only_adapters_get_gradients():
    peft_model = add_lora(sorted_tiny(), LoraSettings(dropout=0.0))
    ids, mask, labels = _batch(1)
    plain = RungLoss(peft_model, 0.0)(ids, mask, labels, 0, denom=1.0)
    only_kl = RungLoss(peft_model, 1.0)(ids, mask, labels, 0, denom=1.0)
    assert abs(only_kl.item()) < 1e-4 < plain.item()  # B = 0: the student at rung 0 IS the teacher
    loss = RungLoss(peft_model, 1.0)(ids, mask, labels, 6, denom=1.0)
    loss.backward()
    assert loss.item() > 1e-3
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in lora_modules(peft_model).values())


def test_distill_settings_are_checked():
    for bad in ({"distill": 1.5}, {"distill": -0.1}, {"distill": 0.5, "distill_temperature": 0.0}):
        with pytest.raises(ValueError, match="distillation"):
            FinetuneConfig(**bad).validate()


def test_bf16_autocast_on_cpu_trains_close_to_fp32_and_precisions_can_alternate(tokenizer):
    """mixed_precision="bf16" on CPU: the same two steps land near the fp32 adapters (bf16 rounding only), the
    provenance says which ran, and runs in different precisions follow each other in one process (accelerate keeps
    one process-wide state that would otherwise refuse the second)."""
    examples, _ = load_examples(tokenizer, str(DATA / "alpaca_small.json"), seqlen=48)
    adapters, precisions, first_loss = {}, {}, {}
    for precision in ("no", "bf16", "no"):
        cfg = FinetuneConfig(steps=2, batch_size=2, grad_accum=1, seqlen=48, device="cpu", mixed_precision=precision,
                             lora=LoraSettings(dropout=0.0))
        model = add_lora(sorted_tiny(vocab=len(tokenizer)), cfg.lora)
        prov, record = train_lora(model, examples, tokenizer.eos_token_id, cfg, n_rungs=8)
        adapters.setdefault(precision, []).append(adapter_state(model))
        first_loss[precision] = record.losses[0]  # before any update: the same model in two precisions
        precisions.setdefault(precision, []).append(prov["mixed_precision"])
    assert precisions == {"no": ["no", "no"], "bf16": ["bf16"]}
    fp32, again, bf16 = adapters["no"][0], adapters["no"][1], adapters["bf16"][0]
    for name, w in fp32.items():
        assert torch.equal(again[name], w), name  # fp32 after a bf16 run: unchanged, bit for bit
    # B starts at 0, so B holds what two steps learnt: close to fp32 over all layers (Adam's first steps are
    # ~lr * sign(grad): an entry whose tiny gradient changes sign under bf16 moves by 2 lr on its own)
    learnt = [name for name in fp32 if "lora_B" in name]
    diff = torch.cat([(bf16[n] - fp32[n]).flatten() for n in learnt])
    ref = torch.cat([fp32[n].flatten() for n in learnt])
    assert 0 < diff.norm() <= 0.3 * ref.norm()  # > 0: bf16 really ran (other rounding, other bits); 0.11 here
    assert first_loss["bf16"] == pytest.approx(first_loss["no"], rel=1e-2)
    with pytest.raises(ValueError, match="mixed_precision"):
        FinetuneConfig(mixed_precision="fp8").validate()
