"""CUDA graphs for the decode step: one graph per (rung, batch bucket), captured lazily, one shared memory pool.

A graph replays the whole decode forward (embedding, every layer, head) with no Python and no launch gaps.
Its inputs are static buffers: one int64 ``[3, B]`` step buffer (token ids, lengths incl. the new token, real-row
flags) that one host-to-device copy refreshes per step, and the ``DecodeBatch`` address tables, refreshed only
when the set of requests changes. The graph ends by writing the next greedy step's inputs into the step buffer,
so a greedy batch can be replayed again before the host has read its tokens (``chain``: the runner's lookahead).
A batch smaller than its bucket is padded with rows that decode into a 1-token scratch
cache of the same rung, so one graph serves every batch size up to its bucket. The scratch cache comes from
``model.new_cache``, so Mamba layers get scratch conv/SSM states too; padding rows share it and leave garbage
there, which no real row reads (every op of a decode step is row-independent).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
from dataclasses import dataclass, field

import torch

from ..kernels.greedy import greedy_picks as kernel_greedy_picks
from .cache import DecodeBatch, KVCache
from .decoder import ElasticDecoder

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def smallest_bucket(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest of the sorted ``buckets`` that holds ``n`` (None: ``n`` is larger than all of them)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def greedy_picks(logits_bv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 ``[2, B]``: each row's argmax over the vocabulary and whether the row is finite. Inside the graph,
    so a greedy step costs the host one small read instead of the sampler's ~7 launches over ``[B, V]`` (the same
    ids as the sampler's greedy path: argmax of the same values, first index on ties). Two small Triton launches
    on the GPU (``kernels/greedy.py``; torch's two single-block reductions took ~42 us a step), torch on CPU."""
    return kernel_greedy_picks(logits_bv[:, :vocab_size])


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: DecodeBatch
    step_in: torch.Tensor  # int64 [3, B]: token ids, lengths including the new token, 1 = a real row (0 = pad)
    host_in: torch.Tensor  # its pinned host twin (allocating pinned memory per step would cost ~100 us)
    logits: torch.Tensor  # [B, V], written by every replay
    picks: torch.Tensor | None = None  # int64 [2, B]: greedy ids and row-finite flags (``greedy_picks``)
    bound: tuple = field(default_factory=tuple)  # the caches the tables point at (identity)
    host_out: torch.Tensor | None = None  # pinned int64 [2 slots, 2, B]: picks copied out without a sync
    done: list = field(default_factory=list)  # one CUDA event per slot: its copy has landed


@dataclass
class Lookahead:
    """A greedy step already on the GPU (chained to the step before it) whose picks nobody has read yet."""
    key: tuple[str, ...]  # the requests it decodes, in row order
    entry: _Graph
    slot: int


