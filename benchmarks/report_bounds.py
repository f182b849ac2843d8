"""The report's stage-latency section: ``results/ratio_bound_h100.json`` (written by ``ratio_bound.py``) and
``results/step_residual_h100.json`` (``step_residual.py``) as tables."""

from __future__ import annotations

import report_plots as rp

FILE = "ratio_bound_h100"
RESIDUAL = "step_residual_h100"


def section_bounds(rep, results: dict) -> None:
    rep.add("## Stage-latency model: what the bytes and the boundaries allow (projections)", "")
    section_model(rep, results.get(FILE))
    section_residual(rep, results.get(RESIDUAL))


def section_model(rep, data: dict | None) -> None:
    """The step model's times and ratio, then each batch-1 GEMV's, next to the measured figures (projections)."""
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
    kernel_l = data["kernel_rows"][0].get("latency_us", data["latency_us"])
    if kernel_l != data["latency_us"]:
        rep.add(f"The kernel rows take L = {kernel_l:.2f} us: the kernel table ran with programmatic dependent launch, "
                "which overlaps ~0.5 us of each boundary with the launch before it (`results/pdl_ab_h100.json`).", "")
    rows = [(r["model"], r["layer"], f"{r['frac_measured']:.0%} / {r['frac_model']:.0%}",
             f"{r['frac_target']:.0%}: L <= {r['latency_for_frac_us']:.2f} us",
             f"{r['ratio_measured']:.3f} / {r['ratio_model']:.3f}" if "ratio_model" in r else "-",
             f"L <= {r['latency_for_ratio_us']:.2f} us" if "ratio_model" in r else "-") for r in data["kernel_rows"]]
    rep.add(*rp.md_table(["model", "layer", "copy measured / model", "copy target needs", "t(0.35)/t(0) measured / "
                          "model", "<= 0.72 needs"], rows), "")


def section_residual(rep, data: dict | None) -> None:
    """``step_residual.py``'s split of the profiled step: what neither the bytes nor the stages explain, by class."""
    if not data or "_error" in data:
        rep.missing("the step's residual by kernel class", f"{RESIDUAL}.json")
        return
    lo, hi = data["rates"]["0.0"], data["rates"]["0.35"]
    rows = [(a["kernel"], f"{a['measured_us']:.1f} / {b['measured_us']:.1f}", f"{a['bytes_us']:.1f} / "
             f"{b['bytes_us']:.1f}", f"{a['stages']:.0f}", f"{a['residual_us']:.1f} / {b['residual_us']:.1f}")
            for a, b in zip(lo["rows"], hi["rows"], strict=True)]
    rep.add(f"`python benchmarks/step_residual.py`: the profiled step (in-graph kernel times) by kernel class at rates "
            f"0 / 0.35, against its bytes at the copy rate and its launches x {data['latency_us']:.2f} us; the "
            "residual is what neither explains.", "",
            *rp.md_table(["class", "measured us", "bytes at copy us", "launches", "residual us"], rows), "",
            f"Residual a step: {lo['total']['residual_us']:.0f} / {hi['total']['residual_us']:.0f} us (the classes "
            f"add up to {lo['total']['measured_us']:.0f} / {hi['total']['measured_us']:.0f} us against profiled "
            f"replays of {lo['replay_us']:.0f} / {hi['replay_us']:.0f}).", "")
