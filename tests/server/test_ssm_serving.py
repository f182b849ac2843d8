"""The server serves tiny INT4 hybrid checkpoints (Bamba: Mamba2 + attention + MLP; Nemotron-H: M / * / - blocks)
end to end: a real uvicorn server on 127.0.0.1 and the real `openai` client."""

from __future__ import annotations

import pytest
from conftest import API_KEY, tiny_config
from helpers import build_tiny_int4_ckpt
from server_helpers import running_server

CHAT = [{"role": "user", "content": "Say something about foxes."}]


@pytest.fixture(scope="module", params=["bamba", "nemotron_h"])
def hybrid_client(request, tokenizer, data_dir, tmp_path_factory):
    from openai import OpenAI

    root = tmp_path_factory.mktemp(f"{request.param}-serve")
    ckpt = build_tiny_int4_ckpt(root / "src", root / "ckpt", data_dir, tokenizer, seed=11, family=request.param)
    with running_server(tiny_config(ckpt)) as base_url:
        yield OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _chat(client, **kw):
    return client.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, temperature=0,
                                                           extra_body={"ignore_eos": True, **kw.pop("extra", {})},
                                                           **kw)


def test_hybrid_chat_greedy_and_streaming(hybrid_client):
    raw = _chat(hybrid_client, max_tokens=8)
    resp = raw.parse()
    text = resp.choices[0].message.content
    assert text and resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
    assert raw.headers["x-uniql-prune-rate"] == "0.00"
    stream = hybrid_client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=8,
                                                   stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text  # same greedy text


def test_hybrid_pinned_rate_and_concurrent_requests(hybrid_client):
    """A pinned pruned rate runs at its rung (smaller SSM states); several requests decode as one batch."""
    from concurrent.futures import ThreadPoolExecutor

    raw = _chat(hybrid_client, max_tokens=5, extra={"prune_rate": 0.35})
    assert raw.headers["x-uniql-prune-rate"] == "0.35" and raw.parse().usage.completion_tokens == 5
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: _chat(hybrid_client, max_tokens=6).parse().choices[0].message.content,
                              range(4)))
    assert len(set(texts)) == 1  # greedy: every concurrent request gets the text a lone request gets
    assert texts[0] == _chat(hybrid_client, max_tokens=6).parse().choices[0].message.content
