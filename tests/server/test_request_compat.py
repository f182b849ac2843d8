"""Request bodies as real clients send them: explicit nulls for OpenAI's nullable fields, conversations replayed
with the fields OpenAI returns on messages, and odd input that must be a 400 (deep JSON, out-of-range seeds).
Real uvicorn server, the real `openai` client or raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
USER = {"role": "user", "content": "hi"}


def _post(base_url, path, body):
    return httpx.post(f"{base_url}/v1/{path}", json=body, headers=HEADERS, timeout=60)


@pytest.mark.parametrize("path, field", [
    ("chat/completions", "n"), ("chat/completions", "stream"), ("chat/completions", "logprobs"),
    ("chat/completions", "stream_options"), ("chat/completions", "temperature"), ("chat/completions", "stop"),
    ("chat/completions", "tools"), ("chat/completions", "response_format"), ("chat/completions", "seed"),
    ("completions", "echo"), ("completions", "n"), ("completions", "stream"), ("completions", "logprobs"),
    ("completions", "best_of"), ("completions", "suffix"),
])
def test_an_explicit_null_means_the_default(tiny_server, path, field):
    body = {"max_tokens": 2, field: None, **({"messages": [USER]} if path.startswith("chat") else {"prompt": "hi"})}
    resp = _post(tiny_server, path, body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 1 and resp.json()["choices"][0]["logprobs"] is None


def test_null_stays_refused_for_unknown_fields_and_required_ones(tiny_server):
    unknown = _post(tiny_server, "chat/completions", {"messages": [USER], "frobnicate": None})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frobnicate"
    missing = _post(tiny_server, "chat/completions", {"messages": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"


def test_a_replayed_conversation_with_openai_message_fields_is_accepted(client):
    first = client.chat.completions.create(model="tiny", messages=[USER], max_tokens=2).choices[0].message
    replayed = [{"role": "system", "content": "be brief", "name": "setup"}, USER,
                first.model_dump(),  # as the openai client hands it back: refusal, tool_calls, audio... all null
                {"role": "user", "content": "more", "name": "bob"},
                {"role": "assistant", "content": "ok", "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    assert {"tool_calls", "refusal", "audio", "function_call"} <= set(replayed[2])
    resp = client.chat.completions.create(model="tiny", messages=replayed, max_tokens=2)
    assert resp.choices[0].message.role == "assistant"


@pytest.mark.parametrize("extra, param", [
    ({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "messages.1.tool_calls"),
    ({"function_call": {"name": "f", "arguments": "{}"}}, "messages.1.function_call"),
    ({"audio": {"id": "audio_1"}}, "messages.1.audio"),
    ({"mood": "cheerful"}, "messages.1.mood"),  # unknown message fields stay refused
])
def test_message_fields_this_server_cannot_honour_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[USER, {"role": "assistant", "content": "a", **extra}],
                                       max_tokens=2)
    assert err.value.body["param"] == param


def test_deeply_nested_json_is_a_400(tiny_server):
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", content=body, timeout=60,
                      headers={**HEADERS, "content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("body, param, sent", [
    ({"seed": 2**70}, "seed", str(2**70)),
    ({"seed": 2**63 - 2**16 - 1, "n": 2}, "seed", str(2**63 - 2**16 - 1)),  # choice 1's seed + 1 is out of range
    ({"seed": -2**63 - 1}, "seed", str(-2**63 - 1)),
    ({"top_k": 2**40}, "top_k", str(2**40)),
])
def test_out_of_range_seed_and_top_k_are_400_naming_the_field(tiny_server, body, param, sent):
    resp = _post(tiny_server, "completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and sent in error["message"]
    assert _post(tiny_server, "completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("chat/completions", {"max_tokens": True}, "max_tokens"),  # was 1 token
    ("chat/completions", {"max_tokens": "5"}, "max_tokens"),  # was 5 tokens
    ("chat/completions", {"stream": "yes"}, "stream"),  # was a stream
    ("chat/completions", {"seed": "7"}, "seed"),
    ("chat/completions", {"n": 2.0}, "n"),
    ("chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("completions", {"prompt": [True, 2]}, "prompt"),  # was token ids [1, 2]
    ("completions", {"logprobs": True}, "logprobs"),  # was logprobs=1
])
def test_a_value_of_the_wrong_type_is_a_400_not_coerced(tiny_server, path, body, param):
    base = {"messages": [USER]} if path.startswith("chat") else {"prompt": "hi"}
    resp = _post(tiny_server, path, {**base, "max_tokens": 2, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_union_type_error_names_the_parameter_not_pydantics_member(tiny_server):
    """``"stop": [1]`` was a 400 naming ``stop.str`` ("Input should be a valid string")."""
    cases = [("chat/completions", {"messages": [USER], "stop": [1]}, "stop"),
             ("chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content"),
             ("completions", {"prompt": [[1], [2, "x"]]}, "prompt")]
    for path, body, param in cases:
        error = _post(tiny_server, path, body).json()["error"]
        assert error["param"] == param and error["code"] == "invalid_type", error
        assert "list[str]" in error["message"] or "list[dict" in error["message"], error


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": []}, {"role": "tool", "tool_call_id": "c"}])
def test_a_message_without_content_is_a_400_unless_from_the_assistant(tiny_server, message):
    resp = _post(tiny_server, "chat/completions", {"messages": [message, USER], "max_tokens": 2})
    assert resp.status_code == 400, resp.text  # was an empty turn the client never wrote
    assert resp.json()["error"]["param"] == "messages.0.content"
    replayed = [USER, {"role": "assistant", "content": None, "refusal": "no"}, USER]
    assert _post(tiny_server, "chat/completions", {"messages": replayed, "max_tokens": 2}).status_code == 200


def test_text_parts_of_a_message_are_joined_by_newlines_as_in_vllm(client):
    """They were joined with nothing: ["Say", "something"] reached the model as "Saysomething"."""
    def answer(content):
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        return resp.choices[0].message.content, resp.usage.prompt_tokens

    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "something about foxes."}]
    assert answer(parts) == answer("Say\nsomething about foxes.")


def test_an_empty_logit_bias_is_accepted_and_a_real_one_refused(tiny_server):
    """``"logit_bias": {}`` biases nothing (OpenAI accepts it) and was a 400."""
    ok = _post(tiny_server, "completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {}})
    assert ok.status_code == 200, ok.text
    refused = _post(tiny_server, "completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"11": 5}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logit_bias"
