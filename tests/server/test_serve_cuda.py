"""`uniql serve --device cuda` as a user runs it: the real `openai` client, device-memory metrics, and elastic
residency under GPU memory pressure (a helper process takes device memory, then gives it back).

The server is started with ``--memory-reserve available-H``: its model budget (available + resident weights -
reserve) starts H above what the model holds, H scaled to what the model needs. The helper takes device memory
until the budget is H below zero, far under every rung (the server's own cached-but-free allocator blocks count
as available, and H covers them), so the outcome does not hang on a few MB of noise: the next requests get the
lightest rung and the tails above it are released; after the helper exits they are reloaded and requests get
rung 0 again, with the same greedy text as before.

The server is started without --dtype: on a GPU with native bf16 it must serve bfloat16 (activations, KV cache),
and its greedy answer must be the in-process engine's bfloat16 answer on the same checkpoint. That last test opens
a CUDA context in this process, so it runs last, after the server has fixed its reserve and the pressure test has
measured its budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import API_KEY
from server_helpers import engine_greedy_chat, free_port, health, metrics, sample, wait_rate_back_to_zero, wait_ready

# torch.cuda.is_available() opens no context; nothing in this module may before its last test (see
# device_total_bytes)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="serves on a GPU")
HERE = Path(__file__).parent
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


def headroom_bytes(ckpt) -> int:
    """H: eight times the model's rung-0 weights (caches, graph pools and activations scale with the model), and at
    least 256 MiB for what the CUDA runtime adds whatever the model (the kernels' code loaded at first use)."""
    from uniql.runtime.checkpoint import load_checkpoint
    from uniql.server.weights import ElasticWeights

    need = ElasticWeights(load_checkpoint(ckpt)[0], ckpt).rung_bytes[0]
    return max(256 << 20, 8 * need) >> 20 << 20


@pytest.fixture(scope="module")
def cuda_server(portable_tiny_ckpt, tmp_path_factory):
    headroom = headroom_bytes(portable_tiny_ckpt)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-cuda") / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "uniql.cli", "serve", str(portable_tiny_ckpt), "--device", "cuda",
                             "--port", str(port), "--api-key", API_KEY, "--served-model-name", "tiny",
                             "--memory-reserve", f"available-{headroom >> 20}M", "--monitor-interval", "0.2",
                             "--residency-sustain", "1", "--max-num-seqs", "2", "--default-max-tokens", "16"],
                            stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, timeout_s=300, proc=proc)
        yield base_url, headroom
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        print("server log (tail):\n" + "".join(log_path.read_text().splitlines(keepends=True)[-40:]))


@pytest.fixture
def client(cuda_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{cuda_server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client) -> tuple[float, str]:
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, **GREEDY)
    resp = raw.parse()  # a failed request raises here: none may fail, whatever the pressure
    rate = float(raw.headers["x-uniql-prune-rate"])
    assert rate == resp.usage.model_extra["prune_rate"]
    return rate, resp.choices[0].message.content


