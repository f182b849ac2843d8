"""Prometheus config (checked by the real promtool), docker-compose files and the systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from deploy_util import DEPLOY, REPO, uniql_exe

PROMTOOL_MISSING = "promtool not installed (Debian: apt-get install prometheus; .ci/run does this)"


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose's `!reset` tag (an override clearing an inherited key)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose(name: str) -> dict:
    return yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)  # noqa: S506 (safe loader subclass)


# ------------------------------------------------------------------------------------------ prometheus
def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_MISSING)
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_servers_default_address():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "uniql")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "127.0.0.1:8000" in job["static_configs"][0]["targets"]


# ------------------------------------------------------------------------------------------ compose
def host_path(spec: str) -> str:
    return spec.split(":", 1)[0]


def test_compose_runs_server_prometheus_and_grafana_with_existing_files():
    services = compose("docker-compose.yml")["services"]
    assert set(services) == {"uniql", "prometheus", "grafana"}
    assert services["uniql"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["uniql"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name  # one prometheus.yml for compose and bare metal
        for spec in service.get("volumes", []):
            path = host_path(spec)
            if path.startswith("."):
                assert (DEPLOY / path).exists(), f"{name} mounts missing {path}"


def test_compose_serves_the_checkpoint_on_the_port_prometheus_scrapes():
    uniql = compose("docker-compose.yml")["services"]["uniql"]
    command = uniql["command"]
    assert command[command.index("--port") + 1] == "8000"
    assert any(v.endswith(":/models/uniql:ro") for v in uniql["volumes"])


def test_jetson_override_uses_the_jetson_image_runtime_and_jtop_socket():
    uniql = compose("docker-compose.jetson.yml")["services"]["uniql"]
    assert uniql["build"]["dockerfile"] == "Dockerfile.jetson" and (REPO / "Dockerfile.jetson").is_file()
    assert uniql["runtime"] == "nvidia"
    assert "/run/jtop.sock:/run/jtop.sock" in uniql["volumes"]
    assert uniql["deploy"] is None  # !reset: no x86 device reservation on Jetson


def test_jetson_server_keeps_the_video_group_for_the_gpu():
    """Dockerfile.jetson adds its user to `video` (L4T's GPU nodes are root:video 0660), but `USER 1000:1000`
    named a group, and Docker then ran with that group only: the non-root server saw no GPU."""
    groups = compose("docker-compose.jetson.yml")["services"]["uniql"]["group_add"]
    user = re.search(r"^USER (\S+)$", (REPO / "Dockerfile.jetson").read_text(), flags=re.M).group(1)
    assert ":" not in user and "video" in groups


# ------------------------------------------------------------------------------------------ systemd
def unit_entries(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values (systemd allows repeated keys such as Environment)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_systemd_unit_runs_uniql_serve():
    entries = unit_entries((DEPLOY / "uniql.service").read_text())
    exec_start = entries["Service.ExecStart"][0]
    assert re.search(r"/bin/uniql serve \$\{UNIQL_CKPT\} --host 127\.0\.0\.1 --port 8000 --device cuda", exec_start)
    assert entries["Service.Restart"] == ["on-failure"]
    assert entries["Install.WantedBy"] == ["multi-user.target"]
    assert entries["Service.User"] == ["uniql"]
    assert any("TRITON_CACHE_DIR=" in e for e in entries["Service.Environment"])


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (package systemd); the unit's fields are still checked above")
    # verify the unit as installed, with ExecStart pointing at this checkout's entry point
    text = (DEPLOY / "uniql.service").read_text().replace("/opt/uniql/.venv/bin/uniql", uniql_exe())
    unit = tmp_path / "uniql.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Unknown" not in output and "Invalid" not in output, output
