"""Mamba2 decode-step folds, each one launch less a layer, against the unfused step. CPU: the Triton kernels in the
interpreter, over address tables.

* UNIQL_SSM_CONV_FOLD=1 (the default): the causal-conv step in the z|x|B|C|dt GEMV's epilogue
  (``kernels/gemv_conv.py``): three decode steps (each reads the conv state the one before shifted) give the unfused
  logits, bit for bit in the interpreter (the same fp32 arithmetic on the same stored values).

(Two norm folds, the gated norm split across the state update and out_proj's GEMV, or done in the update's launch,
lost the H100 engine A/Bs and were removed with their tests, stop 35.)"""

from __future__ import annotations

import pytest
import torch
from helpers import fused_mamba2_for_decode

from uniql.kernels import ops
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
