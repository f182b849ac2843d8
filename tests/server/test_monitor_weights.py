"""Monitor readers (host, recorded jtop readings), the timer thread, byte sizes; the weight store's real bytes."""

from __future__ import annotations

import threading
import time
from collections import namedtuple

import psutil
import pytest
import torch
from server_helpers import fails_once

from uniql.server.config import parse_bytes, resolve_reserve
from uniql.server.monitor import DeviceReading, Monitor, default_readers, read_host, read_jtop

# recorded from jetson-stats 4.x on a Jetson Orin Nano 8 GB (memory in kB, GPU load in percent)
JTOP_ORIN_NANO = {"memory": {"RAM": {"tot": 7620000, "used": 5980000, "free": 310000, "buffers": 52000,
                                     "cached": 1278000, "shared": 1904000, "lfb": 12}},
                  "stats": {"GPU": 87.5, "RAM": 0.78, "CPU1": 35}}


VMem = namedtuple("VMem", "total available")


class FakeJtop:
    """The attributes of a started ``jtop.jtop`` object that the monitor reads."""

    def __init__(self, recorded):
        self.memory, self.stats = recorded["memory"], recorded["stats"]
        self.alive = True  # a real jtop is a Thread: it ends when the jtop service goes away, keeping its last data

    def is_alive(self):
        return self.alive


def test_jtop_reading_is_unified_memory():
    reading = read_jtop(FakeJtop(JTOP_ORIN_NANO))
    assert reading.total_bytes == 7620000 * 1024
    assert reading.available_bytes == (7620000 - 5980000) * 1024  # buffers and page cache count as available
    assert reading.utilization == pytest.approx(0.875)
    readers, primary = default_readers("cuda", jetson=FakeJtop(JTOP_ORIN_NANO))
    assert primary == "jetson" and set(readers) == {"host", "jetson"}  # no separate cuda:0 on unified memory


def test_a_stopped_jtop_is_a_failed_reading_not_stale_data(monkeypatch):
    jetson = FakeJtop(JTOP_ORIN_NANO)
    readers, primary = default_readers("cpu", jetson=jetson)
    monitor = Monitor(readers, primary)
    jetson.alive = False
    jetson.memory = {"RAM": {"tot": 7620000, "used": 0}}  # what a dead client would go on returning, frozen
    with pytest.raises(RuntimeError, match="jtop has stopped"):
        read_jtop(jetson)
    # the same shared RAM, read through psutil from then on (tests/server/test_metrics_monitor_review.py)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VMem(7620000 * 1024, 3 << 30))
    assert monitor.refresh().available_bytes == 3 << 30
    assert monitor.snapshot().devices["jetson"].utilization is None


def test_host_reading_and_device_choice():
    host = read_host()
    assert 0 < host.available_bytes <= host.total_bytes and host.used_bytes >= 0
    assert default_readers("cpu")[1] == "host" and default_readers("cuda:1")[1] == "cuda:1"


def test_monitor_polls_on_its_thread_and_keeps_the_last_good_reading():
    calls = {"n": 0}
    seen = threading.Event()

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("sensor gone")
        return DeviceReading(100, 100 - calls["n"])

    monitor = Monitor({"host": flaky}, "host", interval_s=0.01)
    monitor.listeners.append(lambda snap: seen.set() if calls["n"] >= 4 else None)
    monitor.start()
    try:
        assert seen.wait(5)
    finally:
        monitor.stop()
    assert monitor.snapshot().available_bytes <= 96  # kept polling past the failure
    with pytest.raises(ValueError, match="primary"):
        Monitor({"host": flaky}, "cuda:0")


def test_a_primary_that_fails_its_first_read_is_retried():
    flaky_cuda, calls = fails_once(RuntimeError("CUDA error: device busy (transient)"), DeviceReading(8 << 30, 4 << 30))
    monitor = Monitor({"host": read_host, "cuda:0": flaky_cuda}, "cuda:0", retry_s=0.01)
    assert monitor.snapshot().available_bytes == 4 << 30 and calls["n"] == 2


def test_a_primary_that_never_reads_is_a_clear_error_at_start():
    def broken():
        raise OSError("no such device")

    with pytest.raises(RuntimeError, match="cannot read memory of cuda:0: OSError: no such device"):
        Monitor({"host": read_host, "cuda:0": broken}, "cuda:0", retry_s=0.01)


