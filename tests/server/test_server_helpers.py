"""The helpers the server tests start servers with."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from server_helpers import free_port, wait_ready


def test_wait_ready_stops_when_the_server_process_exits():
    """A server that dies at start-up (an import error on the GPU machine did) ends the wait at once, with its
    exit code, instead of after the whole timeout."""
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout_s=60, proc=proc)
    assert time.monotonic() - start < 5
