"""Data extraction for ``benchmarks/report.py``: results JSON in, plain rows out (no plotting here).

Projection model (the report states it next to every projected number):

    TPOT_projected(device, rate) = bytes_per_token(rate) / (efficiency * bandwidth(device))

* ``bytes_per_token``: weight bytes one batch-1 decode step streams at that rate, measured by the kernel
  benchmark (packed INT4 codes + scales of the active prefix, per layer, times the number of layers, plus the
  never-pruned lm_head).
* ``efficiency``: (bytes_per_token / measured time) / measured copy bandwidth, two ways:
  - kernels: the summed batch-1 kernel times of the kernel benchmark over its own run's ``copy_TBps`` (linear
    layers only: no attention, norms, sampling or launch gaps; optimistic);
  - whole step: the engine's measured batch-1 TPOT of a GPU decode run (``decode_<gpu>.json``) over the copy
    bandwidth measured on the same GPU (a kernel result with that device name); everything a step costs
    counts, including fixed costs that would not grow on a slower device (pessimistic).
* ``bandwidth``: the device's quoted memory bandwidth (shared/docs/perf-anchors.md section 3.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# devices we project onto: label -> bytes/s (perf-anchors.md 3.1)
DEVICES = {
    "Orin Nano 8 GB (68 GB/s)": 68e9,
    "Orin Nano Super (102 GB/s)": 102e9,
    "RTX A6000 (768 GB/s)": 768e9,
}
# decoder layers of the benchmarked shapes (architecture facts: Llama-3.1-8B and Qwen2.5-7B configs)
NUM_LAYERS = {"llama-3.1-8b": 32, "qwen2.5-7b": 28}
BLOCK_LAYERS = ("qkv", "o", "gate_up", "down")

# published batch-1 INT4 8B-class decode anchors, measured by others (perf-anchors.md 2.3 and 2.5): ms per token
PUBLISHED_8B = {
    "Orin Nano 8 GB (68 GB/s)": ("MLC INT4 Llama-3.1-8B", 1000 / 14.0),
    "Orin Nano Super (102 GB/s)": ("MLC INT4 Llama-3.1-8B", 1000 / 19.14),
    "RTX A6000 (768 GB/s)": ("llama.cpp Q4_K_M Llama-3-8B", 1000 / 102.2),
}
# SmolLM2-135M on Orin Nano, measured by others (perf-anchors.md 2.5): ms per token
PUBLISHED_SMOLLM2 = [
    ("MLC INT4, Orin Nano (68 GB/s)", 1000 / 41.0),
    ("MLC INT4, Orin Nano Super (102 GB/s)", 1000 / 64.5),
    ("llama.cpp, Orin Nano Super 25 W", 6.05),
]


def load_results(results_dir: Path) -> dict[str, dict]:
    """``{stem: parsed JSON}`` for every ``*.json`` in the folder (unreadable files are reported, not fatal)."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out[path.stem] = {"_error": str(err)}
    return out


# ------------------------------------------------------------------------------------------ decode
def decode_files(results: dict) -> list[str]:
    """Result files whose rows are decode timings (``tpot_ms``): decode_*, ssm_* and alike. Same-machine A/Bs (rows
    tagged with a ``variant``: envab_*, early_loads_*; or with a ``round``: bound_ab_*, two code trees) are not: one
    curve through their rows would mix configurations; their own files say the answer and Inputs lists them."""
    return [name for name, data in results.items()
            if (rows := timed_rows(data)) and not any("variant" in r or "round" in r for r in rows)]


def timed_rows(data) -> list[dict]:
    """Rows with a TPOT (rows that report an ``error`` instead are left out); ``rate`` defaults to 0."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return []
    return [{"rate": 0.0, "batch": 1, **r} for r in rows if isinstance(r, dict) and "tpot_ms" in r]


def failed_rows(data: dict) -> list[dict]:
    return [r for r in data.get("rows", []) if isinstance(r, dict) and "error" in r]


def split_decode_rows(rows: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(ours, anchors) at batch 1: ours = the UniQL engine by rate, anchors = every other engine by name."""
    batch1 = sorted((r for r in rows if r["batch"] == 1), key=lambda r: r["rate"])
    ours = [r for r in batch1 if r.get("engine", "uniql") == "uniql"]
    anchors: dict[str, list[dict]] = {}
    for r in batch1:
        if r.get("engine", "uniql") != "uniql":
            anchors.setdefault(r["engine"], []).append(r)
    return ours, anchors


def batched_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """tokens/s per rate of every (engine, batch > 1) pair."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["batch"] > 1:
            out.setdefault(f"{r.get('engine', 'uniql')}, batch {r['batch']}", []).append((r["rate"], r["tokens_per_s"]))
    return out


# ------------------------------------------------------------------------------------------ quality
def metric_key(rows: list[dict]) -> str | None:
    """The perplexity column of a quality table (``wikitext2_ppl`` or the first ``*ppl*`` key)."""
    keys = [k for k in rows[0] if "ppl" in k] if rows else []
    return "wikitext2_ppl" if "wikitext2_ppl" in keys else (keys[0] if keys else None)


def group_key(rows: list[dict]) -> str | None:
    for key in ("order", "variant", "stage", "setting", "model"):
        if rows and key in rows[0]:
            return key
    return None


def series_by_group(rows: list[dict], group: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(metric) is not None and "rate" in r:
            out.setdefault(str(r[group]), []).append((float(r["rate"]), float(r[metric])))
    return out


def is_quality_rows(node) -> bool:
    return (isinstance(node, list) and bool(node) and all(isinstance(r, dict) for r in node)
            and "rate" in node[0] and metric_key(node) is not None and group_key(node) is not None)


def quality_tables(data: dict) -> list[tuple[str, list[dict]]]:
    """Every list of rows in a result file that has a rate and a perplexity column, with its JSON path."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif is_quality_rows(node):
            found.append((path, node))

    walk(data, "")
    return found


