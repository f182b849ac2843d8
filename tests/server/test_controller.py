"""The rate controller and the residency policy as pure functions, and the manager over a fake store."""

from __future__ import annotations

import pytest

from uniql.server.controller import ControllerConfig, RateController, RungInputs, TpotWindow, choose_rung
from uniql.server.residency import ResidencyManager, residency_target

MB = 1 << 20
WEIGHTS = tuple(w * MB for w in (600, 580, 560, 540, 520, 500, 470, 440))  # 8 rungs, shrinking prefixes
CACHE = tuple(c * MB for c in (10, 10, 9, 9, 8, 8, 7, 7))


def inputs(available_mb, resident=WEIGHTS[0], **kw):
    return RungInputs(available_bytes=available_mb * MB, resident_bytes=resident, rung_weight_bytes=WEIGHTS,
                      request_cache_bytes=CACHE, **kw)


def test_lowest_rung_whose_weights_cache_and_reserve_fit():
    cfg = ControllerConfig(reserve_bytes=1000 * MB)
    # budget = available + resident - reserve; rung 0 needs 610 MB
    assert choose_rung(inputs(1010), cfg).rung == 0  # budget 610
    assert choose_rung(inputs(1009), cfg).rung == 1  # budget 609 < 610, rung 1 needs 590
    assert choose_rung(inputs(950), cfg).rung == 3  # budget 550: rung 3 needs 540 + 9 = 549
    assert choose_rung(inputs(300), cfg).reason == "fallback"  # nothing fits: the lightest rung, never a refusal
    assert choose_rung(inputs(300), cfg).rung == 7


