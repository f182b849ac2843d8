"""The asyncio front of the engine: concurrent streams, early exit cancels and frees the cache."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import tiny_hf_model

from uniql.runtime.async_engine import AsyncEngine
from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.request import SamplingParams
from uniql.runtime.scheduler import EngineStopped, QueueFull


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


class HeldEngine(Engine):
    """Its steps wait (holding the step lock, as a long prefill does) until ``release`` is set, 2 s at most."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stepping, self.release = threading.Event(), threading.Event()

    def step(self):
        self.stepping.set()
        self.release.wait(2)
        return super().step()


def test_submit_and_cancel_answer_at_once_during_a_step(engines, tokenizer):
    """The event loop never waits for the engine: mid-step, submit queues (or raises ValueError / QueueFull at
    once) and cancel frees the queue place at once; the changes take effect before the next step."""
    engine = HeldEngine(engines[0].runner.model, tokenizer, max_num_seqs=1, max_queued=1)
    front = AsyncEngine(engine)
    ids, params = tokenizer("Hello")["input_ids"], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        first = await front.generate(ids, params)
        assert await asyncio.to_thread(engine.stepping.wait, 10)  # the first request's step holds the lock
        start = time.monotonic()
        second_id, second = front.submit(ids, params)  # the one queue place
        with pytest.raises(QueueFull):
            front.submit(ids, params)
        with pytest.raises(ValueError, match="rung"):
            front.submit(ids, params, rung=9)
        assert front.cancel(second_id)
        third = await front.generate(ids, params)  # the cancelled request's place is free at once
        elapsed = time.monotonic() - start
        assert elapsed < 0.5, f"the event loop waited {elapsed:.2f} s for the engine"
        assert front.live_min_rung() == 0  # queued requests count before the engine thread takes them
        engine.release.set()
        return [e async for e in first], [e async for e in second], [e async for e in third]

    try:
        first, second, third = asyncio.run(main())
    finally:
        engine.release.set()
        front.shutdown()
    assert [e.finish_reason for e in second] == ["cancelled"]
    assert first[-1].finish_reason == third[-1].finish_reason == "length" and len(third) == 2
    assert engine.counters.cancelled == 1 and engine.runner.cache_bytes == 0 and not engine.streams
    assert front.live_min_rung() is None and front.load.running == front.load.waiting == 0


def test_committed_cache_bytes_count_queued_requests_until_they_end(engines, tokenizer):
    sync, _ = engines
    front = AsyncEngine(SlowEngine(sync.runner.model, tokenizer, max_num_seqs=1))  # one seat: the second waits
    ids = tokenizer("Hello")["input_ids"]
    params = SamplingParams(max_tokens=60, ignore_eos=True)

    async def main():
        _, a = front.submit(ids, params)
        b_id, b = front.submit(ids, SamplingParams(max_tokens=30, ignore_eos=True))
        committed = front.committed_cache_bytes()
        assert front.cancel(b_id)  # the queued one: its bytes go at once
        after_cancel = front.committed_cache_bytes()
        await b.aclose()
        async for _ in a:
            pass
        return committed, after_cancel

    try:
        committed, after_cancel = asyncio.run(main())
    finally:
        front.shutdown()
    one = sync.runner.cache_bytes_for(sync.new_request(ids, params))
    two = sync.runner.cache_bytes_for(sync.new_request(ids, SamplingParams(max_tokens=30, ignore_eos=True)))
    assert committed == one + two and after_cancel == one
    assert front.committed_cache_bytes() == 0  # the finished one is counted out too


def test_shutdown_ends_every_live_stream_and_later_submits_fail(engines, tokenizer):
    """Streams still running or queued at shutdown waited forever for a step that never came, and a request
    submitted afterwards was queued for a thread that was gone: both hung their consumers."""
    sync, _ = engines
    front = AsyncEngine(SlowEngine(sync.runner.model, tokenizer, max_num_seqs=1))  # one seat: the second waits
    ids, params = tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        running, waiting = await front.generate(ids, params), await front.generate(ids, params)
        first = await anext(running)
        await asyncio.to_thread(front.shutdown)
        with pytest.raises(RuntimeError, match="stopped"):
            front.submit(ids, params)
        rest = await asyncio.wait_for(asyncio.gather(collect_all(running), collect_all(waiting)), 5)
        return [first, *rest[0]], rest[1]

    running, waiting = asyncio.run(main())
    assert running[-1].finish_reason == waiting[-1].finish_reason == "error"
    assert "stopped" in running[-1].error and len(waiting) == 1
    engine = front.engine
    assert engine.runner.cache_bytes == 0 and not engine.requests and not engine.scheduler.has_work
    assert front.committed_cache_bytes() == 0 and front.live_min_rung() is None


async def collect_all(stream):
    return [event async for event in stream]


