"""benchmarks/lora_smollm2.py's paired comparison: each tuned stage against its own untuned twin, same documents."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location("lora_smollm2", BENCH / "lora_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_rows_compare_each_tuned_stage_with_its_untuned_twin():
    rows = [{"stage": "before", "rate": 0.15, "correct": {"piqa": "0011"}},
            {"stage": "after", "rate": 0.15, "correct": {"piqa": "1111"}},
            {"stage": "before_fp", "rate": 0.15, "correct": {"piqa": "1111"}},
            {"stage": "after_fp", "rate": 0.15, "correct": {"piqa": "1110"}},
            {"stage": "after_variant", "rate": 0.15, "correct": {"piqa": "0001"}},
            {"stage": "after", "rate": 0.35, "correct": {"piqa": "1111"}},  # no "before" at 0.35: no pair
            {"stage": "before", "rate": 0.0, "piqa": 0.5}]  # an old row without per-document results
    got = {(r["stage"], r["vs"], r["rate"]): (r["gained"], r["lost"]) for r in _bench().paired_rows({"rows": rows})}
    assert got == {("after", "before", 0.15): (2, 0), ("after_fp", "before_fp", 0.15): (0, 1),
                   ("after_variant", "before", 0.15): (0, 1)}


def test_quant_options_are_typed_like_the_quant_config_fields():
    import pytest

    from uniql.compressor.quantize import QuantConfig

    bench = _bench()
    assert bench.variant_changes(QuantConfig(), "gptq_objective=full; rung0_weight=2") == {
        "gptq_objective": "full", "rung0_weight": 2.0}
    with pytest.raises(SystemExit, match="QuantConfig"):
        bench.variant_changes(QuantConfig(), "no_such_field=1")