def test_a_failing_reader_is_logged_once_and_the_thread_goes_on(caplog):
    state = {"fail": False, "polls": 0}
    polled = threading.Event()

    def reader():
        if state["fail"]:
            raise OSError("sensor gone")
        return DeviceReading(100, 60)

    def count(_snapshot):
        state["polls"] += 1
        if state["polls"] >= 5:
            polled.set()

    monitor = Monitor({"host": reader}, "host", interval_s=0.01)
    monitor.listeners.append(count)
    state["fail"] = True
    with caplog.at_level("WARNING", logger="uniql.server.monitor"):
        monitor.start()
        try:
            assert polled.wait(5)
        finally:
            monitor.stop()
    assert monitor.snapshot().available_bytes == 60  # the last good reading
    assert sum("reading host failed" in r.getMessage() for r in caplog.records) == 1


def test_a_monitor_interval_of_zero_is_refused():
    with pytest.raises(ValueError, match="> 0"):
        Monitor({"host": read_host}, "host", interval_s=0)


def test_byte_sizes():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5G") == 3 << 29 and parse_bytes("4096") == 4096
    assert resolve_reserve("available-300M", 2 << 30) == (2 << 30) - (300 << 20)
    assert resolve_reserve("1G", 123) == 1 << 30
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("lots")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from uniql.runtime.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt)[0]


@pytest.mark.parametrize("host", ["dense", "int4", None])
def test_released_tails_free_exactly_the_counted_bytes_and_reload_restores_outputs(tiny_ckpt, host):
    from uniql.runtime.checkpoint import load_checkpoint
    from uniql.runtime.linear import Int4Linear
    from uniql.server.weights import ElasticWeights

    model = load_checkpoint(tiny_ckpt)[0]
    if host:  # what the CPU runner does (int4 for bfloat16 models; fp32 here keeps the comparisons exact)
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.prepare_host(torch.float32, host)
    store = ElasticWeights(model, tiny_ckpt)
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.inference_mode():
        full, light = model(ids, rung=0), model(ids, rung=6)
    assert store.resident_bytes() == store.rung_bytes[0]
    assert list(store.rung_bytes) == sorted(store.rung_bytes, reverse=True)
    assert store.rung_bytes[-1] < store.rung_bytes[0]
    held = [store.resident_bytes()]
    for layer in range(store.num_layers):  # layer by layer: the held bytes only ever fall
        store.release_layer(layer, 5)
        held.append(store.resident_bytes())
    assert held == sorted(held, reverse=True) and held[-1] < held[0]
    assert store.resident_bytes() == store.rung_bytes[5]  # the bytes counted are the bytes held
    with torch.inference_mode():
        assert torch.equal(model(ids, rung=6), light)  # rungs above the released one are untouched
    for layer in range(store.num_layers):
        store.reload_layer(layer, 3)  # an intermediate rung: a slice read must not pin the whole stored tensor
    assert store.resident_bytes() == store.rung_bytes[3]
    for layer in range(store.num_layers):
        store.reload_layer(layer, 0)  # from the memory-mapped checkpoint
    assert store.resident_bytes() == store.rung_bytes[0]
    with torch.inference_mode():
        assert torch.equal(model(ids, rung=0), full)


def test_a_reload_cut_short_inside_a_layer_is_released_back_to_the_counted_bytes(tiny_ckpt, monkeypatch):
    """No memory for a tail halfway through one layer's projections: that layer counts as reloaded, so releasing
    it back (what the residency manager does on such a failure) frees what the cut-short pass brought back."""
    from uniql.runtime.checkpoint import load_checkpoint
    from uniql.server import weights

    store = weights.ElasticWeights(load_checkpoint(tiny_ckpt)[0], tiny_ckpt)
    for layer in range(store.num_layers):
        store.release_layer(layer, 5)
    # a layer whose first projections are pruned at rung 5 (so reloading them brings bytes back)
    layer = next(i for i in range(store.num_layers)
                 if any(store.shapes[i][p][5] != store.shapes[i][p][0] for p in store.single[i][:-1]))
    real, calls = weights._reload, {"n": 0}

    def reload_then_fail(*args):
        calls["n"] += 1
        if calls["n"] == len(store.single[layer]):  # the layer's last projection
            raise MemoryError("no memory for the next tail")
        real(*args)

    monkeypatch.setattr(weights, "_reload", reload_then_fail)
    with pytest.raises(MemoryError):
        store.reload_layer(layer, 0)
    assert store.resident_bytes() > store.rung_bytes[5]  # part of layer 0 is back
    for layer in range(store.num_layers):
        store.release_layer(layer, 5)
    assert store.resident_bytes() == store.rung_bytes[5]


