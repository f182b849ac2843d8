"""The adaptive service over a fake backend: the controller sees every choice's cache, a monitor that cannot read
memory fails the load with a clear error, and a failed load shuts the loaded backend down."""

from __future__ import annotations

import asyncio
import time

import pytest
from server_helpers import fails_once

from uniql.runtime.request import SamplingParams
from uniql.server.app import AppState
from uniql.server.config import ServerConfig
from uniql.server.metrics import ServerMetrics
from uniql.server.monitor import DeviceReading, Monitor
from uniql.server.service import AdaptiveService

MB = 1 << 20
RUNG_BYTES = tuple(w * MB for w in (600, 580, 560, 540, 520, 500, 470, 440))
CACHE_PER_SEQUENCE = 10 * MB


class FakeWeights:
    num_layers, rung_bytes = 1, RUNG_BYTES

    def resident_bytes(self):
        return self.rung_bytes[0]


class FakeBackend:
    """What the service reads from ``bridge.EngineBackend``; ``submit`` returns streams that end at once."""

    weights, rates, max_model_len, dtype = FakeWeights(), (0.0, .05, .1, .15, .2, .25, .3, .35), 256, "float32"

    def __init__(self):
        self.shutdowns = 0
        self.committed = 0  # cache bytes of the requests submitted (they never finish here)

    def nearest_rung(self, rate):
        return 0

    def cache_bytes(self, max_len):
        return (CACHE_PER_SEQUENCE,) * len(RUNG_BYTES)  # one sequence's cache at each rung

    def submit(self, ids, params, rung):
        self.committed += CACHE_PER_SEQUENCE

        async def events():
            return
            yield

        return "id", events()

    def cancel(self, request_id):
        pass

    def live_min_rung(self):
        return None

    def change_weights(self, change):
        change()

    def load_stats(self):
        return {"running": 0, "waiting": 0, "kv_cache_bytes": 0, "live_min_rung": None}

    def committed_cache_bytes(self):
        return self.committed

    def shutdown(self):
        self.shutdowns += 1


def service(available_mb: int) -> AdaptiveService:
    monitor = Monitor({"host": lambda: DeviceReading(10_000 * MB, available_mb * MB)}, "host")
    return AdaptiveService(FakeBackend(), ServerConfig(memory_reserve="0", residency=False), ServerMetrics("m"),
                           monitor)


@pytest.mark.parametrize(("n", "rung"), [(1, 0), (4, 2)])
def test_every_choice_counts_its_own_cache(n, rung):
    # budget = available + resident - reserve = 15 + 600 = 615 MB. Rung 0 needs 600 + n * 10 MB: one sequence
    # fits (610); four need 640, rung 1 needs 580 + 40 = 620, rung 2 needs 560 + 40 = 600
    admission = asyncio.run(service(15).admit([1, 2, 3], [SamplingParams(max_tokens=8)] * n, None))
    assert (admission.decision.rung, admission.decision.reason) == (rung, "memory")


def test_a_burst_admitted_on_one_reading_counts_the_caches_admitted_before_it():
    # budget 615 MB as above, and the memory reading does not move: the first request fits rung 0 (610), the second
    # must not (its cache and the first one's: 620), though no reading has seen the first one's cache yet
    svc = service(15)
    first = asyncio.run(svc.admit([1, 2, 3], [SamplingParams(max_tokens=8)], None))
    second = asyncio.run(svc.admit([1, 2, 3], [SamplingParams(max_tokens=8)], None))
    assert first.decision.rung == 0 and second.decision.rung == 1


def test_a_primary_reader_that_fails_once_at_start_does_not_break_the_service():
    flaky, _ = fails_once(RuntimeError("transient read error"), DeviceReading(10_000 * MB, 5_000 * MB))
    monitor = Monitor({"host": lambda: DeviceReading(1, 1), "cuda:0": flaky}, "cuda:0", retry_s=0.01)
    svc = AdaptiveService(FakeBackend(), ServerConfig(memory_reserve="0"), ServerMetrics("m"), monitor)
    assert svc.state()["memory"]["available_bytes"] == 5_000 * MB


def test_a_failed_load_says_why_and_shuts_the_backend_down():
    backend = FakeBackend()

    def broken():
        raise OSError("GPU lost")

    state = AppState(ServerConfig(), lambda: backend,
                     lambda: Monitor({"host": lambda: DeviceReading(1, 1), "cuda:0": broken}, "cuda:0", retry_s=0.01))
    state.load()
    assert state.service is None and backend.shutdowns == 1
    assert state.load_error == "RuntimeError: cannot read memory of cuda:0: OSError: GPU lost"


def test_latency_is_measured_on_the_engine_clock_not_when_a_slow_client_reads():
    from uniql.runtime.request import TokenEvent

    svc = service(5_000)
    start = time.monotonic()

    def submit(ids, params, rung):  # tokens 10 ms apart on the engine's clock
        async def events():
            for i in range(4):
                yield TokenEvent("id", 7, "x", finish_reason="length" if i == 3 else None, time_s=start + 0.01 * i)
        return "id", events()

    svc.backend.submit = submit

    async def slow_client():
        admission = await svc.admit([1, 2, 3], [SamplingParams(max_tokens=4)], None)
        async for _ in admission.streams[0]:
            await asyncio.sleep(0.05)  # the reader lags 50 ms per token

    asyncio.run(slow_client())
    assert svc.tpot.reading()[0] == pytest.approx(0.01)
