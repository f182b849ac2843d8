"""Benchmark report: reads ``benchmarks/results/*.json``, writes ``benchmarks/REPORT.md`` and PNG plots.

    python benchmarks/report.py                      # -> benchmarks/REPORT.md + benchmarks/report/*.png
    python benchmarks/report.py --out /tmp/r/REPORT.md   # figures go next to it, in /tmp/r/report/

Sections whose result file is not there yet are skipped with a note. Jetson and A6000 figures are
projections from measured bytes per token and measured efficiency (formula in the report), never measurements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this script

import report_bounds as rb  # noqa: E402
import report_data as rd  # noqa: E402
import report_plots as rp  # noqa: E402

HERE = Path(__file__).resolve().parent
FIG_DIR = "report"  # relative to the markdown file
GB, MB = 1e9, 1e6


class Report:
    """Collects markdown lines and writes figures next to the markdown file."""

    def __init__(self, md_path: Path):
        self.md_path = md_path
        self.lines: list[str] = []
        self.figures: list[Path] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, fig, name: str, alt: str) -> None:
        self.figures.append(rp.save(fig, self.md_path.parent / FIG_DIR / name))
        self.add("", rp.image(f"{FIG_DIR}/{name}", alt), "")

    def missing(self, what: str, files: str) -> None:
        self.add(f"_Skipped: {what} — `benchmarks/results/{files}` is not there yet._", "")

    def write(self) -> None:
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text("\n".join(self.lines).rstrip() + "\n")


# ------------------------------------------------------------------------------------------ decode
def section_decode(rep: Report, results: dict) -> None:
    rep.add("## Decode: TPOT and tokens/s per rung", "")
    names = rd.decode_files(results)
    if not names:
        rep.missing("decode timings", "decode_*.json")
    for name in names:
        for part, data in per_model(name, results[name]):
            decode_one(rep, part, data)
    if not any(n.startswith(("decode_h1", "decode_h2")) for n in names):
        rep.missing("the GPU decode run (8B shape, CUDA graphs)", "decode_h100.json / decode_h200.json")


def per_model(name: str, data: dict) -> list[tuple[str, dict]]:
    """A file whose rows name several models (``ssm_decode_*``) is one section per model; anchors stay with theirs."""
    models = sorted({r["model"] for r in data.get("rows", []) if isinstance(r, dict) and "model" in r})
    if len(models) < 2:
        return [(name, data)]
    return [(f"{name}_{m}", {**data, "model": m, "rows": [r for r in data["rows"] if r.get("model") == m]})
            for m in models]


def decode_one(rep: Report, name: str, data: dict) -> None:
    rows = rd.timed_rows(data)
    ours, anchors = rd.split_decode_rows(rows)
    if not ours:
        rep.add(f"`{name}.json`: no UniQL engine rows at batch 1.", "")
        return
    rep.add(f"### `{name}` — {data.get('model', '?')} on {data.get('device', '?')}", "",
            f"Batch 1 unless noted, {data.get('prompt_tokens', '?')}-token prompt, greedy. Anchors are other "
            "engines measured **in the same run** (dashed).", "")
    if isinstance(data.get("note"), str):  # e.g. an A/B record of a change that was not kept
        rep.add(f"*Note:* {data['note']}", "")
    batched = rd.batched_series(rows)
    fig, axes = rp.new_figure(3 if batched else 2, width=5.6)
    for ax, key, ylabel, title in ((axes[0], "tpot_ms", "TPOT (ms, lower is better)", "Time per output token"),
                                   (axes[1], "tokens_per_s", "tokens/s (higher is better)", "Decode throughput")):
        rp.lines_by_group(ax, {"UniQL engine": [(r["rate"], r[key]) for r in ours]}, annotate_last=True)
        anchor_lines(ax, anchors, key)
        values = [r[key] for r in ours] + [r[key] for rs in anchors.values() for r in rs]
        if max(values) > 8 * min(values):  # a slow anchor would flatten our curve: log scale
            rp.plain_log_y(ax)
            ylabel += ", log scale"
        else:
            ax.set_ylim(bottom=0)
        rp.rate_axis(ax, ylabel, title)
    if batched:
        rp.lines_by_group(axes[2], batched)
        axes[2].set_ylim(bottom=0)
        rp.rate_axis(axes[2], "tokens/s, all requests", "Concurrent requests")
    rep.figure(fig, f"{name}_tpot.png", f"TPOT and tokens/s per rung, {name}")
    decode_table(rep, rows, anchors)
    for r in rd.failed_rows(data):
        first_line = str(r["error"]).splitlines()[0][:200]
        rep.add(f"* `{r.get('engine', '?')}` did not run: {first_line}")
    rep.add("")


def anchor_lines(ax, anchors: dict[str, list[dict]], key: str) -> None:
    """An engine measured at one rate is a horizontal line, at several rates a dashed line."""
    flat = [(anchor_label(rs[0]), rs[0][key]) for rs in anchors.values() if len(rs) == 1]
    for rs in anchors.values():
        if len(rs) > 1:
            ax.plot([r["rate"] for r in rs], [r[key] for r in rs], linestyle="--", marker="x",
                    label=anchor_label(rs[0]))
    rp.hlines(ax, flat)


def decode_table(rep: Report, rows: list[dict], anchors: dict[str, list[dict]]) -> None:
    base_name = "hf_eager" if "hf_eager" in anchors else next(iter(anchors), None)
    base = anchors[base_name][0] if base_name else None
    header = ["engine", "rate", "batch", "TTFT ms", "TPOT ms", "tokens/s"]
    header += [f"TPOT speed-up vs {base_name}"] if base else []
    table = []
    for r in sorted(rows, key=lambda r: (r.get("engine", "uniql") != "uniql", r.get("engine", ""), r["batch"],
                                         r["rate"])):
        row = [r.get("engine", "uniql"), r["rate"], r["batch"], r["ttft_ms"], r["tpot_ms"], r["tokens_per_s"]]
        if base:
            row.append(f"{base['tpot_ms'] / r['tpot_ms']:.2f}x" if r["batch"] == 1 else "")
        table.append(row)
    rep.add(*rp.md_table(header, table), "")


def anchor_label(row: dict) -> str:
    extra = f", {row['dtype']}" if row.get("dtype") else ""
    return f"{row.get('engine', '?')}{extra} (same run)"


# ------------------------------------------------------------------------------------------ memory
def section_memory(rep: Report, results: dict) -> None:
    rep.add("## Memory and bytes per rung", "")
    quant, kernels = results.get("quant_smollm2"), kernel_results(results)
    if not quant and not kernels:
        rep.missing("bytes per rung", "quant_smollm2.json, kernels_h100.json")
        return
    fig, axes = rp.new_figure(2, width=6.0)
    if quant:
        series = {"INT4 (GPTQ/RTN)": [(b["rate"], b["total_bytes"] / MB) for b in quant["bytes"]]}
        if quant.get("bytes_hadamard"):
            series["INT4 + Hadamard"] = [(b["rate"], b["total_bytes"] / MB) for b in quant["bytes_hadamard"]]
        rp.lines_by_group(axes[0], series)
        rp.hlines(axes[0], [("fp16 model", quant["bytes"][0]["fp16_bytes"] / MB)])
        axes[0].set_ylim(bottom=0)
        rp.rate_axis(axes[0], "MB resident", "SmolLM2-135M: one checkpoint, every rung")
        rep.add(*rp.md_table(["rate", "INT4 MB", "x smaller than fp16"],
                             [(b["rate"], b["total_bytes"] / MB, b["reduction_vs_fp16"]) for b in quant["bytes"]]))
    if kernels:
        series = {m: [(p["rate"], p["bytes"] / GB) for p in rd.per_token(kernels, m)] for m in rd.NUM_LAYERS}
        rp.lines_by_group(axes[1], {k: v for k, v in series.items() if v}, annotate_last=True)
        axes[1].set_ylim(bottom=0)
        rp.rate_axis(axes[1], "GB streamed per token", "8B shapes: INT4 weight bytes per decode step")
    rep.figure(fig, "memory_per_rung.png", "bytes per rung")
    rep.add("Every rung is a prefix view of the same stored bytes: switching rungs allocates and copies nothing. "
            "Bytes per token (right) count the packed codes + fp16 scales of the active prefix of every linear "
            "layer plus the never-pruned lm_head (group 64).", "")


# ------------------------------------------------------------------------------------------ quality
QUALITY_FILES = (("sorting_smollm2", "orders: uniql vs magnitude vs random (FP, no fine-tuning)"),
                 ("quant_smollm2", "INT4: RTN vs GPTQ vs GPTQ + Hadamard"),
                 ("lora_smollm2", "before / after masked LoRA recovery"))


def section_quality(rep: Report, results: dict) -> None:
    rep.add("## Quality per rung (SmolLM2-135M, wikitext2 perplexity, lower is better)", "")
    for name, title in QUALITY_FILES:
        if name not in results:
            rep.missing(title, f"{name}.json")
            continue
        tables = rd.quality_tables(results[name])
        if not tables:
            rep.add(f"`{name}.json`: no (rate, perplexity) rows recognised; see the file.", "")
            continue
        path, rows = tables[0]  # the file's main table; ablations stay in the JSON
        quality_plot(rep, name, title, rows)
    zero_shot(rep, results.get("sorting_smollm2"))


def quality_plot(rep: Report, name: str, title: str, rows: list[dict]) -> None:
    group, metric = rd.group_key(rows), rd.metric_key(rows)
    series = rd.series_by_group(rows, group, metric)
    fig, (ax,) = rp.new_figure(1)
    rp.lines_by_group(ax, series, logy=True, annotate_last=len(series) <= 3)
    rp.rate_axis(ax, f"{metric} (log scale)", f"{name}: {title}")
    rep.add(f"### {title} (`{name}.json`)")
    rep.figure(fig, f"quality_{name}.png", f"{metric} per rung, {name}")
    rates = sorted({x for pts in series.values() for x, _ in pts})
    table = [[g] + [dict(pts).get(r, "") for r in rates] for g, pts in series.items()]
    rep.add(*rp.md_table([group] + [f"rate {r:g}" for r in rates], table), "")


def zero_shot(rep: Report, sorting: dict | None) -> None:
    rows = (sorting or {}).get("zero_shot") or []
    if not rows:
        return
    tasks = sorted({r["task"] for r in rows})
    rates = sorted({r["rate"] for r in rows})
    fig, (ax,) = rp.new_figure(1, height=3.8)
    acc = {f"rate {rate:g}": [next(r["acc"] * 100 for r in rows if r["task"] == t and r["rate"] == rate)
                              for t in tasks] for rate in rates}
    rp.grouped_bars(ax, tasks, acc, fmt="{:.1f}")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Zero-shot accuracy, uniql order (lm-eval definitions, full sets)")
    rep.add("### Zero-shot accuracy (`sorting_smollm2.json`)")
    rep.figure(fig, "quality_zero_shot.png", "zero-shot accuracy per rung")


# ------------------------------------------------------------------------------------------ kernels
def kernel_results(results: dict) -> dict | None:
    """The acceptance device's run (H100, the newest since stop 26) before the H200 file (stops 13-24)."""
    return results.get("kernels_h100") or results.get("kernels_h200")


