"""benchmarks/report.py runs on the committed results JSON and writes REPORT.md plus readable PNGs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from deploy_util import REPO

BENCH = REPO / "benchmarks"


def run_report(results, out):
    result = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(results), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


def linked_pngs(markdown: str) -> list[str]:
    return [line.split("](", 1)[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]


def test_report_on_the_committed_results(tmp_path):
    md = run_report(BENCH / "results", tmp_path / "REPORT.md")
    pngs = linked_pngs(md)
    assert len(pngs) >= 6
    for rel in pngs:
        data = (tmp_path / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, rel
    assert "Projected TPOT" in md and "projections, not measurements" in md
    assert "TPOT_projected = bytes_per_token / (efficiency x bandwidth)" in md
    for device in ("68 GB/s", "102 GB/s", "768 GB/s"):
        assert device in md
    bound = json.loads((BENCH / "results" / "ratio_bound_h100.json").read_text())  # the stage-latency section
    o = next(r for r in bound["kernel_rows"] if (r["model"], r["layer"]) == ("llama-3.1-8b", "o"))
    assert f"model {bound['ratio']:.3f}" in md and f"| llama-3.1-8b | o | {o['frac_measured']:.0%} / " in md
    assert f"a ratio of {bound['short_path']['ratio']:.3f}" in md  # the shortest path's L (stop 38)
    residual = json.loads((BENCH / "results" / "step_residual_h100.json").read_text())["rates"]
    assert f"Residual a step: {residual['0.0']['total']['residual_us']:.0f} / " in md and "| gate_up | " in md
    # the committed report's figures are committed too (it may lag behind newly added results: rerun report.py)
    committed = linked_pngs((BENCH / "REPORT.md").read_text())
    assert committed and all((BENCH / rel).is_file() for rel in committed)


def gpu_decode_like() -> dict:
    """A result shaped like benchmarks/decode_gpu.py's: batched rows, a dense anchor at two rates, a failed row."""
    def row(engine, rate, batch, tpot):
        return {"engine": engine, "rate": rate, "batch": batch, "ttft_ms": 50.0, "tpot_ms": tpot,
                "tokens_per_s": batch * 1000 / tpot, "peak_mem_bytes": 1 << 30}
    rows = [row("uniql", r, b, (4.0 - 4 * r) * (1 + b / 8)) for r in (0.0, 0.35) for b in (1, 4)]
    rows += [row("uniql_bf16_dense", 0.0, 1, 9.0), row("uniql_bf16_dense", 0.35, 1, 6.5)]
    rows += [{"engine": "hf_eager", "batch": 1, "ttft_ms": 80.0, "tpot_ms": 30.0, "tokens_per_s": 33.0},
             {"engine": "hf_compiled", "error": "RuntimeError: no compiler"}]
    return {"device": "NVIDIA H200", "model": "llama-3.1-8b shape", "prompt_tokens": 1024, "rows": rows}


def test_missing_results_are_skipped_with_a_note(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(BENCH / "results" / "decode_cpu.json", results)
    rows = [{"stage": stage, "rate": rate, "wikitext2_ppl": ppl}
            for stage, rate, ppl in (("before", 0.0, 28.0), ("after", 0.0, 27.0),
                                     ("before", 0.25, 90.0), ("after", 0.25, 60.0))]
    (results / "lora_smollm2.json").write_text(json.dumps({"rows": rows}))
    (results / "decode_h200.json").write_text(json.dumps(gpu_decode_like()))
    md = run_report(results, tmp_path / "out" / "REPORT.md")
    assert "decode_h200_tpot.png" in md and "hf_compiled` did not run" in md and "| uniql | 0.35 | 4 |" in md
    assert "_Skipped: kernel bandwidth" in md and "_Skipped: projections" in md
    assert "_Skipped: the stage-latency model" in md and "_Skipped: the step's residual by kernel class" in md
    assert "quality_lora_smollm2.png" in md and "| after |" in md
    assert (tmp_path / "out" / "report" / "decode_cpu_tpot.png").is_file()


def test_an_ab_of_launch_settings_is_listed_not_plotted(tmp_path):
    """Rows of several variants (envab_summary.py's files) through one curve would read as one configuration."""
    results = tmp_path / "results"
    results.mkdir()
    ab = gpu_decode_like()
    ab["rows"] = [{**r, "variant": v, "round": 1} for r in ab["rows"][:4] for v in ("default", "UNIQL_X_1")]
    (results / "envab_x_h200.json").write_text(json.dumps(ab))
    trees = gpu_decode_like()  # bound_ab.py: two code trees ("tree", "b") in alternating rounds, no variant key
    trees["rows"] = [{**r, "engine": e, "round": 1} for r in trees["rows"][:4] for e in ("tree", "b")]
    (results / "bound_ab_h200.json").write_text(json.dumps(trees))
    (results / "decode_h200.json").write_text(json.dumps(gpu_decode_like()))
    md = run_report(results, tmp_path / "out" / "REPORT.md")
    assert "decode_h200_tpot.png" in md and "envab_x_h200_tpot.png" not in md
    assert "`results/envab_x_h200.json` (not plotted by this report yet)" in md
    assert "`bound_ab_h200.json`: no UniQL engine rows" not in md
    assert "`results/bound_ab_h200.json` (not plotted by this report yet)" in md


def test_whole_step_efficiency_divides_by_a_kernel_timed_copy():
    """Several files of one device record a copy rate: a kernel-timed one (it also has ``copy_engine_TBps``) wins
    over an older graph ``copy_`` figure (the slower DMA engines), whatever the file order."""
    sys.path.insert(0, str(BENCH))
    try:
        import report_data as rd
    finally:
        sys.path.remove(str(BENCH))
    old = {"device": "NVIDIA H200", "copy_TBps": 2.7}
    new = {"device": "NVIDIA H200", "copy_TBps": 4.2, "copy_engine_TBps": 2.7}
    other = {"device": "NVIDIA H100", "copy_TBps": 3.0, "copy_engine_TBps": 2.4}
    for results in ({"a": old, "b": new, "c": other}, {"a": new, "b": old}):
        assert rd.same_device_copy(results, "NVIDIA H200") == 4.2
    assert rd.same_device_copy({"a": old}, "NVIDIA H200") == 2.7
    assert rd.same_device_copy({"a": other}, "NVIDIA H200") is None
