"""Many clients at once: concurrent streams, a burst beyond the queue (429), disconnects freeing slots, 503."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from conftest import API_KEY, tiny_config
from server_helpers import EngineGate, metrics, running_server, sample, serving

PROMPTS = [f"Story number {i}: once upon a time" for i in range(16)]
LONG = {"ignore_eos": True}


def async_client(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_sixteen_concurrent_streams_match_sequential_answers(client, tiny_server):
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0,
                                          extra_body=LONG).choices[0].text for p in PROMPTS]

    async def one(api, prompt):
        stream = await api.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                              stream=True, extra_body=LONG)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        api = async_client(tiny_server)
        return await asyncio.gather(*(one(api, p) for p in PROMPTS))

    assert asyncio.run(main()) == expected


@pytest.fixture(scope="module")
def small_server(tiny_ckpt):
    """One seat, two queue places; ``gate`` pauses the engine."""
    from uniql.server.app import create_app
    from uniql.server.serve import make_loader, make_monitor_factory

    cfg = tiny_config(tiny_ckpt, max_num_seqs=1, max_queued_requests=2)
    real, gates = make_loader(cfg), []

    def gated_loader():
        backend = real()
        gates.append(EngineGate(backend.front))
        return backend

    with serving(create_app(cfg, gated_loader, make_monitor_factory(cfg))) as base_url:
        yield base_url, gates[0]


def test_a_burst_beyond_the_queue_gets_429_with_retry_after(small_server):
    base_url, gate = small_server

    async def one(api, i):
        try:
            await api.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=8, temperature=0,
                                         extra_body=LONG)
            return 200, None
        except openai.RateLimitError as err:
            return err.status_code, err.response.headers.get("retry-after")

    async def main():
        api = async_client(base_url)
        seat = await api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                            stream=True, extra_body=LONG)
        await seat.__anext__()  # the seat is taken: its request decodes
        gate.open.clear()  # the engine stops within a step; the seat stays taken until it reopens
        try:
            burst = [asyncio.create_task(one(api, i)) for i in range(1, 8)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in burst) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the five beyond the queue are answered while the engine is held
            answered_while_held = sum(t.done() for t in burst)
        finally:
            gate.open.set()
        rest = "".join([c.choices[0].text async for c in seat if c.choices])
        assert rest  # the seat's request went on after the gate reopened
        return answered_while_held, [(200, None)] + list(await asyncio.gather(*burst))

    answered_while_held, results = asyncio.run(main())
    assert answered_while_held == 5
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 3 + [429] * 5  # one running + two queued; the rest is told to come back
    assert all(int(after) >= 1 for s, after in results if s == 429)
    m = metrics(base_url)
    assert sample(m, "uniql_request_errors", "uniql_request_errors_total", status="429") >= 5


def _wait_idle(base_url, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = metrics(base_url)
        if sample(m, "uniql_num_requests_running", model="tiny") == 0 and \
                sample(m, "uniql_kv_cache_bytes", model="tiny") == 0:
            return m
        time.sleep(0.1)
    raise AssertionError("the server still holds requests after its clients left")


def test_disconnecting_clients_free_their_slots(small_server):
    small_server, _ = small_server
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = metrics(small_server)
    for _ in range(3):  # the seat and both queue places, each client leaves after its first chunk
        with httpx.stream("POST", f"{small_server}/v1/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{small_server}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.5)
    after = _wait_idle(small_server)
    cancelled = (sample(after, "uniql_requests", "uniql_requests_total", finish_reason="cancelled")
                 - sample(before, "uniql_requests", "uniql_requests_total", finish_reason="cancelled"))
    assert cancelled == 4
    start = time.monotonic()  # the seat is free again: a new request runs at once
    resp = httpx.post(f"{small_server}/v1/completions", json={**body, "stream": False, "max_tokens": 4},
                      headers=headers, timeout=30)
    assert resp.status_code == 200 and time.monotonic() - start < 5


def test_503_while_the_model_loads(tiny_ckpt):
    from uniql.server.app import create_app
    from uniql.server.serve import make_loader, make_monitor_factory

    cfg = tiny_config(tiny_ckpt)
    gate = threading.Event()
    real = make_loader(cfg)

    def slow_loader():
        gate.wait(60)
        return real()

    app = create_app(cfg, slow_loader, make_monitor_factory(cfg))
    with serving(app, wait=False) as base_url:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        health = httpx.get(f"{base_url}/health", timeout=10)
        chat = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}]})
        assert health.status_code == 503 and chat.status_code == 503
        assert chat.json()["error"]["code"] == "model_not_ready"
        gate.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ok = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=30,
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200


def test_allowed_origins_answer_cors_preflight(tiny_ckpt):
    with running_server(tiny_config(tiny_ckpt, allowed_origins=["http://dashboard.test"])) as base_url:
        resp = httpx.options(f"{base_url}/v1/chat/completions", timeout=10,
                             headers={"Origin": "http://dashboard.test", "Access-Control-Request-Method": "POST"})
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "http://dashboard.test"
        other = httpx.options(f"{base_url}/v1/chat/completions", timeout=10,
                              headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
