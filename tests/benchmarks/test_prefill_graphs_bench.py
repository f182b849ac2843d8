"""benchmarks/prefill_graphs.py: each (rate, length) row times the same engine with its prefill graphs on, then
off, and puts them back; the speedup is eager over graphs; a machine without CUDA is told so."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import prefill_graphs as pg  # noqa: E402


def test_rows_time_graphs_then_eager_and_restore_them(monkeypatch):
    graphs = SimpleNamespace(bucket=lambda n: 16 if n <= 16 else None)
    ladder = SimpleNamespace(rates=(0.0, 0.35), nearest=lambda r: 0 if r < 0.2 else 1)
    runner = SimpleNamespace(prefill_graphs=graphs, model=SimpleNamespace(ladder=ladder))
    engine = SimpleNamespace(runner=runner)
    seen = []

    def fake_samples(eng, prompt, rung):
        on = eng.runner.prefill_graphs is not None
        seen.append((len(prompt), rung, on))
        return {"ttft_median_ms": 10.0 if on else 30.0}

    monkeypatch.setattr(pg, "ttft_samples", fake_samples)
    rows = pg.rows_for(engine, [8, 40], [0.0, 0.35])
    assert seen == [(8, 0, True), (8, 0, False), (40, 0, True), (40, 0, False),
                    (8, 1, True), (8, 1, False), (40, 1, True), (40, 1, False)]
    assert runner.prefill_graphs is graphs
    assert [(r["rate"], r["prompt_tokens"], r["bucket"]) for r in rows] == [
        (0.0, 8, 16), (0.0, 40, None), (0.35, 8, 16), (0.35, 40, None)]
    assert all(r["speedup"] == 3.0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so():
    with pytest.raises(SystemExit, match="CUDA"):
        pg.main([])
