"""Ctrl-C while `uniql serve` is still loading its model: one line and exit 130 (the CLI's convention), never a
traceback, whether pressed once or twice (a second press forces uvicorn's exit). A real `uniql serve` process on
the tiny checkpoint; the signals come right after uvicorn's start-up, seconds before the engine has loaded."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from server_helpers import free_port


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_loading_is_one_line_and_exit_130(tiny_ckpt, presses):
    proc = subprocess.Popen([sys.executable, "-m", "uniql.cli", "serve", str(tiny_ckpt), "--port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        err = []
        for line in proc.stderr:  # the lifespan has started the loading thread once uvicorn says this
            err.append(line)
            if "Application startup complete" in line:
                break
        for _ in range(presses):  # 20 ms apart: inside uvicorn's 0.1 s shutdown poll, so both reach it
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        err.append(proc.stderr.read())
        rc = proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
    err = "".join(err)
    assert "Traceback" not in err, err
    assert rc == 130 and err.rstrip().splitlines()[-1] == "uniql serve: stopped while the model was loading", err