# ------------------------------------------------------------------------------------------ kernels
def kernel_rows(kernels: dict, model: str, batch: int = 1) -> list[dict]:
    return [r for r in kernels.get("rows", []) if r["model"] == model and r["batch"] == batch]


def per_token(kernels: dict, model: str) -> list[dict]:
    """Bytes streamed and kernel time per decode step at each measured rate (batch 1, linear layers only)."""
    rows = kernel_rows(kernels, model)
    head = [r for r in rows if r["layer"] == "lm_head" and r["rate"] == 0.0]
    layers = NUM_LAYERS.get(model)
    if not head or layers is None:
        return []
    copy_bps = kernels["copy_TBps"] * 1e12
    out = []
    for rate in sorted({r["rate"] for r in rows if r["layer"] in BLOCK_LAYERS}):
        block = [r for r in rows if r["rate"] == rate and r["layer"] in BLOCK_LAYERS]
        if sorted(r["layer"] for r in block) != sorted(BLOCK_LAYERS):
            continue
        nbytes = layers * sum(r["bytes"] for r in block) + head[0]["bytes"]
        seconds = (layers * sum(r["ours_us"] for r in block) + head[0]["ours_us"]) * 1e-6
        out.append({"model": model, "rate": rate, "bytes": nbytes, "h100_s": seconds,
                    "efficiency": nbytes / seconds / copy_bps})
    return out


def project(points: list[dict], step: dict | None = None) -> list[dict]:
    """Projected TPOT (ms) per device for each point: ``label`` from kernel efficiency, ``label step`` from
    the whole-step efficiency of ``step`` (when measured at that rate), ``label floor`` at efficiency 1."""
    out = []
    for p in points:
        row = dict(p, step_efficiency=(step or {}).get("efficiency", {}).get(p["rate"]))
        for label, bw in DEVICES.items():
            row[label] = p["bytes"] / (p["efficiency"] * bw) * 1e3
            row[label + " floor"] = p["bytes"] / bw * 1e3
            if row["step_efficiency"]:
                row[label + " step"] = p["bytes"] / (row["step_efficiency"] * bw) * 1e3
        out.append(row)
    return out


def bits_per_weight(group: int) -> float:
    return 4 + 16 / group  # 4-bit codes + one fp16 scale per group


def same_device_copy(results: dict, device: str | None) -> float | None:
    """``copy_TBps`` measured on ``device`` (the kernel benchmark records it): a file that times a copy KERNEL
    (it also records ``copy_engine_TBps``) before older files, whose graph-captured ``copy_`` ran on the slower
    DMA engines; among equals the highest figure, so no efficiency is flattered by a low copy rate."""
    found = [(bool(data.get("copy_engine_TBps")), data["copy_TBps"]) for data in results.values()
             if isinstance(data, dict) and data.get("device") == device and data.get("copy_TBps")]
    return max(found)[1] if found else None


def quant_group(data: dict) -> int | None:
    """The scale group of a decode run (``g128`` in its ``quantization`` note), or None."""
    found = re.search(r"\bg(\d+)\b", str(data.get("quantization", "")))
    return int(found.group(1)) if found else None


def bytes_at_group(kernels: dict, model: str, group: int) -> dict[float, float]:
    """{rate: weight bytes a batch-1 step streams}: ``per_token``'s bytes rescaled from the kernel benchmark's scale
    group to ``group`` (the shapes do not depend on the GPU; KV-cache reads are not counted)."""
    return {p["rate"]: p["bytes"] * group_scale(kernels, group) for p in per_token(kernels, model)}


def group_scale(kernels: dict, group: int) -> float:
    """Packed bytes at scale group ``group`` over the kernel benchmark's (its table's ``group_size``)."""
    return bits_per_weight(group) / bits_per_weight(kernels["group_size"])


def step_efficiency(results: dict, kernels: dict, model: str) -> dict | None:
    """Whole-step efficiency per rate of ``model`` from a GPU decode run, or None when there is none yet: the
    bytes of ``bytes_at_group`` at the run's scale group over its TPOT and the same device's copy rate."""
    for name in decode_files(results):
        data = results[name]
        copy = data.get("copy_TBps") or same_device_copy(results, data.get("device"))
        group = quant_group(data)
        points = bytes_at_group(kernels, model, group) if group else {}
        if not (str(data.get("model", "")).startswith(model) and copy and points):
            continue
        ours, _ = split_decode_rows(timed_rows(data))
        eff = {r["rate"]: points[r["rate"]] / (r["tpot_ms"] * 1e-3) / (copy * 1e12)
               for r in ours if r["rate"] in points}
        return {"file": name, "device": data["device"], "copy_TBps": copy, "group": group, "efficiency": eff}
    return None


def smollm2_floors(quant: dict) -> list[dict]:
    """Bandwidth floor (efficiency 1) per rung of the 135M model from its resident INT4 bytes."""
    out = []
    for b in quant.get("bytes", []):
        row = {"rate": b["rate"], "bytes": b["total_bytes"]}
        row.update({label: b["total_bytes"] / bw * 1e3 for label, bw in DEVICES.items()})
        out.append(row)
    return out
