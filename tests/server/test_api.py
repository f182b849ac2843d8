"""The OpenAI API end to end: a real uvicorn server on 127.0.0.1, the real `openai` client (max_retries=0)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import API_KEY
from server_helpers import metrics, sample

CHAT = [{"role": "user", "content": "Say something about foxes."}]


def greedy_chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, **kw)


def test_chat_completion_reports_usage_and_the_rung(client):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, temperature=0,
                                                          max_tokens=6, extra_body={"ignore_eos": True})
    resp = raw.parse()
    assert resp.object == "chat.completion" and resp.model == "tiny"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 6 and resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6
    assert raw.headers["x-uniql-prune-rate"] == "0.00" and resp.usage.model_extra["prune_rate"] == 0.0
    assert greedy_chat(client, max_tokens=6, extra_body={"ignore_eos": True}).choices[0].message.content \
        == choice.message.content  # greedy: the same text again


def test_chat_streaming_equals_the_whole_response(client):
    whole = greedy_chat(client, max_tokens=8, extra_body={"ignore_eos": True})
    stream = greedy_chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_ends_with_done(tiny_server):
    body = {"messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_and_models(client):
    resp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["prune_rates"][0] == 0.0


def test_echo_returns_the_prompt_before_the_completion(client, tokenizer):
    """echo: the prompt, then the completion (whole and streamed alike; token-id prompts decoded); the prompt is
    neither generated nor counted as completion tokens. With logprobs it would need the prompt's logprobs: 400."""
    prompt, kw = "Once upon a time", dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(prompt=prompt, **kw)
    echoed = client.completions.create(prompt=prompt, echo=True, **kw)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == 4 and echoed.usage.prompt_tokens == plain.usage.prompt_tokens
    chunks = [c for c in client.completions.create(prompt=prompt, echo=True, stream=True, n=2, **kw) if c.choices]
    for index in (0, 1):
        pieces = [c.choices[0].text for c in chunks if c.choices[0].index == index]
        assert pieces[0] == prompt and "".join(pieces) == echoed.choices[0].text
    ids = [40, 1211, 2987]
    from_ids = client.completions.create(prompt=ids, echo=True, **kw).choices[0].text
    assert from_ids == tokenizer.decode(ids) + client.completions.create(prompt=ids, **kw).choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=prompt, echo=True, logprobs=2, **kw)
    assert err.value.body["param"] == "echo"


def test_same_seed_same_text(client):
    def sampled(seed):
        return client.chat.completions.create(model="tiny", messages=CHAT, temperature=1.0, seed=seed,
                                              max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    assert sampled(3) == sampled(3)
    assert len({sampled(s) for s in (3, 4, 5)}) > 1


def test_stop_string_cuts_the_text(client):
    full = greedy_chat(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = greedy_chat(client, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]


def test_n_choices(client):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, n=2, temperature=1.0, seed=9,
                                          max_tokens=10, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].message.content != resp.choices[1].message.content
    assert resp.usage.completion_tokens == 20
    streamed = client.chat.completions.create(model="tiny", messages=CHAT, n=2, temperature=1.0, seed=9,
                                              max_tokens=10, stream=True, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in resp.choices]


def test_logprobs(client):
    resp = greedy_chat(client, max_tokens=4, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the chosen token is the top
    assert "".join(i.token for i in content) == resp.choices[0].message.content
    text = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(text.tokens) == 3 and len(text.top_logprobs[0]) == 2 and text.text_offset[0] == 0


def test_pinned_prune_rate(client):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, max_tokens=3,
                                                          extra_body={"prune_rate": 0.24})
    assert raw.headers["x-uniql-prune-rate"] == "0.25" and raw.parse().usage.model_extra["prune_rate"] == 0.25


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": -0.5}, "top_p"),
    ({"max_tokens": 100_000}, "messages"),  # prompt + max_tokens over the context
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),  # unknown field: never silently ignored
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"prune_rate": 1.5}}, "prune_rate"),
    ({"n": 0}, "n"),
])
def test_bad_input_is_a_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["message"]


def test_malformed_bodies_are_400_not_422(tiny_server):
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    for body in (b"{not json", b"[1, 2]", json.dumps({"messages": "hi"}).encode(),
                 json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()):
        resp = httpx.post(f"{tiny_server}/v1/chat/completions", content=body, headers=headers, timeout=10)
        assert resp.status_code == 400, body
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_only_api_requests_count_as_request_errors(client, tiny_server):
    """A scanner's 404 (or /health's 503 while loading) is no failed API request: it inflated the error rate."""
    before = sample(metrics(tiny_server), "uniql_request_errors", "uniql_request_errors_total", status="404")
    assert httpx.get(f"{tiny_server}/wp-login.php", timeout=10).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    after = sample(metrics(tiny_server), "uniql_request_errors", "uniql_request_errors_total", status="404")
    assert after - before == 1


def test_unknown_model_is_404_and_bad_key_401(client, tiny_server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert err.value.body["code"] == "model_not_found"
    from openai import OpenAI

    for key in ("wrong", None):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        resp = httpx.get(f"{tiny_server}/v1/models", headers=headers, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{tiny_server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{tiny_server}/health", timeout=10).status_code == 200  # health stays public
    head = httpx.head(f"{tiny_server}/health", timeout=10)  # probes that send HEAD (curl -I, load balancers)
    assert head.status_code == 200 and head.content == b""


def test_metrics_parse_and_count_the_requests(client, tiny_server):
    before = metrics(tiny_server)
    for _ in range(3):
        greedy_chat(client, max_tokens=4, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=9)
    after = metrics(tiny_server)

    def grew(family, name=None, **labels):
        return sample(after, family, name, **labels) - sample(before, family, name, **labels)

    for hist in ("uniql_time_to_first_token_seconds", "uniql_e2e_request_latency_seconds",
                 "uniql_request_prune_rate"):
        assert grew(hist, f"{hist}_count", model="tiny") == 3
    assert grew("uniql_inter_token_latency_seconds", "uniql_inter_token_latency_seconds_count", model="tiny") == 9
    assert grew("uniql_generation_tokens", "uniql_generation_tokens_total", model="tiny") == 12
    assert grew("uniql_requests", "uniql_requests_total", model="tiny", finish_reason="length") == 3
    assert sample(after, "uniql_weights_resident_bytes", model="tiny") > 0
    assert sample(after, "uniql_memory_available_bytes", device="host") > 0
    assert grew("uniql_request_errors", "uniql_request_errors_total", status="400") == 1
    from uniql.server.metrics import EXPOSED_NAMES

    names = {name for family in after.values() for name, _ in family}
    for name in EXPOSED_NAMES:
        if name != "uniql_gpu_utilization_ratio":  # no GPU on this host
            assert any(n == name or n.startswith(name + "_") for n in names), name