def test_rung_choice_does_not_depend_on_where_the_bytes_sit():
    """Releasing tails moves bytes from resident to available: the budget, and so the choice, stays the same."""
    cfg = ControllerConfig(reserve_bytes=1000 * MB)
    full = choose_rung(inputs(950), cfg).rung
    released = choose_rung(inputs(950 + (WEIGHTS[0] - WEIGHTS[5]) // MB, resident=WEIGHTS[5], min_rung=0), cfg)
    assert released.rung == full


def test_requests_are_held_to_resident_rungs_and_pins():
    cfg = ControllerConfig(reserve_bytes=0)
    decision = choose_rung(inputs(10_000, min_rung=5), cfg)
    assert decision.rung == 5 and decision.reason == "resident"
    controller = RateController(cfg)
    assert controller.decide(inputs(10_000), pinned=3).rung == 3
    assert controller.decide(inputs(10_000, min_rung=6), pinned=3).rung == 6  # a pin below residency is held
    assert RateController(cfg, fixed_rung=2).decide(inputs(10_000)).rung == 2


def test_hysteresis_descends_only_with_room_to_spare():
    cfg = ControllerConfig(reserve_bytes=1000 * MB, hysteresis_bytes=5 * MB)
    assert choose_rung(inputs(1012), cfg, previous=2).rung == 1  # rung 0 fits by 2 MB, not 5: down to rung 1 only
    assert choose_rung(inputs(1016), cfg, previous=2).rung == 0
    assert choose_rung(inputs(1009), cfg, previous=0).rung == 1  # climbing never waits


def test_latency_climbs_under_contention_and_holds_in_the_band():
    cfg = ControllerConfig(reserve_bytes=0, tpot_target_s=0.05)
    roomy = dict(available_mb=100_000)
    assert choose_rung(inputs(**roomy, recent_tpot_s=0.08, running=4), cfg, previous=2).rung == 3
    # no contention, but TPOT still misses: hold (dropping here made the rung flap at the contention boundary)
    assert choose_rung(inputs(**roomy, recent_tpot_s=0.08, running=1), cfg, previous=2).rung == 2
    assert choose_rung(inputs(**roomy, recent_tpot_s=0.045, running=4), cfg, previous=3).rung == 3  # in the band
    assert choose_rung(inputs(**roomy, recent_tpot_s=0.02, running=4), cfg, previous=3).rung == 0  # recovered
    assert choose_rung(inputs(**roomy, recent_tpot_s=0.08, running=4), cfg, previous=7).rung == 7  # top stays top


LATENCY = ControllerConfig(reserve_bytes=0, hysteresis_bytes=16 * MB, tpot_target_s=0.05)  # band: 0.04 s


def decide(controller, tpot, running, seq):
    return controller.decide(inputs(100_000, recent_tpot_s=tpot, tpot_seq=seq, running=running)).rung


def test_a_burst_on_one_slow_measurement_climbs_one_rung_not_one_per_request():
    controller = RateController(LATENCY)
    assert [decide(controller, 0.06, running, seq=1) for running in range(2, 8)] == [1] * 6
    assert decide(controller, 0.06, 7, seq=2) == 2  # a new measurement still misses: one more rung
    assert decide(controller, 0.06, 7, seq=2) == 2


def test_no_flapping_at_the_contention_boundary():
    controller = RateController(LATENCY)
    assert decide(controller, 0.06, 2, seq=1) == 1
    # requests finish and start: running crosses the contention threshold while TPOT still misses the target
    assert [decide(controller, 0.06, running, seq=1) for running in (1, 2, 1, 2, 1)] == [1] * 5


def test_the_rung_comes_down_only_once_tpot_is_back_under_the_band():
    controller = RateController(LATENCY)
    assert decide(controller, 0.06, 3, seq=1) == 1
    assert decide(controller, 0.06, 3, seq=2) == 2
    assert decide(controller, 0.045, 1, seq=3) == 2  # below the target but above the band: hold
    assert decide(controller, 0.045, 3, seq=4) == 2
    assert decide(controller, 0.039, 1, seq=5) == 0  # under 0.8 * target: memory rule alone again
    assert controller.last.reason == "memory"


def test_a_preview_does_not_use_up_a_measurement():
    controller = RateController(LATENCY)
    probe = inputs(100_000, recent_tpot_s=0.06, tpot_seq=1, running=3)
    assert controller.decide(probe, commit=False).rung == 1
    assert controller.decide(probe).rung == 1  # the gauge's preview did not count as the climb


def test_tpot_window_counts_measurements_not_reads():
    window = TpotWindow(size=4)
    assert window.reading() == (None, 0)
    window.add([0.1, 0.3])
    window.add([])  # a request that ended before its second token measured nothing
    assert window.reading() == (pytest.approx(0.2), 1)
    assert window.reading()[1] == 1  # reading again is the same measurement
    window.add([0.5, 0.5, 0.5])
    assert window.reading() == (0.5, 2)  # the window holds the last 4 gaps


def test_commit_false_previews_without_moving_the_state():
    controller = RateController(ControllerConfig(reserve_bytes=1000 * MB, hysteresis_bytes=5 * MB))
    assert controller.decide(inputs(850)).rung == 7  # budget 450: the lightest rung
    assert controller.decide(inputs(1100), commit=False).rung == 0
    assert controller.last.rung == 7  # the preview did not move the hysteresis state


def test_residency_target():
    w = WEIGHTS
    assert residency_target(600 * MB, w, 0, 0) == 0
    assert residency_target(530 * MB, w, 0, 0) == 4  # 520 fits
    assert residency_target(100 * MB, w, 0, 0) == 7  # nothing fits: keep the lightest rung
    assert residency_target(590 * MB, w, 4, 16 * MB) == 2  # room again, with the margin: 560 + 16 <= 590
    assert residency_target(616 * MB, w, 4, 16 * MB) == 0  # 600 + 16


class FakeStore:
    def __init__(self):
        self.num_layers, self.rung_bytes = 3, WEIGHTS
        self.layer_rung = [0, 0, 0]
        self.calls = []

    def resident_bytes(self):
        return self.rung_bytes[max(self.layer_rung)] if len(set(self.layer_rung)) == 1 else -1

    def release_layer(self, layer, rung):
        self.calls.append(("release", layer, rung))
        self.layer_rung[layer] = rung

    def reload_layer(self, layer, rung):
        self.calls.append(("reload", layer, rung))
        self.layer_rung[layer] = rung

    def settle(self):
        self.calls.append(("settle",))


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class Snap:
    def __init__(self, available_mb):
        self.available_bytes = available_mb * MB


@pytest.fixture
def manager():
    store, clock, live = FakeStore(), Clock(), {"rung": None}
    mgr = ResidencyManager(store, reserve_bytes=1000 * MB, hysteresis_bytes=16 * MB, sustain_s=2.0,
                           live_min_rung=lambda: live["rung"], clock=clock)
    return mgr, store, clock, live


def test_manager_releases_only_under_sustained_pressure_layer_by_layer(manager):
    mgr, store, clock, _ = manager
    mgr.on_snapshot(Snap(930))  # budget 530: rung 4 would fit
    clock.now = 1.0
    mgr.on_snapshot(Snap(930))
    assert mgr.resident_rung == 0 and not store.calls  # not sustained yet
    clock.now = 2.5
    mgr.on_snapshot(Snap(930))
    assert mgr.resident_rung == 4 and mgr.floor == 4 and mgr.resident_bytes == WEIGHTS[4]
    assert store.calls == [("release", 0, 4), ("release", 1, 4), ("release", 2, 4), ("settle",)]


def test_a_spike_shorter_than_sustain_changes_nothing(manager):
    mgr, store, clock, _ = manager
    mgr.on_snapshot(Snap(930))
    clock.now = 1.0
    mgr.on_snapshot(Snap(2000))  # pressure gone before it lasted
    clock.now = 5.0
    mgr.on_snapshot(Snap(2000))
    assert not store.calls and mgr.resident_rung == 0 and mgr.floor == 0


def test_release_waits_for_live_requests_below_the_target_but_raises_the_floor(manager):
    mgr, store, clock, live = manager
    live["rung"] = 1
    mgr.on_snapshot(Snap(930))
    clock.now = 3.0
    mgr.on_snapshot(Snap(930))
    assert mgr.floor == 4 and mgr.resident_rung == 0 and not store.calls  # new requests held at >= 4
    live["rung"] = None  # the rung-1 request finished
    clock.now = 3.5
    mgr.on_snapshot(Snap(930))
    assert mgr.resident_rung == 4


def test_a_reload_cut_short_puts_every_layer_back(manager):
    """No memory for the next tail halfway through a reload: the layers already reloaded are released again, so
    the bytes the controller reads are the bytes held, and the floor stays where it was."""
    mgr, store, _, _ = manager
    mgr.apply(6)
    real = store.reload_layer

    def reload_layer(layer, rung):
        if layer == 2:
            raise MemoryError("no memory for the next tail")
        real(layer, rung)

    store.reload_layer = reload_layer
    with pytest.raises(MemoryError):
        mgr.apply(0)
    assert store.layer_rung == [6, 6, 6] and mgr.resident_rung == 6 and mgr.floor == 6
    assert mgr.resident_bytes == WEIGHTS[6]


def test_reload_restores_every_layer_before_lowering_the_floor(manager):
    mgr, store, clock, _ = manager
    mgr.apply(6)
    assert mgr.floor == 6
    # released bytes went back to the device: available rose by WEIGHTS[0] - WEIGHTS[6]
    freed = (WEIGHTS[0] - WEIGHTS[6]) // MB
    mgr.on_snapshot(Snap(1100 + freed))  # budget 1100 + 600 - 1000 - ... : rung 0 fits with margin
    clock.now = 2.1
    mgr.on_snapshot(Snap(1100 + freed))
    assert mgr.resident_rung == 0 and mgr.floor == 0 and mgr.resident_bytes == WEIGHTS[0]
    assert [c[0] for c in store.calls[-4:]] == ["reload", "reload", "reload", "settle"]
    assert [h[1] for h in mgr.history] == [6, 0]


def test_tpot_gaps_age_out_so_a_quiet_spell_releases_the_latency_rule():
    now = [100.0]
    window = TpotWindow(size=8, max_age_s=60.0, clock=lambda: now[0])
    window.add([0.2, 0.2])  # a slow burst
    now[0] += 30.0
    window.add([0.01])
    assert window.reading() == (0.2, 2)
    now[0] += 31.0  # the burst's gaps are 61 s old: only the recent one counts
    assert window.reading() == (0.01, 2)
    now[0] += 60.0
    assert window.reading() == (None, 2)  # nothing recent: no reading, the latency rule asks for nothing
