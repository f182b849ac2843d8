"""Server fixtures: tiny and SmolLM2 checkpoints built once per session, real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import build_tiny_int4_ckpt, make_data_dir

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # server_helpers, beside this file
from server_helpers import running_server  # noqa: E402

from uniql.server.config import ServerConfig  # noqa: E402

API_KEY = "test-key"
# the default model's recipe, lightened for tests: RTN and a few calibration windows (about a minute on 2 cores)
TEST_RECIPE = {"quant": "rtn", "calib_samples": 8, "calib_seqlen": 128, "bi_samples": 2, "bi_seqlen": 128,
               "quant_samples": 1, "quant_seqlen": 128}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_ckpt(tokenizer, data_dir, tmp_path_factory):
    """An INT4 (RTN) UniQL checkpoint of a random tiny Llama with SmolLM2's tokenizer and chat template."""
    return build_tiny_int4_ckpt(tmp_path_factory.mktemp("tiny-src"), tmp_path_factory.mktemp("ckpt") / "tiny-uniql",
                                data_dir, tokenizer, seed=11)


@pytest.fixture(scope="session")
def repo_tokenizer():
    """SmolLM2's tokenizer and chat template as committed beside the tiny SSM models (``models/``): the same
    tokenizer as ``tokenizer`` without the GGUF package, which the GPU host lacks."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "models" / "mamba2-tiny"), local_files_only=True)


@pytest.fixture(scope="session")
def portable_tiny_ckpt(repo_tokenizer, data_dir, tmp_path_factory):
    """``tiny_ckpt`` built from ``repo_tokenizer``: what the GPU tests serve."""
    return build_tiny_int4_ckpt(tmp_path_factory.mktemp("ptiny-src"), tmp_path_factory.mktemp("pckpt") / "tiny-uniql",
                                data_dir, repo_tokenizer, seed=11)


@pytest.fixture(scope="session")
def default_cache(data_dir, tmp_path_factory):
    """A cache dir holding the default SmolLM2 checkpoint, built on first use by the server's own builder."""
    from uniql.server.default_model import ensure_default_checkpoint

    cache = tmp_path_factory.mktemp("uniql-cache")
    messages = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIQL_DATA_DIR", str(data_dir))
        mp.setenv("UNIQL_CACHE_DIR", str(cache))
        ckpt = ensure_default_checkpoint(TEST_RECIPE, progress=messages.append)
        again = ensure_default_checkpoint(TEST_RECIPE, progress=messages.append)  # reused, not rebuilt
    assert again == ckpt and len(messages) == 2 and "building the default model" in messages[0]
    return cache, ckpt


def tiny_config(ckpt, **overrides) -> ServerConfig:
    cfg = ServerConfig(ckpt=str(ckpt), api_key=API_KEY, served_model_name=["tiny"], max_num_seqs=8,
                       max_queued_requests=64, default_max_tokens=32, monitor_interval_s=0.1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def tiny_server(tiny_ckpt):
    """The tiny model behind a real uvicorn server (api key ``test-key``, model name ``tiny``)."""
    with running_server(tiny_config(tiny_ckpt)) as base_url:
        yield base_url


@pytest.fixture
def client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{tiny_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
