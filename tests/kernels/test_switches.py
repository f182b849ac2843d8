"""The decode-path switches: one registry (``kernels/switches.SWITCHES``) that every reader goes through, checked
by the CLI before a model loads, and the README's switch table in step with it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from uniql.cli import main
from uniql.kernels import switches

REPO = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("kernels", "runtime", "server", "compressor", "src") for p in (REPO / d).rglob("*.py")]


def test_every_switch_reader_goes_through_the_registry():
    """No module reads a UNIQL_* switch with its own choices / default (they would drift from the registry and the
    CLI's check); every registered switch is read somewhere; other UNIQL_* reads are the listed non-switches."""
    read, direct = set(), set()
    for path in SOURCES:
        text = path.read_text()
        if path.name != "switches.py":
            assert 'env_choice("UNIQL_' not in text, path
            direct |= set(re.findall(r'environ(?:\.get\(|\[)"(UNIQL_[A-Z0-9_]+)"', text))
        read |= set(re.findall(r'switch\("(UNIQL_[A-Z0-9_]+)"\)', text))
    assert read == set(switches.SWITCHES)
    assert direct and direct <= set(switches.OTHER_VARIABLES), direct


def test_defaults_are_accepted_values_and_typos_are_refused(monkeypatch):
    for name, (choices, default) in switches.SWITCHES.items():
        monkeypatch.delenv(name, raising=False)
        assert default in choices and switches.switch(name) == default
        monkeypatch.setenv(name, "")  # empty = unset
        assert switches.switch(name) == default
        monkeypatch.setenv(name, choices[-1])
        assert switches.switch(name) == choices[-1]
        monkeypatch.setenv(name, "on")
        with pytest.raises(ValueError, match=f"{name} must be"):
            switches.check_switches()
        monkeypatch.delenv(name)


def test_an_unknown_uniql_variable_is_named(monkeypatch, caplog):
    for name in list(switches.SWITCHES) + ["UNIQL_SPLITK_STPE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UNIQL_SPLITK_STPE", "all")  # a misspelt switch would otherwise be ignored
    monkeypatch.setenv("UNIQL_DATA_DIR", "/data")  # read elsewhere: not reported
    with caplog.at_level(logging.WARNING):
        assert switches.check_switches() == ["UNIQL_SPLITK_STPE"]
    assert "UNIQL_SPLITK_STPE is set but UniQL reads no such variable" in caplog.text
    with pytest.raises(ValueError, match="UNIQL_SPLITK_STPE set, but UniQL reads no such variable"):
        switches.check_switches(strict=True)  # the benchmarks: an A/B must not time the default by mistake


def test_the_cli_refuses_a_mistyped_switch_before_it_loads_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("UNIQL_SPLITK_STEP", "al")
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "UNIQL_SPLITK_STEP must be 4, 8 or all, got 'al'" in err and "missing" not in err


def test_readme_switch_table_lists_every_switch_with_its_default():
    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(UNIQL_[A-Z0-9_]+)` \| ([^|]+) \|", text, flags=re.M))
    registered = {name for name in switches.SWITCHES}
    assert registered <= set(rows), sorted(registered - set(rows))
    for name, (_, default) in switches.SWITCHES.items():
        assert rows[name].strip().startswith(f"`{default}`"), (name, rows[name])


def test_importing_the_kernels_keeps_fp_fusion_on_unless_the_user_chose():
    """Triton 3.10 turns FMA fusion off by default; the kernels were tuned and checked with it on."""
    import os
    import subprocess
    import sys

    code = "import os, uniql.kernels; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TRITON_DEFAULT_FP_FUSION": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
