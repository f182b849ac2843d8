"""Failures stay with the requests they touch, and a stream's end releases all its text (CPU, tiny random Llama
with SmolLM2's tokenizer)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from helpers import tiny_hf_model

from uniql.runtime.async_engine import AsyncEngine
from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.request import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, seed=4, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return decoder_from_hf(tiny_hf_model(vocab=49152, hidden=64, inter=128, heads=4, kv_heads=2, seed=3))


def ids(tokenizer, text="The quick brown fox"):
    return tokenizer(text)["input_ids"]


def run_all(engine, reqs):
    events = {r.request_id: [] for r in reqs}
    while any(not r.finished for r in reqs):
        for event in engine.step():
            events[event.request_id].append(event)
    return events


def poisoned(fn, victim):
    """``fn`` with NaN logits in ``victim``'s batch row (a stand-in for a numerically broken request)."""
    def wrapped(reqs, *args, **kwargs):
        out = fn(reqs, *args, **kwargs)
        if victim not in reqs:
            return out
        row = reqs.index(victim)
        if isinstance(out, tuple):  # decode_greedy: (tokens, finite)
            tokens, finite = out
            return tokens, [ok and i != row for i, ok in enumerate(finite)]
        out = out.clone()
        out[row] = float("nan")
        return out
    return wrapped


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_non_finite_logits_fail_only_that_request(model, tokenizer, params):
    alone = Engine(model, tokenizer).generate(ids(tokenizer), params)
    engine = Engine(model, tokenizer, max_num_seqs=4, lookahead=False)
    good, bad = (engine.add_request(ids(tokenizer), params) for _ in range(2))
    engine.step()  # both prefilled; the next decode step breaks the second row
    name = "decode_greedy" if params is GREEDY else "decode"
    real = getattr(engine.runner, name)
    setattr(engine.runner, name, poisoned(real, bad))
    events = run_all(engine, [good, bad])
    assert bad.finish_reason == "error" and "non-finite" in events[bad.request_id][-1].error
    setattr(engine.runner, name, real)
    assert good.finish_reason == "length" and tokenizer.decode(good.output_ids, skip_special_tokens=True) == alone
    assert engine.runner.cache_bytes == 0 and engine.scheduler.num_running == 0 and engine.counters.failed == 1


def test_a_prefill_that_raises_fails_its_request_and_the_engine_goes_on(model, tokenizer):
    engine = Engine(model, tokenizer, max_num_seqs=4)
    good, bad = (engine.add_request(ids(tokenizer), GREEDY) for _ in range(2))
    real = engine.runner.prefill

    def prefill(req):
        if req is bad:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(req)

    engine.runner.prefill = prefill
    events = run_all(engine, [good, bad])
    assert events[bad.request_id] == [events[bad.request_id][0]]  # one event: the error
    assert events[bad.request_id][0].error == "RuntimeError: CUDA out of memory (simulated)"
    assert good.finish_reason == "length" and len(good.output_ids) == GREEDY.max_tokens
    assert bad.request_id not in engine.runner.caches and not engine.scheduler.has_work
    assert engine.generate(ids(tokenizer), GREEDY)  # and later requests run as usual


