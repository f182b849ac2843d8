"""The one rounding rule (kept_size), aligned dim steps, and the rate ladder."""

import json

import pytest

from uniql.runtime.ladder import (
    DEFAULT_RATES,
    Alignment,
    DimSteps,
    LayerSizes,
    RateLadder,
    dim_steps,
    kept_size,
    uniform_ladder,
)

# (heads, kv_heads, head_dim, group_size): SmolLM2-135M and Llama-3.1-8B
SMOLLM2 = (9, 3, 64, 64)
LLAMA31_8B = (32, 8, 128, 128)


# ---- kept_size ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.13, 0.5, 0.77, 0.99])
def test_kept_size_is_a_multiple_of_step_within_step_and_full(ratio):
    size = kept_size(1024, ratio, 64)
    assert size % 64 == 0 and 64 <= size <= 1024


def test_kept_size_is_the_nearest_multiple():
    assert kept_size(1024, 0.7, 64) == 704  # 716.8 -> 11.2 steps -> 11
    assert kept_size(1024, 0.72, 64) == 768  # 737.3 -> 11.52 steps -> 12


def test_kept_size_clamps_to_step_and_full():
    assert kept_size(1024, 0.0, 64) == 64  # never prunes a dim away
    assert kept_size(1024, 0.01, 64) == 64
    assert kept_size(1000, 0.999, 64) == 1000  # 999 rounds to 1024 > full -> full
    assert kept_size(48, 0.5, 64) == 48  # step >= full: never pruned


def test_kept_size_ratio_one_is_full_even_off_step():
    assert kept_size(1000, 1.0, 64) == 1000
    assert kept_size(1024, 1.0, 64) == 1024


def test_kept_size_ties_round_half_to_even():
    assert kept_size(128, 0.5625, 16) == 64  # 4.5 steps -> 4
    assert kept_size(128, 0.6875, 16) == 96  # 5.5 steps -> 6


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan")])
def test_kept_size_rejects_invalid_ratio(ratio):
    with pytest.raises(ValueError, match="keep ratio"):
        kept_size(1024, ratio, 64)


def test_kept_size_rejects_non_positive_step_or_full():
    with pytest.raises(ValueError):
        kept_size(1024, 0.5, 0)
    with pytest.raises(ValueError):
        kept_size(0, 0.5, 16)


# ---- dim_steps ----------------------------------------------------------------------------------------------

def _qk_ok(s, heads, kv, a: Alignment):
    return s % 2 == 0 and heads * s % a.n_align == 0 and kv * s % a.n_align == 0


def _vo_ok(s, heads, kv, a: Alignment):
    return kv * s % a.n_align == 0 and heads * s % a.k_pack == 0


def _mlp_ok(s, a: Alignment):
    return s % a.group_size == 0 and s % a.n_align == 0


@pytest.mark.parametrize("shape", [SMOLLM2, LLAMA31_8B], ids=["smollm2", "llama31_8b"])
def test_dim_steps_meet_every_alignment(shape):
    heads, kv, head_dim, group = shape
    a = Alignment(group_size=group)
    steps = dim_steps(heads, kv, head_dim, a)
    assert steps.qk < head_dim and steps.vo < head_dim  # these models are prunable per head
    assert _qk_ok(steps.qk, heads, kv, a)
    assert _vo_ok(steps.vo, heads, kv, a)
    assert _mlp_ok(steps.mlp, a)


@pytest.mark.parametrize("shape", [SMOLLM2, LLAMA31_8B, (4, 2, 16, 32), (12, 4, 64, 64), (14, 2, 64, 64),
                                   (7, 7, 8, 16)])
def test_dim_steps_are_the_smallest_aligned_values(shape):
    heads, kv, head_dim, group = shape
    a = Alignment(group_size=group)
    steps = dim_steps(heads, kv, head_dim, a)
    smallest_qk = next(s for s in range(1, 10_000) if _qk_ok(s, heads, kv, a))
    smallest_vo = next(s for s in range(1, 10_000) if _vo_ok(s, heads, kv, a))
    assert steps.qk == min(smallest_qk, head_dim)  # head_dim: the dim is never pruned
    assert steps.vo == min(smallest_vo, head_dim)
    assert steps.mlp == next(s for s in range(1, 10_000) if _mlp_ok(s, a))


def test_alignment_group_size_follows_hidden_size():
    assert Alignment.for_hidden(576).group_size == 64  # SmolLM2
    assert Alignment.for_hidden(4096).group_size == 128  # Llama-3.1-8B


# ---- RateLadder ---------------------------------------------------------------------------------------------

FULL = LayerSizes(mlp=1536, qk=64, vo=64)
STEPS = DimSteps(mlp=64, qk=16, vo=16)


def _ladder(rates):
    return uniform_ladder(FULL, STEPS, 3, rates=rates)


