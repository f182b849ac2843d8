"""Model runner: prefill and batched decode over the elastic decoder, one KV cache per request sized by its rung.

Each request keeps its rung from prefill to its last token, so its cache holds exactly the kept K/V head dims
of that rung (a pruned request costs less cache memory too) and ``max_len = prompt + max_tokens`` positions.
Prefill runs one request's prompt through the eager decoder. Decode runs all requests of one rung as one batch
(``DecodeBatch``: attention reads each request's own cache through address tables), on CUDA replayed from one
CUDA graph per (rung, batch bucket) (``graphs.py``); on CPU the same batched forward runs eagerly. Models with
Mamba layers (Mamba2, hybrids) are graphed the same way: their conv and SSM kernels read each request's own
states through the batch's fixed address tables (``ssm_cache.BatchedSSMStates``), which a rebind refreshes in
place, so the captured graph always reads the requests bound now.
"""

from __future__ import annotations

import torch

from uniql.kernels.int4_matmul import reserve_workspace

from .cache import DecodeBatch, KVCache
from .decoder import ElasticDecoder
from .fusion import fuse_projections
from .graphs import DEFAULT_BUCKETS, DecodeGraphs, Lookahead, greedy_picks
from .linear import Int4Linear
from .prefill_graphs import DEFAULT_PREFILL_BUCKETS, PrefillGraphs
from .request import Request
from .ssm_cache import cache_bytes


