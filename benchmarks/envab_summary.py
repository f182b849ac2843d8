"""One JSON from the per-run files of ``device_suite.sh``'s ``envab`` / ``envabssm`` steps: every row of every run
(round, variant, rate, TPOT ...) and, per variant and rate, the median TPOT over the rounds and its ratio to the
default tree's (same machine, alternating rounds, so the ratio is the A/B's answer).

    python benchmarks/envab_summary.py DIR --out benchmarks/results/envab_<tag>_h100.json

DIR holds ``<name>_envab_<gpu>_<round>_<variant>.json`` (variant ``default`` or ``VAR_VALUE`` joined by ``_``),
loose or in the archive ``device_suite.sh`` packs them into (``envab_runs_<gpu>.tgz``, read as it is).
A run whose JSON did not come back from the device (a call returns a limited number of files) is read from the
step's log ``<name>_envab_<gpu>.txt`` instead (its printed TPOT, TTFT and peak; rows marked ``"from": "log"``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tarfile
from pathlib import Path

RUN_FILE = re.compile(r"(?P<name>\w+?)_envab_(?P<gpu>[a-z0-9]+)_(?P<round>\d+)_(?P<variant>.+)\.json$")
LOG_FILE = re.compile(r"(?P<name>\w+?)_envab_(?P<gpu>[a-z0-9]+)\.txt$")
ROUND = re.compile(r"== round (?P<round>\d+): (?P<variant>\S+)")
# a printed engine row: "[model] uniql  rate 0.15 [batch  1]: TTFT 81.0 ms  TPOT 2.083 ms [...] peak 4.2 GiB"
LOG_ROW = re.compile(r"^(?:(?P<model>\S+)\s+)?uniql\s+rate (?P<rate>[\d.]+)(?: batch\s+(?P<batch>\d+))?: "
                     r"TTFT\s+(?P<ttft>[\d.]+) ms\s+TPOT\s+(?P<tpot>[\d.]+) ms.*peak\s+(?P<peak>[\d.]+) GiB")


def log_rows(path: Path, have: set[tuple[str, int, str]], model: str) -> list[dict]:
    """The rows of the runs in an envab log that are not in ``have`` ((name, round, variant) with a JSON); ``model``
    names rows that print none (decode_gpu.py's)."""
    name, rows, run = LOG_FILE.match(path.name)["name"], [], None
    for line in path.read_text().splitlines():
        if (head := ROUND.match(line)) is not None:
            run = (name, int(head["round"]), re.sub(r"[=+]", "_", head["variant"]))  # as the run file names it
            continue
        row = LOG_ROW.match(line) if run is not None and run not in have else None
        if row is not None:
            rows.append({"model": row["model"] or model, "engine": "uniql", "rate": float(row["rate"]),
                         "batch": int(row["batch"] or 1),
                         "ttft_ms": float(row["ttft"]), "tpot_ms": float(row["tpot"]),
                         "peak_mem_bytes": round(float(row["peak"]) * 2**30), "round": run[1], "variant": run[2],
                         "file": path.name, "from": "log"})
    return rows


def run_files(folder: Path) -> list[tuple[str, str]]:
    """``(name, text)`` of every run JSON in ``folder`` and in its ``envab_runs_*.tgz`` archives."""
    files = [(path.name, path.read_text()) for path in folder.glob("*_envab_*.json")]
    for archive in folder.glob("envab_runs_*.tgz"):
        with tarfile.open(archive) as tar:
            files += [(Path(m.name).name, tar.extractfile(m).read().decode()) for m in tar.getmembers() if m.isfile()]
    return sorted(files)


def collect(folder: Path) -> tuple[list[dict], str]:
    """Every engine row of every run file, tagged with its file's round and variant; and the device name."""
    rows, device, models, have = [], "", {}, set()
    for name, text in run_files(folder):
        match = RUN_FILE.match(name)
        if match is None:
            continue
        report = json.loads(text)
        device = device or report.get("device", "")
        models[match["name"]] = report.get("model", match["name"])
        have.add((match["name"], int(match["round"]), match["variant"]))  # its log lines are not read again
        for row in report.get("rows", []):
            if row.get("engine") == "uniql":
                rows.append({**row, "model": row.get("model", report.get("model", match["name"])),
                             "round": int(match["round"]), "variant": match["variant"], "file": name})
    for path in sorted(folder.glob("*_envab_*.txt")):
        if (match := LOG_FILE.match(path.name)) is not None:
            rows += log_rows(path, have, models.get(match["name"], match["name"]))
    return rows, device


def summarize(rows: list[dict]) -> list[dict]:
    """Median TPOT per (model, variant, rate, batch) over the rounds and its ratio to the default's at that rate and
    batch (``ENVAB_BATCHES``); likewise the runs' TTFT medians where they recorded them (``decode_gpu.py``'s five
    one-token requests a rate, batch 1)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["variant"], row["rate"], row.get("batch", 1)), []).append(row)
    out = []
    for (model, variant, rate, batch), runs in sorted(groups.items()):
        base = groups.get((model, "default", rate, batch), [])
        tpot, tpot_base = _median(runs, "tpot_ms"), _median(base, "tpot_ms")
        ttft, ttft_base = _median(runs, "ttft_median_ms"), _median(base, "ttft_median_ms")
        out.append({"model": model, "variant": variant, "rate": rate, "batch": batch, "runs": len(runs),
                    "tpot_ms_median": tpot, "tpot_ms_all": [r["tpot_ms"] for r in runs],
                    "vs_default": tpot / tpot_base if tpot_base else None, "ttft_ms_median": ttft,
                    "ttft_vs_default": ttft / ttft_base if ttft is not None and ttft_base else None})
    return out


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--what", default="same-machine A/B of kernel switches (device_suite.sh envab / envabssm), two "
                                      "alternating rounds, batch 1 (and ENVAB_BATCHES), 1024-token prompt, 256 new "
                                      "tokens")
    args = ap.parse_args()
    if not args.folder.is_dir():
        ap.error(f"{args.folder} is not a folder")
    rows, device = collect(args.folder)
    if not rows:
        ap.error(f"no *_envab_<gpu>_<round>_<variant>.json run files with engine rows in {args.folder}")
    summary = summarize(rows)
    args.out.write_text(json.dumps({"device": device, "what": args.what, "summary": summary, "rows": rows},
                                   indent=1))
    for s in summary:
        ratio = f"{s['vs_default']:.3f}" if s["vs_default"] is not None else "-"
        ttft = "" if s["ttft_ms_median"] is None else \
            f", TTFT {s['ttft_ms_median']:.1f} ms (x{s['ttft_vs_default'] or float('nan'):.3f})"
        print(f"{s['model']:<22} {s['variant']:<28} rate {s['rate']:.2f} batch {s['batch']:>2}: "
              f"TPOT {s['tpot_ms_median']:.3f} ms "
              f"(x{ratio} of default, {s['runs']} runs){ttft}")


if __name__ == "__main__":
    main()
