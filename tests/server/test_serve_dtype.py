"""`uniql serve --dtype`: the flag parses (serve, generate, bench decode share it), bad values are clear errors, and
a tiny checkpoint served in bfloat16 on CPU answers the real `openai` client with half the KV cache of float32
(the engine's admission formula, and the bytes a live request holds in `uniql_kv_cache_bytes`)."""

from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY, tiny_config
from server_helpers import engine_greedy_chat, metrics, running_server, sample

from uniql.cli import build_parser, main
from uniql.server.config import ServerConfig
from uniql.server.serve import build_app, config_from_args

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG = 200  # completion tokens: the stream lives long enough for a few monitor polls to see its cache


@pytest.mark.parametrize("argv", [["serve", "ckpt"], ["generate", "ckpt", "--prompt", "x"],
                                  ["bench", "decode", "ckpt"]])
def test_dtype_defaults_to_auto_and_takes_each_choice(argv):
    parser = build_parser()
    assert parser.parse_args(argv).dtype == "auto"
    for name in ("bfloat16", "float16", "float32"):
        assert parser.parse_args([*argv, "--dtype", name]).dtype == name
    assert config_from_args(parser.parse_args(["serve", "ckpt", "--dtype", "bfloat16"])).dtype == "bfloat16"


def test_an_unknown_dtype_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "ckpt", "--dtype", "fp8"])
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dtype must be one of auto, bfloat16, float16, float32; got 'half'"):
        build_app(ServerConfig(ckpt="ckpt", dtype="half"))  # a config built in code is checked too


def test_help_says_the_cpu_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {auto,bfloat16,float16,float32}" in text
    assert "on CPU bfloat16 (INT4 decode kernel) on x86 with AVX2 / AVX-512, else float32" in text


@pytest.fixture(scope="module")
def servers(tiny_ckpt):
    """The tiny checkpoint served twice on CPU: --dtype float32 and --dtype bfloat16."""
    with running_server(tiny_config(tiny_ckpt, dtype="float32")) as fp32, \
            running_server(tiny_config(tiny_ckpt, dtype="bfloat16")) as bf16:
        yield {"float32": fp32, "bfloat16": bf16}


def _client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_bfloat16_server_answers_the_openai_client_as_the_in_process_engine_does(servers, tiny_ckpt):
    for dtype, base_url in servers.items():
        assert httpx.get(f"{base_url}/health", timeout=10).json()["dtype"] == dtype
        raw = _client(base_url).chat.completions.with_raw_response.create(
            model="tiny", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        resp = raw.parse()
        assert float(raw.headers["x-uniql-prune-rate"]) == 0.0 and resp.usage.completion_tokens == 8
        text, cache_dtype = engine_greedy_chat(tiny_ckpt, "cpu", dtype, CHAT, 8, max_num_seqs=8)
        assert resp.choices[0].message.content == text and str(cache_dtype) == f"torch.{dtype}"


def _live_cache_bytes(base_url) -> float:
    """``uniql_kv_cache_bytes`` while one long rung-0 completion streams (0 if no poll caught it)."""
    stream = _client(base_url).completions.create(model="tiny", prompt="Once upon a time", max_tokens=LONG,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True, "prune_rate": 0.0})
    seen = 0.0
    for _ in stream:  # drained to the end: the request finishes normally
        if not seen:
            seen = sample(metrics(base_url), "uniql_kv_cache_bytes", model="tiny")
    return seen


def test_bfloat16_halves_the_kv_cache_in_the_engine_and_in_metrics(servers, tiny_ckpt):
    from uniql.server.bridge import EngineBackend

    formula = {}
    for dtype in servers:
        backend = EngineBackend.load(tiny_ckpt, ServerConfig(dtype=dtype, max_num_seqs=2))
        try:
            formula[dtype] = backend.cache_bytes(128)  # what the controller budgets per rung
        finally:
            backend.shutdown()
    assert [2 * b for b in formula["bfloat16"]] == list(formula["float32"])
    live = {dtype: _live_cache_bytes(base_url) for dtype, base_url in servers.items()}
    assert live["float32"] > 0 and 2 * live["bfloat16"] == live["float32"], live
    state = {d: httpx.get(f"{u}/health", timeout=10).json() for d, u in servers.items()}
    # the CPU runner's host forms follow the dtype (bf16: int4 codes for decode + a bf16 copy for prefill, fp32: a
    # dense fp32 copy): fewer resident bytes at every rung
    assert all(b < f for b, f in zip(state["bfloat16"]["rung_weight_bytes"], state["float32"]["rung_weight_bytes"],
                                     strict=True))
    assert state["bfloat16"]["weights_resident_bytes"] < state["float32"]["weights_resident_bytes"]
