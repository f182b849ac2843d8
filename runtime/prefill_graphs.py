"""CUDA graphs for prompts up to 1024 tokens: one graph per (rung, length bucket), captured lazily, one pool.

Why: an eager prefill is bound by the host issuing its ~20 launches a layer. At stop 45 (H100) a 1024-token INT4
prefill kept the GPU busy 28 of its 33 ms, and a shorter prompt's GPU time shrinks with it while the host's does
not. A graph issues every launch at once.

A prompt of ``n`` tokens runs in the smallest bucket ``L >= n``, its ids padded after the real ones. Causal
attention keeps the real positions blind to the padding, so their K/V and the last real position's logits are
those of the unpadded prompt (up to the kernels' choice of tiles for ``L`` rows). The graph gathers that one
position before the head through a device index, with no host sync. Its K/V land in a staging cache (one for
every rung: views of its head-dim prefixes; as long as the largest bucket, 134 MB for an 8B shape at 1024 tokens)
and are copied into the request's cache after the replay (``n`` positions a layer). The graphs share one memory
pool (their activations and dequantize scratch: captures run one at a time, replays too).

Models with Mamba layers are not graphed: the padding would run through their recurrent state. A capture that
fails turns the graphs off for good, with a warning; every prompt then runs eagerly, as one past the largest
bucket does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .cache import KVCache
from .decoder import ElasticDecoder
from .graphs import collector_paused, smallest_bucket

# up to 1024 tokens: at 1024 an eager INT4 prefill left the GPU idle 5 ms of 33 at rate 0 and 18 of 38 at 0.35 (H100,
# results/prefill_profile_h100.json); past it the GPU's work dominates and padding would only add to it. No 192:
# graphed, 192 rows took 16.0 / 13.8 ms at rates 0 / 0.35 against 15.8 / 12.0 for 256 (H100, stop 46,
# results/prefill_graphs_buckets_h100.json); 384 and 768 beat the next bucket (18.7 / 13.9 against 19.9 / 14.7 ms,
# 25.7 / 18.6 against 29.3 / 22.1)
DEFAULT_PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024)
log = logging.getLogger(__name__)


@dataclass
class _Prefill:
    graph: torch.cuda.CUDAGraph
    cache: KVCache  # the rung's view of the staging cache (batch 1, the largest bucket's length)
    step_in: torch.Tensor  # int64 [L + 1] on the device: the padded ids, then the last real position
    host_in: torch.Tensor  # its pinned host twin
    copied: torch.cuda.Event  # the last host-to-device copy of host_in has landed (host_in may be rewritten)
    logits: torch.Tensor | None = None  # [1, V], written by every replay


def buckets_within(buckets: tuple[int, ...], max_len: int | None) -> tuple[int, ...]:
    """The sorted buckets a prompt of at most ``max_len`` tokens can need: up to the first that holds ``max_len``
    (no graph, nor staging memory, for lengths no prompt reaches)."""
    ordered = tuple(sorted(buckets))
    if max_len is None:
        return ordered
    last = smallest_bucket(ordered, max_len)
    return ordered if last is None else tuple(b for b in ordered if b <= last)


def padded_forward(model: ElasticDecoder, step_in: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``[1, V]`` of the last real token of a padded prompt: ``step_in`` = ids ``[L]`` then that token's
    position; K/V of all ``L`` positions written to ``cache`` from position 0 (what a graph replays)."""
    size = step_in.shape[0] - 1
    cache.length = 0  # every replay prefills from the start
    return model(step_in[:size].view(1, size), cache=cache, last_index=step_in[size:])[:, 0]


def fill_step(host_in: torch.Tensor, prompt_ids: list[int]) -> None:
    """``host_in [L + 1]``: the prompt's ids, zeros after them (any valid id: causal attention hides them), then
    the last real position."""
    n, size = len(prompt_ids), host_in.shape[0] - 1
    if not 0 < n <= size:
        raise ValueError(f"a {n}-token prompt does not fit a {size}-token bucket")
    host_in[:n].copy_(torch.tensor(prompt_ids, dtype=torch.int64))
    host_in[n:size].zero_()
    host_in[size] = n - 1


