"""Prometheus metrics of the server: the ONE list of names (the Grafana dashboard is built from it).

Names follow DESIGN.md section 6 (``uniql_`` prefix, base units, vLLM's names where the meaning is the same).
Every app gets its own ``CollectorRegistry`` so several servers in one process (tests) never clash.
No torch here: this module belongs to the HTTP layer.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# the single source of metric names (counters without "_total": prometheus-client appends it on exposition)
TTFT = "uniql_time_to_first_token_seconds"
ITL = "uniql_inter_token_latency_seconds"
E2E = "uniql_e2e_request_latency_seconds"
PROMPT_TOKENS = "uniql_prompt_tokens"  # exposed as uniql_prompt_tokens_total
GENERATION_TOKENS = "uniql_generation_tokens"  # exposed as uniql_generation_tokens_total
RUNNING = "uniql_num_requests_running"
WAITING = "uniql_num_requests_waiting"
REQUEST_PRUNE_RATE = "uniql_request_prune_rate"
PRUNE_RATE = "uniql_prune_rate"
MEMORY_AVAILABLE = "uniql_memory_available_bytes"
MEMORY_USED = "uniql_memory_used_bytes"
WEIGHTS_RESIDENT = "uniql_weights_resident_bytes"
KV_CACHE = "uniql_kv_cache_bytes"
GPU_UTILIZATION = "uniql_gpu_utilization_ratio"
REQUESTS = "uniql_requests"  # exposed as uniql_requests_total
REQUEST_ERRORS = "uniql_request_errors"  # exposed as uniql_request_errors_total

EXPOSED_NAMES = (TTFT, ITL, E2E, PROMPT_TOKENS + "_total", GENERATION_TOKENS + "_total", RUNNING, WAITING,
                 REQUEST_PRUNE_RATE, PRUNE_RATE, MEMORY_AVAILABLE, MEMORY_USED, WEIGHTS_RESIDENT, KV_CACHE,
                 GPU_UTILIZATION, REQUESTS + "_total", REQUEST_ERRORS + "_total")


def _ladder(low: float, high: float) -> tuple[float, ...]:
    """Bounds 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k from ``low`` to ``high``: neighbours at most 1/3 apart, so
    a quantile interpolated inside one bucket is off by at most ~15 % (a 2x step cannot tell 2.5 ms from 3.9 ms)."""
    steps = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    bounds = (round(s * 10.0**k, 6) for k in range(-4, 3) for s in steps)
    return tuple(b for b in bounds if low <= b <= high)


# TPOT: ~2.5-7 ms a token on an H100 (benchmarks/results/decode_h100.json), tens to hundreds of ms on a Jetson
# Orin Nano: fine steps from 1 ms to 1 s, coarse above (a stall). TTFT includes queueing: fine from 5 ms (a short
# prompt on a fast GPU) to 5 s, coarse up to 2 minutes (a long queue on the Jetson) so p95 does not pin at the top
ITL_BUCKETS = _ladder(0.001, 1.0) + (2.0, 5.0)
TTFT_BUCKETS = _ladder(0.005, 5.0) + (7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# one bucket per multiple of 0.05 (upper bound just above the rate) over every rate a ladder may have: the default
# ladder stops at 0.35, but a ladder (`CompressConfig.rates`) may hold any rate up to max_prune (0.85 by default,
# at most 1), and every rate above the old top bound (0.451) fell into +Inf, out of the "Rungs served" panel
PRUNE_RATE_BUCKETS = tuple(round(0.05 * i + 0.001, 3) for i in range(21))


class ServerMetrics:
    """All metric objects of one server, registered in its own registry."""

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        r, m, d = self.registry, ["model"], ["device"]
        self.ttft = Histogram(TTFT, "Time to first token", m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(ITL, "Time between two tokens of a request (TPOT)", m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(E2E, "Request latency from arrival to last token", m, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter(GENERATION_TOKENS, "Tokens generated", m, registry=r)
        self.running = Gauge(RUNNING, "Requests decoding now", m, registry=r)
        self.waiting = Gauge(WAITING, "Requests in the queue", m, registry=r)
        self.request_prune_rate = Histogram(REQUEST_PRUNE_RATE, "Pruning rate served per request", m,
                                            buckets=PRUNE_RATE_BUCKETS, registry=r)
        self.prune_rate = Gauge(PRUNE_RATE, "Pruning rate the controller would pick now", m, registry=r)
        self.memory_available = Gauge(MEMORY_AVAILABLE, "Memory available on a device", d, registry=r)
        self.memory_used = Gauge(MEMORY_USED, "Memory used on a device", d, registry=r)
        self.weights_resident = Gauge(WEIGHTS_RESIDENT, "Weight bytes held in memory", m, registry=r)
        self.kv_cache = Gauge(KV_CACHE, "KV cache bytes held by running requests", m, registry=r)
        self.gpu_utilization = Gauge(GPU_UTILIZATION, "GPU busy fraction (0..1)", d, registry=r)
        self.requests = Counter(REQUESTS, "Finished requests by finish reason", ["model", "finish_reason"],
                                registry=r)
        self.errors = Counter(REQUEST_ERRORS, "Requests answered with an HTTP error, by status", ["status"],
                              registry=r)

    # ------------------------------------------------------------------------------------ per request
    def observe_request(self, ttft_s: float | None, token_gaps_s: list[float], e2e_s: float, prompt_tokens: int,
                        generated: int, prune_rate: float, finish_reason: str) -> None:
        m = self.model
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
        for gap in token_gaps_s:
            self.itl.labels(m).observe(gap)
        self.e2e.labels(m).observe(e2e_s)
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generated)
        self.request_prune_rate.labels(m).observe(prune_rate)
        self.requests.labels(m, finish_reason).inc()

    def observe_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    # ------------------------------------------------------------------------------------- gauges
    def set_devices(self, devices: dict) -> None:
        """``devices``: name -> DeviceReading-like (available_bytes, used_bytes, utilization or None)."""
        for name, reading in devices.items():
            self.memory_available.labels(name).set(reading.available_bytes)
            self.memory_used.labels(name).set(reading.used_bytes)
            if name == "host":  # the host's utilization is CPU load, not GPU
                continue
            if reading.utilization is not None:
                self.gpu_utilization.labels(name).set(reading.utilization)
            else:  # NVML or jtop stopped answering: no series, not the last value frozen as if still current
                with contextlib.suppress(KeyError):  # prometheus-client before 0.21 raises for an unset series
                    self.gpu_utilization.remove(name)

    def set_engine(self, running: int, waiting: int, kv_cache_bytes: int, weights_resident_bytes: int,
                   prune_rate: float) -> None:
        m = self.model
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        self.kv_cache.labels(m).set(kv_cache_bytes)
        self.weights_resident.labels(m).set(weights_resident_bytes)
        self.prune_rate.labels(m).set(prune_rate)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
