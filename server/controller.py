"""The rate controller: which rung a new request runs at, from a memory snapshot and recent decode latency.

Pure functions over plain numbers (testable without hardware), plus a small stateful wrapper that remembers the
last decision for hysteresis.

Memory rule. The *model budget* is ``available + resident_weights - reserve``: what the model may hold while
leaving ``reserve`` bytes free for everything else on the device. Moving weights between "resident" and "free"
does not change it, so releasing or reloading tails never makes the controller flap. A request fits at rung ``r``
when ``weights(r) + cache(r) <= budget``; the controller picks the lowest such rung (the least pruning), never one
below the lowest resident rung, and the lightest rung when nothing fits (a request is never refused for memory:
the lightest rung is the best the server can do, and the residency manager frees the tails it does not need).

Latency rule. When the recent inter-token latency (TPOT) misses the target while several requests share the
engine, climb one rung above the last decision, once per new measurement: the TPOT window only moves when a
request finishes, so a burst admitted on one slow reading must not climb once per request. Hold the last
rung the latency rule climbed to while TPOT stays above the band (``tpot_band * target``), with or without
contention; only a TPOT back below the band releases the latency rule. A rung that memory chose is not the latency
rule's to hold: once memory recovers, it comes down with the memory rule's hysteresis alone.

Hysteresis. Climbing happens at once (memory or latency trouble must be answered now); descending to a lower
rung needs the lower rung to fit with ``hysteresis_bytes`` to spare and TPOT back below the band.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerConfig:
    reserve_bytes: int = 0
    hysteresis_bytes: int = 0
    tpot_target_s: float | None = None  # None: no latency rule
    tpot_band: float = 0.8  # TPOT below band * target counts as recovered
    contention: int = 2  # running requests from which TPOT misses count as contention


@dataclass(frozen=True)
class RungInputs:
    available_bytes: int  # free memory on the device the weights live in
    resident_bytes: int  # weight bytes the server holds now
    rung_weight_bytes: tuple[int, ...]  # weight bytes held to serve each rung (prefixes: non-increasing)
    request_cache_bytes: tuple[int, ...]  # this request's KV cache at each rung
    min_rung: int = 0  # lowest rung whose weights are resident
    recent_tpot_s: float | None = None
    tpot_seq: int = 0  # which measurement recent_tpot_s is (TpotWindow.seq): a climb uses each one once
    running: int = 0


@dataclass(frozen=True)
class Decision:
    rung: int
    reason: str  # "memory" | "latency" | "resident" | "fallback" | "pinned" | "fixed"
    latency_climb: bool = False  # the latency rule climbed on this decision's TPOT measurement
    latency_rung: int = 0  # the rung the latency rule asked for at least (held until TPOT is back in the band)


def model_budget(available_bytes: int, resident_bytes: int, reserve_bytes: int) -> int:
    return available_bytes + resident_bytes - reserve_bytes


def memory_rung(inputs: RungInputs, cfg: ControllerConfig, previous: int) -> tuple[int, bool]:
    """(lowest fitting rung, whether any fit); rungs lower than ``previous`` need the hysteresis margin."""
    budget = model_budget(inputs.available_bytes, inputs.resident_bytes, cfg.reserve_bytes)
    top = len(inputs.rung_weight_bytes) - 1
    for rung in range(top + 1):
        margin = cfg.hysteresis_bytes if rung < previous else 0
        if inputs.rung_weight_bytes[rung] + inputs.request_cache_bytes[rung] + margin <= budget:
            return rung, True
    return top, False


def latency_floor(inputs: RungInputs, cfg: ControllerConfig, previous: int, climbed_at: int | None = None,
                  held: int | None = None) -> int:
    """Rung the latency rule asks for at least: previous + 1 on a new miss under contention, ``held`` (the rung it
    asked for last; None: previous) while TPOT is above the band, 0 once it is below. ``climbed_at``: the
    measurement (``tpot_seq``) of the last climb."""
    if cfg.tpot_target_s is None or inputs.recent_tpot_s is None:
        return 0
    if inputs.recent_tpot_s <= cfg.tpot_band * cfg.tpot_target_s:
        return 0  # recovered: only now may the rung come down (else it flaps at the contention boundary)
    fresh = inputs.tpot_seq != climbed_at
    if inputs.recent_tpot_s > cfg.tpot_target_s and inputs.running >= cfg.contention and fresh:
        return min(previous + 1, len(inputs.rung_weight_bytes) - 1)
    return previous if held is None else held


def choose_rung(inputs: RungInputs, cfg: ControllerConfig, previous: int = 0,
                climbed_at: int | None = None, held: int | None = None) -> Decision:
    """The rung for a new request (see the module doc for the rules); ``held``: see ``latency_floor``."""
    if len(inputs.rung_weight_bytes) != len(inputs.request_cache_bytes):
        raise ValueError("one weight size and one cache size per rung")
    mem, fits = memory_rung(inputs, cfg, previous)
    lat = latency_floor(inputs, cfg, previous, climbed_at, held)
    rung = max(mem, lat, inputs.min_rung)
    climbed = lat > previous
    if not fits:
        return Decision(rung, "fallback", climbed, lat)
    if inputs.min_rung > max(mem, lat):
        return Decision(rung, "resident", climbed, lat)
    return Decision(rung, "latency" if lat > mem else "memory", climbed, lat)


class TpotWindow:
    """The last inter-token gaps of all requests, up to ``max_age_s`` old; their median is the controller's recent
    TPOT.

    ``seq`` counts the additions that brought gaps, so the controller can tell a new measurement from the same
    median read again (it moves only when a request finishes). Gaps age out: after a quiet spell the slow median of
    a past burst no longer holds a climbed rung (with no recent gap there is no reading, and the latency rule lets
    go)."""

    def __init__(self, size: int = 64, max_age_s: float = 60.0, clock=time.monotonic):
        self._gaps: deque[tuple[float, float]] = deque(maxlen=size)  # (when added, gap)
        self._lock = threading.Lock()
        self.max_age_s, self._clock = max_age_s, clock
        self.seq = 0

    def add(self, gaps: list[float]) -> None:
        if not gaps:  # a request that ended before its second token measured nothing
            return
        now = self._clock()
        with self._lock:
            self._gaps.extend((now, g) for g in gaps)
            self.seq += 1

    def reading(self) -> tuple[float | None, int]:
        """(median gap or None, seq), read together so the number always names the median it came with."""
        oldest = self._clock() - self.max_age_s
        with self._lock:
            while self._gaps and self._gaps[0][0] < oldest:
                self._gaps.popleft()
            return (statistics.median(g for _, g in self._gaps) if self._gaps else None), self.seq


class RateController:
    """``choose_rung`` with memory: remembers the last decision (hysteresis), or serves a fixed rung."""

    def __init__(self, cfg: ControllerConfig, fixed_rung: int | None = None):
        self.cfg = cfg
        self.fixed_rung = fixed_rung
        self.last = Decision(fixed_rung or 0, "fixed" if fixed_rung is not None else "memory")
        self._climbed_at: int | None = None  # tpot_seq of the last latency climb
        self._lock = threading.Lock()

    def decide(self, inputs: RungInputs, pinned: int | None = None, commit: bool = True) -> Decision:
        """A request's rung: a pin or the fixed rung (held to resident rungs), else the controller's choice.

        ``commit=False`` previews a decision (the ``uniql_prune_rate`` gauge) without moving the hysteresis state.
        """
        if pinned is not None or self.fixed_rung is not None:
            rung = pinned if pinned is not None else self.fixed_rung
            return Decision(max(rung, inputs.min_rung), "pinned" if pinned is not None else "fixed")
        with self._lock:
            # held: the latency rule's own rung, not the last decision, which memory may have raised (holding that
            # while TPOT sat in the band kept a passing memory spike's rung for as long as TPOT stayed there)
            decision = choose_rung(inputs, self.cfg, self.last.rung, self._climbed_at, self.last.latency_rung)
            if commit:
                self.last = decision
                if decision.latency_climb:
                    self._climbed_at = inputs.tpot_seq
            return decision
