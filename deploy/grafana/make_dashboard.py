"""Writes ``deploy/grafana/uniql.json``, the Grafana dashboard of a UniQL server (edit here, then run it).

    python deploy/grafana/make_dashboard.py

Every query uses only the metric names of DESIGN.md section 6 (``server/metrics.py``); tests/deploy checks
that against the contract and against what a running ``uniql serve`` exports. Panels: TTFT / TPOT / E2E p50 and
p95 (``histogram_quantile`` over ``rate(..._bucket)``), tokens/s, the pruning rate (rung) over time and its
histogram, host/device memory available vs used, weights resident, KV cache bytes, queue depth, GPU
utilization, finished requests and error rate.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "uniql.json"
UID = "uniql-server"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
RI = "$__rate_interval"


def quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket{{{M}}}[{RI}])))"


def target(expr: str, legend: str, ref: str, **extra) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def panel(title: str, kind: str, targets: list[dict], grid: tuple[int, int, int, int], unit: str = "short",
          description: str = "", **options) -> dict:
    """A Grafana panel; ``grid`` = (x, y, w, h) on the 24-column grid."""
    x, y, w, h = grid
    p = {"title": title, "type": kind, "datasource": DS, "description": description,
         "gridPos": {"x": x, "y": y, "w": w, "h": h},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                     "tooltip": {"mode": "multi"}}, "targets": targets}
    p["options"].update(options.pop("panel_options", {}))
    p["fieldConfig"]["defaults"].update(options.pop("defaults", {}))
    p.update(options)
    return p


def latency_panel(title: str, metric: str, grid, description: str) -> dict:
    return panel(title, "timeseries", [target(quantile(0.5, metric), "p50 {{model}}", "A"),
                                       target(quantile(0.95, metric), "p95 {{model}}", "B")],
                 grid, unit="s", description=description)


def stat(title: str, expr: str, x: int, unit: str, description: str) -> dict:
    return panel(title, "stat", [target(expr, "{{model}}", "A", instant=True)], (x, 0, 4, 4), unit=unit,
                 description=description, panel_options={"reduceOptions": {"calcs": ["lastNotNull"]},
                                                         "colorMode": "value", "graphMode": "area"})


def top_row() -> list[dict]:
    return [
        stat("Tokens/s", f"sum(rate(uniql_generation_tokens_total{{{M}}}[{RI}]))", 0, "short",
             "Generated tokens per second, all requests"),
        stat("TTFT p95", quantile(0.95, "uniql_time_to_first_token_seconds"), 4, "s", "Time to first token"),
        stat("TPOT p95", quantile(0.95, "uniql_inter_token_latency_seconds"), 8, "s", "Time per output token"),
        stat("Pruning rate now", f"max(uniql_prune_rate{{{M}}})", 12, "percentunit",
             "Rung the controller would pick for a new request now"),
        stat("Requests waiting", f"sum(uniql_num_requests_waiting{{{M}}})", 16, "short",
             "Requests queued for a seat in the engine"),
        stat("Error rate", f"sum(rate(uniql_request_errors_total[{RI}])) or vector(0)", 20, "reqps",
             "HTTP errors per second (any status); 0 until the first error"),
    ]


def latency_rows() -> list[dict]:
    return [
        latency_panel("Time to first token (p50, p95)", "uniql_time_to_first_token_seconds", (0, 4, 12, 8),
                      "Arrival to first generated token"),
        latency_panel("Time per output token, TPOT (p50, p95)", "uniql_inter_token_latency_seconds",
                      (12, 4, 12, 8), "Gap between two tokens of one request"),
        panel("Tokens/s", "timeseries", [
            target(f"sum by (model) (rate(uniql_generation_tokens_total{{{M}}}[{RI}]))", "generated {{model}}", "A"),
            target(f"sum by (model) (rate(uniql_prompt_tokens_total{{{M}}}[{RI}]))", "prompt {{model}}", "B"),
        ], (0, 12, 12, 8), description="Generated and prompt tokens per second"),
        latency_panel("End-to-end request latency (p50, p95)", "uniql_e2e_request_latency_seconds",
                      (12, 12, 12, 8), "Arrival to last token"),
    ]


def rung_rows() -> list[dict]:
    served = (f"sum by (model) (rate(uniql_request_prune_rate_sum{{{M}}}[{RI}])) / "
              f"sum by (model) (rate(uniql_request_prune_rate_count{{{M}}}[{RI}]))")
    return [
        panel("Pruning rate (rung) over time", "timeseries", [
            target(f"uniql_prune_rate{{{M}}}", "controller pick now {{model}}", "A"),
            target(served, "mean served {{model}}", "B"),
        ], (0, 20, 12, 8), unit="percentunit",
            description="Rung the controller would pick now, and the mean rate served to finished requests",
            defaults={"min": 0}),  # no max: a ladder may go up to rate 0.85 (`uniql compress --rates`)
        panel("Rungs served (histogram over the time range)", "bargauge", [
            target(f"sum by (le) (increase(uniql_request_prune_rate_bucket{{{M}}}[$__range]))", "{{le}}", "A",
                   format="heatmap", instant=True),
        ], (12, 20, 12, 8), description="Requests per served pruning rate; bucket le = rate + 0.001",
            panel_options={"orientation": "vertical", "displayMode": "basic",
                           "reduceOptions": {"calcs": ["lastNotNull"]}}),
    ]


def memory_rows() -> list[dict]:
    return [
        panel("Memory available vs used (host, GPU, Jetson)", "timeseries", [
            target("uniql_memory_available_bytes", "available {{device}}", "A"),
            target("uniql_memory_used_bytes", "used {{device}}", "B"),
        ], (0, 28, 12, 8), unit="bytes", description="Per device: host, cuda:0, or jetson (unified memory)"),
        panel("Weights resident and KV cache", "timeseries", [
            target(f"uniql_weights_resident_bytes{{{M}}}", "weights {{model}}", "A"),
            target(f"uniql_kv_cache_bytes{{{M}}}", "KV cache {{model}}", "B"),
        ], (12, 28, 12, 8), unit="bytes", description="Weight bytes held and cache bytes of running requests"),
    ]


def load_rows() -> list[dict]:
    return [
        panel("Queue depth", "timeseries", [
            target(f"sum by (model) (uniql_num_requests_running{{{M}}})", "running {{model}}", "A"),
            target(f"sum by (model) (uniql_num_requests_waiting{{{M}}})", "waiting {{model}}", "B"),
        ], (0, 36, 6, 8), description="Requests decoding and requests queued"),
        panel("GPU utilization", "timeseries", [target("uniql_gpu_utilization_ratio", "{{device}}", "A")],
              (6, 36, 6, 8), unit="percentunit", description="Busy fraction (NVML or jtop)",
              defaults={"min": 0, "max": 1}),
        panel("Finished requests by reason", "timeseries", [
            target(f"sum by (finish_reason) (rate(uniql_requests_total{{{M}}}[{RI}]))", "{{finish_reason}}", "A"),
        ], (12, 36, 6, 8), unit="reqps", description="stop, length, cancelled, ..."),
        panel("Error rate by status", "timeseries", [
            target(f"sum by (status) (rate(uniql_request_errors_total[{RI}]))", "HTTP {{status}}", "A"),
            target(f"(sum(rate(uniql_request_errors_total[{RI}])) or vector(0)) / "
                   f"clamp_min(sum(rate(uniql_requests_total[{RI}])) + "
                   f"(sum(rate(uniql_request_errors_total[{RI}])) or vector(0)), 1e-9)", "error fraction", "B"),
        ], (18, 36, 6, 8), unit="short", description="Errors per second by HTTP status, and errors / all requests"),
    ]


def templating() -> dict:
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "model", "label": "model", "type": "query", "datasource": DS,
         "query": {"query": "label_values(uniql_num_requests_running, model)", "refId": "model"},
         "definition": "label_values(uniql_num_requests_running, model)", "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0},
    ]}


def dashboard() -> dict:
    panels = top_row() + latency_rows() + rung_rows() + memory_rows() + load_rows()
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {"uid": UID, "title": "UniQL server", "tags": ["uniql", "llm"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "5s",
            "time": {"from": "now-30m", "to": "now"}, "templating": templating(), "annotations": {"list": []},
            "panels": panels}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
