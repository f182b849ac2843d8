"""Fixtures of the deployment tests: a tiny INT4 checkpoint and a live `uniql serve` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tiny_int4_ckpt, make_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # deploy_util, shared by the modules here

from deploy_util import free_port, http_get, http_post_json, require_server, uniql_exe, wait_until  # noqa: E402


# ------------------------------------------------------------------------------------------ live server
@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer):
    """An INT4 (RTN) UniQL checkpoint of a tiny random Llama with SmolLM2's tokenizer (seconds on CPU)."""
    require_server()
    return build_tiny_int4_ckpt(tmp_path_factory.mktemp("deploy-src"), tmp_path_factory.mktemp("deploy-ckpt") / "tiny",
                                make_data_dir(tmp_path_factory.mktemp("deploy-data")), tokenizer)


@pytest.fixture(scope="session")
def live_server(tiny_ckpt, tmp_path_factory):
    """A real `uniql serve` subprocess on a free port; yields its base URL after one finished completion."""
    port = free_port()
    log = tmp_path_factory.mktemp("deploy-logs") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([uniql_exe(), "serve", str(tiny_ckpt), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(f"{base}/health"), 120, f"uniql serve (log: {log})", proc)
        model = json.loads(http_get(f"{base}/v1/models"))["data"][0]["id"]
        http_post_json(f"{base}/v1/completions", {"model": model, "prompt": "Hello there", "max_tokens": 4})
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