def test_events_made_before_a_failure_in_the_same_batch_are_kept(model, tokenizer):
    """A decode batch emits request by request: when one request's emit raised (its detokenizer, say), the events
    already made in that batch were dropped with the step's list, a finished request's last event with them. The
    request had left the engine, so nothing ended its AsyncEngine stream (it waited forever) or freed its place."""
    engine = Engine(model, tokenizer, max_num_seqs=4, lookahead=False)
    short = engine.add_request(ids(tokenizer), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    broken = engine.add_request(ids(tokenizer), GREEDY)
    engine.step()  # both prefilled: one decode batch of [short, broken] next

    def add(token):
        raise RuntimeError("detokenizer failed (simulated)")

    engine.streams[broken.request_id].detok.add = add
    events = engine.step()
    assert short.finish_reason == "length" and broken.finish_reason == "error"
    assert [e.finish_reason for e in events] == ["length", "error"]
    assert events == [short.events[-1], broken.events[-1]]


class Undecodable:
    """A tokenizer whose decode raises (as a slow SentencePiece one does for an id past its vocabulary)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        raise IndexError("piece id is out of range (simulated)")


def test_a_request_refused_while_queueing_is_not_left_in_the_scheduler(model):
    """``enqueue`` queued the request in the scheduler, then built its detokenizer: when that raised, the caller got
    the error but the scheduler kept the request, which still took a place and later a prefill and a cache (and the
    AsyncEngine, having counted it out, could then admit one more than the scheduler has room for)."""
    engine = Engine(model, Undecodable())
    with pytest.raises(IndexError, match="out of range"):
        engine.add_request(list(range(1, 11)), GREEDY)  # long enough that the detokenizer decodes its context
    assert not engine.scheduler.has_work and not engine.requests and not engine.streams


def test_a_stop_token_releases_text_held_for_a_possible_stop_string(model, tokenizer):
    """The text before the stop token is all there, even the part held back because it began a stop string."""
    engine = Engine(model, tokenizer)
    ref = engine.add_request(ids(tokenizer), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    list(engine.stream(ref))
    out = ref.output_ids
    k = next(i for i in range(3, len(out)) if out[i] not in out[:i]
             and tokenizer.decode(out[:i], skip_special_tokens=True).strip())
    before = tokenizer.decode(out[:k], skip_special_tokens=True)
    never = before[-2:] + "\x01 never generated"  # starts with the text's tail, so that tail is held
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=(never,), stop_token_ids=(out[k],))
    req = engine.add_request(ids(tokenizer), params)
    events = list(engine.stream(req))
    assert "".join(e.text for e in events) == before and events[-1].finish_reason == "stop"


def test_async_engine_survives_failures_and_closed_loops(model, tokenizer):
    broken = copy.deepcopy(model)
    zebra = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        weight = broken.embed.weight
        (weight[zebra] if weight.shape[0] == broken.spec.vocab_size else weight[:, zebra]).fill_(float("nan"))
    front = AsyncEngine(Engine(broken, tokenizer, max_num_seqs=4))
    try:
        async def collect(text):
            return [e async for e in await front.generate(ids(tokenizer, text), GREEDY)]

        async def both():
            return await asyncio.wait_for(asyncio.gather(collect("The quick brown fox"), collect("A zebra")), 60)

        good, bad = asyncio.run(both())
        assert bad[-1].finish_reason == "error" and "non-finite" in bad[-1].error
        assert good[-1].finish_reason == "length" and len(good) == GREEDY.max_tokens

        async def abandon():  # a stream whose loop closes before it is read
            front.submit(ids(tokenizer), GREEDY)

        asyncio.run(abandon())
        again = asyncio.run(both())[0]
        assert front.alive and [e.token_id for e in again] == [e.token_id for e in good]
        with pytest.raises(RuntimeError, match="no running event loop"):
            front.submit(ids(tokenizer), GREEDY)
        assert front.read(lambda e: e.scheduler.num_waiting + e.scheduler.num_running) == 0
    finally:
        front.shutdown()


def test_cancelling_an_unread_stream_leaves_no_sink(model, tokenizer):
    front = AsyncEngine(Engine(model, tokenizer, max_num_seqs=1))
    try:
        async def submit_and_cancel():
            rid, _ = front.submit(ids(tokenizer), SamplingParams(max_tokens=50))
            return front.cancel(rid)

        assert asyncio.run(submit_and_cancel()) and front._sinks == {}
    finally:
        front.shutdown()


def test_a_request_whose_release_raised_after_it_finished_still_ends(model, tokenizer):
    """``_emit`` finishes a request, then releases it: when the release raised, ``fail`` skipped the request (it
    was finished) and no event ended it, so its stream waited forever."""
    engine = Engine(model, tokenizer, max_num_seqs=4, lookahead=False)
    req = engine.add_request(ids(tokenizer), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    real = engine.runner.free

    def free(request_id):
        real(request_id)
        raise RuntimeError("free failed (simulated)")

    engine.runner.free = free
    events = engine.step()  # the prefill's token finishes it
    assert req.finished and [e.finish_reason for e in events] == ["error"] and events[-1] is req.events[-1]
    assert "free failed" in events[-1].error
    assert engine.counters.finished + engine.counters.failed == 1  # counted once
    assert engine.fail([req], "again") == []  # and ended once