def section_kernels(rep: Report, results: dict) -> None:
    rep.add("## Kernels: fraction of copy bandwidth (batch 1)", "")
    kernels = kernel_results(results)
    if not kernels:
        rep.missing("kernel bandwidth", "kernels_h100.json")
        return
    models = [m for m in rd.NUM_LAYERS if rd.kernel_rows(kernels, m)]
    fig, axes = rp.new_figure(len(models), width=6.2)
    for ax, model in zip(axes, models, strict=True):
        rows = rd.kernel_rows(kernels, model)
        layers = [layer for layer in (*rd.BLOCK_LAYERS, "lm_head") if any(r["layer"] == layer for r in rows)]
        rates = sorted({r["rate"] for r in rows})
        bars = {f"rate {rate:g}": [frac(rows, layer, rate) for layer in layers] for rate in rates}
        rp.grouped_bars(ax, layers, bars)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of measured copy bandwidth")
        ax.set_title(f"{model}: W4A16 GEMV, batch 1")
    rep.figure(fig, "kernels_bandwidth.png", "kernel fraction of copy bandwidth")
    rep.add(f"Copy bandwidth measured in the same run: {kernels['copy_TBps']:.2f} TB/s (read + write) on "
            f"{kernels.get('device', '?')}; bytes = active packed weights + scales + activations + output. "
            "lm_head is never pruned (rate 0 only).", "")
    ratios = [r for r in kernels.get("rate_ratios", []) if r["batch"] == 1]
    if ratios:
        rep.add(*rp.md_table(["model", "layer", "t(0.35)/t(0)", "bytes ratio", "cuBLAS bf16 ratio"],
                             [(r["model"], r["layer"], r["ratio_035_over_0"], r["bytes_ratio"], r["cublas_ratio"])
                              for r in ratios]), "")


