"""Operator review of the metrics and the monitor (Jetson Orin Nano and CUDA server): each test failed before its
fix (offline, CPU only, fakes)."""

from __future__ import annotations

import logging
from collections import namedtuple

import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_monitor_weights import JTOP_ORIN_NANO, FakeJtop

from uniql.compressor.compress import CompressConfig
from uniql.server.metrics import ITL_BUCKETS, PRUNE_RATE_BUCKETS, TTFT_BUCKETS, ServerMetrics
from uniql.server.monitor import DeviceReading, Monitor, default_readers

MiB, GiB = 1 << 20, 1 << 30
JTOP_AVAILABLE = (7620000 - 5980000) * 1024  # the recorded Orin Nano reading: total - used
VMem = namedtuple("VMem", "total available")


def fake_allocator(monkeypatch, reserved: int, allocated: int) -> None:
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated)


# ------------------------------------------------------------------------------------------ Jetson memory
def test_jetson_counts_the_allocators_free_blocks_as_available(monkeypatch):
    """On the Jetson (jtop running) the blocks torch's caching allocator keeps after a large prefill read as used,
    as pressure, while read_cuda (discrete GPU, or Jetson without jtop) counts them as available: the same board
    picked a lower rung with jtop running than without it."""
    fake_allocator(monkeypatch, reserved=900 * MiB, allocated=600 * MiB)
    readers, primary = default_readers("cuda", jetson=FakeJtop(JTOP_ORIN_NANO))
    reading = readers[primary]()
    assert reading.available_bytes == JTOP_AVAILABLE + 300 * MiB
    assert reading.total_bytes == 7620000 * 1024 and reading.utilization == pytest.approx(0.875)
    readers, primary = default_readers("cpu", jetson=FakeJtop(JTOP_ORIN_NANO))
    assert readers[primary]().available_bytes == JTOP_AVAILABLE  # --device cpu: no CUDA allocator to count


def test_a_jtop_that_stops_mid_run_falls_back_to_psutil(monkeypatch, caplog):
    """jtop's service restarting (an apt upgrade of jetson-stats) ends the client for good: the monitor kept its
    last reading forever, so the controller and residency acted on frozen memory while the board filled up."""
    jetson = FakeJtop(JTOP_ORIN_NANO)
    readers, primary = default_readers("cpu", jetson=jetson)
    monitor = Monitor(readers, primary)
    assert monitor.snapshot().available_bytes == JTOP_AVAILABLE
    jetson.alive = False
    ram = {"available": 2 * GiB}
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VMem(8 * GiB, ram["available"]))
    with caplog.at_level(logging.WARNING, logger="uniql.server.monitor"):
        assert monitor.refresh().available_bytes == 2 * GiB
        ram["available"] = 1 * GiB  # another process takes RAM: the reading follows it
        assert monitor.refresh().available_bytes == 1 * GiB
    assert monitor.snapshot().devices["jetson"].utilization is None  # no GPU load without jtop (not CPU load)
    assert sum("jtop failed" in r.getMessage() for r in caplog.records) == 1  # polled twice a second: logged once
    jetson.alive = True  # a client that answers again is read again
    assert monitor.refresh().available_bytes == JTOP_AVAILABLE


# ------------------------------------------------------------------------------------------ metrics
def samples(metrics: ServerMetrics, name: str) -> dict[tuple, float]:
    text = metrics.exposition()[0].decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_gpu_utilization_goes_away_when_its_reading_stops():
    """NVML failing mid-run (or jtop falling back to psutil) gives utilization None: the gauge kept its last value,
    a flat line on the dashboard that looked like a GPU still busy at 93 %."""
    metrics = ServerMetrics("m")
    metrics.set_devices({"host": DeviceReading(8 * GiB, 4 * GiB, 0.5), "cuda:0": DeviceReading(80 * GiB, GiB, 0.93)})
    assert samples(metrics, "uniql_gpu_utilization_ratio") == {(("device", "cuda:0"),): pytest.approx(0.93)}
    metrics.set_devices({"host": DeviceReading(8 * GiB, 4 * GiB, 0.5), "cuda:0": DeviceReading(80 * GiB, GiB, None)})
    assert samples(metrics, "uniql_gpu_utilization_ratio") == {}
    assert samples(metrics, "uniql_memory_available_bytes")[(("device", "cuda:0"),)] == GiB  # memory still read
    metrics.set_devices({"cuda:0": DeviceReading(80 * GiB, GiB, None)})  # never set: no error either


def widest_step(buckets: tuple[float, ...], low: float, high: float) -> float:
    inside = [b for b in buckets if low <= b <= high]
    return max(b / a for a, b in zip(inside[:-1], inside[1:], strict=True))


@pytest.mark.parametrize(("buckets", "low", "high"), [
    (ITL_BUCKETS, 0.001, 0.01),   # TPOT on an H100: 2.5-7 ms a token (benchmarks/results/decode_h100.json)
    (ITL_BUCKETS, 0.01, 1.0),     # TPOT on a Jetson Orin Nano: tens to hundreds of ms
    (TTFT_BUCKETS, 0.005, 0.1),   # TTFT of a short prompt on a fast GPU
    (TTFT_BUCKETS, 0.1, 5.0),     # TTFT on a Jetson, long prompts
])
def test_latency_buckets_resolve_a_fast_gpu_and_a_jetson(buckets, low, high):
    """histogram_quantile interpolates inside one bucket: with 2x steps (1-2-4 ms, 10-20-40 ms) a p50 of 2.5 ms and
    one of 3.9 ms both read 3 ms, and TTFT had no bucket under 10 ms. Neighbours at most 1/3 apart keep the
    quantile within ~15 %."""
    assert buckets[0] <= low and buckets[-1] >= high
    assert widest_step(buckets, low, high) <= 4 / 3 + 1e-9
    assert list(buckets) == sorted(set(buckets))


def test_ttft_buckets_reach_a_long_queue():
    """TTFT counts queueing: on a busy Jetson it passes a minute, where every p95 pinned at the top bound (60 s)."""
    assert TTFT_BUCKETS[-1] >= 120.0 and ITL_BUCKETS[-1] >= 2.0


def test_every_rate_a_ladder_may_have_gets_its_own_bucket():
    """`uniql compress --rates` accepts any rate up to max_prune (0.85): the buckets stopped at 0.451, so a ladder
    with rates 0.5 / 0.7 served them all into +Inf and the "Rungs served" panel lost them."""
    top = CompressConfig.__dataclass_fields__["max_prune"].default
    metrics = ServerMetrics("m")
    for rate in (0.0, 0.35, 0.5, 0.7, top):
        metrics.observe_request(0.1, [], 0.2, 3, 1, rate, "stop")
    buckets = samples(metrics, "uniql_request_prune_rate_bucket")
    counts = [buckets[(("le", le), ("model", "m"))] for le in ("0.001", "0.351", "0.501", "0.701", "0.851")]
    assert counts == [1, 2, 3, 4, 5]  # each rate in the bucket just above it, none left for +Inf only
    assert PRUNE_RATE_BUCKETS[-1] > 1.0
