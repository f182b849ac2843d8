"""The engine bridge: checkpoint + tokenizer + engine + weight store behind a small torch-free interface.

This is the only server module that imports torch (through the runtime); the HTTP layer talks to it through
the methods below, with plain lists and numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from uniql.runtime.async_engine import AsyncEngine
from uniql.runtime.checkpoint import eos_token_ids, load_tokenizer
from uniql.runtime.detokenizer import render_chat
from uniql.runtime.dtypes import dtype_name, load_for_inference
from uniql.runtime.engine import Engine
from uniql.runtime.request import SamplingParams, TokenEvent

from .config import ServerConfig
from .tokens import token_bytes_fn
from .weights import ElasticWeights

log = logging.getLogger(__name__)


class EngineBackend:
    def __init__(self, model, tokenizer, ckpt_dir: str | Path | None, cfg: ServerConfig, eos_ids=()):
        self.engine = Engine(model, tokenizer, max_num_seqs=cfg.max_num_seqs, max_queued=cfg.max_queued_requests,
                             max_model_len=cfg.max_model_len or model.spec.max_position_embeddings,
                             eos_token_ids=eos_ids, prefill_graph_tokens=cfg.prefill_graph_tokens)
        if cfg.capture_graphs == "startup" and self.engine.runner.graphs is not None:  # CUDA: before the engine
            # thread exists, as a capture allows no other CUDA work meanwhile
            self._capture_graphs(model)
        self.front = AsyncEngine(self.engine)
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes_fn(tokenizer, self.token_text)  # token_id -> its raw bytes (logprobs)
        self.rates = tuple(model.ladder.rates)
        self.dtype = dtype_name(model.norm.weight.dtype)  # what activations and caches run in (/health says it)
        self.max_model_len = self.engine.max_model_len
        self.weights = ElasticWeights(model, ckpt_dir)
        self.weights.settle()  # the runner's one-time dequantization leaves temporaries in the heap

    def _capture_graphs(self, model) -> None:
        runner, start = self.engine.runner, time.perf_counter()
        for rung in range(len(model.ladder.rates)):
            runner.capture_graphs([rung])
            log.info("CUDA graphs of rung %d captured (%.1f s so far)", rung, time.perf_counter() - start)

    @classmethod
    def load(cls, ckpt_dir: str | Path, cfg: ServerConfig) -> EngineBackend:
        model, manifest = load_for_inference(ckpt_dir, cfg.device, cfg.dtype)  # cast once here, never per request
        backend = cls(model, load_tokenizer(ckpt_dir), ckpt_dir, cfg, eos_token_ids(manifest))
        if cfg.device == "cpu":
            backend._leave_a_core()
        return backend

    def _leave_a_core(self) -> None:
        """CPU serving: torch's worker threads spin while they wait, so with every core busy the event loop that
        streams the tokens starves (measured on 2 cores: 150 ms per token of a tiny model with 2 threads, 6 ms
        with 1). Keep one core for the HTTP side; restored on shutdown."""
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self._torch_threads, (os.cpu_count() or 2) - 1)))

    # ------------------------------------------------------------------------------------------ text
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids (ValueError for bad messages, or messages the template refuses: ``render_chat``)."""
        return render_chat(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode_text(self, ids: list[int]) -> str:
        """A prompt given as token ids, as text (``echo``)."""
        return self.tokenizer.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.engine.runner.model.spec.vocab_size

    # ---------------------------------------------------------------------------------------- requests
    @property
    def max_choices(self) -> int:
        """The most sequences one request may queue at once: every seat plus every queue place. More choices
        (``n``) can never be accepted, however idle the server is."""
        return self.engine.scheduler.capacity

    @property
    def alive(self) -> bool:
        """Whether the engine thread still steps (if it died, requests would wait forever)."""
        return self.front.alive

    def nearest_rung(self, rate: float) -> int:
        return self.engine.runner.model.ladder.nearest(rate)

    def cache_bytes(self, max_len: int) -> tuple[int, ...]:
        """A request's caches at every rung (KV for prompt + max_tokens positions, SSM states), by the runner's own
        admission formula."""
        return tuple(self.engine.runner.cache_bytes_at(r, max_len) for r in range(len(self.rates)))

    def submit(self, prompt_ids: list[int], params: SamplingParams, rung: int) -> tuple[str, AsyncIterator[TokenEvent]]:
        """Queue one sequence (ValueError / QueueFull now); returns its id and its event stream."""
        return self.front.submit(prompt_ids, params, rung)

    def cancel(self, request_id: str) -> bool:
        return self.front.cancel(request_id)

    # ------------------------------------------------------------------------------------------ state
    def load_stats(self) -> dict:
        """Running / waiting counts and KV cache bytes as of the last step, and the lowest live rung. Neither waits
        for a step in progress (seconds, for a long prefill on CPU), so the monitor's gauges stay current."""
        load = self.front.load
        return {"running": load.running, "waiting": load.waiting, "kv_cache_bytes": load.kv_cache_bytes,
                "live_min_rung": self.front.live_min_rung()}

    def committed_cache_bytes(self) -> int:
        """Cache bytes of every live request, queued ones included (``AsyncEngine.committed_cache_bytes``)."""
        return self.front.committed_cache_bytes()

    def live_min_rung(self) -> int | None:
        """The lowest rung of any live request, those queued but not yet seen by the engine thread included."""
        return self.front.live_min_rung()

    def change_weights(self, change) -> None:
        """Run ``change()`` (a residency pass that swaps weight tensors) where no forward can overlap it: on the
        engine thread between two steps. The captured decode and prefill graphs hold the old tensors' addresses, so
        they are dropped first (their pools too, before the pass allocates) and recaptured at their next use.
        Decoding waits for the whole pass (its cost: ``ResidencyManager.last_pass_s``)."""
        def run(engine: Engine) -> None:
            engine.runner.reset_graphs()
            change()
        self.front.between_steps(run)

    def shutdown(self) -> None:
        self.front.shutdown()
        if getattr(self, "_torch_threads", None):
            torch.set_num_threads(self._torch_threads)
