"""The engine end to end on CPU: a tiny random Llama with SmolLM2's tokenizer (real tokenizer, real decoding)."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import tiny_hf_model

from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder
from uniql.runtime.request import SamplingParams

VOCAB = 49152  # SmolLM2's tokenizer




@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(vocab=VOCAB, hidden=64, inter=128, heads=4, kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def model(hf_model):
    decoder = decoder_from_hf(hf_model)
    spec = decoder.spec
    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=16, n_align=4))
    decoder.ladder = uniform_ladder(decoder.full_sizes, steps, spec.num_layers, rates=(0.0, 0.25, 0.5))
    return decoder


@pytest.fixture
def engine(model, tokenizer):
    return Engine(model, tokenizer, max_num_seqs=4)


def prompt(tokenizer, text="The quick brown fox"):
    return tokenizer(text)["input_ids"]


def test_greedy_equals_transformers_greedy_at_rung_0(engine, hf_model, tokenizer):
    """Full-precision model at rung 0: token ids identical to transformers' own greedy generate."""
    ids = prompt(tokenizer)
    req = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    list(engine.stream(req))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert req.output_ids == ref[0, len(ids):].tolist()
    assert req.finish_reason == "length"


def test_same_seed_same_rung_same_text(engine, tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    first = engine.generate(prompt(tokenizer), params, rung=1)
    again = engine.generate(prompt(tokenizer), params, rung=1)
    other = engine.generate(prompt(tokenizer), SamplingParams(temperature=1.0, seed=8, max_tokens=10,
                                                              ignore_eos=True), rung=1)
    assert first == again and first != other


def test_streamed_text_is_the_decoded_output(engine, tokenizer):
    req = engine.add_request(prompt(tokenizer), SamplingParams(temperature=0.8, seed=1, max_tokens=15,
                                                               ignore_eos=True))
    text = "".join(e.text for e in engine.stream(req))
    assert text == tokenizer.decode(req.output_ids, skip_special_tokens=True)


def test_concurrent_requests_at_different_rungs_match_running_alone(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    texts = ["The quick brown fox", "Once upon a time", "def main():"]
    alone = [engine.generate(prompt(tokenizer, t), params, rung=r) for r, t in enumerate(texts)]
    reqs = [engine.add_request(prompt(tokenizer, t), params, rung=r) for r, t in enumerate(texts)]
    while any(not r.finished for r in reqs):
        engine.step()
    together = [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in reqs]
    assert together == alone


def test_a_pruned_rung_holds_a_smaller_cache(engine, tokenizer):
    reqs = [engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=4), rung=r) for r in (0, 2)]
    engine.step()
    sizes = [engine.runner.caches[r.request_id].nbytes() for r in reqs]
    assert sizes[1] < sizes[0]
    assert sizes == [engine.runner.cache_bytes_for(r) for r in reqs]


def test_cancel_frees_the_cache_at_once(engine, tokenizer):
    req = engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=50))
    engine.step()
    assert req.request_id in engine.runner.caches and engine.runner.cache_bytes > 0
    assert engine.cancel(req.request_id)
    assert engine.runner.cache_bytes == 0 and req.finish_reason == "cancelled"
    assert not engine.cancel(req.request_id)
    assert [e.finish_reason for e in engine.stream(req)][-1] == "cancelled"


def test_stop_string_ends_the_text_before_it(engine, tokenizer):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = engine.generate(prompt(tokenizer), base)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string in its middle")
    cut = engine.generate(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                            stop=(stop,)))
    assert cut == full[:full.index(stop)]


def test_stop_token_ids_finish_with_stop(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    req = engine.add_request(prompt(tokenizer), params)
    list(engine.stream(req))
    second = req.output_ids[1]
    stopped = engine.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                   stop_token_ids=(second,)))
    events = list(engine.stream(stopped))
    assert stopped.output_ids == req.output_ids[:2] and events[-1].finish_reason == "stop"


def test_the_checkpoints_eos_ids_end_generation_unless_ignore_eos(model, tokenizer):
    plain = Engine(model, tokenizer, max_num_seqs=2)
    req = plain.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    list(plain.stream(req))
    second = req.output_ids[1]
    assert second != tokenizer.eos_token_id  # (the tiny model's greedy pick; the test needs another id)
    # e.g. Llama-3's <|eot_id|> besides its tokenizer's eos: given from the checkpoint's source generation config
    engine = Engine(model, tokenizer, max_num_seqs=2, eos_token_ids=(second,))
    stopped = engine.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=10))
    events = list(engine.stream(stopped))
    assert stopped.output_ids == req.output_ids[:2] and events[-1].finish_reason == "stop"
    ignored = engine.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    list(engine.stream(ignored))
    assert ignored.output_ids == req.output_ids


def test_cache_budget_queues_requests_and_rejects_impossible_ones(model, tokenizer):
    probe = Engine(model, tokenizer)
    one = probe.runner.cache_bytes_for(probe.add_request(prompt(tokenizer), SamplingParams(max_tokens=8)))
    engine = Engine(model, tokenizer, cache_budget_bytes=int(one * 1.5))
    a = engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=8))
    b = engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=8))
    engine.step()
    assert a.request_id in engine.runner.caches and b.request_id not in engine.runner.caches
    while not b.finished:
        engine.step()
    with pytest.raises(ValueError, match="cache budget"):
        engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=engine.scheduler.max_model_len // 2))
    # past max_model_len no budget or rung helps: the length error, not the budget's advice
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.add_request(prompt(tokenizer), SamplingParams(max_tokens=2000))


def test_bad_rung_is_refused_before_queueing(engine, tokenizer):
    with pytest.raises(ValueError, match="rung"):
        engine.add_request(prompt(tokenizer), rung=9)
    assert engine.scheduler.num_waiting == 0


def _step_until_done(engine, reqs, seen) -> None:
    while any(not r.finished for r in reqs):
        for event in engine.step():
            seen[event.request_id].append(event)


def test_requests_driven_by_step_leave_nothing_behind_in_the_engine(engine, tokenizer):
    """A long-running caller of ``step()`` (no ``stream()``): every request that ends (length, stop token,
    cancelled while waiting or running) leaves the engine's per-request tables, and its events still arrive."""
    seen, reqs = collections.defaultdict(list), []
    for _ in range(3):  # waves of requests, as over a server's life
        batch = [engine.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=2 + i % 3,
                                                                      ignore_eos=True), rung=i % 3)
                 for i in range(8)]
        engine.cancel(batch[-1].request_id)  # still waiting (4 seats)
        for event in engine.step():  # prefills the first four
            seen[event.request_id].append(event)
        engine.cancel(batch[0].request_id)  # running, one token of two generated
        _step_until_done(engine, batch, seen)
        reqs += batch
    stopped = engine.add_request(prompt(tokenizer), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                   stop_token_ids=(reqs[0].output_ids[0],)))
    _step_until_done(engine, [stopped], seen)
    reqs.append(stopped)
    assert not engine.streams and not engine.requests and not engine.scheduler.has_work
    assert {r.finish_reason for r in reqs} == {"length", "cancelled", "stop"}
    for req in reqs:
        assert seen[req.request_id] == [e for e in req.events if e.finish_reason != "cancelled"]
        assert req.events[-1].finish_reason == req.finish_reason
        assert list(engine.stream(req)) == req.events  # the synchronous API still replays them
        if req.finish_reason != "cancelled":
            assert len(req.events) == len(req.output_ids)