def frac(rows: list[dict], layer: str, rate: float) -> float | None:
    hit = [r["frac_of_copy"] for r in rows if r["layer"] == layer and r["rate"] == rate]
    return hit[0] if hit else None


# ------------------------------------------------------------------------------------------ projections
def section_projection(rep: Report, results: dict) -> None:
    rep.add("## Projected TPOT on Jetson Orin Nano and RTX A6000 (projections, not measurements)", "")
    kernels = kernel_results(results)
    if not kernels:
        rep.missing("projections", "kernels_h100.json")
        return
    rep.add("**Formula.** `TPOT_projected = bytes_per_token / (efficiency x bandwidth)`. bytes_per_token is "
            "measured (INT4 weight bytes one batch-1 decode step streams at that rung); bandwidth is the device's "
            "quoted figure (Orin Nano 68 GB/s, Orin Nano Super 102 GB/s, A6000 768 GB/s; "
            "`shared/docs/perf-anchors.md` 3.1); efficiency = (bytes_per_token / measured time) / measured copy "
            "bandwidth, taken two ways, which bracket the projection:", "",
            "* **kernels** (lower TPOT): summed batch-1 kernel times of the linear layers from "
            "`kernels_h200.json` (or `kernels_h100.json`; layers x (qkv + o + gate_up + down) + lm_head) "
            "over that run's copy bandwidth. "
            "Attention, norms, sampling and launch gaps are not in it.",
            "* **whole step** (higher TPOT): the engine's measured batch-1 TPOT in a GPU decode run (1024-token "
            "prompt, CUDA graphs) over the copy bandwidth measured on that GPU. Fixed per-step costs count as if "
            "they scaled with bandwidth, and KV-cache reads count against it.", "",
            "The floor is efficiency 1. The quoted bandwidths are above what a device copies in practice, so "
            "both bounds lean optimistic on that factor.", "")
    models = [m for m in rd.NUM_LAYERS if rd.per_token(kernels, m)]
    devices = list(rd.DEVICES)
    fig, axes = rp.new_figure(len(devices), width=5.0, height=4.0, nrows=len(models))
    for i, model in enumerate(models):
        step = rd.step_efficiency(results, kernels, model)
        rows = rd.project(rd.per_token(kernels, model), step)
        if step:
            rep.add(f"Whole-step efficiency of {model}: `{step['file']}.json` on {step['device']} "
                    f"(copy {step['copy_TBps']:.2f} TB/s, INT4 g{step['group']}, bytes rescaled from g"
                    f"{kernels['group_size']}).", "")
        for j, device in enumerate(devices):
            projection_plot(axes[i * len(devices) + j], model, rows, device)
        projection_table(rep, model, rows)
    rep.figure(fig, "projected_tpot.png", "projected TPOT per rung (projection)")
    smollm2_projection(rep, results.get("quant_smollm2"))


