"""`uniql serve` on a damaged checkpoint: the server answers at once (503 while loading), and when the load fails
the process stops with one error line and exit 2. Before, it logged a traceback and stayed up answering 503 forever
(exit 0 on Ctrl-C), which a supervisor takes for a live server. The real `uniql` executable on copies of the tiny
checkpoint."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port

UNIQL = Path(sys.executable).parent / "uniql"


def _serve(ckpt: Path, port: int, logs: Path) -> subprocess.Popen:
    """`uniql serve` with its stdout and stderr in files under ``logs`` (a pipe nobody reads could fill up with the
    access log and block the server)."""
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        return subprocess.Popen([str(UNIQL), "serve", str(ckpt), "--port", str(port)], stdout=out, stderr=err)


def _finish(proc: subprocess.Popen, logs: Path, timeout_s: float = 120) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); a process still running after ``timeout_s`` is killed and fails the test."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"`uniql serve` was still running after {timeout_s} s:\n{(logs / 'err').read_text()}")
    return proc.returncode, (logs / "out").read_text(), (logs / "err").read_text()


def _truncate_weights(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _mlp_past_full_width(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "uniql.json").read_text())
    manifest["ladder"]["sizes"][3][1]["mlp"] = 999999
    (ckpt / "uniql.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (_truncate_weights, "model.safetensors does not match its sha256 in uniql.json: the file is corrupt or truncated"),
    (_mlp_past_full_width, "ladder.sizes[3][1].mlp is 999999; it must be a whole number in [1, 128]"),
], ids=["truncated_weights", "ladder_past_full_width"])
def test_a_checkpoint_that_fails_to_load_stops_serve_with_one_line_and_exit_2(tiny_ckpt, tmp_path, damage, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    damage(bad)
    rc, out, err = _finish(_serve(bad, free_port(), tmp_path), tmp_path)
    assert "model loading in the background" in out  # it did listen first: the check ran in the loading thread
    assert "Traceback" not in err, err
    last = err.rstrip().splitlines()[-1]
    assert rc == 2 and last.startswith("uniql serve: error: ") and message in last, err
    assert err.count("uniql serve: error:") == 1, err


def test_a_good_checkpoint_still_answers_503_while_loading_then_serves(tiny_ckpt, tmp_path):
    """The check runs in the loading thread: the server listens at once, then serves, and stops with exit 0."""
    port = free_port()
    proc = _serve(tiny_ckpt, port, tmp_path)
    watchdog = threading.Timer(120, proc.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        statuses = []
        while not statuses or statuses[-1] != 200:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc, _, err = _finish(proc, tmp_path)
    finally:
        watchdog.cancel()
        proc.kill()
    assert statuses[0] == 503 and set(statuses) == {503, 200} and rc == 0 and "error" not in err, (statuses, err)


def test_a_load_error_reported_as_one_line_keeps_its_traceback_at_debug(caplog):
    """Before: with ``on_load_error`` set a ValueError (a bug's as much as a damaged checkpoint's) left no traceback
    anywhere, not even under `--log-level debug`."""
    import logging

    from uniql.server.app import AppState
    from uniql.server.config import ServerConfig

    def loader():
        raise ValueError("a bug, say")

    seen = []
    state = AppState(ServerConfig(served_model_name=["tiny"]), loader, lambda: None, seen.append)
    with caplog.at_level(logging.DEBUG, logger="uniql.server.app"):
        state.load()
    assert [type(e) for e in seen] == [ValueError] and state.load_error == "ValueError: a bug, say"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # still one line, from serve
    assert [r.levelno for r in caplog.records if r.exc_info] == [logging.DEBUG]