def device_total_bytes() -> int | None:
    """GPU 0's memory from NVML, which opens no CUDA context: one in this process, made after the server fixed its
    reserve, would eat the server's headroom (None without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    except Exception:  # no NVML library or driver support
        return None


def errors_total(base_url) -> float:
    families = metrics(base_url).get("uniql_request_errors", {})
    return sum(v for (name, _), v in families.items() if name == "uniql_request_errors_total")


def wait_for(base_url, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = health(base_url)
        if predicate(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {health(base_url)}")


def test_openai_chat_and_streaming_on_cuda_with_device_memory_metrics(cuda_server, client):
    base_url, _ = cuda_server
    rate, text = chat(client)
    assert rate == 0.0 and text
    stream = client.chat.completions.create(model="tiny", messages=CHAT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]
    state = health(base_url)
    assert state["memory"]["device"] == "cuda:0"
    m = metrics(base_url)
    available = sample(m, "uniql_memory_available_bytes", device="cuda:0")
    used = sample(m, "uniql_memory_used_bytes", device="cuda:0")
    total = device_total_bytes()
    assert available > 0 and used > 0
    if total is not None:  # the CUDA runtime's total leaves out what the driver reserves, NVML's does not
        assert 0.9 * total <= available + used <= total
    assert sample(m, "uniql_memory_available_bytes", device="host") > 0  # the host series stays beside it
    assert sample(m, "uniql_weights_resident_bytes", model="tiny") == state["rung_weight_bytes"][0]


def test_device_memory_pressure_raises_the_rung_releases_tails_and_recovers(cuda_server, client):
    base_url, headroom = cuda_server
    sequence = []
    errors = errors_total(base_url)  # 503s while the model loaded were counted already
    rate, before = chat(client)
    assert rate == 0.0
    state = health(base_url)
    weights, w0 = state["rung_weight_bytes"], state["weights_resident_bytes"]
    top_rate = state["prune_rates"][-1]
    sequence.append(("idle", rate, w0))
    target_free = state["memory"]["reserve_bytes"] - w0 - headroom  # budget: H below zero
    cap = 4 * headroom + w0 + (512 << 20)
    hog = subprocess.Popen([sys.executable, str(HERE / "cuda_memory_hog.py"), str(target_free), str(cap), "120"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = hog.stdout.readline().split()
        assert ready and ready[0] == "READY" and int(ready[2]) <= target_free, ready  # reached within CAP
        time.sleep(0.6)  # a few monitor polls
        rates = [chat(client)[0] for _ in range(2)]
        assert rates == [top_rate, top_rate], rates  # nothing fits: the lightest rung, never a failure
        assert sample(metrics(base_url), "uniql_prune_rate", model="tiny") == top_rate
        sequence.append(("pressure", rates[-1], health(base_url)["weights_resident_bytes"]))
        released = wait_for(base_url, lambda s: s["resident_rung"] == len(weights) - 1, 30, "tails to be released")
        assert released["weights_resident_bytes"] == weights[-1] < w0
        assert sample(metrics(base_url), "uniql_weights_resident_bytes", model="tiny") == weights[-1]
        rate, _ = chat(client)  # served from the released weights, through freshly captured graphs
        assert rate == top_rate
        sequence.append(("released", rate, released["weights_resident_bytes"]))
    finally:
        hog.stdin.close()
        hog.wait(timeout=30)

    back = wait_for(base_url, lambda s: s["resident_rung"] == 0, 60, "weights to be reloaded")
    assert back["weights_resident_bytes"] == w0
    wait_rate_back_to_zero(base_url, "tiny")
    rate, after = chat(client)
    assert rate == 0.0 and after == before  # reloaded from the checkpoint: the same greedy text
    sequence.append(("recovered", rate, back["weights_resident_bytes"]))
    print("prune rate and resident weight bytes per phase:", json.dumps(sequence))
    assert errors_total(base_url) == errors


def test_serves_bfloat16_by_default_and_answers_as_the_in_process_engine(cuda_server, client, portable_tiny_ckpt):
    base_url, _ = cuda_server
    served_dtype = health(base_url)["dtype"]
    rate, served = chat(client)
    assert rate == 0.0, "the pressure test left the server above rung 0"
    # from here on this process holds a CUDA context (the server has answered: nothing of its budget is measured)
    from uniql.runtime.dtypes import dtype_name, resolve_dtype

    auto = resolve_dtype("auto", "cuda")
    if torch.cuda.get_device_capability()[0] >= 8:  # native bf16 (A100, H100, H200, A6000, Jetson Orin)
        assert auto == torch.bfloat16
    assert served_dtype == dtype_name(auto)
    text, cache_dtype = engine_greedy_chat(portable_tiny_ckpt, "cuda", "auto", CHAT, GREEDY["max_tokens"],
                                           max_num_seqs=2)  # the server's --max-num-seqs: the same graph buckets
    assert cache_dtype == auto
    assert served == text, (served, text)
