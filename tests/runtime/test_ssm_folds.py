"""Mamba2 decode-step folds, each one launch less a layer, against the unfused step. CPU: the Triton kernels in the
interpreter, over address tables.

* UNIQL_SSM_NORM_FOLD=1: the gated group RMSNorm split across the state update (g * w and partial sums of g^2) and
  out_proj's GEMV (each packed row's group 1 / rms): a decode step gives the logits of the step with the norm kernel.
* UNIQL_SSM_CONV_FOLD=1: the causal-conv step in the z|x|B|C|dt GEMV's epilogue (``kernels/gemv_conv.py``): three
  decode steps (each reads the conv state the one before shifted) give the unfused logits, bit for bit in the
  interpreter (the same fp32 arithmetic on the same stored values).
* UNIQL_SSM_UPDATE_NORM=1: the state update's last program of each norm group normalises it (no norm launch):
  the same tile function on the same stored values, so the same logits bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import fused_mamba2_for_decode

from uniql.kernels import elementwise, ops, ssm_update
from uniql.runtime.cache import DecodeBatch

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


def decode_steps(model, dev, prompt, rung: int, tokens: tuple[int, ...], monkeypatch) -> list[torch.Tensor]:
    """The prompt's prefill, then one decode step a token over an address table: each step's logits. On CPU the
    decode kernels are the (interpreted) Triton ones, as on a GPU."""
    cache = model.new_cache(1, 10, rung, torch.bfloat16)
    real_enabled, logits = ops.triton_enabled, []
    with torch.inference_mode():
        model(prompt, cache=cache)
        if not CUDA:
            monkeypatch.setattr(ops, "triton_enabled", lambda device: True)
        for i, token in enumerate(tokens):
            batch = DecodeBatch(model.sizes_for(rung), 1, 10, dev)
            batch.bind([cache], torch.tensor([7 + i], dtype=torch.int32, device=dev))
            logits.append(model(torch.tensor([[token]], device=dev), cache=batch, logits_to_keep=1).float())
    monkeypatch.setattr(ops, "triton_enabled", real_enabled)
    return logits


def switch_ab(monkeypatch, env: str, counted: tuple, model, dev, prompt, rung: int, tokens: tuple[int, ...]):
    """``decode_steps`` with ``env`` at 1, then at 0: per run its logits and how often ``counted`` = (module,
    function name) was called."""
    module, name = counted
    real, calls, runs = getattr(module, name), [], []
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for value in ("1", "0"):
        monkeypatch.setenv(env, value)
        before = len(calls)
        runs.append((decode_steps(model, dev, prompt, rung, tokens, monkeypatch), len(calls) - before))
    return runs


@pytest.mark.parametrize("rung", [0, 2])
def test_norm_split_across_update_and_out_proj_equals_the_norm_kernel(rung, monkeypatch):
    model, dev, prompt = fused_mamba2_for_decode(monkeypatch, 1, 3)
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


@pytest.mark.parametrize("rung", [0, 2])
def test_conv_in_the_in_projection_equals_the_conv_kernel(rung, monkeypatch):
    model, dev, prompt = fused_mamba2_for_decode(monkeypatch, 2, 5)
    (folded, convs_on), (plain, convs_off) = switch_ab(monkeypatch, "UNIQL_SSM_CONV_FOLD", (ops, "conv_state_update"),
                                                       model, dev, prompt, rung, (5, 17, 3))
    assert convs_on == 0 and convs_off == 3 * model.spec.num_layers  # no conv kernel ran with the fold
    for mine, theirs in zip(folded, plain, strict=True):
        assert torch.isfinite(mine).all()
        if CUDA:  # FMA contraction may differ between the two kernels
            torch.testing.assert_close(mine, theirs, atol=2e-2 * theirs.abs().max().item(), rtol=0)
        else:
            assert torch.equal(mine, theirs)
    monkeypatch.setenv("UNIQL_SSM_CONV_FOLD", "on")
    with pytest.raises(ValueError, match="UNIQL_SSM_CONV_FOLD must be 0 or 1"):
        decode_steps(model, dev, prompt, rung, (5,), monkeypatch)


def test_norm_fold_declines_more_than_eight_groups(monkeypatch):
    """The GEMV picks among at most 8 group scales (``gemv_norm.check_norm`` refuses more): a mixer with 16 norm
    groups takes the norm kernel instead of failing the step."""
    model, dev, _ = fused_mamba2_for_decode(monkeypatch, 1, 3)
    mixer = next(layer.mamba for layer in model.layers if layer.mamba is not None)
    monkeypatch.setenv("UNIQL_SSM_NORM_FOLD", "1")
    table = torch.zeros(1, dtype=torch.int64, device=dev)
    stream = torch.zeros(1, model.spec.hidden_size, dtype=torch.bfloat16, device=dev)
    assert mixer._folds_norm(table, stream, mixer.head_dim)
    monkeypatch.setattr(mixer, "heads", 128)
    monkeypatch.setattr(mixer, "norm_groups", 16)  # 8 heads a group: whole packed rows, but 16 scales
    assert not mixer._folds_norm(table, stream, mixer.head_dim)


@pytest.mark.parametrize("rung", [0, 2])
def test_group_norm_in_the_state_update_equals_the_norm_kernel(rung, monkeypatch):
    model, dev, prompt = fused_mamba2_for_decode(monkeypatch, 2, 5)
    counted = (elementwise, "group_rms_norm")
    (fused, norms_on), (plain, norms_off) = switch_ab(monkeypatch, "UNIQL_SSM_UPDATE_NORM", counted, model, dev,
                                                      prompt, rung, (5, 17))
    assert norms_on == 0 and norms_off == 2 * model.spec.num_layers  # no norm launch with it
    for mine, theirs in zip(fused, plain, strict=True):
        assert torch.isfinite(mine).all() and torch.equal(mine, theirs)
    monkeypatch.setenv("UNIQL_SSM_UPDATE_NORM", "yes")
    with pytest.raises(ValueError, match="UNIQL_SSM_UPDATE_NORM must be 0 or 1"):
        decode_steps(model, dev, prompt, rung, (5,), monkeypatch)
