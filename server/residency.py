"""Elastic residency: under sustained memory pressure release weight tails, reload them when memory frees.

Every rung is a prefix of the stored tensors, so the server can drop the tail of every pruned weight above the
lowest rung it still serves and keep serving the rungs above it. The policy is a pure function of the model
budget (``available + resident - reserve``, see controller.py): if the resident rung's weights no longer fit,
release down to the lowest rung that does (the lightest rung if none); if a lower rung fits again with
``hysteresis_bytes`` to spare, reload to it. A shortage (or a recovery) must last ``sustain_s`` before it is acted
on, so a short spike never costs a reload.

The manager works on a *weight store* (``server/weights.py``: tensors, a memory-mapped checkpoint) and runs on
the monitor thread. Before releasing it raises the *floor* (the lowest rung new requests may get) under
``lock``, the same lock request admission takes, then releases only once no live request runs below the
target; tails go layer by layer, so the peak memory never rises. A reload restores every layer first and
lowers the floor last.

Each pass (every layer of one release or reload) runs through ``exclusive``, which the server points at the
engine thread between two steps (``EngineBackend.change_weights``): no forward overlaps a tensor swap, and the
captured CUDA graphs, which hold the old tensors' addresses, are dropped first and recaptured lazily.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class WeightStore(Protocol):
    num_layers: int
    rung_bytes: tuple[int, ...]  # bytes held with every layer released to each rung

    def resident_bytes(self) -> int: ...
    def release_layer(self, layer: int, rung: int) -> None: ...
    def reload_layer(self, layer: int, rung: int) -> None: ...
    def settle(self) -> None: ...  # hand freed memory back to the OS / driver


def residency_target(budget: int, rung_bytes: tuple[int, ...], current: int, hysteresis_bytes: int) -> int:
    """The rung whose weights should be resident, given the model budget (pure; see the module doc)."""
    top = len(rung_bytes) - 1
    if rung_bytes[current] > budget:
        return next((r for r in range(current + 1, top + 1) if rung_bytes[r] <= budget), top)
    return next((r for r in range(current) if rung_bytes[r] + hysteresis_bytes <= budget), current)


class ResidencyManager:
    def __init__(self, store: WeightStore, reserve_bytes: int, *, hysteresis_bytes: int = 0, sustain_s: float = 2.0,
                 live_min_rung: Callable[[], int | None] = lambda: None, enabled: bool = True,
                 exclusive: Callable[[Callable[[], None]], None] = lambda change: change(),
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.reserve_bytes = reserve_bytes
        self.hysteresis_bytes = hysteresis_bytes
        self.sustain_s = sustain_s
        self.live_min_rung = live_min_rung  # lowest rung of any waiting or running request (None: idle)
        self.enabled = enabled
        self.exclusive = exclusive  # runs one pass where no forward can overlap it (see the module doc)
        self.clock = clock
        self.lock = threading.Lock()  # taken by admission (floor + add) and by floor changes here
        self.floor = 0  # lowest rung new requests may get
        self.resident_rung = 0  # lowest rung whose weights are fully resident
        self._resident = store.resident_bytes()
        self._pending: tuple[bool, float] | None = None  # (release?, since): a shortage or a recovery under way
        self.history: list[tuple[float, int, int]] = []  # (time, resident rung, resident bytes) per change
        self.last_pass_s = 0.0

    @property
    def resident_bytes(self) -> int:
        """Bytes held (cached from the store after every change; the store measures its tensors)."""
        return self._resident

    def budget(self, available_bytes: int) -> int:
        return available_bytes + self._resident - self.reserve_bytes

    def on_snapshot(self, snapshot) -> None:
        """Monitor listener: act on a target once it has held for ``sustain_s``."""
        if not self.enabled:
            return
        target = residency_target(self.budget(snapshot.available_bytes), self.store.rung_bytes, self.resident_rung,
                                  self.hysteresis_bytes)
        now = self.clock()
        if target == self.resident_rung:
            self._pending = None
            if self.floor > self.resident_rung:  # a release that waited for live requests is no longer due
                with self.lock:
                    self.floor = self.resident_rung
            return
        # The timer runs while the target stays on one side of the resident rung, not while it stays one rung: a
        # budget that wobbles across a rung boundary (target 4, 5, 4, ...) is a sustained shortage all the same,
        # and restarting the timer at every wobble would never release (or reload). The latest target is applied.
        release = target > self.resident_rung
        if self._pending is None or self._pending[0] != release:
            self._pending = (release, now)
        if now - self._pending[1] >= self.sustain_s:
            self.apply(target)

    def apply(self, target: int) -> bool:
        """Move residency to ``target`` now; False if live requests still run below it (retried next poll)."""
        if target > self.resident_rung:
            return self._release(target)
        self._reload(target)
        return True

    def _release(self, target: int) -> bool:
        with self.lock:
            self.floor = max(self.floor, target)  # from now on new requests get >= target
        live = self.live_min_rung()
        if live is not None and live < target:
            log.info("residency: holding release to rung %d until requests at rung %d finish", target, live)
            return False
        self.exclusive(lambda: self._each_layer(self.store.release_layer, target))
        self.store.settle()
        self._changed(target)
        return True

    def _reload(self, target: int) -> None:
        try:
            self.exclusive(lambda: self._each_layer(self.store.reload_layer, target))
        except Exception:
            self._undo_reload()
            raise
        self.store.settle()  # dequantizing leaves temporaries behind in the heap
        self._changed(target)
        with self.lock:
            self.floor = target  # every layer is back: requests may use the reloaded rungs

    def _undo_reload(self) -> None:
        """A reload pass cut short (no memory for the next tail): put every layer back where it was, so memory and
        the bookkeeping the controller reads agree again."""
        previous = self.resident_rung
        self.exclusive(lambda: self._each_layer(self.store.release_layer, previous))
        self.store.settle()
        self._changed(previous)

    def _each_layer(self, change: Callable[[int, int], None], target: int) -> None:
        start = self.clock()
        for layer in range(self.store.num_layers):
            change(layer, target)
        self.last_pass_s = self.clock() - start  # what a pass costs (logged by _changed)

    def _changed(self, rung: int) -> None:
        before = self._resident
        self.resident_rung = rung
        self._resident = self.store.resident_bytes()
        self._pending = None
        self.history.append((self.clock(), rung, self._resident))
        log.warning("residency: weights resident for rung %d and above (%.1f MB -> %.1f MB, %.1f ms)", rung,
                    before / 1e6, self._resident / 1e6, 1e3 * self.last_pass_s)
