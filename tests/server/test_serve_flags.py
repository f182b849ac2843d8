"""`uniql serve` refuses bad flags before it starts anything: exit status 2 and a message naming the flag, instead
of a server that answers 503 forever because its loading thread failed."""

from __future__ import annotations

import argparse

import pytest

from uniql.cli import main
from uniql.server.config import ServerConfig

BAD_FLAGS = [
    (["--memory-reserve", "lots"], "--memory-reserve: not a byte size: 'lots'"),
    (["--memory-reserve", "available-lots"], "--memory-reserve: not a byte size: 'lots'"),
    (["--memory-reserve=-1G"], "--memory-reserve: not a byte size"),
    (["--hysteresis", "16 parsecs"], "--hysteresis: not a byte size"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-queued-requests", "-1"], "--max-queued-requests must be at least 0, got -1"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be at least 1, got 0"),
    (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    (["--max-model-len", "-5"], "--max-model-len must be at least 1, got -5"),
    (["--monitor-interval", "0"], "--monitor-interval must be greater than 0, got 0.0"),
    (["--monitor-interval", "-0.5"], "--monitor-interval must be greater than 0, got -0.5"),
    (["--tpot-target-ms", "0"], "--tpot-target-ms must be greater than 0, got 0.0"),
    (["--residency-sustain", "-1"], "--residency-sustain must be at least 0, got -1.0"),
    (["--prefill-graph-tokens", "-1"], "--prefill-graph-tokens must be at least 0, got -1"),
    # before: an OverflowError traceback from uvicorn's bind (exit 1), after the start-up banner
    (["--port", "99999"], "--port must be in 0..65535 (0: any free port), got 99999"),
    (["--port", "-1"], "--port must be in 0..65535 (0: any free port), got -1"),
    # before: "could not convert string to float: 'abc'", naming no flag
    (["--rate", "abc"], "--rate must be 'auto' or a pruning rate in [0, 1), got 'abc'"),
    # before: an OverflowError traceback (400 digits parse to an infinite float)
    (["--memory-reserve", "9" * 400], "--memory-reserve: byte size '999"),
    (["--hysteresis", "9" * 400 + "G"], "--hysteresis: byte size '999"),
]


@pytest.fixture
def no_uvicorn(monkeypatch):
    """Fail the test if `uniql serve` gets as far as starting the server."""
    import uvicorn

    def run(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", run)  # (`uniql serve` runs a uvicorn.Server with its own handlers)


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_a_bad_flag_exits_2_before_serving(tmp_path, capsys, no_uvicorn, flags, message):
    assert main(["serve", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("device", ["cpu:1", "cuda:7"])
def test_a_device_that_does_not_exist_exits_2(tmp_path, capsys, no_uvicorn, monkeypatch, device):
    """Before: the server started and its loading thread failed ("model.safetensors cannot be read (device cpu:1 is
    invalid)"), leaving a server at 503. cuda:7 is asked for on a (pretended) machine with 2 GPUs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["serve", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"device {device!r} does not exist" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_checkpoint_that_is_not_a_directory_exits_2(tmp_path, capsys, no_uvicorn, where):
    path = tmp_path / where
    if where == "file":
        path.write_text("not a checkpoint")
    assert main(["serve", str(path)]) == 2
    assert f"checkpoint {str(path)!r} is not a directory" in capsys.readouterr().err


def test_good_flags_pass(tmp_path):
    ServerConfig(ckpt=str(tmp_path), memory_reserve="available-300M", hysteresis="0", max_queued_requests=0,
                 max_model_len=1, monitor_interval_s=0.01, tpot_target_ms=20.0, residency_sustain_s=0).check()
    ServerConfig(memory_reserve="1.5G").check()  # no checkpoint: the embedded default model
    ServerConfig(capture_graphs="startup").check()
    with pytest.raises(ValueError, match="--capture-graphs must be lazy or startup"):
        ServerConfig(capture_graphs="eager").check()


def test_the_default_prefill_graph_limit_is_the_engines_largest_bucket():
    from uniql.runtime.prefill_graphs import DEFAULT_PREFILL_BUCKETS
    from uniql.server.serve import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args([])
    assert args.prefill_graph_tokens == ServerConfig().prefill_graph_tokens == DEFAULT_PREFILL_BUCKETS[-1]


def test_a_max_model_len_past_the_checkpoints_context_exits_2(tmp_path, capsys, no_uvicorn):
    (tmp_path / "uniql.json").write_text('{"format": "uniql", "arch": {"max_position_embeddings": 8192}}')
    assert main(["serve", str(tmp_path), "--max-model-len", "100000"]) == 2
    assert "--max-model-len 100000 exceeds the model's context limit 8192" in capsys.readouterr().err


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys, no_uvicorn):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["serve", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_a_port_another_server_holds_exits_2(tmp_path, capsys, no_uvicorn):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
