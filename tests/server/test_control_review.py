"""Review of the control loop and its readings: each test failed before its fix (offline, CPU only, fakes)."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import pytest
from test_controller import MB, WEIGHTS, Clock, inputs  # the same 8-rung fixture

from uniql.server.config import ServerConfig
from uniql.server.controller import ControllerConfig, RateController
from uniql.server.monitor import Monitor, read_cuda, read_host
from uniql.server.residency import ResidencyManager


# ------------------------------------------------------------------------------------------ residency timer
class Store:
    """A weight store whose released bytes go back to the device (as the real one's do after settle)."""

    num_layers, rung_bytes = 2, WEIGHTS

    def __init__(self):
        self.rung = 0

    def resident_bytes(self):
        return self.rung_bytes[self.rung]

    def release_layer(self, layer, rung):
        self.rung = rung

    reload_layer = release_layer

    def settle(self):
        pass


class Snap:
    def __init__(self, available_bytes):
        self.available_bytes = available_bytes


def test_a_shortage_that_wobbles_across_a_rung_boundary_is_still_sustained():
    """The budget sits at the rung 4 / rung 5 boundary (515 or 525 MB, 600 MB resident) for 10 s: the target goes 5,
    4, 5, ... and the sustain timer restarted at every change, so nothing was ever released. Same on recovery."""
    store, clock = Store(), Clock()
    mgr = ResidencyManager(store, reserve_bytes=1000 * MB, hysteresis_bytes=16 * MB, sustain_s=2.0, clock=clock)
    free_mb = {0: 915, 1: 925}  # device memory besides the weights (budget = free + 600 - 1000 = 515 / 525 MB)
    for i in range(20):
        clock.now = 0.5 * i
        held = store.resident_bytes()
        mgr.on_snapshot(Snap(free_mb[i % 2] * MB + WEIGHTS[0] - held))  # released bytes show up as available
    assert mgr.resident_rung in (4, 5) and mgr.floor == mgr.resident_rung
    # recovery that wobbles between "rung 0 fits with the margin" and "rung 1 does": reloaded all the same
    for i in range(20):
        clock.now = 20 + 0.5 * i
        mgr.on_snapshot(Snap((1016 + 20 * (i % 2)) * MB + WEIGHTS[0] - store.resident_bytes()))
    assert mgr.resident_rung in (0, 1) and mgr.floor == mgr.resident_rung


def test_a_spike_shorter_than_sustain_still_changes_nothing_when_it_wobbles():
    store, clock = Store(), Clock()
    mgr = ResidencyManager(store, reserve_bytes=1000 * MB, sustain_s=2.0, clock=clock)
    for i, free in enumerate((915, 925, 915, 2000, 2000, 2000, 2000, 2000, 2000)):
        clock.now = 0.5 * i
        mgr.on_snapshot(Snap(free * MB))
    assert mgr.resident_rung == 0 and mgr.floor == 0  # the shortage lasted 1.5 s: the timer restarts on recovery


# ------------------------------------------------------------------------------------------ latency hold
LATENCY = ControllerConfig(reserve_bytes=1000 * MB, hysteresis_bytes=16 * MB, tpot_target_s=0.05)  # band 40 ms


def test_a_memory_spike_is_not_held_by_the_latency_rule():
    """One request at a time with TPOT 45 ms (under the 50 ms target, above the 40 ms band): rung 0. A memory spike
    takes it to rung 7; once memory is back, the latency rule used to hold the last decision (rung 7) for as long
    as TPOT stayed in the band, although it had never climbed: the same readings gave rung 0 before the spike."""
    controller = RateController(LATENCY)
    assert controller.decide(inputs(100_000, recent_tpot_s=0.045, tpot_seq=1)).rung == 0
    assert controller.decide(inputs(850, recent_tpot_s=0.045, tpot_seq=1)).rung == 7  # budget 450 MB
    back = controller.decide(inputs(100_000, recent_tpot_s=0.045, tpot_seq=2))
    assert (back.rung, back.reason) == (0, "memory")


def test_a_latency_climb_is_still_held_in_the_band_across_a_memory_spike():
    controller = RateController(LATENCY)
    assert controller.decide(inputs(100_000, recent_tpot_s=0.06, tpot_seq=1, running=3)).rung == 1
    assert controller.decide(inputs(100_000, recent_tpot_s=0.06, tpot_seq=2, running=3)).rung == 2
    assert controller.decide(inputs(850, recent_tpot_s=0.045, tpot_seq=3)).rung == 7  # memory
    assert controller.decide(inputs(100_000, recent_tpot_s=0.045, tpot_seq=4)).rung == 2  # latency's own climb
    assert controller.decide(inputs(100_000, recent_tpot_s=0.03, tpot_seq=5)).rung == 0  # back in the band


# ------------------------------------------------------------------------------------------ readers
def fake_pynvml(loads: list[int]) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=loads[handle])
    return nvml


def test_gpu_utilization_is_read_for_the_visible_gpu(monkeypatch):
    """With CUDA_VISIBLE_DEVICES=2,3 the server's cuda:0 is NVML's GPU 2; NVML's GPU 0 (another job's) was read."""
    from uniql.server import monitor

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([10, 20, 30, 40]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert monitor._nvml_utilization(0) == pytest.approx(0.30)
    assert monitor._nvml_utilization(1) == pytest.approx(0.40)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert monitor._nvml_utilization(1) == pytest.approx(0.20)


GiB = 1 << 30
VMem = namedtuple("VMem", "total available")


def fake_cuda(monkeypatch, integrated: bool, free: int, total: int, reserved: int = 0, allocated: int = 0):
    import psutil
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(is_integrated=int(integrated), total_memory=total))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VMem(8 * GiB, 5 * GiB))
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 25.0)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)


def test_an_integrated_gpu_reads_unified_memory_as_available_not_driver_free(monkeypatch):
    """A Jetson whose jtop is missing (or failed to start) serving with --device cuda: cudaMemGetInfo's free
    bytes leave out the page cache the kernel reclaims (here 1 of 5 GiB available), which read as pressure."""
    fake_cuda(monkeypatch, integrated=True, free=1 * GiB, total=8 * GiB, reserved=300 * MB, allocated=200 * MB)
    reading = read_cuda(0)
    assert reading.total_bytes == read_host().total_bytes == 8 * GiB
    assert reading.available_bytes == 5 * GiB + 100 * MB  # the host's available + the allocator's free blocks
    assert reading.utilization is None  # no NVML on Tegra; the host's CPU load is not a GPU load


def test_a_discrete_gpu_still_reads_the_driver(monkeypatch):
    fake_cuda(monkeypatch, integrated=False, free=10 * GiB, total=80 * GiB, reserved=3 * GiB, allocated=1 * GiB)
    reading = read_cuda(0)
    assert (reading.total_bytes, reading.available_bytes) == (80 * GiB, 12 * GiB)


# ------------------------------------------------------------------------------------------ config
def test_a_monitor_interval_no_timer_can_wait_is_refused():
    """``Event.wait(inf)`` raises OverflowError in the monitor thread, which died at its first wait: the snapshot
    froze at start and the controller and residency acted on it for good."""
    for interval in (float("inf"), 1e12):
        with pytest.raises(ValueError, match="--monitor-interval"):
            ServerConfig(monitor_interval_s=interval).check()
        with pytest.raises(ValueError, match="monitor interval"):
            Monitor({"host": read_host}, "host", interval_s=interval)
    ServerConfig(monitor_interval_s=3600).check()
