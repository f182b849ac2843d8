"""Helpers of the deployment tests: repo paths, the metric contract, PromQL name extraction, HTTP and processes."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# DESIGN.md section 6: the metric names the server exports (counters with their exposed `_total`)
CONTRACT = frozenset({
    "uniql_time_to_first_token_seconds", "uniql_inter_token_latency_seconds", "uniql_e2e_request_latency_seconds",
    "uniql_prompt_tokens_total", "uniql_generation_tokens_total", "uniql_num_requests_running",
    "uniql_num_requests_waiting", "uniql_request_prune_rate", "uniql_prune_rate", "uniql_memory_available_bytes",
    "uniql_memory_used_bytes", "uniql_weights_resident_bytes", "uniql_kv_cache_bytes", "uniql_gpu_utilization_ratio",
    "uniql_requests_total", "uniql_request_errors_total",
})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                          "unless", "offset", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left after dropping strings, label matchers,
    ranges, grouping clauses, function names, keywords and numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # grouping labels
    s = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", s)  # function calls
    s = re.sub(r"\b\d+(?:\.\d*)?(?:[eE][-+]?\d+)?\b", " ", s)  # numbers (0.95, 1e-9)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s) if w.lower() not in PROMQL_WORDS}


def family(name: str) -> str:
    """``x_bucket``/``x_sum``/``x_count`` of a contract histogram -> ``x``; anything else unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT:
            return name[: -len(suffix)]
    return name


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "uniql.json").read_text())


def dashboard_exprs(dash: dict | None = None) -> list[str]:
    dash = dash or load_dashboard()
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced so Prometheus can run it directly."""
    return (expr.replace('"$model"', '".*"').replace("$__rate_interval", "15s").replace("$__range", "5m")
            .replace("$__interval", "5s"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local test servers only)
        return resp.read()


def http_post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return json.loads(resp.read())


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``check()`` until it returns a truthy value (returned) or the time is up (test fails)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
            if result:
                return result
        except OSError as err:  # connection refused while starting, timeouts
            last = err
        time.sleep(0.25)
    pytest.fail(f"{what}: not ready after {timeout_s:.0f} s (last error: {last})")


def uniql_exe() -> str:
    exe = Path(sys.executable).with_name("uniql")
    return str(exe) if exe.exists() else (shutil.which("uniql") or "uniql")


def require_server() -> None:
    """Skip unless the HTTP server exists: its metrics module and the `uniql serve` command."""
    pytest.importorskip("uniql.server.metrics", reason="server not built yet (uniql.server.metrics missing)")
    probe = subprocess.run([uniql_exe(), "serve", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("`uniql serve` is not there yet: " + (probe.stderr.strip().splitlines() or ["?"])[-1])


