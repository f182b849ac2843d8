"""A real `uniql serve` on a tiny checkpoint: its /metrics has every dashboard metric, and a real Prometheus
(Debian's package) scraping it with deploy/prometheus.yml returns our series through its query API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse

import pytest
import yaml
from deploy_util import (
    CONTRACT,
    DEPLOY,
    dashboard_exprs,
    family,
    free_port,
    grafana_to_promql,
    http_get,
    metric_names,
    wait_until,
)


def exposed_families(text: str) -> set[str]:
    """Metric families named in ``# TYPE`` lines (present even before a labelled metric has samples)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def exposed_samples(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_endpoint_exports_every_dashboard_metric(live_server):
    text = http_get(f"{live_server}/metrics").decode()
    families = exposed_families(text)
    dashboard = {family(n) for e in dashboard_exprs() for n in metric_names(e)}
    assert dashboard <= CONTRACT
    assert dashboard <= families, f"dashboard metrics missing from /metrics: {sorted(dashboard - families)}"
    # after one finished completion the per-request series carry samples, not only TYPE lines
    samples = exposed_samples(text)
    for name in ("uniql_generation_tokens_total", "uniql_prompt_tokens_total", "uniql_requests_total",
                 "uniql_time_to_first_token_seconds_bucket", "uniql_request_prune_rate_bucket",
                 "uniql_memory_available_bytes", "uniql_weights_resident_bytes", "uniql_num_requests_running"):
        assert name in samples, name


# ------------------------------------------------------------------------------------------ Prometheus
def prometheus_config(tmp_path, target: str):
    """deploy/prometheus.yml as shipped, with the server's test address and a 1 s scrape interval."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "uniql")
    job["static_configs"][0]["targets"] = [target]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(live_server, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("prometheus")
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus; .ci/run does this)")
    port = free_port()
    config = prometheus_config(tmp_path, live_server.removeprefix("http://"))
    proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(f"{base}/-/ready"), 60, f"prometheus (log: {tmp_path / 'prometheus.log'})", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def query(base: str, promql: str) -> dict:
    body = json.loads(http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_server_and_returns_our_series(prometheus):
    tokens = wait_until(lambda: query(prometheus, 'uniql_generation_tokens_total{job="uniql"}')["result"],
                        30, "uniql_generation_tokens_total in Prometheus")
    assert float(tokens[0]["value"][1]) > 0 and tokens[0]["metric"]["model"]
    assert query(prometheus, 'up{job="uniql"}')["result"][0]["value"][1] == "1"
    names = {s["metric"]["__name__"] for s in query(prometheus, '{__name__=~"uniql_.*", job="uniql"}')["result"]}
    for name in ("uniql_memory_available_bytes", "uniql_weights_resident_bytes", "uniql_num_requests_waiting",
                 "uniql_inter_token_latency_seconds_bucket", "uniql_requests_total"):
        assert name in names, name


def test_prometheus_evaluates_every_dashboard_query(prometheus):
    """Each panel's query parses and runs in Prometheus (Grafana's variables filled in)."""
    wait_until(lambda: query(prometheus, "uniql_prune_rate")["result"], 30, "uniql_prune_rate in Prometheus")
    for expr in dashboard_exprs():
        query(prometheus, grafana_to_promql(expr))
