"""The adaptive service: admission at a controller-chosen rung, per-request measurements, gauges, residency.

It wires the pieces together: the monitor's snapshots feed the controller (per request) and, on the monitor
thread, the residency manager and the gauges; every stream is wrapped so its latency, tokens, rung and outcome
reach the metrics and the controller's TPOT window however it ends. Torch-free: the backend (bridge.py) is
passed in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from uniql.runtime.request import SamplingParams, TokenEvent

from .config import ServerConfig, parse_bytes, resolve_reserve
from .controller import ControllerConfig, Decision, RateController, RungInputs, TpotWindow
from .metrics import ServerMetrics
from .monitor import Monitor, Snapshot
from .residency import ResidencyManager

NOMINAL_PROMPT = 64  # prompt length of the nominal request behind the uniql_prune_rate gauge


@dataclass
class Admission:
    decision: Decision
    prune_rate: float
    prompt_tokens: int
    streams: list[AsyncIterator[TokenEvent]]  # one per choice, tracked


class AdaptiveService:
    def __init__(self, backend, cfg: ServerConfig, metrics: ServerMetrics, monitor: Monitor):
        self.backend, self.cfg, self.metrics, self.monitor = backend, cfg, metrics, monitor
        self.reserve_bytes = resolve_reserve(cfg.memory_reserve, monitor.snapshot().available_bytes)
        hysteresis = parse_bytes(cfg.hysteresis)
        fixed = cfg.fixed_rate()
        target = None if cfg.tpot_target_ms is None else cfg.tpot_target_ms / 1000.0
        self.controller = RateController(ControllerConfig(self.reserve_bytes, hysteresis, target),
                                         None if fixed is None else backend.nearest_rung(fixed))
        self.residency = ResidencyManager(backend.weights, self.reserve_bytes, hysteresis_bytes=hysteresis,
                                          sustain_s=cfg.residency_sustain_s, live_min_rung=backend.live_min_rung,
                                          enabled=cfg.residency, exclusive=backend.change_weights)
        self.tpot = TpotWindow()
        self._running = 0
        self._kv_counted = 0  # KV cache bytes allocated when the latest memory reading was taken
        monitor.listeners += [self.residency.on_snapshot, self.refresh_gauges]
        self.refresh_gauges(monitor.snapshot())

    # ----------------------------------------------------------------------------------------- decisions
    def inputs(self, max_len: int, snapshot: Snapshot | None = None, sequences: int = 1) -> RungInputs:
        """The controller's readings for a request of ``sequences`` choices (each holds its own cache)."""
        snapshot = snapshot or self.monitor.snapshot()
        tpot, seq = self.tpot.reading()
        cache = tuple(sequences * size for size in self.backend.cache_bytes(max_len))
        # the caches of requests admitted since that reading (allocated at their prefill, maybe later) are spoken
        # for: without them every request of a burst admitted on one reading got rung 0, for room of one cache
        pending = max(0, self.backend.committed_cache_bytes() - self._kv_counted)
        return RungInputs(available_bytes=max(0, snapshot.available_bytes - pending),
                          resident_bytes=self.residency.resident_bytes,
                          rung_weight_bytes=self.backend.weights.rung_bytes, request_cache_bytes=cache,
                          min_rung=self.residency.floor, recent_tpot_s=tpot, tpot_seq=seq, running=self._running)

    def pinned_rung(self, prune_rate: float | None) -> int | None:
        return None if prune_rate is None else self.backend.nearest_rung(prune_rate)

    async def admit(self, prompt_ids: list[int], params: list[SamplingParams],
                    prune_rate: float | None) -> Admission:
        """Queue every choice at one rung (ValueError / QueueFull: nothing stays queued)."""
        max_len = len(prompt_ids) + params[0].max_tokens
        submitted: list[tuple[str, AsyncIterator[TokenEvent]]] = []
        try:
            with self.residency.lock:  # the floor cannot rise between the decision and the add
                decision = self.controller.decide(self.inputs(max_len, sequences=len(params)),
                                                  self.pinned_rung(prune_rate))
                for p in params:
                    submitted.append(self.backend.submit(prompt_ids, p, decision.rung))
        except Exception:
            await self._roll_back(submitted)
            raise
        rate = self.backend.rates[decision.rung]
        arrival = time.monotonic()
        streams = [self._track(stream, len(prompt_ids), rate, arrival) for _, stream in submitted]
        return Admission(decision, rate, len(prompt_ids), streams)

    def echo_only(self, prompt_tokens: int, n: int, prune_rate: float | None) -> Admission:
        """A request that generates nothing (completions' echo with max_tokens 0): every choice ends at once with
        "length"; nothing is queued, no seat or cache is taken and nothing is measured. Its rate is the one it
        would have run at, previewed without moving the controller's state."""
        decision = self.controller.decide(self.inputs(prompt_tokens, sequences=n), self.pinned_rung(prune_rate),
                                          commit=False)
        streams = [_ended("length") for _ in range(n)]
        return Admission(decision, self.backend.rates[decision.rung], prompt_tokens, streams)

    async def _roll_back(self, submitted: list[tuple[str, AsyncIterator[TokenEvent]]]) -> None:
        """Undo the choices queued before one was refused: cancel each, then close its stream, since whoever
        holds a stream is the one to close it (it will never be iterated to its end)."""
        for request_id, stream in submitted:
            self.backend.cancel(request_id)
            await stream.aclose()

    # --------------------------------------------------------------------------------------- measuring
    async def _track(self, stream: AsyncIterator[TokenEvent], prompt_tokens: int, rate: float,
                     arrival: float) -> AsyncIterator[TokenEvent]:
        """Pass events through; when the stream ends (finished, cancelled or abandoned) record it."""
        first = last = None
        gaps: list[float] = []
        generated, reason = 0, "cancelled"
        self._running += 1
        try:
            async for event in stream:
                now = event.time_s  # the engine's clock of the token, not when this consumer got to it
                if event.token_id is not None:
                    generated += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                if event.finish_reason is not None:
                    reason = event.finish_reason
                yield event
        finally:
            await stream.aclose()  # a consumer that left cancels the request (AsyncEngine frees its cache)
            self._running -= 1
            self.tpot.add(gaps)
            self.metrics.observe_request(None if first is None else first - arrival, gaps, time.monotonic() - arrival,
                                         prompt_tokens, generated, rate, reason)

    def refresh_gauges(self, snapshot: Snapshot) -> None:
        """Monitor listener: device memory, engine load, residency and the rung the controller would pick now."""
        stats = self.backend.load_stats()
        self._kv_counted = stats["kv_cache_bytes"]  # what this reading already counts as used
        nominal = min(self.backend.max_model_len, NOMINAL_PROMPT + self.cfg.default_max_tokens)
        preview = self.controller.decide(self.inputs(nominal, snapshot), commit=False)
        self.metrics.set_devices(snapshot.devices)
        self.metrics.set_engine(stats["running"], stats["waiting"], stats["kv_cache_bytes"],
                                self.residency.resident_bytes, self.backend.rates[preview.rung])
        self.last_preview = preview

    def state(self) -> dict:
        """What /health reports besides the status (memory, residency, controller)."""
        snapshot = self.monitor.snapshot()
        return {"prune_rates": list(self.backend.rates), "dtype": self.backend.dtype,
                "resident_rung": self.residency.resident_rung,
                "floor_rung": self.residency.floor, "weights_resident_bytes": self.residency.resident_bytes,
                "rung_weight_bytes": list(self.backend.weights.rung_bytes),
                "memory": {"device": snapshot.primary, "available_bytes": snapshot.available_bytes,
                           "reserve_bytes": self.reserve_bytes,
                           "budget_bytes": self.residency.budget(snapshot.available_bytes)},
                "prune_rate_now": self.backend.rates[self.last_preview.rung]}


async def _ended(reason: str) -> AsyncIterator[TokenEvent]:
    """A stream that only finishes: no token, no text."""
    yield TokenEvent("", None, "", finish_reason=reason)
