"""envab_summary.py: the device A/B's per-run files -> one JSON with per-variant medians and ratios to default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run_file(folder: Path, name: str, rnd: int, variant: str, tpots: dict, model: str | None = None,
              ttft: float | None = None) -> None:
    rows = [{"engine": "uniql", "rate": rate, "batch": 1, "tpot_ms": t} for rate, t in tpots.items()]
    if ttft is not None:  # decode_gpu.py's TTFT median of its one-token requests
        rows = [{**r, "ttft_median_ms": ttft + r["rate"]} for r in rows]
    rows.append({"engine": "uniql", "rate": 0.0, "batch": 4, "tpot_ms": 90.0 + rnd})  # ENVAB_BATCHES: its own rows
    if model:
        rows = [{**r, "model": model} for r in rows]
    report = {"device": "NVIDIA H100 80GB HBM3", "model": "llama-3.1-8b", "rows": rows}
    (folder / f"{name}_envab_h100_{rnd}_{variant}.json").write_text(json.dumps(report))


def test_summary_medians_and_ratios(tmp_path):
    _run_file(tmp_path, "decode", 1, "default", {0.0: 2.4, 0.35: 2.0}, ttft=30.0)
    _run_file(tmp_path, "decode", 2, "default", {0.0: 2.5, 0.35: 2.0}, ttft=34.0)
    _run_file(tmp_path, "decode", 1, "UNIQL_NARROW_SPLIT_deep", {0.0: 2.6, 0.35: 2.1}, ttft=40.0)
    _run_file(tmp_path, "decode", 2, "UNIQL_NARROW_SPLIT_deep", {0.0: 2.8, 0.35: 2.1}, ttft=44.0)
    _run_file(tmp_path, "ssm", 1, "default", {0.0: 3.0}, model="mamba2-8b-shape")
    (tmp_path / "decode_envab_h100.txt").write_text("not json")
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(BENCH / "envab_summary.py"), str(tmp_path), "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "NVIDIA H100 80GB HBM3" and len(report["rows"]) == 14
    by_key = {(s["model"], s["variant"], s["rate"]): s for s in report["summary"] if s["batch"] == 1}
    deep = by_key[("llama-3.1-8b", "UNIQL_NARROW_SPLIT_deep", 0.0)]
    assert deep["runs"] == 2 and abs(deep["tpot_ms_median"] - 2.7) < 1e-9
    assert abs(deep["vs_default"] - 2.7 / 2.45) < 1e-9
    assert deep["ttft_ms_median"] == 42.0 and abs(deep["ttft_vs_default"] - 42.0 / 32.0) < 1e-9
    assert by_key[("llama-3.1-8b", "default", 0.35)]["ttft_ms_median"] == 32.35
    ssm = by_key[("mamba2-8b-shape", "default", 0.0)]
    assert ssm["vs_default"] == 1.0 and ssm["ttft_ms_median"] is None and ssm["ttft_vs_default"] is None
    batch4 = [s for s in report["summary"] if s["batch"] == 4 and s["variant"] == "UNIQL_NARROW_SPLIT_deep"]
    assert len(batch4) == 1 and batch4[0]["tpot_ms_median"] == 91.5 and batch4[0]["vs_default"] == 1.0  # vs batch 4


def test_runs_missing_their_json_are_read_from_the_log(tmp_path):
    """The device returns a limited number of files: round 2's JSONs did not come back, its log lines did."""
    _run_file(tmp_path, "decode", 1, "default", {0.0: 2.4})
    _run_file(tmp_path, "decode", 1, "UNIQL_PDL_1_UNIQL_GEMV_PER_SM_4", {0.0: 2.6})
    (tmp_path / "decode_envab_h100.txt").write_text(
        "== round 1: default\n"
        "uniql             rate 0.00 batch  1: TTFT    208.6 ms  TPOT   9.999 ms     324.8 tok/s  peak   4.2 GiB\n"
        "== round 2: default\n"
        "uniql             rate 0.00 batch  1: TTFT    165.0 ms  TPOT   2.200 ms     343.7 tok/s  peak   4.2 GiB\n"
        "uniql             rate 0.00 batch  4: TTFT    348.1 ms  TPOT   4.685 ms     663.7 tok/s  peak   4.7 GiB\n"
        "== round 2: UNIQL_PDL=1+UNIQL_GEMV_PER_SM=4\n"
        "uniql             rate 0.00 batch  1: TTFT    169.0 ms  TPOT   2.800 ms     304.9 tok/s  peak   4.2 GiB\n")
    (tmp_path / "ssm_envab_h100.txt").write_text(
        "== round 1: default\n"
        "mamba2-8b-shape      uniql             rate 0.35: TTFT    256.4 ms  TPOT   2.034 ms  peak   5.4 GiB\n")
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(BENCH / "envab_summary.py"), str(tmp_path), "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    logged = [r for r in report["rows"] if r.get("from") == "log"]
    # round 1's log lines duplicate its JSONs (9.999 would show); batch 4 rows are their own rows
    assert sorted((r["model"], r["round"], r["batch"], r["tpot_ms"]) for r in logged) == [
        ("llama-3.1-8b", 2, 1, 2.2), ("llama-3.1-8b", 2, 1, 2.8), ("llama-3.1-8b", 2, 4, 4.685),
        ("mamba2-8b-shape", 1, 1, 2.034)]
    by_key = {(s["model"], s["variant"], s["rate"]): s for s in report["summary"] if s["batch"] == 1}
    pdl = by_key[("llama-3.1-8b", "UNIQL_PDL_1_UNIQL_GEMV_PER_SM_4", 0.0)]
    assert pdl["runs"] == 2 and abs(pdl["vs_default"] - 2.7 / 2.3) < 1e-9


def test_runs_are_read_from_the_archive_the_device_suite_packs(tmp_path):
    """device_suite.sh packs the per-run JSONs into envab_runs_<gpu>.tgz (a call returns few files)."""
    import tarfile

    loose = tmp_path / "loose"
    loose.mkdir()
    _run_file(loose, "ssm", 1, "default", {0.35: 2.0}, model="mamba2-8b-shape")
    _run_file(loose, "ssm", 1, "UNIQL_WIDE_COLS_auto", {0.35: 1.9}, model="mamba2-8b-shape")
    with tarfile.open(tmp_path / "envab_runs_h100.tgz", "w:gz") as tar:
        for path in sorted(loose.iterdir()):
            tar.add(path, arcname=path.name)
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(BENCH / "envab_summary.py"), str(tmp_path), "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    by_key = {(s["variant"], s["rate"]): s for s in json.loads(out.read_text())["summary"]}
    assert abs(by_key[("UNIQL_WIDE_COLS_auto", 0.35)]["vs_default"] - 0.95) < 1e-9


def test_an_empty_folder_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "envab_summary.py"), str(tmp_path), "--out",
                             str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no *_envab_" in result.stderr and not (tmp_path / "x.json").exists()
