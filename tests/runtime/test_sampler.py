"""Sampler: greedy, truncation supports, penalties against hand-computed logits, per-request reproducibility,
the empirical distribution, logprobs, padded vocab columns and non-finite logits (CPU, small vocabularies)."""

from __future__ import annotations

import math

import pytest
import torch

from uniql.runtime.request import SamplingParams
from uniql.runtime.sampler import Sampler


def _batch(sampler: Sampler, logits_bv: torch.Tensor, params: SamplingParams | list[SamplingParams],
           ids: list[str] | None = None, prompts=None, outputs=None):
    """Samples every row of logits_bv; a single params object applies to every row, seeded by row index."""
    rows = logits_bv.shape[0]
    if isinstance(params, SamplingParams):
        params = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(rows)]
    ids = ids or [f"r{i}" for i in range(rows)]
    return sampler(logits_bv, params, ids, prompts or [[0]] * rows, outputs or [[]] * rows)


def _support(probs: list[float], params: SamplingParams, rows: int = 2000) -> set[int]:
    """The set of tokens drawn over `rows` differently seeded rows that all see the distribution `probs`."""
    logits_bv = torch.tensor(probs).log().expand(rows, -1)
    return set(_batch(Sampler(len(probs)), logits_bv, params).token_ids)


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits_bv = torch.randn(16, 100)
    out = _batch(Sampler(100), logits_bv, SamplingParams(temperature=0.0))
    assert out.token_ids == logits_bv.argmax(-1).tolist()


def test_small_temperature_is_greedy_in_the_limit():
    logits_bv = torch.tensor([1.0, 1.95, 2.0, 1.9, 0.0]).expand(500, -1)
    cold = _batch(Sampler(5), logits_bv, SamplingParams(temperature=1e-3)).token_ids
    warm = _batch(Sampler(5), logits_bv, SamplingParams(temperature=1.0)).token_ids
    assert set(cold) == {2}
    assert len(set(warm)) > 1  # the same rows at temperature 1 do spread out


def test_top_k_one_equals_greedy():
    torch.manual_seed(1)
    logits_bv = torch.randn(64, 30)
    out = _batch(Sampler(30), logits_bv, SamplingParams(temperature=1.5, top_k=1))
    assert out.token_ids == logits_bv.argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------- truncation
_PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]  # ranks: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05)


@pytest.mark.parametrize(("top_k", "expected"), [(2, {1, 3}), (3, {1, 3, 4}), (0, {0, 1, 2, 3, 4})])
def test_top_k_support(top_k, expected):
    assert _support(_PROBS, SamplingParams(top_k=top_k)) == expected


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.0, {1}),  # OpenAI's top_p 0: the top token alone (was an empty support: NaN)
    (0.3, {1}),  # the top token alone already covers 0.3
    (0.6, {1, 3}),  # 0.4 < 0.6 <= 0.7
    (0.8, {1, 3, 4}),  # 0.7 < 0.8 <= 0.85
    (0.9, {1, 3, 4, 0}),  # 0.85 < 0.9 <= 0.95
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
    assert _support(_PROBS, SamplingParams(top_p=top_p)) == expected


def test_top_p_stops_once_the_mass_is_reached_exactly():
    # dyadic probabilities are exact in float32: the top two hold exactly 0.75, so nothing more is needed
    assert _support([0.125, 0.5, 0.125, 0.25], SamplingParams(top_p=0.75)) == {1, 3}


@pytest.mark.parametrize(("min_p", "expected"), [
    (0.2, {1, 3, 4, 0}),  # threshold 0.08 drops 0.05
    (0.3, {1, 3, 4}),  # threshold 0.12
    (0.5, {1, 3}),  # threshold 0.2
    (1.0, {1}),
])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, expected):
    assert _support(_PROBS, SamplingParams(min_p=min_p)) == expected


def test_filters_combine_as_an_intersection():
    assert _support(_PROBS, SamplingParams(top_k=3, top_p=0.95, min_p=0.3)) == {1, 3, 4}
    assert _support(_PROBS, SamplingParams(top_k=4, top_p=0.6, min_p=0.01)) == {1, 3}


# ---------------------------------------------------------------------------------------------- penalties
_RAW = [2.0, -1.0, 0.5, 1.0, -0.5]
_PROMPT, _OUTPUT = [1, 3], [0, 0, 2]  # tokens 1, 3 only in the prompt; 0 generated twice, 2 once