class DecodeGraphs:
    def __init__(self, model: ElasticDecoder, max_len: int, cache_dtype: torch.dtype,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.max_len, self.cache_dtype = model, max_len, cache_dtype
        self.buckets = tuple(sorted(buckets))
        self.device = model.norm.weight.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._scratch: dict[int, KVCache] = {}
        self.pending: Lookahead | None = None

    def bucket(self, batch: int) -> int | None:
        """The smallest captured batch size that holds ``batch`` rows (None: larger than every bucket)."""
        return smallest_bucket(self.buckets, batch)

    def capture_all(self, rungs) -> None:
        """Capture every (rung, bucket) now instead of on first use (start-up cost for steady latency)."""
        for rung in rungs:
            for size in self.buckets:
                self._get(rung, size)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool; each (rung, bucket) is recaptured at its next decode.

        A graph holds the addresses of the weights it read: replacing a weight tensor (elastic residency) makes
        every graph stale. Call between two decode steps. The graphs' pool goes with them (a fresh pool id for the
        next captures), so once the caching allocator is emptied its memory is back with the driver. The 1-token
        scratch caches and the split-K workspace were allocated outside the pool and stay.
        """
        torch.cuda.synchronize(self.device)  # no replay may still be reading the old tensors
        self.graphs.clear()  # a pending lookahead keeps its entry (and host buffers) until it is read
        self.pool = torch.cuda.graph_pool_handle()

    def current(self, entry: _Graph) -> bool:
        """Whether ``entry`` is still one of the captured graphs (``reset`` drops them all)."""
        return any(g is entry for g in self.graphs.values())

    def run(self, rung: int, ids: list[int], lengths: list[int],
            caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, V]`` and greedy picks ``[2, B]`` for one decode step of these requests (views valid until
        the next replay)."""
        b = len(caches)
        entry = self._get(rung, self.bucket(b))
        pad = entry.step_in.shape[1] - b
        rows = caches + [self._scratch_cache(rung)] * pad
        key = tuple(c.serial for c in rows)
        if entry.bound != key:
            entry.batch.bind(rows)
            entry.bound = key
        entry.host_in.copy_(torch.tensor([ids + [0] * pad, lengths + [1] * pad, [1] * b + [0] * pad],
                                         dtype=torch.int64))
        entry.step_in.copy_(entry.host_in, non_blocking=True)
        entry.graph.replay()
        return entry.logits[:b], entry.picks[:, :b]

    def entry_for(self, rung: int, batch: int) -> _Graph:
        return self._get(rung, self.bucket(batch))

    def chain(self, entry: _Graph) -> None:
        """Replay ``entry`` again on the inputs its last replay left: each real row's greedy pick as its next id
        and its length + 1 (the graph ends by writing them), with no host input: the GPU starts the next token
        before the host has read this one."""
        entry.graph.replay()

    def fetch(self, entry: _Graph, slot: int) -> None:
        """Queue the copy of the last replay's picks to host slot ``slot`` (read it with ``read``)."""
        entry.host_out[slot].copy_(entry.picks, non_blocking=True)
        entry.done[slot].record()

    @staticmethod
    def read(entry: _Graph, slot: int, b: int) -> list[list[int]]:
        entry.done[slot].synchronize()
        return entry.host_out[slot][:, :b].tolist()

    def _scratch_cache(self, rung: int) -> KVCache:
        if rung not in self._scratch:
            self._scratch[rung] = self.model.new_cache(1, 1, rung, self.cache_dtype)
        return self._scratch[rung]

    def _forward(self, entry: _Graph) -> torch.Tensor:
        entry.batch.lengths.copy_(entry.step_in[1])
        b = entry.step_in.shape[1]
        ids = entry.step_in[0].view(b, 1)  # positions: the batch's lengths - 1 (the RoPE tables in one launch)
        return self.model(ids, cache=entry.batch, logits_to_keep=1)[:, -1]

    @torch.inference_mode()
    def _get(self, rung: int, size: int) -> _Graph:
        if (rung, size) in self.graphs:
            return self.graphs[(rung, size)]
        batch = DecodeBatch(self.model.sizes_for(rung), size, self.max_len, self.device)
        step_in = torch.ones(3, size, dtype=torch.int64, device=self.device)
        host_in = torch.ones(3, size, dtype=torch.int64).pin_memory()
        entry = _Graph(torch.cuda.CUDAGraph(), batch, step_in, host_in, logits=None,
                       host_out=torch.zeros(2, 2, size, dtype=torch.int64).pin_memory(),
                       done=[torch.cuda.Event(), torch.cuda.Event()])
        batch.bind([self._scratch_cache(rung)] * size)
        entry.bound = (self._scratch_cache(rung).serial,) * size
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compiles the Triton kernels, settles allocations
            for _ in range(2):
                self._forward(entry)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with collector_paused(), torch.cuda.graph(entry.graph, pool=self.pool):
            entry.logits = self._forward(entry)
            entry.picks = greedy_picks(entry.logits, self.model.spec.vocab_size)
            # the next step's inputs, for ``chain``: the picks in, real rows one longer (pads stay at length 1)
            entry.step_in[0].copy_(entry.picks[0])
            entry.step_in[1].add_(entry.step_in[2])
        self.graphs[(rung, size)] = entry
        return entry


@contextlib.contextmanager
def collector_paused():
    """Collect Python garbage now and not during the capture: a dead engine's CUDA graph (or pinned buffer) freed
    by the cycle collector mid-capture is a CUDA call the capture forbids, and it invalidates the capture ("operation
    not permitted when stream is capturing"). torch no longer collects at capture start by default."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
