"""The engine for asyncio callers (the server): steps run in one background thread, events stream back.

``generate`` is an async iterator of TokenEvents. Leaving it early (client disconnect, ``aclose``, task
cancelled) cancels the request, which frees its slot and cache. The engine thread holds the step lock for a
whole step, which on CPU or an edge GPU can last seconds (a long prefill), so nothing the event loop calls may
wait on it: ``submit`` and ``cancel`` check what they can at once, then queue the change for the thread, which
applies it between two steps; ``load`` and ``live_min_rung`` read state published outside the step lock.
Only a small admission lock, never held during engine work, makes the queue-capacity check atomic.
``between_steps`` runs a function ON the engine thread between two steps (elastic residency replaces weight
tensors there): a queued call is taken before the next step, so a busy engine cannot starve it.
Once the thread stops (``shutdown``, or a crash) every live stream ends with an "error" event and ``submit``
raises EngineStopped: nothing may wait for a step that will never come.
"""

from __future__ import annotations

import asyncio
import logging
import queue as queue_mod
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

from .engine import Engine, event_marks, events_since
from .request import Request, SamplingParams, TokenEvent
from .scheduler import EngineStopped, QueueFull, retry_after_s

log = logging.getLogger(__name__)


def _drained(q: queue_mod.SimpleQueue):
    """What ``q`` holds now, in order, without waiting."""
    while True:
        try:
            yield q.get_nowait()
        except queue_mod.Empty:
            return