class PrefillGraphs:
    def __init__(self, model: ElasticDecoder, cache_dtype: torch.dtype,
                 buckets: tuple[int, ...] = DEFAULT_PREFILL_BUCKETS, max_len: int | None = None):
        self.model, self.cache_dtype = model, cache_dtype
        self.buckets = buckets_within(buckets, max_len)
        self.device = model.norm.weight.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Prefill] = {}
        # K/V of the replay: one allocation at full head dims, a view of it a rung (replays never overlap, and each
        # copies its K/V out before the next)
        self._full: KVCache | None = None
        self._staging: dict[int, KVCache] = {}
        self.enabled = self.supports(model)
        self._attn_layers = model.spec.layers_with("attn")

    @staticmethod
    def supports(model: ElasticDecoder) -> bool:
        """Whether padding a prompt changes nothing real: no Mamba layer (their state would run through it)."""
        return not model.spec.layers_with("mamba")

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds ``n`` tokens (None: graphs off, or longer than every bucket)."""
        return smallest_bucket(self.buckets, n) if self.enabled and n > 0 else None

    def capture_all(self, rungs) -> None:
        """Capture every (rung, bucket) now instead of at first use (a capture that fails turns the graphs off)."""
        for rung in rungs:
            for size in self.buckets:
                if self.enabled:
                    self._get(rung, size)

    def reset(self) -> None:
        """Drop every captured graph and its pool (the weights they read were replaced); recaptured on next use."""
        torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self._staging.clear()
        self._full = None
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, rung: int, prompt_ids: list[int], cache: KVCache) -> torch.Tensor | None:
        """The prompt's last logits ``[V]`` (a view valid until the next replay) with its K/V written to ``cache``,
        or None when the graph could not be captured (graphs now off: run it eagerly)."""
        n = len(prompt_ids)
        entry = self._get(rung, self.bucket(n))
        if entry is None:
            return None
        entry.copied.synchronize()  # the previous replay's copy has read host_in
        fill_step(entry.host_in, prompt_ids)
        entry.step_in.copy_(entry.host_in, non_blocking=True)
        entry.copied.record()
        entry.graph.replay()
        for layer in self._attn_layers:
            cache.k[layer][:, :, :n].copy_(entry.cache.k[layer][:, :, :n])
            cache.v[layer][:, :, :n].copy_(entry.cache.v[layer][:, :, :n])
        cache.advance(n)
        return entry.logits[0]

    @torch.inference_mode()
    def _get(self, rung: int, size: int) -> _Prefill | None:
        if (rung, size) in self.graphs:
            return self.graphs[(rung, size)]
        if self._full is None:  # full head dims, as long as the largest bucket
            self._full = self.model.new_cache(1, self.buckets[-1], None, self.cache_dtype)
        if rung not in self._staging:
            self._staging[rung] = self._full.narrowed(self.model.sizes_for(rung))
        entry = _Prefill(torch.cuda.CUDAGraph(), self._staging[rung],
                         torch.zeros(size + 1, dtype=torch.int64, device=self.device),
                         torch.zeros(size + 1, dtype=torch.int64).pin_memory(), torch.cuda.Event())
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles the kernels for L rows, settles allocations
                for _ in range(2):
                    padded_forward(self.model, entry.step_in, entry.cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            with collector_paused(), torch.cuda.graph(entry.graph, pool=self.pool):
                entry.logits = padded_forward(self.model, entry.step_in, entry.cache)
        except RuntimeError as exc:  # e.g. an op that syncs the host: eager prefill is still right
            log.warning("prefill CUDA graphs off: capturing (rung %d, %d tokens) failed: %s", rung, size, exc)
            self.enabled = False
            self.graphs.clear()
            return None
        entry.copied.record()
        self.graphs[(rung, size)] = entry
        return entry
