"""Running a real uvicorn server in a background thread, and reading its /metrics."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll /health until it answers 200; ``proc``: the server's process, whose exit ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {base_url} exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.TransportError):
            resp = httpx.get(f"{base_url}/health", timeout=5)
            if resp.status_code == 200:
                return
            if "failed to load" in resp.text:
                raise RuntimeError(resp.json()["error"]["message"])
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become ready in {timeout_s} s")


@contextlib.contextmanager
def serving(app, wait: bool = True):
    """``app`` on 127.0.0.1 at a free port in a thread; yields the base URL; stops it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_ready(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class EngineGate:
    """Holds the engine thread between two steps (outside the engine lock, so requests still queue or get 429):
    what a request sees when the server is busy, without racing a timer. ``open.clear()`` holds, ``set`` frees."""

    def __init__(self, front):
        self.open = threading.Event()
        self.open.set()
        run_calls = front._run_calls

        def gated_run_calls():
            self.open.wait(60)
            run_calls()
        front._run_calls = gated_run_calls


@contextlib.contextmanager
def rigged_server(cfg, rig):
    """A real server whose freshly loaded backend ``rig(backend)`` adjusts first (a fault, a gate, scripted logits);
    yields (base URL, app)."""
    from uniql.server.app import create_app
    from uniql.server.serve import make_loader, make_monitor_factory

    real = make_loader(cfg)

    def load():
        backend = real()
        rig(backend)
        return backend

    app = create_app(cfg, load, make_monitor_factory(cfg))
    with serving(app) as base_url:
        yield base_url, app


@contextlib.contextmanager
def running_server(cfg):
    from uniql.server.serve import build_app

    cfg.port = 0
    with serving(build_app(cfg)) as base_url:
        yield base_url


def metrics(base_url: str) -> dict[str, dict]:
    """/metrics parsed by prometheus-client: family name -> {(sample name, labels tuple): value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    """One sample's value (0 if absent): ``sample(m, "uniql_requests", "uniql_requests_total", finish_reason=...)``."""
    name = name or family
    for (sample_name, sample_labels), value in families.get(family, {}).items():
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def engine_greedy_chat(ckpt, device: str, dtype: str, messages: list[dict], max_tokens: int,
                       max_num_seqs: int) -> tuple[str, object]:
    """(text, cache dtype) of one greedy chat request through an in-process engine built as `uniql serve` builds
    it (the same loader, dtype resolution, chat template and seats, hence the same CUDA-graph buckets)."""
    from uniql.runtime.checkpoint import load_tokenizer
    from uniql.runtime.detokenizer import render_chat
    from uniql.runtime.dtypes import load_for_inference
    from uniql.runtime.engine import Engine
    from uniql.runtime.request import SamplingParams

    model, _ = load_for_inference(ckpt, device, dtype)
    tokenizer = load_tokenizer(ckpt)
    engine = Engine(model, tokenizer, max_num_seqs=max_num_seqs)
    req = engine.add_request(render_chat(tokenizer, messages),
                             SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return "".join(event.text for event in engine.stream(req)), engine.runner.cache_dtype


def health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health", timeout=30).json()


def wait_rate_back_to_zero(base_url: str, model: str, timeout_s: float = 30.0) -> None:
    """Poll /metrics until the controller's current pick is rate 0 again (the monitor needs a few polls to see
    freed memory settle); fail with /health in the message."""
    deadline = time.monotonic() + timeout_s
    while sample(metrics(base_url), "uniql_prune_rate", model=model) > 0:
        assert time.monotonic() < deadline, f"rung did not come back: {health(base_url)}"
        time.sleep(0.3)


def fails_once(err: Exception, reading) -> tuple[Callable[[], object], dict[str, int]]:
    """A monitor reader whose first call raises ``err`` and later ones return ``reading``; ``calls["n"]`` counts."""
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] == 1:
            raise err
        return reading

    return read, calls