@pytest.mark.parametrize("rates", [(0.1, 0.2), (), (0.0, 0.2, 0.2), (0.0, 0.3, 0.2)])
def test_ladder_must_start_at_zero_and_increase(rates):
    with pytest.raises(ValueError):
        _ladder(rates)


def test_ladder_needs_one_row_per_rate():
    good = _ladder((0.0, 0.1))
    with pytest.raises(ValueError, match="one row"):
        RateLadder(rates=[0.0, 0.1], layer_keep=good.layer_keep, sizes=good.sizes[:1])


def test_nearest_snaps_to_closest_rung():
    ladder = _ladder((0.0, 0.25, 0.5))
    assert [ladder.nearest(r) for r in (0.0, 0.1, 0.2, 0.49, 0.9)] == [0, 0, 1, 2, 2]


def test_nearest_tie_goes_to_lighter_pruning():
    ladder = _ladder((0.0, 0.25, 0.5))
    assert ladder.nearest(0.125) == 0
    assert ladder.nearest(0.375) == 1


def test_nearest_decimal_midpoints_of_default_rates_go_lighter():
    ladder = _ladder(DEFAULT_RATES)
    for i in range(len(DEFAULT_RATES) - 1):
        midpoint = float(f"{(DEFAULT_RATES[i] + DEFAULT_RATES[i + 1]) / 2:.4f}")  # e.g. 0.275 as typed
        assert ladder.nearest(midpoint) == i, midpoint


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_nearest_rejects_invalid_rate(rate):
    with pytest.raises(ValueError, match="pruning rate"):
        _ladder((0.0, 0.5)).nearest(rate)


def test_ladder_dict_round_trip_through_json():
    ladder = _ladder(DEFAULT_RATES)
    back = RateLadder.from_dict(json.loads(json.dumps(ladder.to_dict())))
    assert back == ladder
    assert isinstance(back.sizes[3][1], LayerSizes)


def test_uniform_ladder_sizes_shrink_with_rate_for_every_layer():
    ladder = uniform_ladder(LayerSizes(mlp=1536, qk=64, vo=64), dim_steps(*SMOLLM2[:3], Alignment(64)), 30)
    assert ladder.sizes[0] == [FULL] * 30
    for prev, cur in zip(ladder.sizes, ladder.sizes[1:], strict=False):
        for a, b in zip(prev, cur, strict=True):
            assert b.mlp <= a.mlp and b.qk <= a.qk and b.vo <= a.vo
    assert ladder.sizes[-1][0].mlp < FULL.mlp  # the ladder actually prunes


def test_a_hidden_size_no_group_divides_takes_the_finest_float_alignment():
    """A floating-point checkpoint quantizes nothing: hidden 100 (or 72) takes the finest step instead of the refusal
    "hidden size 100 is not a multiple of 16: no INT4 group size fits it" (`uniql compress --no-quant` failed)."""
    assert Alignment.for_hidden(100).group_size == 16
    assert Alignment.for_hidden(576).group_size == 64


def _checked(sizes_at_rung_2, rates=(0.0, 0.1, 0.2)):
    """check_ladder over a 2-layer ladder (mlp 256, head_dim 64) whose rung 2 is ``sizes_at_rung_2``."""
    from types import SimpleNamespace

    from uniql.runtime.ladder import check_ladder

    spec = SimpleNamespace(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256,
                           ssm_heads=0, ssm_groups=0, ssm_head_dim=0, ssm_state=0)
    full = LayerSizes(mlp=256, qk=64, vo=64)
    ladder = RateLadder(list(rates), [[1.0, 1.0]] * 3, [[full, full], [full, full], sizes_at_rung_2])
    check_ladder(ladder, spec)


@pytest.mark.parametrize("sizes, message", [
    ([LayerSizes(999999, 64, 64)] * 2, r"sizes\[2\]\[0\].mlp is 999999; it must be a whole number in \[1, 256\]"),
    ([LayerSizes(256, 64, 64), LayerSizes(256, 0, 64)], r"sizes\[2\]\[1\].qk is 0"),
    ([LayerSizes(256, 64, 64), LayerSizes(256, 64, 64, ssm_p=2)], r"sizes\[2\]\[1\].ssm_p is 2; .* \[0, 0\]"),
    ([LayerSizes(256, 64, 64)], r"sizes\[2\] lists 1 layers; the architecture has 2"),
], ids=["past_full", "zero", "dim_the_model_lacks", "missing_layer"])
def test_check_ladder_names_the_first_bad_size(sizes, message):
    with pytest.raises(ValueError, match=message):
        _checked(sizes)


def test_check_ladder_takes_what_kept_size_makes():
    _checked([LayerSizes(128, 32, 64), LayerSizes(192, 64, 16)])
    with pytest.raises(ValueError, match="must be pruning rates in"):
        _checked([LayerSizes(128, 32, 64)] * 2, rates=(0.0, 0.1, 1.0))
