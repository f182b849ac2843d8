"""Fewer launches in a decode step, same results: without explicit positions (what the CUDA graphs run) the RoPE
tables come from the batch's lengths in one launch (``kernels/rope.decode_rope_tables``); an INT4 table's rows come
out of the lookup in the model dtype (no cast launch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_hf_model

from uniql.compressor.quantize import quantize_tables
from uniql.runtime import decoder as decoder_module
from uniql.runtime.cache import DecodeBatch
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.linear import Int4Linear

pytest.importorskip("triton")


@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_decode_without_positions_reads_the_lengths(monkeypatch, scaling):
    model = decoder_from_hf(tiny_hf_model("llama")).eval()
    model.spec = dataclasses.replace(model.spec, rope_attention_scaling=scaling)  # e.g. YaRN's attention factor
    tables = []
    real = decoder_module.decode_rope_tables
    monkeypatch.setattr(decoder_module, "decode_rope_tables", lambda *a: tables.append(a) or real(*a))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (1, n), generator=gen) for n in (5, 9)]
    caches = [model.new_cache(1, 16, 0, torch.float32) for _ in prompts]
    with torch.inference_mode():
        for prompt, cache in zip(prompts, caches, strict=True):
            model(prompt, cache=cache)
        batch = DecodeBatch(model.sizes_for(0), 2, 16, "cpu")
        lengths = torch.tensor([6, 10], dtype=torch.int32)  # each prompt plus the token being decoded
        batch.bind(caches, lengths)
        ids = torch.tensor([[7], [11]])
        with_positions = model(ids, positions=lengths.long().view(-1, 1) - 1, cache=batch, logits_to_keep=1)
        assert not tables
        without = model(ids, cache=batch, logits_to_keep=1)  # the step writes the same K / V again: same result
    assert len(tables) == 1 and tables[0][1] is batch.lengths and tables[0][2] == scaling
    torch.testing.assert_close(without, with_positions, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_table_rows_come_in_the_model_dtype_with_the_cast_bits(monkeypatch, dtype):
    model = decoder_from_hf(tiny_hf_model("llama"))
    quantize_tables(model, 32)
    model = model.to(dtype).eval()
    assert isinstance(model.embed, Int4Linear)
    ids = torch.tensor([[3, 17, 299, 0]])
    lookups = []
    real = Int4Linear.lookup
    monkeypatch.setattr(Int4Linear, "lookup", lambda self, *a: lookups.append(a[1:]) or real(self, *a))
    rows = model.embed_tokens(ids)
    assert lookups == [(dtype,)] and rows.dtype == dtype
    assert torch.equal(rows, real(model.embed, ids, torch.float32).to(dtype))
