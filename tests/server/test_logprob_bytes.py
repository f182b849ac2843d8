"""Logprobs of tokens that hold part of a UTF-8 character: ``bytes`` are the token's raw bytes (joined, they
rebuild the text), ``token`` the decoded text (U+FFFD there), completions' ``text_offset`` the same whole and
streamed, and top_logprobs keys that do not collide. The tiny model is steered through its logits (a real
server, engine, sampler and detokenizer) to say a fox emoji, which SmolLM2 splits over three byte tokens. And the
token that ends generation (eos, stop_token_ids) is counted in usage but is no part of the logprobs."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import API_KEY, tiny_config
from server_helpers import rigged_server

SCRIPT_SEED = 777  # requests with this seed say SCRIPT
SCRIPT = "A🦊 fox🦊"
EOS_SEED = 778  # requests with this seed say SAID (SCRIPT's first tokens), then the end-of-sequence token
SAID = "A🦊"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def steer(backend) -> None:
    """Each SCRIPT_SEED request's next token: SCRIPT's, by far; runner-up, another emoji byte token (it decodes to
    U+FFFD as well, so the top_logprobs keys must not collide)."""
    script = backend.encode_text(SCRIPT)
    parts = [t for t in script if "\ufffd" in backend.token_text(t)]
    said, eos = len(backend.encode_text(SAID)), backend.tokenizer.eos_token_id
    runner = backend.engine.runner
    prefill, decode = runner.prefill, runner.decode

    def biased(reqs, logits):
        logits = logits.clone()  # the runner's tensors are inference-mode: a copy to edit
        for row, req in zip(logits, reqs, strict=True):
            if req.params.seed == SCRIPT_SEED:
                token = script[len(req.output_ids) % len(script)]
                row[token] += 100.0
                row[next(p for p in parts if p != token)] += 50.0
            elif req.params.seed == EOS_SEED:
                n = len(req.output_ids)
                row[script[n] if n < said else eos] += 100.0
        return logits

    runner.prefill = lambda req: biased([req], prefill(req)[None])[0]
    runner.decode = lambda reqs: biased(reqs, decode(reqs))


@pytest.fixture(scope="module")
def steered(tiny_ckpt):
    with rigged_server(tiny_config(tiny_ckpt), steer) as (base_url, app):
        yield base_url, app.state.uniql.service.backend


def _post(base_url, path, body):
    resp = httpx.post(f"{base_url}/v1/{path}", json=body, headers=HEADERS, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_chat_logprob_bytes_join_into_the_text(steered):
    base_url, backend = steered
    n = len(backend.encode_text(SCRIPT))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0, "seed": SCRIPT_SEED,
            "logprobs": True, "top_logprobs": 3, "ignore_eos": True}
    choice = _post(base_url, "chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["content"] == SCRIPT
    assert bytes(b for item in content for b in item["bytes"]) == SCRIPT.encode()
    fox = [item for item in content if "\ufffd" in item["token"]]
    assert [item["bytes"] for item in fox[:3]] == [[0xF0, 0x9F], [0xA6], [0x8A]]  # U+1F98A, as SmolLM2 splits it
    runner_up = content[0]["top_logprobs"][1]
    assert runner_up["token"] == "\ufffd" and runner_up["bytes"] != list("\ufffd".encode())


def test_completion_offsets_agree_whole_and_streamed_and_top_keys_do_not_collide(steered):
    base_url, backend = steered
    n = len(backend.encode_text(SCRIPT))
    body = {"prompt": "Hello", "max_tokens": n, "temperature": 0, "seed": SCRIPT_SEED, "logprobs": 5,
            "ignore_eos": True}
    whole = _post(base_url, "completions", body)["choices"][0]
    assert whole["text"] == SCRIPT
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=60) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    streamed = [c["logprobs"] for chunk in chunks for c in chunk["choices"] if c["logprobs"]]
    logprobs = whole["logprobs"]
    assert [o for lp in streamed for o in lp["text_offset"]] == logprobs["text_offset"]
    for offset, token in zip(logprobs["text_offset"], logprobs["tokens"], strict=True):
        if "\ufffd" not in token:  # a whole token's text sits at its offset in the text
            assert SCRIPT[offset:offset + len(token)] == token
    assert all(len(top) == 5 for top in logprobs["top_logprobs"])  # two U+FFFD tokens, two keys
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert max(top, key=top.get) == token  # the sampled token keeps its text as key


@pytest.mark.parametrize("ending", ["eos", "stop_token_ids"])
def test_the_token_that_ends_generation_counts_in_usage_but_not_in_logprobs(steered, ending):
    """As in OpenAI's API and vLLM: logprobs cover the returned text, which the eos / stop token is no part of;
    usage.completion_tokens counts it (vLLM's count). Whole and streamed, chat and completions."""
    base_url, backend = steered
    said, script = backend.encode_text(SAID), backend.encode_text(SCRIPT)
    assert script[:len(said)] == said
    seed, extra = (EOS_SEED, {}) if ending == "eos" else \
        (SCRIPT_SEED, {"ignore_eos": True, "stop_token_ids": [script[len(said)]]})
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    common = {"model": "tiny", "max_tokens": 10, "temperature": 0, "seed": seed, "extra_body": extra}
    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2, **common}
    text = {"prompt": "Hello", "logprobs": 2, **common}
    whole = client.chat.completions.create(**chat)
    content = whole.choices[0].logprobs.content
    assert whole.choices[0].message.content == SAID and whole.choices[0].finish_reason == "stop"
    assert bytes(b for item in content for b in item.bytes) == SAID.encode() and len(content) == len(said)
    assert whole.usage.completion_tokens == len(said) + 1
    plain = client.completions.create(**text)
    assert plain.choices[0].text == SAID and len(plain.choices[0].logprobs.tokens) == len(said)
    assert len(plain.choices[0].logprobs.text_offset) == len(said) and plain.usage.completion_tokens == len(said) + 1
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(**chat, **usage))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [item.model_dump() for item in streamed] == [item.model_dump() for item in content]
    assert chunks[-1].usage.completion_tokens == len(said) + 1
    chunks = list(client.completions.create(**text, **usage))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == plain.choices[0].logprobs.tokens and chunks[-1].usage.completion_tokens == len(said) + 1
