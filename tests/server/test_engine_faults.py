"""The server when the engine fails or cannot take a request: failed choices (500 / an SSE error chunk), a dead
engine (503), choices beyond every seat and queue place (400), a refused n>1 request rolled back, and a chat
template that refuses the messages (400). Real uvicorn servers; faults are injected into the real engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import API_KEY, tiny_config
from server_helpers import EngineGate, metrics, rigged_server, sample

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
POISON_SEED = 4242  # a sequence sampled with this seed fails in its prefill
FAULT = "injected prefill fault"
# SmolLM2's template shape, plus the kind of check real templates make (Llama 2, Mistral: roles must alternate)
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Rig:
    """Applied to the loaded backend: a prefill that fails for POISON_SEED, the alternating template, a gate on
    the engine thread, and a record of every stream handed out (to see which ones were closed)."""

    def __init__(self):
        self.gate: EngineGate | None = None
        self.streams: list = []

    def __call__(self, backend) -> None:
        runner, submit = backend.engine.runner, backend.submit
        prefill = runner.prefill

        def failing_prefill(req):
            if req.params.seed == POISON_SEED:
                raise RuntimeError(FAULT)
            return prefill(req)

        def recording_submit(*args):
            request_id, stream = submit(*args)
            self.streams.append(stream)
            return request_id, stream

        runner.prefill, backend.submit = failing_prefill, recording_submit
        backend.tokenizer.chat_template = ALTERNATING_TEMPLATE
        self.gate = EngineGate(backend.front)


@pytest.fixture(scope="module")
def rigged(tiny_ckpt):
    """Two seats and two queue places: at most four sequences at once."""
    rig = Rig()
    with rigged_server(tiny_config(tiny_ckpt, max_num_seqs=2, max_queued_requests=2), rig) as (base_url, app):
        yield base_url, app, rig


def _grew(before, after, family, name, **labels):
    return sample(after, family, name, **labels) - sample(before, family, name, **labels)


def test_a_choice_the_engine_fails_is_a_500_in_the_envelope(rigged):
    base_url, _, _ = rigged
    before = metrics(base_url)
    body = {"prompt": "Hello", "max_tokens": 4, "n": 2, "seed": POISON_SEED - 1, "temperature": 1.0}
    resp = httpx.post(f"{base_url}/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and FAULT in error["message"] and "choice 1" in error["message"]
    after = metrics(base_url)
    assert _grew(before, after, "uniql_requests", "uniql_requests_total", finish_reason="error") == 1
    assert _grew(before, after, "uniql_requests", "uniql_requests_total", finish_reason="length") == 1
    assert _grew(before, after, "uniql_request_errors", "uniql_request_errors_total", status="500") == 1
    ok = httpx.post(f"{base_url}/v1/completions", json={**body, "seed": 1}, headers=HEADERS, timeout=60)
    assert ok.status_code == 200  # the engine went on


def test_a_streamed_choice_the_engine_fails_sends_an_error_chunk_then_done(rigged):
    base_url, _, _ = rigged
    before = metrics(base_url)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2, "seed": POISON_SEED - 1,
            "temperature": 1.0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200 and lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    assert len(errors) == 1 and set(errors[0]) == {"message", "type", "param", "code"}
    assert errors[0]["type"] == "server_error" and FAULT in errors[0]["message"]
    finishes = [(c["index"], c["finish_reason"]) for p in payloads for c in p.get("choices", []) if c["finish_reason"]]
    assert finishes == [(0, "length")]  # choice 0 ran to its end; choice 1 ended with the error chunk
    assert _grew(before, metrics(base_url), "uniql_request_errors", "uniql_request_errors_total", status="500") == 1
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=4,
                                            seed=POISON_SEED, stream=True)
    with pytest.raises(openai.APIError, match=FAULT):
        list(stream)


def test_more_choices_than_seats_and_queue_is_a_400_naming_n(rigged):
    base_url, _, _ = rigged
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 1.0}
    resp = httpx.post(f"{base_url}/v1/completions", json={**body, "n": 5}, headers=HEADERS, timeout=60)
    assert resp.status_code == 400 and "retry-after" not in resp.headers
    assert resp.json()["error"]["param"] == "n"
    fits = httpx.post(f"{base_url}/v1/completions", json={**body, "n": 4}, headers=HEADERS, timeout=60)
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 4


def test_a_refused_n_request_cancels_and_closes_the_choices_it_queued(rigged):
    base_url, app, rig = rigged
    front = app.state.uniql.service.backend.front
    api = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    async def main():
        seats = [await api.completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True,
                                              extra_body={"ignore_eos": True}) for _ in range(2)]
        for seat in seats:
            await seat.__anext__()  # both seats decode
        rig.gate.open.clear()
        try:
            handed_out = len(rig.streams)
            with pytest.raises(openai.RateLimitError):  # two choices queue, the third finds no room
                await api.completions.create(model="tiny", prompt="Hello", max_tokens=2, n=3)
            refused = rig.streams[handed_out:]
            waiting = front.read(lambda engine: engine.scheduler.num_waiting)
        finally:
            rig.gate.open.set()
        for seat in seats:
            await seat.close()
        return refused, waiting

    refused, waiting = asyncio.run(main())
    assert len(refused) == 2 and waiting == 0
    assert all(stream.ag_frame is None for stream in refused)  # closed, never to be iterated


def test_a_template_that_refuses_the_messages_is_a_400_naming_messages(rigged):
    base_url, _, _ = rigged
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=twice, max_tokens=2)
    assert err.value.body["param"] == "messages" and "must alternate" in err.value.body["message"]
    ok = client.chat.completions.create(model="tiny", messages=twice[:1], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_health_is_503_once_the_engine_thread_stopped(tiny_ckpt):
    with rigged_server(tiny_config(tiny_ckpt), lambda backend: None) as (base_url, app):
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        app.state.uniql.service.backend.front.shutdown()  # the thread ends, as if it had died
        health = httpx.get(f"{base_url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        chat = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=HEADERS,
                          timeout=10)
        assert chat.status_code == 503  # not a request that would wait forever


def test_a_request_that_races_the_engine_stopping_is_a_503_not_a_500(tiny_ckpt, monkeypatch):
    """The engine thread stops between ready()'s alive check and the submit: the submit's EngineStopped is the same
    503 engine_dead, not an internal error."""
    from uniql.server.bridge import EngineBackend

    with rigged_server(tiny_config(tiny_ckpt), lambda backend: None) as (base_url, app):
        app.state.uniql.service.backend.front.shutdown()
        monkeypatch.setattr(EngineBackend, "alive", property(lambda self: True))  # the check saw it alive
        reply = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=HEADERS,
                           timeout=10)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_dead"