@pytest.mark.parametrize(("params", "expected"), [
    # repetition 2 on every seen token (prompt + output): positive / 2, negative * 2; token 4 unseen
    (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.25, 0.5, -0.5]),
    # presence: once per generated token, prompt-only tokens untouched
    (SamplingParams(presence_penalty=0.5), [1.5, -1.0, 0.0, 1.0, -0.5]),
    # frequency: times the generated count
    (SamplingParams(frequency_penalty=0.25), [1.5, -1.0, 0.25, 1.0, -0.5]),
    # negative values reward repeats
    (SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), [4.0, -1.0, 2.0, 1.0, -0.5]),
    # repetition first, then presence/frequency on the result
    (SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
     [0.0, -2.0, -0.5, 0.5, -0.5]),
])
def test_penalties_move_the_right_logits_by_the_right_amounts(params, expected):
    """The reported logprobs are log_softmax of the penalised logits; compare them over the whole vocab."""
    params = SamplingParams(**{**params.__dict__, "temperature": 0.0, "logprobs": True, "top_logprobs": 5})
    out = Sampler(5)(torch.tensor([_RAW]), [params], ["r"], [_PROMPT], [_OUTPUT])
    expected_v = torch.tensor(expected)
    want = expected_v.log_softmax(-1)
    got = torch.tensor([out.top_logprobs[0][t] for t in range(5)])
    torch.testing.assert_close(got, want)
    assert out.token_ids == [int(expected_v.argmax())]


def test_penalties_are_per_row():
    logits_bv = torch.tensor([_RAW, _RAW])
    params = [SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(temperature=0)]
    out = Sampler(5)(logits_bv, params, ["a", "b"], [_PROMPT] * 2, [_OUTPUT] * 2)
    assert out.token_ids == [3, 0]  # only row a is pushed off its repeated token 0


# ---------------------------------------------------------------------------------------------- reproducibility
def _stream(steps_logits: list[torch.Tensor], seed: int | None, others: int, request_id: str, sampler: Sampler):
    """Tokens drawn for one request over the steps, with `others` unrelated requests around it in the batch."""
    params = SamplingParams(seed=seed, top_p=0.95)
    tokens = []
    for step, logits_v in enumerate(steps_logits):
        slot = step % (others + 1)  # the request moves around the batch
        noise_bv = torch.randn(others + 1, logits_v.shape[0])
        noise_bv[slot] = logits_v
        ids = [f"other{step}-{j}" for j in range(others + 1)]
        ids[slot] = request_id
        batch = [SamplingParams(seed=j) for j in range(others + 1)]
        batch[slot] = params
        out = sampler(noise_bv, batch, ids, [[0]] * (others + 1), [[]] * (others + 1))
        tokens.append(out.token_ids[slot])
    return tokens


def test_same_seed_same_tokens_across_samplers_and_batches():
    torch.manual_seed(2)
    steps = [torch.randn(1000) for _ in range(20)]
    alone = _stream(steps, seed=7, others=0, request_id="x", sampler=Sampler(1000))
    crowded = _stream(steps, seed=7, others=3, request_id="y", sampler=Sampler(1000))
    assert alone == crowded
    assert _stream(steps, seed=8, others=0, request_id="x", sampler=Sampler(1000)) != alone


def test_unseeded_requests_get_their_own_streams_from_the_global_rng():
    torch.manual_seed(3)
    steps = [torch.randn(1000) for _ in range(10)]
    torch.manual_seed(4)
    first = _stream(steps, seed=None, others=0, request_id="a", sampler=Sampler(1000))
    second = _stream(steps, seed=None, others=0, request_id="a", sampler=Sampler(1000))
    torch.manual_seed(4)
    assert _stream(steps, seed=None, others=0, request_id="a", sampler=Sampler(1000)) == first
    assert second != first


