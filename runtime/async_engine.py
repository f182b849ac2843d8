"""The engine for asyncio callers (the server): steps run in one background thread, events stream back.

``generate`` is an async iterator of TokenEvents. Leaving it early (client disconnect, ``aclose``, task
cancelled) cancels the request, which frees its slot and cache at once. One lock guards the engine, so
requests may be added and cancelled from the event loop while the thread steps. ``between_steps`` runs a function
ON the engine thread between two steps (elastic residency replaces weight tensors there): a queued call is taken
before the next step, so it cannot be starved by a busy engine the way a waiter on the lock can be.
"""

from __future__ import annotations

import asyncio
import logging
import queue as queue_mod
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future

from .engine import Engine
from .request import SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stop = threading.Event()
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
        (for ``cancel``). Synchronous, but must be called on the event loop that will consume the stream."""
        loop = asyncio.get_running_loop()  # first: without a loop nothing may be queued (it would run unread)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            req = self.engine.add_request(prompt_ids, params, rung)
            self._sinks[req.request_id] = (loop, queue)
        self._work.set()
        return req.request_id, self._events(req.request_id, queue)

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
        with self._lock:
            cancelled = self.engine.cancel(request_id)
            if cancelled:
                self._deliver(self.engine.streams[request_id].events[-1])
                self._forget(request_id)
            self._sinks.pop(request_id, None)  # a stream cancelled before anyone iterated it keeps no sink
        return cancelled

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (a health check reports 503 when it does not)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def read(self, fn):
        """``fn(engine)`` under the engine lock: a consistent view between two steps (server metrics, residency)."""
        with self._lock:
            return fn(self.engine)

    def between_steps(self, fn):
        """``fn(engine)`` on the engine thread, between two steps, under the engine lock; waits for its result.

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
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue_mod.Empty:
                return
            with self._lock:
                try:
                    done.set_result(fn(self.engine))
                except BaseException as err:  # handed to the caller, who raises it
                    done.set_exception(err)

    def _deliver(self, event: TokenEvent) -> None:
        sink = self._sinks.get(event.request_id)
        if sink is None:
            return
        loop, queue = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # that consumer's event loop is closed: nobody is left to read this stream
            self._sinks.pop(event.request_id, None)

    def _forget(self, request_id: str) -> None:
        self.engine.streams.pop(request_id, None)
        self.engine.requests.pop(request_id, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_calls()
            with self._lock:
                busy = self.engine.scheduler.has_work
                events = self._step() if busy else []
                for event in events:
                    if event.finish_reason is not None:  # forget first: a consumer that sees the end sees it clean
                        self._forget(event.request_id)
                    self._deliver(event)
            if not busy:
                self._work.wait(self.idle_wait_s)
                self._work.clear()

    def _step(self):
        """One engine step. The engine fails only the requests a failure touches; should the step itself fail
        (a bug), every live request fails rather than the thread dying with streams left waiting forever."""
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001
            log.exception("engine step failed")
            live = [r for r in self.engine.requests.values() if not r.finished]
            return self.engine.fail(live, f"{type(err).__name__}: {err}")

    def shutdown(self) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(timeout=5)
        self._run_calls()  # a call queued while the thread stopped must not wait forever
