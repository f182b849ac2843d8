"""The asyncio front of the engine: concurrent streams, early exit cancels and frees the cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import tiny_hf_model

from uniql.runtime.async_engine import AsyncEngine
from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.request import SamplingParams


@pytest.fixture
def engines(tokenizer):
    model = decoder_from_hf(tiny_hf_model(vocab=49152, seed=5))
    front = AsyncEngine(Engine(model, tokenizer, max_num_seqs=4))
    yield Engine(model, tokenizer), front
    front.shutdown()


async def collect(front, ids, params):
    return [event async for event in await front.generate(ids, params)]


def test_concurrent_streams_match_the_sync_engine(engines, tokenizer):
    sync, front = engines
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [tokenizer(t)["input_ids"] for t in ("The fox", "Once upon a time", "In 1905,")]
    expected = [sync.generate(p, params) for p in prompts]

    async def main():
        return await asyncio.gather(*(collect(front, p, params) for p in prompts))

    streams = asyncio.run(main())
    assert ["".join(e.text for e in s) for s in streams] == expected
    assert all(s[-1].finish_reason == "length" for s in streams)
    assert front.engine.runner.cache_bytes == 0 and not front.engine.streams


class SlowEngine(Engine):
    """Steps take 5 ms, so a request of 200 tokens is surely still running when its consumer leaves."""

    def step(self):
        time.sleep(0.005)
        return super().step()


def test_leaving_the_stream_early_cancels_and_frees_the_cache(engines, tokenizer):
    sync, _ = engines
    front = AsyncEngine(SlowEngine(sync.runner.model, tokenizer))

    async def main():
        stream = await front.generate(tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=200,
                                                                                     ignore_eos=True))
        async for _ in stream:
            break  # the client disconnects after the first token
        await stream.aclose()

    asyncio.run(main())
    front.shutdown()
    engine = front.engine
    assert engine.counters.cancelled == 1 and engine.counters.finished == 0 and engine.runner.cache_bytes == 0
    assert engine.scheduler.num_running == 0 and not engine.streams


def test_bad_requests_fail_before_streaming(engines, tokenizer):
    _, front = engines

    async def main():
        await front.generate(tokenizer("Hi")["input_ids"], SamplingParams(), rung=3)

    with pytest.raises(ValueError, match="rung"):
        asyncio.run(main())
