"""The report's stage-latency section: ``results/ratio_bound_h100.json`` (written by ``ratio_bound.py``) as tables."""

from __future__ import annotations

import report_plots as rp

FILE = "ratio_bound_h100"


def section_bounds(rep, results: dict) -> None:
    """The step model's times and ratio, then each batch-1 GEMV's, next to the measured figures (projections)."""
    data = results.get(FILE)
    rep.add("## Stage-latency model: what the bytes and the boundaries allow (projections)", "")
    if not data or "_error" in data:
        rep.missing("the stage-latency model", f"{FILE}.json")
        return
    rep.add(f"`python benchmarks/ratio_bound.py` on {data['device']}: a step (or a GEMV) takes its bytes at the copy "
            f"rate ({data['copy_TBps']:.2f} TB/s) plus {data['latency_us']:.2f} us for every dependent stage (a "
            f"512-wide GEMV chain, {data['latency_from']}: all boundary, next to no bytes). It binds designs whose "
            "stages stream only once their input is ready.", "")
    rows = [(f"{float(rate):g}", data["bytes"][rate] / 1e9, data["stages"][rate], data["floor_ms"][rate],
             data["model_ms"][rate], data["measured_ms"][rate]) for rate in data["model_ms"]]
    measured = data["measured_ms"]["0.35"] / data["measured_ms"]["0.0"]
    rep.add(*rp.md_table(["rate", "GB a step", "stages", "bytes at copy ms", "model ms", "measured TPOT ms"], rows),
            "", f"Ratio 0.35 / 0: bytes alone {data['bytes_ratio']:.3f}, model {data['ratio']:.3f}, measured "
            f"{measured:.3f}; the model reaches {data['target']} only at <= {data['latency_for_target_us']:.2f} us a "
            f"stage, or with <= {data['stages_for_target']:.0f} stages.", "")
    if short := data.get("short_path"):
        rep.add(f"The shortest dependent path measured (`short_path_probe.py`: weights loaded before the wait, the "
                f"split partials summed by the next layer, one release add a task; {short['latency_from']}) takes "
                f"{short['latency_us']:.2f} us a stage: the model then gives {short['model_ms']['0.0']:.3f} / "
                f"{short['model_ms']['0.35']:.3f} ms, a ratio of {short['ratio']:.3f}, and {data['target']} with <= "
                f"{short['stages_for_target']:.0f} stages.", "")
    rows = [(r["model"], r["layer"], f"{r['frac_measured']:.0%} / {r['frac_model']:.0%}",
             f"{r['frac_target']:.0%}: L <= {r['latency_for_frac_us']:.2f} us",
             f"{r['ratio_measured']:.3f} / {r['ratio_model']:.3f}" if "ratio_model" in r else "-",
             f"L <= {r['latency_for_ratio_us']:.2f} us" if "ratio_model" in r else "-") for r in data["kernel_rows"]]
    rep.add(*rp.md_table(["model", "layer", "copy measured / model", "copy target needs", "t(0.35)/t(0) measured / "
                          "model", "<= 0.72 needs"], rows), "")
