"""BI-driven per-layer prune rates: exact mean (water-filling under the cap), ordering, and the ladder."""

import math

import pytest

from uniql.compressor.allocation import allocate, build_ladder
from uniql.runtime.ladder import DEFAULT_RATES, Alignment, LayerSizes, dim_steps

# a ShortGPT-like profile: first and last layers matter most
SCORES = [0.9, 0.35, 0.2, 0.12, 0.1, 0.08, 0.09, 0.11, 0.15, 0.6]
SPREAD = [1.0, 0.0, 0.02, 0.5, 0.03, 0.9, 0.01]  # low-score layers would exceed the cap at high rates


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.35, 0.5, 0.7])
def test_mean_prune_rate_equals_target(rate):
    assert abs(_mean(allocate(SCORES, rate)) - rate) < 1e-9


@pytest.mark.parametrize("rate", [0.4, 0.5, 0.7, 0.8, 0.85])
def test_mean_is_exact_when_the_cap_binds(rate):
    prune = allocate(SPREAD, rate, eps=0.05)
    assert max(prune) == pytest.approx(0.85)  # the cap binds ...
    assert abs(_mean(prune) - rate) < 1e-9  # ... and the cut-off part went to the other layers


@pytest.mark.parametrize("max_prune", [0.5, 0.85])
def test_every_rate_within_zero_and_cap(max_prune):
    for rate in (0.1, 0.3, max_prune):
        prune = allocate(SPREAD, rate, eps=0.05, max_prune=max_prune)
        assert all(0.0 <= p <= max_prune + 1e-12 for p in prune)


@pytest.mark.parametrize("scores,eps", [(SCORES, 0.1), (SPREAD, 0.05), (SPREAD, 1.0)])
def test_higher_score_is_pruned_less_or_equal(scores, eps):
    for rate in (0.1, 0.35, 0.7):
        prune = allocate(scores, rate, eps=eps)
        for i in range(len(scores)):
            for j in range(len(scores)):
                if scores[i] > scores[j]:
                    assert prune[i] <= prune[j] + 1e-12


def test_rate_zero_prunes_nothing():
    assert allocate(SCORES, 0.0) == [0.0] * len(SCORES)


def test_large_eps_is_nearly_uniform():
    prune = allocate(SCORES, 0.3, eps=1e6)
    assert max(abs(p - 0.3) for p in prune) < 1e-5


def test_small_eps_concentrates_pruning_on_the_least_important_layer():
    prune = allocate([0.5, 0.1, 0.4], 0.2, eps=0.01)
    assert prune[1] == pytest.approx(0.6, abs=1e-6) and max(prune[0], prune[2]) < 1e-6


def test_reachable_target_survives_underflowing_weights():
    prune = allocate([0.0, 1.0, 2.0], 0.5, eps=0.001)  # weights [1, e^-1000, e^-2000] -> [1, 0, 0]
    assert all(math.isfinite(p) for p in prune)
    assert abs(_mean(prune) - 0.5) < 1e-9


@pytest.mark.parametrize("kwargs", [{"rate": -0.1}, {"rate": 0.9}, {"rate": 0.5, "max_prune": 0.4},
                                    {"rate": 0.2, "eps": 0.0}, {"rate": 0.2, "eps": -1.0}])
def test_invalid_inputs_raise(kwargs):
    with pytest.raises(ValueError):
        allocate(SCORES, **kwargs)


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"max_prune": 1.5}, {"ridge_lambda": 0.0}, {"ridge_lambda": -1.0},
                                    {"rates": (0.0, 0.5, 0.9)}])
def test_compress_settings_the_allocation_cannot_take_are_refused_up_front(kwargs):
    """Before any calibration (they used to pass until the ladder was built; ridge_lambda 0 silently left every
    channel in its original order: each ridge leverage is then exactly 1)."""
    from uniql.compressor.compress import CompressConfig

    with pytest.raises(ValueError, match="eps|rates"):
        CompressConfig(quant=None, **kwargs).validate()


def test_a_rate_of_one_is_refused_up_front_not_on_load():
    """Before: max_prune 1.0 let a rate of 1.0 through; the checkpoint built after hours of work was then refused
    by check_ladder when loaded."""
    from uniql.compressor.compress import CompressConfig

    with pytest.raises(ValueError, match="below 1"):
        CompressConfig(quant=None, max_prune=1.0, rates=(0.0, 0.5, 1.0)).validate()
    CompressConfig(quant=None, max_prune=1.0, rates=(0.0, 0.5, 0.99)).validate()


def test_build_ladder_starts_full_and_sizes_never_grow():
    full = LayerSizes(mlp=1536, qk=64, vo=64)
    steps = dim_steps(9, 3, 64, Alignment(group_size=64))
    ladder = build_ladder(SCORES, full, steps, DEFAULT_RATES)
    assert ladder.rates == list(DEFAULT_RATES)
    assert ladder.sizes[0] == [full] * len(SCORES)
    for prev, cur in zip(ladder.sizes, ladder.sizes[1:], strict=False):
        for a, b in zip(prev, cur, strict=True):
            assert b.mlp <= a.mlp and b.qk <= a.qk and b.vo <= a.vo
    last = ladder.sizes[-1]
    assert last[0].mlp > last[5].mlp  # the important first layer keeps more than a middle one
    for row, rate in zip(ladder.layer_keep, DEFAULT_RATES, strict=True):
        assert abs(_mean(row) - (1.0 - rate)) < 1e-9


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_score_that_is_not_finite_is_named(bad):
    with pytest.raises(ValueError, match=r"not finite for layers \{2: "):
        allocate([0.1, 0.2, bad, 0.3], 0.2)