@dataclass(frozen=True)
class Load:
    """The engine's load as of its last step (published by the engine thread, read by anyone without a lock)."""

    running: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.load = Load()
        self._lock = threading.Lock()  # the step lock: the engine thread holds it for a whole step
        self._admit = threading.Lock()  # guards _live and the order of _ops; held for microseconds only
        self._live: dict[str, int] = {}  # request id -> rung, from submit until finished or cancelled
        self._committed: dict[str, int] = {}  # request id -> its cache bytes, over the same span as _live
        self._capacity = engine.scheduler.capacity
        self._ops: queue_mod.SimpleQueue[tuple[str, object]] = queue_mod.SimpleQueue()  # ("add", req) / ("cancel", id)
        self._work = threading.Event()
        self._stop = threading.Event()
        self._closed = False  # set (under _admit) once the thread stops: submit refuses, as no step would run it
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: queue_mod.SimpleQueue[tuple[object, Future]] = queue_mod.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="uniql-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       rung: int = 0) -> AsyncIterator[TokenEvent]:
        """Queue a request (ValueError / QueueFull raised here, before any event) and stream its events."""
        return self.submit(prompt_ids, params, rung)[1]

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               rung: int = 0) -> tuple[str, AsyncIterator[TokenEvent]]:
        """``generate`` for callers that may drop a stream before iterating it: also returns the request id
        (for ``cancel``). Synchronous and never waits for a step; must be called on the event loop that will
        consume the stream."""
        loop = asyncio.get_running_loop()  # first: without a loop nothing may be queued (it would run unread)
        req = self.engine.new_request(prompt_ids, params, rung)  # ValueError: bad input, nothing queued
        queue: asyncio.Queue = asyncio.Queue()
        self._sinks[req.request_id] = (loop, queue)  # before queueing: the thread may emit at once
        try:
            self._admit_request(req)
        except Exception:  # QueueFull, or EngineStopped: each refusal would otherwise leave a sink for good
            self._sinks.pop(req.request_id, None)
            raise
        self._work.set()
        return req.request_id, self._events(req.request_id, queue)

    def _admit_request(self, req: Request) -> None:
        """Count the request in and queue it, atomically: requests counted are never fewer than the scheduler
        holds (ops apply in queue order, and a finish is counted out after the scheduler dropped it), so an add
        this check lets through always finds room when the thread applies it."""
        with self._admit:
            if self._closed:
                raise EngineStopped("the engine has stopped")
            if len(self._live) >= self._capacity:
                raise QueueFull(self._retry_after_s())
            self._live[req.request_id] = req.rung
            self._committed[req.request_id] = self.engine.runner.cache_bytes_for(req)
            self._ops.put(("add", req))

    def _retry_after_s(self) -> float:
        # from the live count: the scheduler's own queue lags the ops not yet applied
        seqs = self.engine.scheduler.max_num_seqs
        return retry_after_s(max(0, len(self._live) - seqs), seqs)

    async def _events(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        done = False
        try:
            while not done:
                event = await queue.get()
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:  # the consumer went away: stop generating for it
                self.cancel(request_id)
            self._sinks.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Cancel a live request: its stream ends with a "cancelled" event now, and its slot and cache are freed
        before the next step. Never waits for a step. False if it had already finished (or was never known)."""
        with self._admit:
            rung = self._live.pop(request_id, None)
            self._committed.pop(request_id, None)
            if rung is not None:
                self._ops.put(("cancel", request_id))
        if rung is None:
            # it has finished, and the engine thread may not have delivered its last event yet (it counts a
            # request out first): its sink stays for that event, which removes it
            return False
        sink = self._sinks.pop(request_id, None)  # a stream cancelled before anyone iterated it keeps no sink
        if sink is not None:
            self._send(sink, TokenEvent(request_id, None, "", finish_reason="cancelled", rung=rung))
        self._work.set()
        return True

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (a health check reports 503 when it does not)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def live_min_rung(self) -> int | None:
        """The lowest rung of any request submitted and not yet finished or cancelled, queued ones included:
        residency must not release a rung one of them will run at."""
        with self._admit:
            return min(self._live.values(), default=None)

    def committed_cache_bytes(self) -> int:
        """Cache bytes of every request submitted and not yet finished or cancelled, allocated or not (queued
        ones hold none yet): what memory readings taken before their prefill do not show."""
        with self._admit:
            return sum(self._committed.values())

    def read(self, fn):
        """``fn(engine)`` under the step lock: a consistent view between two steps. It waits for a step in
        progress, so never call it on an event loop (the server reads ``load`` and ``live_min_rung``)."""
        with self._lock:
            return fn(self.engine)

    def between_steps(self, fn):
        """``fn(engine)`` on the engine thread, between two steps, under the step lock; waits for its result.

        Unlike ``read`` the call is queued and the thread takes it before its next step, so a busy engine cannot
        starve it, and it runs on the thread (and CUDA stream) that runs the model. Never call it from ``fn``.
        """
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        done: Future = Future()
        self._calls.put((fn, done))
        self._work.set()
        if self._stop.is_set() or not self._thread.is_alive():
            self._run_calls()  # the thread is gone: nothing steps any more, run it here
        return done.result()

    def _run_calls(self) -> None:
        for fn, done in _drained(self._calls):
            with self._lock:
                try:
                    done.set_result(fn(self.engine))
                except BaseException as err:  # handed to the caller, who raises it
                    done.set_exception(err)

    def _apply_ops(self) -> None:
        """Adds and cancels queued by the event loop, in their order (under the step lock)."""
        for kind, arg in _drained(self._ops):
            if kind == "add":
                self._add(arg)
            else:  # a cancel (False, nothing to do, if it finished first)
                self.engine.cancel(arg)

    def _add(self, req: Request) -> None:
        try:
            self.engine.enqueue(req)
        except Exception as err:  # noqa: BLE001 (submit checked it; should a bug land here, its stream still ends)
            log.exception("queueing request %s failed", req.request_id)
            self._retire(req.request_id)
            self._deliver(TokenEvent(req.request_id, None, "", finish_reason="error", rung=req.rung,
                                     error=f"{type(err).__name__}: {err}"))

    def _send(self, sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], event: TokenEvent) -> None:
        loop, queue = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # that consumer's event loop is closed: nobody is left to read this stream
            self._sinks.pop(event.request_id, None)

    def _deliver(self, event: TokenEvent) -> None:
        # a stream's last event takes its sink along: a stream never iterated nor cancelled leaves nothing behind
        last = event.finish_reason is not None
        sink = self._sinks.pop(event.request_id, None) if last else self._sinks.get(event.request_id)
        if sink is not None:
            self._send(sink, event)

    def _retire(self, request_id: str) -> None:
        """Count a request out of the queue capacity (after the scheduler let it go)."""
        with self._admit:
            self._live.pop(request_id, None)
            self._committed.pop(request_id, None)

    def _publish(self) -> None:
        scheduler = self.engine.scheduler
        self.load = Load(scheduler.num_running, scheduler.num_waiting, self.engine.runner.cache_bytes)

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # stopped or crashed: no stream or call may wait for a step that will never come
            # a crash sets no _stop of its own: set it first, so a ``between_steps`` call queued from now on runs
            # on its caller's thread, and one queued before is taken by the drain below
            self._stop.set()
            try:
                self._end_streams()
            finally:
                self._run_calls()

    def _end_streams(self) -> None:
        with self._admit:
            self._closed = True  # after this no add is queued, so the drain below sees every one
        with self._lock:
            self._apply_ops()
            self._dispatch(self._fail_live("RuntimeError: the engine stopped"))
            self._dispatch(self._fail_orphans("RuntimeError: the engine stopped"))
            self._publish()

    def _fail_orphans(self, message: str) -> list[TokenEvent]:
        """An "error" event for every request still counted live that the engine no longer holds (its events were
        lost with a step that failed outside the per-request guards): their streams must end too."""
        with self._admit:
            orphans = [(rid, rung) for rid, rung in self._live.items() if rid not in self.engine.requests]
        return [TokenEvent(rid, None, "", finish_reason="error", rung=rung, error=message) for rid, rung in orphans]

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._work.clear()  # before taking the ops: one queued after this wakes the wait below
            self._run_calls()
            with self._lock:
                self._apply_ops()
                busy = self.engine.scheduler.has_work
                self._dispatch(self._step() if busy else [])
                self._publish()
            if not busy:
                self._work.wait(self.idle_wait_s)

    def _dispatch(self, events) -> None:
        for event in events:
            if event.finish_reason is not None:  # (the engine has already dropped it)
                self._retire(event.request_id)
            self._deliver(event)

    def _step(self):
        """One engine step. The engine fails only the requests a failure touches; should the step itself fail
        (a bug), every live request fails rather than the thread dying with streams left waiting forever."""
        # as ``Engine._guarded`` (not ``_fail_orphans``: it would fail requests whose "add" is still queued)
        marks = event_marks(self.engine.requests.values())
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001
            log.exception("engine step failed")
            return events_since(marks) + self._fail_live(f"{type(err).__name__}: {err}")

    def _fail_live(self, message: str):
        live = [r for r in self.engine.requests.values() if not r.finished]
        return self.engine.fail(live, message)

    def shutdown(self) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(timeout=5)
        self._run_calls()  # a call queued while the thread stopped must not wait forever
        with self._lock:
            self._apply_ops()  # cancels queued at the end still free their slots and caches
            self._publish()