def test_the_http_layer_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import uniql.server.app, uniql.server.schema, uniql.server.service, uniql.server.metrics; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_monitor_never_blocks_a_reader_of_the_snapshot():
    slow_started = threading.Event()

    def slow():
        slow_started.set()
        time.sleep(2.0)
        return DeviceReading(10, 5)

    monitor = Monitor({"host": lambda: DeviceReading(10, 5)}, "host", interval_s=0.01)
    monitor.readers["host"] = slow
    monitor.start()
    try:
        assert slow_started.wait(5)
        start = time.monotonic()
        assert monitor.snapshot().available_bytes == 5
        assert time.monotonic() - start < 0.5  # the latest snapshot, not the 2 s poll (slack for a loaded CI)
    finally:
        monitor.stop()


def test_a_hanging_reader_holds_up_neither_the_others_nor_the_listeners():
    """A reader call that hangs (a stalled jtop socket) keeps its last reading after the read timeout; the other
    readers and the listeners go on at every poll, the hung call is never started twice, and its value is taken
    once it returns. The whole monitor used to freeze on it."""
    release, calls, polls_seen = threading.Event(), [], []
    free = {"n": 0}

    def stuck():
        calls.append(1)
        if len(calls) > 1:
            release.wait(30)
        return DeviceReading(100, 7 * len(calls))

    def other():
        free["n"] += 1
        return DeviceReading(10, free["n"])

    monitor = Monitor({"host": other, "cuda:0": stuck}, "cuda:0", read_timeout_s=0.05)
    monitor.listeners.append(lambda snap: polls_seen.append(snap))
    assert monitor.snapshot().devices["cuda:0"].available_bytes == 7  # first call returns at once
    start = time.monotonic()
    for _ in range(3):
        snap = monitor.refresh()
        assert snap.devices["cuda:0"].available_bytes == 7  # the hung call's last value is kept
    assert time.monotonic() - start < 2.0 and len(polls_seen) == 3
    assert [s.devices["host"].available_bytes for s in polls_seen] == [2, 3, 4]  # the other reader goes on
    assert len(calls) == 2  # one hung call, waited on, never a second one beside it
    release.set()
    deadline = time.monotonic() + 5
    while monitor.refresh().devices["cuda:0"].available_bytes != 14 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert monitor.snapshot().devices["cuda:0"].available_bytes == 14


def _reader_threads() -> int:
    return sum(t.name.startswith("uniql-read-") and t.is_alive() for t in threading.enumerate())


def test_reader_threads_end_with_the_monitor_and_survive_any_failure():
    """Reader threads end when the monitor stops or their reader is replaced (they piled up, one per reader, in
    every Monitor ever built); a reader raising even SystemExit fails that poll only; a non-positive or infinite
    read timeout is refused (it made every other poll fail)."""
    before = _reader_threads()
    calls = {"n": 0}

    def odd():
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("reader gave up")
        return DeviceReading(10, calls["n"])

    monitor = Monitor({"host": odd, "cuda:0": lambda: DeviceReading(5, 5)}, "cuda:0", read_timeout_s=1.0)
    assert monitor.refresh().devices["host"].available_bytes == 1  # calls 1 (construction) then 2 (SystemExit)
    assert monitor.refresh().devices["host"].available_bytes == 3  # the thread lived on
    monitor.readers["host"] = lambda: DeviceReading(10, 9)  # replaced: its old thread ends
    assert monitor.refresh().devices["host"].available_bytes == 9
    deadline = time.monotonic() + 5
    while _reader_threads() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _reader_threads() == before + 2
    monitor.stop()
    while _reader_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _reader_threads() == before
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="read timeout"):
            Monitor({"host": lambda: DeviceReading(1, 1)}, "host", read_timeout_s=bad)
