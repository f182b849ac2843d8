"""`uniql serve [CKPT]`: flags (vLLM's names where the meaning is the same), the model loader, uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from uniql.runtime.dtypes import add_dtype_arg

from .config import ServerConfig
from .monitor import Monitor, default_readers, open_jtop

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server that picks a pruning rate per request")
    p.add_argument("ckpt", nargs="?", default=None,
                   help="UniQL checkpoint directory (default: the embedded SmolLM2-135M, built once into the cache)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name", nargs="+", default=[], help="model name(s) clients use")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: model's)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests decoding at once")
    p.add_argument("--max-queued-requests", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--allowed-origins", nargs="+", default=[], help="CORS origins (e.g. '*')")
    p.add_argument("--rate", default="auto", help="'auto' (the controller picks per request) or a fixed rate")
    p.add_argument("--memory-reserve", default="512M",
                   help="memory to leave free for other programs, e.g. 1G; 'available-300M' = the memory available "
                        "once the model has loaded minus 300M")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_dtype_arg(p)
    p.add_argument("--default-max-tokens", type=int, default=512, help="completion length when a request sets none")
    p.add_argument("--tpot-target-ms", type=float, default=None,
                   help="climb a rung when inter-token latency exceeds this under contention")
    p.add_argument("--hysteresis", default="16M", help="spare memory a lower rung needs before the server returns")
    p.add_argument("--monitor-interval", type=float, default=0.5, help="seconds between memory readings")
    p.add_argument("--no-residency", action="store_true", help="never release weight tails under memory pressure")
    p.add_argument("--residency-sustain", type=float, default=2.0,
                   help="seconds a memory shortage (or recovery) must last before weights are released (reloaded)")
    p.add_argument("--capture-graphs", default="lazy", choices=["lazy", "startup"],
                   help="CUDA: capture each decode / prefill graph at its first use (lazy), or all at start-up "
                        "(slower start, no first-request capture)")
    p.add_argument("--prefill-graph-tokens", type=int, default=ServerConfig.prefill_graph_tokens,
                   help="CUDA: prompts up to the largest length bucket <= N replay a prefill graph (buckets 16..1024; "
                        "0: every prefill eager; a smaller value holds less graph memory)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(ckpt=args.ckpt, host=args.host, port=args.port, api_key=args.api_key,
                        served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_queued_requests=args.max_queued_requests,
                        allowed_origins=args.allowed_origins, rate=args.rate, memory_reserve=args.memory_reserve,
                        device=args.device, dtype=args.dtype, default_max_tokens=args.default_max_tokens,
                        tpot_target_ms=args.tpot_target_ms, hysteresis=args.hysteresis,
                        monitor_interval_s=args.monitor_interval, residency=not args.no_residency,
                        residency_sustain_s=args.residency_sustain, capture_graphs=args.capture_graphs,
                        prefill_graph_tokens=args.prefill_graph_tokens,
                        log_level=args.log_level)


def make_loader(cfg: ServerConfig):
    """The function the app runs in its loading thread (imports torch there, never in the HTTP layer)."""
    def load():
        from .bridge import EngineBackend
        from .default_model import ensure_default_checkpoint

        ckpt = cfg.ckpt or str(ensure_default_checkpoint(progress=log.warning))
        return EngineBackend.load(ckpt, cfg)
    return load


def make_monitor_factory(cfg: ServerConfig):
    def factory() -> Monitor:
        readers, primary = default_readers(cfg.device, open_jtop())
        return Monitor(readers, primary, cfg.monitor_interval_s)
    return factory


def build_app(cfg: ServerConfig, on_load_error=None):
    from .app import create_app

    cfg.check()  # a bad flag fails now (`uniql serve` exits 2), not in the loading thread
    return create_app(cfg, make_loader(cfg), make_monitor_factory(cfg), on_load_error)


class LoadFailure:
    """Stops `uniql serve` when its model fails to load (a damaged checkpoint: a truncated weights file, a bad
    manifest field). It kept serving 503 forever (exit 0 on Ctrl-C), which a supervisor takes for a live server.
    The checkpoint is checked in the loading thread, not before the server listens, so that the server still
    answers at once (503 while loading) for a good checkpoint. Called on the loading thread."""

    def __init__(self):
        self.error: Exception | None = None
        self.server = None  # the uvicorn.Server, once made (the loading thread starts inside its run)

    def __call__(self, err: Exception) -> None:
        self.error = err
        if self.server is not None:
            self.server.should_exit = True  # uvicorn's own graceful shutdown, polled by its main loop

    def exit_status(self) -> int:
        """One line on stderr for the error, and `uniql serve`'s status: 2 for a bad input (the CLI's status for
        ValueError / OSError), 1 for anything else (its traceback was logged: a bug)."""
        bad_input = isinstance(self.error, ValueError | OSError)
        print(f"uniql serve: error: {'' if bad_input else 'the model failed to load: '}{self.error}",
              file=sys.stderr, flush=True)
        return 2 if bad_input else 1


def _check_port(host: str, port: int) -> None:
    """A port another server holds: one line and exit 2 now, not uvicorn's traceback-free exit 3 after start-up.
    (Bound with SO_REUSEADDR as uvicorn binds, so a port in TIME_WAIT is not mistaken for a busy one.)"""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _checkpoint_context(ckpt: str) -> int | None:
    """The checkpoint's context limit from its manifest; None if unreadable (the loader says what is wrong). Read
    here as plain JSON: runtime.checkpoint.read_manifest would import torch into the HTTP process's start-up."""
    try:
        manifest = json.loads((Path(ckpt) / "uniql.json").read_text(encoding="utf-8"))
        return int(manifest["arch"]["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_device(cfg: ServerConfig) -> None:
    """A device that is not there (``cuda`` without a GPU, ``cuda:7`` on a machine with fewer, ``cpu:1``); the
    device normalised as torch names it (``cpu:0``, which safetensors refuses, becomes ``cpu``)."""
    if cfg.device == "cpu":
        return  # the default: no torch import before the server listens
    import torch  # the loading thread imports it anyway

    from uniql.runtime.checkpoint import checked_device

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available (use --device cpu)")
    cfg.device = str(checked_device(cfg.device))


def preflight(cfg: ServerConfig) -> None:
    """What the loading thread would only find after the server is up (a server stuck at 503, exit 0 on Ctrl-C):
    a CUDA device that is not there, a --max-model-len past the checkpoint's context, a port already taken.
    ValueError: exit 2."""
    _check_device(cfg)
    context = _checkpoint_context(cfg.ckpt) if cfg.ckpt and cfg.max_model_len else None
    if context is not None and cfg.max_model_len > context:
        raise ValueError(f"--max-model-len {cfg.max_model_len} exceeds the model's context limit {context}")
    _check_port(cfg.host, cfg.port)  # last: the flags' own mistakes first, whatever holds the port


def _loading() -> bool:
    from .app import LOAD_THREAD

    return any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate())


def _exit_while_loading() -> None:
    # now, without the interpreter's teardown, which would abort the process under torch's running threads
    # ("terminate called without an active exception")
    print("uniql serve: stopped while the model was loading", file=sys.stderr, flush=True)
    os._exit(130)


def _run_uvicorn(app, cfg: ServerConfig, log_level: str, failure: LoadFailure) -> bool:
    """Serve until a signal stops the server; whether it started (uvicorn logged why not).

    uvicorn handles SIGINT / SIGTERM only while it serves, then restores the handlers it found and re-raises the
    signals it caught (under asyncio.run: a KeyboardInterrupt inside the event loop), and a second Ctrl-C forces
    an exit that cancels the app's lifespan (a CancelledError traceback): Ctrl-C twice while the model was
    loading printed both. So the handler is ours, installed before the loop starts and kept to the end: while
    the model loads nothing can be in flight (every /v1 route answers 503) and a signal leaves at once; once it
    has loaded, uvicorn's graceful shutdown runs as before (a second signal forces it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield  # our handler stays installed, and nothing is re-raised

    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level))
    failure.server = server

    def on_signal(sig, frame) -> None:
        if _loading():
            _exit_while_loading()
        server.handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server.run()
    return server.started


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    logging.getLogger("uniql").setLevel(args.log_level.upper())
    failure = LoadFailure()
    app = build_app(cfg, failure)
    preflight(cfg)
    print(f"uniql serve: http://{cfg.host}:{cfg.port}/v1 (model loading in the background; /health says when)",
          flush=True)
    started = _run_uvicorn(app, cfg, args.log_level, failure)
    if failure.error is not None:
        return failure.exit_status()
    if _loading():  # the signal came before the lifespan started the loading thread, which runs now
        _exit_while_loading()
    return 0 if started else 3  # uvicorn.run's status for a server that could not start