def test_a_cancel_that_loses_the_race_with_the_finish_leaves_the_stream_its_last_event(engines, tokenizer):
    """The explicit-cancel race: the engine thread counts a finished request out (``_retire``), then delivers its
    last event. A ``cancel`` in between found it finished (False) yet dropped its stream's sink, so that last
    event went nowhere and whoever iterated the stream waited forever."""
    front = AsyncEngine(Engine(engines[0].runner.model, tokenizer))
    retired, cancelled = threading.Event(), threading.Event()
    real_retire = front._retire

    def retire(request_id):
        real_retire(request_id)
        retired.set()
        cancelled.wait(5)  # the event loop's cancel runs here, before the engine thread delivers the event

    front._retire = retire
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        request_id, stream = front.submit(tokenizer("Hello")["input_ids"], params)
        assert await asyncio.to_thread(retired.wait, 10)
        assert not front.cancel(request_id)  # too late: it has finished
        cancelled.set()
        return await asyncio.wait_for(collect_all(stream), 5)

    try:
        events = asyncio.run(main())
    finally:
        cancelled.set()
        front.shutdown()
    assert [e.finish_reason for e in events] == [None, "length"] and not front._sinks


class WatchedThread:
    """The engine thread, with ``asked`` set once another thread has asked whether it is alive."""

    def __init__(self, thread: threading.Thread):
        self.thread, self.asked = thread, threading.Event()

    def is_alive(self) -> bool:
        alive = self.thread.is_alive()
        if threading.current_thread() is not self.thread:
            self.asked.set()
        return alive

    def __getattr__(self, name):
        return getattr(self.thread, name)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_call_queued_as_the_engine_thread_crashes_still_runs(engines):
    """``between_steps`` queued its call, saw the thread alive and waited; the thread then crashed (a bug outside
    a step) without taking its calls, and no ``shutdown`` came to run it: the caller waited forever."""
    _, front = engines
    blocked, crash = threading.Event(), threading.Event()
    real_publish = front._publish

    def publish():
        if not crash.is_set():
            blocked.set()
            crash.wait(5)
            raise RuntimeError("a bug in the step loop (simulated)")
        real_publish()

    front._publish = publish
    front._thread = watched = WatchedThread(front._thread)
    front._work.set()
    assert blocked.wait(10)  # the thread is past this iteration's calls, inside its step lock
    result = []
    caller = threading.Thread(target=lambda: result.append(front.between_steps(lambda e: "ran")), daemon=True)
    caller.start()
    assert watched.asked.wait(5)  # queued, and saw the thread alive
    crash.set()
    caller.join(5)
    assert result == ["ran"] and not front.alive


def test_a_submit_refused_after_shutdown_leaves_no_sink(engines, tokenizer):
    """Every submit after the engine stopped (a server answering 503 for hours) left its sink behind."""
    _, front = engines
    front.shutdown()

    async def main():
        with pytest.raises(EngineStopped):
            front.submit(tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=2))

    asyncio.run(main())
    assert not front._sinks


def test_a_finished_stream_nobody_iterated_leaves_no_sink(engines, tokenizer):
    """A stream dropped before anyone iterated it (and never cancelled) kept its sink, and every event of its
    request, for the life of the process."""
    _, front = engines

    async def main():
        front.submit(tokenizer("Hello")["input_ids"], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        await asyncio.to_thread(front.between_steps, lambda e: None)  # taken in
        # the sink itself, not committed_cache_bytes(): that drops in _retire, before _deliver removes the sink
        while front._sinks:  # until it has finished (wait_for below bounds the wait)
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert not front._sinks


def test_shutdown_ends_a_stream_whose_request_the_engine_lost(engines, tokenizer):
    """A request counted live that the engine no longer holds (its events lost with a step that failed outside
    the per-request guards) was skipped by the stop path, which only fails what the engine holds: its stream
    waited forever."""
    _, front = engines

    async def main():
        rid, stream = front.submit(tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=200, ignore_eos=True))
        await asyncio.to_thread(front.between_steps, lambda e: None)  # calls run before the queued add applies
        assert await asyncio.to_thread(front.between_steps, lambda e: e.cancel(rid))  # freed behind the front's back
        await asyncio.to_thread(front.shutdown)
        return [event async for event in stream]

    events = asyncio.run(asyncio.wait_for(main(), 10))
    assert events[-1].finish_reason == "error" and "stopped" in events[-1].error
    assert not front._live and not front._sinks


def test_a_request_that_finished_in_a_step_that_then_failed_ends_its_stream(engines, tokenizer, monkeypatch):
    """A step that raised outside the per-request guards after a request finished in it lost that request's last
    event with its list; the engine no longer held it, so nothing failed it: its stream hung and its ``_live``
    entry (queue room, committed bytes) stayed until shutdown."""
    _, front = engines
    engine = front.engine
    real = engine.step

    def step():
        events = real()
        if any(e.finish_reason is not None for e in events):
            monkeypatch.setattr(engine, "step", real)  # fail once
            raise RuntimeError("a bug after the step")
        return events

    monkeypatch.setattr(engine, "step", step)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    events = asyncio.run(asyncio.wait_for(collect(front, tokenizer("Hello")["input_ids"], params), 10))
    assert events[-1].finish_reason == "length" and len(events) == 3  # its real finish event, not an error
    assert not front._live and front.committed_cache_bytes() == 0