def projection_plot(ax, model: str, rows: list[dict], device: str) -> None:
    """Projection from kernel efficiency (solid) up to whole-step efficiency (dashed, band between), the
    bandwidth floor (dotted) and a published anchor at rate 0 (star)."""
    xs = [r["rate"] for r in rows]
    color = f"C{list(rd.DEVICES).index(device)}"
    kernel = [r[device] for r in rows]
    ax.plot(xs, kernel, marker="o", color=color, label="projected, kernel efficiency")
    step = [(r["rate"], r[device + " step"]) for r in rows if device + " step" in r]
    if step:
        ax.plot(*zip(*step, strict=True), marker="s", linestyle="--", color=color,
                label="projected, whole-step efficiency")
        if len(step) == len(rows):
            ax.fill_between(xs, kernel, [y for _, y in step], color=color, alpha=0.12)
    ax.plot(xs, [r[device + " floor"] for r in rows], linestyle=":", color="black", label="bandwidth floor")
    anchor, ms = rd.PUBLISHED_8B[device]
    ax.scatter([0.0], [ms], marker="*", s=160, color=color, edgecolor="black", zorder=5,
               label=f"published (others): {anchor}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower left")
    rp.rate_axis(ax, "TPOT ms", f"PROJECTION: {model}\n{device}")