class ModelRunner:
    def __init__(self, model: ElasticDecoder, cache_dtype: torch.dtype | None = None, *,
                 max_model_len: int | None = None, cuda_graphs: bool = True,
                 graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 prefill_buckets: tuple[int, ...] = DEFAULT_PREFILL_BUCKETS):
        self.model = model.eval()
        self.cache_dtype = cache_dtype or model.norm.weight.dtype
        self.max_model_len = max_model_len or model.spec.max_position_embeddings
        self.caches: dict[str, KVCache] = {}
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.lookahead_reads = 0  # greedy steps that were already on the GPU when asked for
        if self.device.type == "cpu":  # no Triton on CPU: a host form per projection (aten int4 GEMM or dense)
            dtype = model.norm.weight.dtype
            for module in model.modules():
                if isinstance(module, Int4Linear):
                    module.prepare_host(dtype)
        else:
            fuse_projections(model)  # q|k|v and gate|up in one launch each
            reserve_workspace(self.device, floats=1 << 23)  # split-K scratch, allocated before any capture
            if cuda_graphs:
                self.graphs = DecodeGraphs(model, self.max_model_len, self.cache_dtype, graph_buckets)
            if cuda_graphs and prefill_buckets and PrefillGraphs.supports(model):
                self.prefill_graphs = PrefillGraphs(model, self.cache_dtype, prefill_buckets, self.max_model_len)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def cache_bytes_for(self, req: Request) -> int:
        """Bytes a request's cache would take (the scheduler's admission check uses it)."""
        return self.cache_bytes_at(req.rung, req.max_len)

    def cache_bytes_at(self, rung: int, max_len: int) -> int:
        """KV of attention layers for ``max_len`` tokens + fixed SSM/conv states of Mamba layers, at ``rung``."""
        itemsize = torch.empty((), dtype=self.cache_dtype).element_size()
        return cache_bytes(self.model.spec, self.model.sizes_for(rung), max_len, itemsize)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    @torch.inference_mode()
    def prefill(self, req: Request) -> torch.Tensor:
        """Run the prompt, fill a fresh cache; returns the last position's logits [V] (fp32)."""
        cache = self.model.new_cache(1, req.max_len, req.rung, self.cache_dtype)
        self.caches[req.request_id] = cache
        graphs = self.prefill_graphs
        if graphs is not None and graphs.bucket(len(req.prompt_ids)) is not None:
            logits = graphs.run(req.rung, req.prompt_ids, cache)
            if logits is not None:  # a copy: the graph's output buffer is rewritten by its next replay
                return logits.to(torch.float32, copy=True)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        return self.model(ids, cache=cache, logits_to_keep=1)[0, -1].float()

    @torch.inference_mode()
    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One new token for each request of ONE rung (its last output token in): next logits ``[B, V]`` fp32."""
        return self._decode(reqs)[0].float()

    @torch.inference_mode()
    def decode_greedy(self, reqs: list[Request], lookahead: bool = False) -> tuple[list[int], list[bool]]:
        """Like ``decode`` for requests that take the plain argmax: their next ids and whether each row's logits
        were finite, read from the device in one small copy (the sampler never sees the logits).

        ``lookahead`` (CUDA graphs): before reading this step's ids, queue the NEXT step of the same requests on
        the GPU, fed by this step's picks on the device. The next call with the same requests only reads it; if
        the batch changes instead, the caller takes it with ``take_lookahead`` first (its tokens are real: every
        row's input was its true greedy pick, and Mamba states have already moved past it). The host's work
        between tokens (bookkeeping, detokenizing, streaming) then overlaps the GPU instead of idling it."""
        graphs, key = self.graphs, tuple(r.request_id for r in reqs)
        pending = graphs.pending if graphs is not None else None
        if pending is not None and pending.key == key:
            graphs.pending = None
            self.lookahead_reads += 1
            entry, slot = pending.entry, pending.slot
            for cache in (self.caches[r.request_id] for r in reqs):
                cache.advance(1)
        elif graphs is not None and graphs.bucket(len(reqs)) is not None:
            self._decode(reqs)
            entry, slot = graphs.entry_for(reqs[0].rung, len(reqs)), 0
            graphs.fetch(entry, slot)
        else:
            picks = self._decode(reqs)[1].tolist()
            return picks[0], [bool(v) for v in picks[1]]
        # a pending step read after ``graphs.reset`` ran a dropped graph: replaying it again would read the weight
        # tensors a residency pass replaced (freed memory); the next step captures a fresh one instead
        if (lookahead and graphs.current(entry)
                and all(c.length < c.max_len for c in (self.caches[r.request_id] for r in reqs))):
            graphs.chain(entry)  # room for one more token in every cache checked above: the kernels trust lengths
            graphs.fetch(entry, 1 - slot)
            graphs.pending = Lookahead(key, entry, 1 - slot)
        picks = graphs.read(entry, slot, len(reqs))
        return picks[0], [bool(v) for v in picks[1]]

    def capture_graphs(self, rungs) -> None:
        """Capture every decode and prefill graph of these rungs now (start-up cost for steady latency); no-op
        without graphs (CPU, ``cuda_graphs=False``)."""
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.capture_all(rungs)

    def reset_graphs(self) -> None:
        """Drop every captured graph, decode and prefill (weights were replaced); each is recaptured on next use."""
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.reset()

    @property
    def lookahead_key(self) -> tuple[str, ...] | None:
        """The requests of the greedy step already queued on the GPU, if any."""
        pending = self.graphs.pending if self.graphs is not None else None
        return None if pending is None else pending.key

    @torch.inference_mode()
    def take_lookahead(self) -> list[tuple[str, int, bool]]:
        """Read the queued step: ``(request id, token, finite)`` for each of its requests whose cache is still
        here (finished or cancelled ones are skipped; their rows were computed for nothing)."""
        pending, self.graphs.pending = self.graphs.pending, None
        ids, finite = self.graphs.read(pending.entry, pending.slot, len(pending.key))
        out = []
        for rid, token, ok in zip(pending.key, ids, finite, strict=True):
            if rid in self.caches:
                self.caches[rid].advance(1)
                out.append((rid, token, bool(ok)))
        self.lookahead_reads += 1
        return out

    def _decode(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lookahead_key is not None:  # its tokens would be lost and Mamba states would skip them
            raise RuntimeError("a greedy lookahead is queued: take_lookahead() before decoding another batch")
        rung = reqs[0].rung
        if any(r.rung != rung for r in reqs):
            raise ValueError("a decode batch runs one rung; group requests by rung first")
        caches = [self.caches[r.request_id] for r in reqs]
        ids = [r.output_ids[-1] for r in reqs]
        lengths = [c.length + 1 for c in caches]  # tokens after this step, the new one included
        if any(n > c.max_len for n, c in zip(lengths, caches, strict=True)):
            raise ValueError("a request has filled its cache; it should have finished at max_tokens")
        if self.graphs is not None and self.graphs.bucket(len(reqs)) is not None:
            logits, picks = self.graphs.run(rung, ids, lengths, caches)
        else:
            logits = self._decode_eager(rung, ids, lengths, caches)
            picks = greedy_picks(logits, self.model.spec.vocab_size)
        for cache in caches:
            cache.advance(1)
        return logits, picks

    def _decode_eager(self, rung: int, ids: list[int], lengths: list[int], caches: list[KVCache]) -> torch.Tensor:
        batch = DecodeBatch(self.model.sizes_for(rung), len(caches), max(c.max_len for c in caches), self.device)
        batch.bind(caches, torch.tensor(lengths, dtype=torch.int32))
        ids_t = torch.tensor(ids, device=self.device).view(-1, 1)  # positions: the bound lengths - 1
        return self.model(ids_t, cache=batch, logits_to_keep=1)[:, -1]

    def free(self, request_id: str) -> None:
        """Drop a request's cache at once (finished or cancelled). A queued lookahead may still write to it: the
        allocator reuses the memory in stream order, after that."""
        self.caches.pop(request_id, None)
