"""Server settings (the `uniql serve` flags) and byte-size parsing. Pure Python."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"1.5G"``, ``"1073741824"`` -> bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 512M, 1.5G)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):  # 400 digits parse to infinity, and int(inf) is an OverflowError traceback
        raise ValueError(f"byte size {text!r} is too large")
    return int(value)


def resolve_reserve(spec: str, available_bytes: int) -> int:
    """The memory reserve: an absolute size, or ``available-SIZE`` = the memory available when the model has
    loaded minus SIZE (the server then starts with SIZE of headroom above its reserve; tests and benchmarks
    use it to put a machine under pressure with a small allocation)."""
    spec = spec.strip()
    if spec.lower().startswith(("available-", "avail-")):
        headroom = parse_bytes(spec.split("-", 1)[1])
        return max(0, available_bytes - headroom)
    return parse_bytes(spec)


@dataclass
class ServerConfig:
    ckpt: str | None = None  # None: the embedded default model (built once into the cache directory)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: list[str] = field(default_factory=list)  # empty: the checkpoint's directory name
    max_model_len: int | None = None
    max_num_seqs: int = 8
    max_queued_requests: int = 64
    allowed_origins: list[str] = field(default_factory=list)
    rate: str = "auto"  # "auto" (the controller) or a fixed pruning rate
    memory_reserve: str = "512M"
    device: str = "cpu"
    dtype: str = "auto"  # activations and caches (runtime/dtypes.py): bf16 on a GPU with native bf16 and on x86 CPUs
    default_max_tokens: int = 512  # when a request gives none (its KV cache is sized for prompt + this)
    tpot_target_ms: float | None = None  # climb a rung when decode is slower than this under contention
    hysteresis: str = "16M"  # a lower rung must fit with this much to spare before the server goes back to it
    monitor_interval_s: float = 0.5
    residency: bool = True  # release weight tails under sustained pressure
    residency_sustain_s: float = 2.0
    capture_graphs: str = "lazy"  # CUDA graphs captured at first use, or every one at start-up ("startup")
    # prompts up to the largest bucket <= this are graphed (0: eager); the engine's largest bucket (a test keeps
    # them in step: this module stays free of torch, which runtime.prefill_graphs imports)
    prefill_graph_tokens: int = 1024
    log_level: str = "info"

    def fixed_rate(self) -> float | None:
        if self.rate == "auto":
            return None
        try:
            rate = float(self.rate)
        except ValueError:  # float's own message ("could not convert string to float") named no flag
            rate = math.nan
        if not 0.0 <= rate < 1.0:  # NaN fails this too
            raise ValueError(f"--rate must be 'auto' or a pruning rate in [0, 1), got {self.rate!r}")
        return rate

    def check(self) -> None:
        """Flags that can be wrong without loading anything fail here (ValueError naming the flag), before the
        loading thread starts: a failure there leaves a server that answers 503 until someone restarts it."""
        from uniql.runtime.dtypes import check_dtype_name  # torch-free

        self.fixed_rate()
        check_dtype_name(self.dtype)
        if self.capture_graphs not in ("lazy", "startup"):
            raise ValueError(f"--capture-graphs must be lazy or startup, got {self.capture_graphs!r}")
        _check_size("--memory-reserve", lambda: resolve_reserve(self.memory_reserve, 0))  # syntax only
        _check_size("--hysteresis", lambda: parse_bytes(self.hysteresis))
        self._check_numbers()
        if self.ckpt is not None and not Path(self.ckpt).is_dir():
            raise ValueError(f"checkpoint {self.ckpt!r} is not a directory")

    def _check_numbers(self) -> None:
        # uvicorn's bind raised an OverflowError traceback (exit 1) for 99999, after the start-up banner
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        _at_least("--max-num-seqs", self.max_num_seqs, 1)
        _at_least("--max-queued-requests", self.max_queued_requests, 0)
        _at_least("--default-max-tokens", self.default_max_tokens, 1)
        if self.max_model_len is not None:  # 0 must not quietly mean "the model's length" (bridge: `or`)
            _at_least("--max-model-len", self.max_model_len, 1)
        _positive("--monitor-interval", self.monitor_interval_s)  # 0 would poll in a busy loop
        if not self.monitor_interval_s <= threading.TIMEOUT_MAX:  # wait(inf) raises: the monitor thread would die
            raise ValueError(f"--monitor-interval must be at most {threading.TIMEOUT_MAX:.0f}, "
                             f"got {self.monitor_interval_s}")
        if self.tpot_target_ms is not None:
            _positive("--tpot-target-ms", self.tpot_target_ms)
        _at_least("--residency-sustain", self.residency_sustain_s, 0)
        _at_least("--prefill-graph-tokens", self.prefill_graph_tokens, 0)


def _check_size(flag: str, parse) -> None:
    try:
        parse()
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _at_least(flag: str, value, low) -> None:
    if not value >= low:  # `not >=` also refuses NaN
        raise ValueError(f"{flag} must be at least {low}, got {value}")


def _positive(flag: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{flag} must be greater than 0, got {value}")
