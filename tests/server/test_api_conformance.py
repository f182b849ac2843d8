"""Corners of the OpenAI API that a client relies on beyond the basics (test_api.py): the Models API's retrieve,
completions' logprobs always holding the sampled token, usage on streamed chunks (OpenAI's null before the last,
vLLM's continuous_usage_stats), stream_options.include_obfuscation, echo with max_tokens 0 (the prompt alone),
and 400s that name their field. Real uvicorn server on the tiny model, the real `openai` client or raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "Say something about foxes."}]
LONG = {"ignore_eos": True}


def _sse(base_url: str, path: str, body: dict) -> list[dict]:
    """The JSON chunks of one streamed request (``[DONE]`` checked and dropped)."""
    with httpx.stream("POST", f"{base_url}/v1/{path}", json=body, headers=HEADERS, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_models_retrieve(client, tiny_server):
    model = client.models.retrieve("tiny")  # GET /v1/models/tiny: was an "unknown route" 404
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "uniql"
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.body["code"] == "model_not_found"
    assert httpx.get(f"{tiny_server}/v1/models/tiny", timeout=10).status_code == 401  # guarded as /v1/models


@pytest.mark.parametrize("logprobs", [0, 2])
def test_completion_top_logprobs_always_hold_the_sampled_token(client, logprobs):
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements". The tiny random model, sampled at temperature 1, rarely picks one of its top tokens."""
    kwargs = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 3,
              "logprobs": logprobs, "extra_body": LONG}
    whole = client.completions.create(**kwargs).choices[0].logprobs
    for token, logprob, top in zip(whole.tokens, whole.token_logprobs, whole.top_logprobs, strict=True):
        assert top[token] == pytest.approx(logprob)
        assert logprobs <= len(top) <= logprobs + 1
    streamed = [c.choices[0].logprobs.top_logprobs for c in client.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert [top for chunk in streamed for top in chunk] == whole.top_logprobs


def test_streamed_chunks_carry_usage_null_until_the_usage_chunk(tiny_server):
    for path, body in (("chat/completions", {"messages": CHAT}), ("completions", {"prompt": "Hello"})):
        chunks = _sse(tiny_server, path, {**body, "max_tokens": 3, "stream": True, **LONG,
                                          "stream_options": {"include_usage": True}})
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), path
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        plain = _sse(tiny_server, path, {**body, "max_tokens": 3, "stream": True, **LONG})
        assert all("usage" not in c for c in plain)  # without include_usage, no usage field at all


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(tiny_server):
    """vLLM's stream_options.continuous_usage_stats was accepted and then ignored (no usage but the last)."""
    chunks = _sse(tiny_server, "chat/completions", {
        "messages": CHAT, "max_tokens": 4, "n": 2, "stream": True, **LONG,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    *body, last = chunks
    assert all(c["usage"] is not None for c in body)
    seen = [c["usage"]["completion_tokens"] for c in body]
    assert seen == sorted(seen) and seen[0] == 0  # the role chunks come before any token
    tokens = [c["usage"]["completion_tokens"] for c in body if c["choices"][0]["delta"].get("content")]
    assert len(set(tokens)) == len(tokens)  # each token chunk counts its own token
    prompt = last["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in body)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8 == seen[-1]


def test_include_obfuscation_false_is_accepted_true_refused(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=True,
                                            stream_options={"include_obfuscation": False, "include_usage": True})
    assert list(stream)[-1].usage.completion_tokens >= 1  # no padding is what this server sends anyway
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=True,
                                       stream_options={"include_obfuscation": True})
    assert err.value.body["param"] == "stream_options.include_obfuscation"


def test_top_logprobs_without_logprobs_is_a_400_naming_top_logprobs(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
    ok = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, top_logprobs=0)
    assert ok.choices[0].logprobs is None


def test_vllm_top_k_minus_one_means_no_top_k(client):
    def text(top_k):
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=5,
                                         extra_body={"top_k": top_k, **LONG}).choices[0].text
    assert text(-1) == text(0)
    with pytest.raises(openai.BadRequestError) as err:
        text(-2)
    assert err.value.body["param"] == "top_k"


@pytest.mark.parametrize("prompt", ["Once upon a time", [40, 1211, 2987]])
def test_echo_with_max_tokens_0_returns_the_prompt_alone(client, tokenizer, prompt):
    """OpenAI's way to get a prompt back without generating (finish_reason "length", no completion tokens): it was
    a 400 ("max_tokens: should be greater than or equal to 1"), whole and streamed."""
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    tokens = client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage.prompt_tokens
    kw = {"model": "tiny", "prompt": prompt, "echo": True, "max_tokens": 0}
    whole = client.completions.create(n=2, **kw)
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(0, text, "length"), (1, text, "length")]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (tokens, 0, tokens)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 0


def test_max_tokens_0_needs_echo_and_the_rest_is_still_checked(client):
    full = [40] * client.models.retrieve("tiny").model_extra["max_model_len"]  # nothing generated: it fits
    fits = client.completions.create(model="tiny", prompt=full, echo=True, max_tokens=0)
    assert fits.usage.prompt_tokens == len(full) and fits.usage.completion_tokens == 0
    cases = [({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # nothing to return at all
             ({"prompt": "hi", "max_tokens": 0, "echo": True, "temperature": 3.0}, "temperature"),
             ({"prompt": full + [40], "max_tokens": 0, "echo": True}, "prompt")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", **kwargs)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError) as err:  # chat has no echo: 0 stays refused, as in OpenAI
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
