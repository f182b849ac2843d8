"""The event loop never waits for an engine step: while one request's prefill takes 1.5 s, a second request is
admitted and /health and /metrics answer at once, over real HTTP (before, admission took the step lock on the
event loop and every connection stalled until the step ended)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from conftest import API_KEY, tiny_config
from server_helpers import rigged_server

SLOW_SEED = 777  # a request with this seed prefills for SLOW_S
SLOW_S = 1.5
LIMIT_S = 0.3  # an answer on an idle loop takes milliseconds; a blocked loop waits for the rest of the step
BODY = {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True}


class SlowPrefill:
    """Applied to the loaded backend: the SLOW_SEED request's prefill sleeps first (in the step, under its lock)."""

    def __init__(self):
        self.started, self.ended = threading.Event(), threading.Event()

    def __call__(self, backend) -> None:
        runner = backend.engine.runner
        prefill = runner.prefill

        def slow_prefill(req):
            if req.params.seed == SLOW_SEED:
                self.started.set()
                time.sleep(SLOW_S)
                self.ended.set()
            return prefill(req)

        runner.prefill = slow_prefill


async def _timed(call) -> tuple[float, object]:
    start = time.monotonic()
    result = await call
    return time.monotonic() - start, result


async def _during_slow_step(base_url: str, rig: SlowPrefill) -> dict:
    """Latencies of the second request's admission (its response headers), /health and /metrics mid-step."""
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=60) as http:
        slow = asyncio.create_task(http.post("/v1/completions", json={**BODY, "seed": SLOW_SEED}))
        assert await asyncio.to_thread(rig.started.wait, 30)
        start = time.monotonic()
        async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as second:
            took = {"admission": time.monotonic() - start}
            for path in ("/health", "/metrics"):
                took[path], resp = await _timed(http.get(path))
                assert resp.status_code == 200
            took["mid_step"] = not rig.ended.is_set()
            lines = [line async for line in second.aiter_lines() if line]
        took["second_done"] = second.status_code == 200 and lines[-1] == "data: [DONE]"
        took["slow_status"] = (await slow).status_code
    return took


def test_a_long_step_blocks_neither_health_nor_metrics_nor_admission(tiny_ckpt):
    rig = SlowPrefill()
    with rigged_server(tiny_config(tiny_ckpt), rig) as (base_url, _):
        took = asyncio.run(_during_slow_step(base_url, rig))
    mid_step, second_done, slow_status = took.pop("mid_step"), took.pop("second_done"), took.pop("slow_status")
    assert all(seconds < LIMIT_S for seconds in took.values()), f"answers waited for the engine step: {took}"
    assert mid_step, "the slow step ended before the measurements"
    assert second_done and slow_status == 200


class SlowTokenizer:
    """Applied to the loaded backend: a prompt holding MARKER takes SLOW_S to tokenize, releasing the GIL as the
    Rust tokenizer does (a real 4 MB prompt took 2.7 s, all of it on the event loop before the fix)."""

    MARKER = "slow-to-tokenize"

    def __init__(self):
        self.started, self.ended = threading.Event(), threading.Event()

    def __call__(self, backend) -> None:
        backend.encode_text = self._slowed(backend.encode_text, lambda text: self.MARKER in text)
        backend.encode_chat = self._slowed(backend.encode_chat, lambda msgs: any(self.MARKER in m["content"]
                                                                                  for m in msgs))

    def _slowed(self, encode, is_slow):
        def slowed(arg):
            if is_slow(arg):
                self.started.set()
                time.sleep(SLOW_S)
                self.ended.set()
            return encode(arg)
        return slowed


async def _health_while_tokenizing(base_url: str, rig: SlowTokenizer, path: str, body: dict) -> tuple[float, bool]:
    rig.started.clear()
    rig.ended.clear()
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=60) as http:
        slow = asyncio.create_task(http.post(path, json={**body, "max_tokens": 2}))
        assert await asyncio.to_thread(rig.started.wait, 30)
        took, resp = await _timed(http.get("/health"))
        mid = not rig.ended.is_set()
        assert resp.status_code == 200 and (await slow).status_code == 200
    return took, mid


def test_tokenizing_a_huge_prompt_does_not_block_the_event_loop(tiny_ckpt):
    rig = SlowTokenizer()
    prompts = {"/v1/completions": {"prompt": f"a {rig.MARKER} prompt"},
               "/v1/chat/completions": {"messages": [{"role": "user", "content": f"a {rig.MARKER} prompt"}]}}
    with rigged_server(tiny_config(tiny_ckpt), rig) as (base_url, _):
        for path, body in prompts.items():
            took, mid = asyncio.run(_health_while_tokenizing(base_url, rig, path, body))
            assert took < LIMIT_S and mid, f"{path}: /health waited {took:.2f} s for the tokenizer"