def test_release_drops_the_generator():
    sampler = Sampler(10)
    gen = sampler.generator_for("r", 5, "cpu")
    assert sampler.generator_for("r", 5, "cpu") is gen
    first = torch.rand(4, generator=gen)
    sampler.release("r")
    again = torch.rand(4, generator=sampler.generator_for("r", 5, "cpu"))
    torch.testing.assert_close(again, first)  # a fresh generator, seeded again from the start


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_frequencies_match_softmax(temperature):
    logits_v = torch.tensor([0.5, -1.0, 1.5, 0.0, 1.0, -0.3])
    rows, steps = 2000, 10
    sampler = Sampler(6)
    params = [SamplingParams(seed=i, temperature=temperature) for i in range(rows)]
    ids = [f"r{i}" for i in range(rows)]
    tokens = []
    for _ in range(steps):  # 10 consecutive draws of 2000 streams: 20k samples
        tokens += sampler(logits_v.expand(rows, -1), params, ids, [[0]] * rows, [[]] * rows).token_ids
    freq_v = torch.bincount(torch.tensor(tokens), minlength=6).float() / len(tokens)
    want_v = (logits_v / temperature).softmax(-1)
    assert (freq_v - want_v).abs().max() < 0.015  # ~4 standard errors at 20k samples


# ---------------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_penalised_but_not_tempered_or_truncated():
    torch.manual_seed(5)
    logits_bv = torch.randn(32, 50)
    outputs = [[3, 3, 7]] * 32
    params = SamplingParams(temperature=0.3, top_k=5, frequency_penalty=1.0, logprobs=True, top_logprobs=4)
    out = _batch(Sampler(50), logits_bv, params, outputs=outputs)
    penalised_bv = logits_bv.clone()
    penalised_bv[:, 3] -= 2.0
    penalised_bv[:, 7] -= 1.0
    logp_bv = penalised_bv.log_softmax(-1)
    want = logp_bv.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), want)
    for row, top in enumerate(out.top_logprobs):
        vals, idx = logp_bv[row].topk(4)
        assert list(top) == idx.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), vals)


def test_logprobs_only_when_asked():
    logits_bv = torch.randn(3, 10)
    params = [SamplingParams(), SamplingParams(logprobs=True), SamplingParams(logprobs=True, top_logprobs=2)]
    out = Sampler(10)(logits_bv, params, ["a", "b", "c"], [[0]] * 3, [[]] * 3)
    assert out.logprobs[0] is None and out.top_logprobs[0] is None
    assert out.logprobs[1] is not None and out.top_logprobs[1] is None
    assert len(out.top_logprobs[2]) == 2


# ---------------------------------------------------------------------------------------------- vocab and dtype
def test_padded_vocab_columns_are_never_sampled_nor_counted():
    logits_bv = torch.zeros(500, 8)
    logits_bv[:, 4:] = 50.0  # padded head columns that would win every draw if they were looked at
    logits_bv[:, 6] = math.nan  # and garbage there must not raise
    params = SamplingParams(logprobs=True, top_logprobs=3)
    out = _batch(Sampler(4), logits_bv, params)
    assert set(out.token_ids) == {0, 1, 2, 3}
    assert all(abs(lp - math.log(0.25)) < 1e-5 for lp in out.logprobs)
    assert all(set(top) <= {0, 1, 2, 3} for top in out.top_logprobs)


def test_half_precision_input_is_sampled_in_float32_and_left_untouched():
    torch.manual_seed(6)
    logits_bv = torch.randn(8, 40).to(torch.bfloat16)
    before = logits_bv.clone()
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0)
    half = _batch(Sampler(40), logits_bv, params, outputs=[[1, 2, 3]] * 8)
    full = _batch(Sampler(40), logits_bv.float(), params, outputs=[[1, 2, 3]] * 8)
    assert half.token_ids == full.token_ids
    assert torch.equal(logits_bv, before)


# ---------------------------------------------------------------------------------------------- bad logits
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_flagged_per_row(bad):
    """A bad row is reported (the engine fails that request only) and does not disturb the others' draws."""
    logits_bv = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(seed=s, logprobs=True) for s in (1, 2, 3)]
    clean = Sampler(6)(logits_bv.clone(), params, ["ok0", "req-bad", "ok2"], [[0]] * 3, [[]] * 3)
    logits_bv[1, 2] = bad
    out = Sampler(6)(logits_bv, params, ["ok0", "req-bad", "ok2"], [[0]] * 3, [[]] * 3)
    assert out.finite == [True, False, True] and clean.finite == [True, True, True]
    assert [out.token_ids[i] for i in (0, 2)] == [clean.token_ids[i] for i in (0, 2)]
    assert [out.logprobs[i] for i in (0, 2)] == [clean.logprobs[i] for i in (0, 2)]


def test_narrow_logits_raise():
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(10)(torch.zeros(1, 8), [SamplingParams()], ["r"], [[0]], [[]])
