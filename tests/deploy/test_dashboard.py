"""The Grafana dashboard: generated file up to date, well formed, every query on contract metric names only."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml
from deploy_util import CONTRACT, DEPLOY, dashboard_exprs, family, load_dashboard, metric_names

REQUIRED_PANELS = ("Time to first token", "Time per output token", "Tokens/s", "Pruning rate (rung) over time",
                   "Rungs served (histogram", "Memory available vs used", "Weights resident and KV cache",
                   "Queue depth", "Error rate by status")


def _generator():
    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_the_generators_output():
    """deploy/grafana/uniql.json is written by make_dashboard.py: edit the script, then rerun it."""
    assert (DEPLOY / "grafana" / "uniql.json").read_text() == _generator().render()


def test_every_query_uses_only_contract_metrics():
    used = set()
    for expr in dashboard_exprs():
        names = {family(n) for n in metric_names(expr)}
        assert names, f"no metric in {expr!r}"
        assert names <= CONTRACT, f"{expr!r} uses {sorted(names - CONTRACT)}, not in DESIGN.md section 6"
        used |= names
    assert used == CONTRACT, f"contract metrics without a panel: {sorted(CONTRACT - used)}"


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(uniql_time_to_first_token_seconds_bucket'
            '{model=~"$model"}[$__rate_interval]))) / clamp_min(sum(uniql_prune_rate) or vector(0), 1e-9)')
    assert metric_names(expr) == {"uniql_time_to_first_token_seconds_bucket", "uniql_prune_rate"}
    assert family("uniql_time_to_first_token_seconds_bucket") == "uniql_time_to_first_token_seconds"
    assert family("uniql_requests_total") == "uniql_requests_total"


def test_latency_panels_show_p50_and_p95_from_histogram_buckets():
    panels = {p["title"]: p for p in load_dashboard()["panels"]}
    for title in ("Time to first token (p50, p95)", "Time per output token, TPOT (p50, p95)"):
        exprs = [t["expr"] for t in panels[title]["targets"]]
        assert any(e.startswith("histogram_quantile(0.5,") for e in exprs)
        assert any(e.startswith("histogram_quantile(0.95,") for e in exprs)
        assert all("_bucket{" in e and "rate(" in e for e in exprs)
        assert panels[title]["fieldConfig"]["defaults"]["unit"] == "s"


def test_pruning_rate_panel_does_not_clip_a_ladder_above_0_4():
    """The y axis stopped at 0.4 while `uniql compress --rates` takes rates up to 0.85: higher rungs left the plot."""
    panel = next(p for p in load_dashboard()["panels"] if p["title"].startswith("Pruning rate (rung) over time"))
    assert panel["fieldConfig"]["defaults"].get("max", 1.0) >= 1.0


def test_dashboard_structure():
    dash = load_dashboard()
    titles = [p["title"] for p in dash["panels"]]
    for required in REQUIRED_PANELS:
        assert any(t.startswith(required) for t in titles), f"missing panel {required!r}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, p["title"]
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" and t["refId"] for t in p["targets"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "uniql_" in variables["model"]["definition"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    prov = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"] and source["url"].endswith(":9090")
    provider = yaml.safe_load((prov / "dashboards" / "uniql.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/uniql.json:{provider['options']['path']}/uniql.json:ro" in mounts


def test_server_metric_list_matches_the_contract():
    """The server's own list of exported names (server/metrics.py) is the DESIGN.md list."""
    metrics = pytest.importorskip("uniql.server.metrics", reason="server not built yet (uniql.server.metrics)")
    assert set(metrics.EXPOSED_NAMES) == CONTRACT


def _server_labels() -> dict[str, set[str]]:
    """Exposed family name -> label names, from the server's own metric objects (server/metrics.py)."""
    metrics = pytest.importorskip("uniql.server.metrics", reason="server not built yet (uniql.server.metrics)")
    out = {}
    for obj in vars(metrics.ServerMetrics("m")).values():
        if hasattr(obj, "_labelnames"):
            out[obj._name + ("_total" if obj._type == "counter" else "")] = set(obj._labelnames)
    return out


def test_every_query_filters_and_groups_by_labels_the_metric_has():
    """A matcher on a label the metric lacks still matches with `=~".*"` (All), so Prometheus would not notice:
    `{model=~"$model"}` on a metric without `model` silently ignores the variable; `sum by (x)` on a missing x
    collapses every series into one."""
    labels = _server_labels()
    assert set(labels) == CONTRACT
    for expr in dashboard_exprs():
        metrics = {family(n) for n in metric_names(expr)}
        for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
            used, have = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)), labels[family(name)]
            assert used <= have, f"{expr!r}: {family(name)} has no label {sorted(used - have)}"
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            wanted = {g.strip() for g in group.split(",")} - {"le", ""}
            for name in metrics:
                assert wanted <= labels[name], f"{expr!r}: {name} has no label {sorted(wanted - labels[name])}"