def projection_table(rep: Report, model: str, rows: list[dict]) -> None:
    header = ["rate", "GB/token", "GPU kernels ms", "eff. kernels", "eff. whole step"] + [
        f"{d} ms" for d in rd.DEVICES]
    table = [[r["rate"], r["bytes"] / GB, r["h100_s"] * 1e3, r["efficiency"], r["step_efficiency"] or "-"]
             + [projected_cell(r, d) for d in rd.DEVICES] for r in rows]
    rep.add(f"**{model}** (projected TPOT, ms: kernels - whole step, and the floor):", "",
            *rp.md_table(header, table), "")


def projected_cell(row: dict, device: str) -> str:
    step = f" - {row[device + ' step']:.1f}" if device + " step" in row else ""
    return f"{row[device]:.1f}{step} (floor {row[device + ' floor']:.1f})"


def smollm2_projection(rep: Report, quant: dict | None) -> None:
    if not quant:
        return
    rows = rd.smollm2_floors(quant)
    rep.add("**SmolLM2-135M** (the default model): its bandwidth floor is about a millisecond even on the Orin "
            "Nano, far below what any runtime reaches — a 135M model is launch/latency-bound, so only the floor "
            "is projected. Published measurements by others for scale: "
            + "; ".join(f"{label} {ms:.1f} ms" for label, ms in rd.PUBLISHED_SMOLLM2) + ".", "",
            *rp.md_table(["rate", "MB/token"] + [f"{d} floor ms" for d in rd.DEVICES],
                         [[r["rate"], r["bytes"] / MB] + [r[d] for d in rd.DEVICES] for r in rows]), "")


# ------------------------------------------------------------------------------------------ the rest
def section_compress(rep: Report, results: dict) -> None:
    data = results.get("compress_scale_h100")
    rep.add("## Compression at 8B scale", "")
    if not data:
        rep.missing("compression timing", "compress_scale_h100.json")
        return
    stages = [(k, v["s"] / 60, v["peak_gpu_bytes"] / GB) for k, v in data["stages"].items()]
    rep.add(f"`uniql compress` of a {data['shape']}-shaped model on {data['device']}: "
            f"{data['compress_total_s'] / 60:.1f} min, peak GPU {data['peak_gpu_bytes'] / GB:.1f} GB.", "",
            *rp.md_table(["stage", "minutes", "peak GPU GB"], stages), "")


def section_inputs(rep: Report, results: dict, used: set[str]) -> None:
    rep.add("## Inputs", "")
    for name, data in results.items():
        note = "" if name in used else " (not plotted by this report yet)"
        err = f" — unreadable: {data['_error']}" if "_error" in data else ""
        rep.add(f"* `results/{name}.json`{note}{err}")
    rep.add("")


def build(results_dir: Path, md_path: Path) -> Report:
    results = rd.load_results(results_dir)
    rep = Report(md_path)
    rep.add("# UniQL benchmark report", "",
            "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand. "
            "Measured numbers come from the device named in each section; **Jetson and A6000 numbers are "
            "projections**.", "")
    for section in (section_decode, section_projection, section_memory, section_quality, section_kernels,
                    rb.section_bounds, section_compress):
        section(rep, results)
    used = set(rd.decode_files(results)) | {n for n, _ in QUALITY_FILES} | {
        "kernels_h100", "kernels_h200", "quant_smollm2", "compress_scale_h100", rb.FILE}
    section_inputs(rep, results, used)
    rep.write()
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md", help="markdown path; figures in report/ next to it")
    args = ap.parse_args(argv)
    rep = build(args.results, args.out)
    print(f"wrote {args.out} and {len(rep.figures)} figures in {args.out.parent / FIG_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
