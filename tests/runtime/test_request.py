"""Request state and parameter validation (pure Python)."""

from __future__ import annotations

import pytest

from uniql.runtime.request import Request, SamplingParams, Status


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("temperature", -0.1), ("temperature", 2.5), ("top_p", -0.1), ("top_p", 1.2),
    ("top_k", -1), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0), ("top_logprobs", 21), ("stop", ("",)), ("stop", ("a", "b", "c", "d", "e")),
])
def test_out_of_range_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_bad_stop_list_is_told_the_rule_not_echoed_back():
    long = "x" * 5000
    with pytest.raises(ValueError, match=r"at most 4 non-empty strings, got 5 \(0 empty") as err:
        SamplingParams(stop=(long,) * 5)
    assert long not in str(err.value)
    with pytest.raises(ValueError, match=r"got 2 \(1 empty"):
        SamplingParams(stop=("ok", ""))


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(top_logprobs=3)
    assert SamplingParams(logprobs=True, top_logprobs=3).top_logprobs == 3


def test_greedy_when_temperature_zero_or_top_k_one():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_request_lengths_ids_and_bad_input():
    a, b = Request([1, 2, 3], SamplingParams(max_tokens=5)), Request([4])
    assert a.request_id != b.request_id and a.status is Status.WAITING and not a.finished
    a.output_ids += [7, 8]
    assert a.num_tokens == 5 and a.max_len == 8
    with pytest.raises(ValueError, match="empty"):
        Request([])
    with pytest.raises(ValueError, match="rung"):
        Request([1], rung=-1)
