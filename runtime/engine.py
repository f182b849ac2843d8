"""The engine: requests in, token events out. Scheduler + runner + sampler + detokenizer, nano-vllm style.

``add_request`` queues a request at its rung; ``step`` runs one scheduler step (prefills of newly admitted
requests, then one decode token for every running request, grouped by rung) and returns the events it made;
``stream`` drives steps until one request finishes (the synchronous API the CLI and tests use). ``cancel``
frees a request's slot and cache at once. Counters feed the server's metrics. A request that ends (finished,
cancelled or failed) leaves every per-request table at once, whichever API drove it: its events stay on the
``Request`` (``req.events``), which its owner holds, so a long-running process keeps nothing per past request.

A failure while running some requests (an exception in their prefill or decode, non-finite logits in a row)
fails those requests only: each ends with ``finish_reason="error"`` and the message, its slot and cache are freed,
and the engine goes on with the others.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .decoder import ElasticDecoder
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .prefill_graphs import DEFAULT_PREFILL_BUCKETS
from .request import Request, SamplingParams, Status, TokenEvent
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler

log = logging.getLogger(__name__)
NON_FINITE = "ValueError: non-finite logits (NaN/inf) for this request"
RECENT = 4096  # timings kept for callers that look at recent ones (a server runs for months: bounded)


@dataclass
class _Stream:
    detok: IncrementalDetokenizer
    stops: StopMatcher


@dataclass
class Counters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))  # the latest requests'
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))  # the latest decode steps


def _buckets(max_num_seqs: int) -> tuple[int, ...]:
    """CUDA-graph batch sizes: powers of two up to the seat limit, and the limit itself."""
    sizes = {1 << i for i in range(max_num_seqs.bit_length()) if 1 << i <= max_num_seqs}
    return tuple(sorted(sizes | {max_num_seqs}))


def event_marks(reqs) -> list[tuple[Request, int]]:
    """Each request with its event count now: ``events_since`` returns what was emitted after."""
    return [(req, len(req.events)) for req in reqs]


def events_since(marks: list[tuple[Request, int]]) -> list[TokenEvent]:
    """The events emitted since ``event_marks``. Work that emits request by request and then raises made real
    events (one request's last, say) that went with its lost return value; that request has left the engine, and
    only these events can end its stream."""
    return [event for req, n in marks for event in req.events[n:]]


class Engine:
    def __init__(self, model: ElasticDecoder, tokenizer, *, max_num_seqs: int = 8, max_queued: int = 64,
                 max_model_len: int | None = None, cache_budget_bytes: int | None = None,
                 cuda_graphs: bool = True, lookahead: bool = True, eos_token_ids=(),
                 prefill_graph_tokens: int = DEFAULT_PREFILL_BUCKETS[-1]):
        self.max_model_len = max_model_len or model.spec.max_position_embeddings
        if self.max_model_len > model.spec.max_position_embeddings:  # as vLLM: RoPE was not trained past it
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context limit "
                             f"{model.spec.max_position_embeddings} (max_position_embeddings, or its sliding window)")
        prefill_buckets = tuple(b for b in DEFAULT_PREFILL_BUCKETS if b <= prefill_graph_tokens)
        self.runner = ModelRunner(model, max_model_len=self.max_model_len, cuda_graphs=cuda_graphs,
                                  graph_buckets=_buckets(max_num_seqs), prefill_buckets=prefill_buckets)
        self.sampler = Sampler(model.spec.vocab_size)
        self.tokenizer = tokenizer
        self.cache_budget_bytes = cache_budget_bytes
        self.scheduler = Scheduler(max_num_seqs, max_queued, self.max_model_len, cache_budget=self._cache_fits)
        # the tokenizer's eos and the checkpoint's (its source's generation config: ``checkpoint.eos_token_ids``)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = ({eos} if isinstance(eos, int) else set(eos or ())) | {int(t) for t in eos_token_ids}
        self._reserved: dict[str, int] = {}  # cache bytes of admitted requests
        self.streams: dict[str, _Stream] = {}
        self.requests: dict[str, Request] = {}
        self.counters = Counters()
        self.lookahead = lookahead  # greedy decode queues its next step before the host reads this one

    def _cache_fits(self, req: Request) -> bool:
        """Admission check; a yes reserves the bytes (several requests may be admitted before any prefill)."""
        need = self.runner.cache_bytes_for(req)
        if self.cache_budget_bytes is not None and sum(self._reserved.values()) + need > self.cache_budget_bytes:
            return False
        self._reserved[req.request_id] = need
        return True

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, rung: int = 0) -> Request:
        """Queue a request (ValueError for bad input, scheduler.QueueFull when the queue is full)."""
        return self.enqueue(self.new_request(prompt_ids, params, rung))

    def new_request(self, prompt_ids: list[int], params: SamplingParams | None = None, rung: int = 0) -> Request:
        """A checked request, not queued yet (ValueError for bad input). It reads only what a step never changes
        (the ladder, the spec, the limits), so the async front may call it while a step runs on another thread."""
        self.runner.model.sizes_for(rung)  # a rung outside the ladder fails here, before anything is queued
        req = Request(list(prompt_ids), params or SamplingParams(), rung=rung)
        # checked here, not left to the embedding lookup: that fails the request only at prefill, with an opaque
        # IndexError on CPU and a device-side assert (every request lost) on CUDA
        vocab = self.runner.model.spec.vocab_size
        if req.prompt_ids and not (min(req.prompt_ids) >= 0 and max(req.prompt_ids) < vocab):  # (C loops)
            bad = next(t for t in req.prompt_ids if not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        # the length first: over max_model_len no rung or budget helps, and the budget's advice would mislead
        self.scheduler.check_length(req)  # the scheduler's own check, here before any queueing
        need = self.runner.cache_bytes_for(req)
        if self.cache_budget_bytes is not None and need > self.cache_budget_bytes:
            raise ValueError(f"this request's cache ({need} bytes at rung {rung}) exceeds the cache budget "
                             f"({self.cache_budget_bytes} bytes): lower max_tokens or pick a higher rung")
        return req

    def enqueue(self, req: Request) -> Request:
        """Queue a request from ``new_request`` (scheduler.QueueFull when the queue is full)."""
        # the stream first: it decodes the prompt and may raise, and a refused request must not stay queued
        stream = _Stream(IncrementalDetokenizer(self.tokenizer, req.prompt_ids), StopMatcher(req.params.stop))
        self.scheduler.add(req)
        self.requests[req.request_id] = req
        self.streams[req.request_id] = stream
        return req

    def cancel(self, request_id: str) -> bool:
        req = self.scheduler.cancel(request_id)
        if req is None:
            return False
        self.counters.cancelled += 1
        self._release(req)
        req.events.append(TokenEvent(request_id, None, "", finish_reason="cancelled", rung=req.rung))
        return True

    def _release(self, req: Request) -> None:
        """Everything the engine holds for a request that ended (every end path calls this)."""
        self.streams.pop(req.request_id, None)
        self.requests.pop(req.request_id, None)
        self._reserved.pop(req.request_id, None)
        self.runner.free(req.request_id)
        self.sampler.release(req.request_id)

    # ---------------------------------------------------------------------------------------------- steps
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        events = self._guarded(self._running_in(plan), lambda: self._take_lookahead(plan))
        for req in plan.prefill:
            self.counters.prompt_tokens += len(req.prompt_ids)
            events += self._guarded([req], lambda req=req: self._advance([req], self.runner.prefill(req)[None]))
        start = time.perf_counter()
        steady = len(plan.decode) == 1 and self.scheduler.num_waiting == 0  # the next step decodes the same batch
        for group in plan.decode.values():
            group = [r for r in group if r.status is Status.RUNNING]  # a lookahead token may have finished one
            if group:
                events += self._guarded(group, lambda group=group: self._decode_group(group, steady))
        if plan.decode:
            self.counters.step_s.append(time.perf_counter() - start)
        return events

    def _decode_group(self, group: list[Request], steady: bool) -> list[TokenEvent]:
        if all(self.sampler.plain_greedy(r.params) for r in group):
            return self._advance_greedy(group, steady and self.lookahead)
        return self._advance(group, self.runner.decode(group))

    @staticmethod
    def _running_in(plan) -> list[Request]:
        return [r for group in plan.decode.values() for r in group]

    def _guarded(self, reqs: list[Request], run) -> list[TokenEvent]:
        """``run()``'s events; if it raises, ``reqs`` fail (freed, an "error" event each) and the engine goes on."""
        marks = event_marks(reqs)
        try:
            return run()
        except Exception as err:  # noqa: BLE001 (any failure of these requests must not stop the others)
            log.exception("requests %s failed", [r.request_id for r in reqs])
            return events_since(marks) + self.fail(reqs, f"{type(err).__name__}: {err}")

    def fail(self, reqs: list[Request], message: str) -> list[TokenEvent]:
        """End unfinished ``reqs`` with finish_reason "error": slot, cache and sampler state freed at once.

        A request already finished whose events do not end with a finish event (``_release`` raised after
        ``scheduler.finish``, so its last event was never made) gets its "error" event too, or its stream would wait
        forever; it was counted when it finished, so it is not counted again."""
        events = []
        for req in reqs:
            if req.finished:
                if not req.events or req.events[-1].finish_reason is None:
                    event = TokenEvent(req.request_id, None, "", finish_reason="error", rung=req.rung, error=message)
                    req.events.append(event)
                    events.append(event)
                continue
            self.scheduler.finish(req, "error")
            self.counters.failed += 1
            self._release(req)
            event = TokenEvent(req.request_id, None, "", finish_reason="error", rung=req.rung, error=message)
            req.events.append(event)
            events.append(event)
        return events

    def _take_lookahead(self, plan) -> list[TokenEvent]:
        """A greedy step already on the GPU for a batch this plan does not decode as is (a request finished, was
        cancelled or joins): emit its tokens now, for the requests still running, before anything else runs."""
        key = self.runner.lookahead_key
        if key is None:
            return []
        groups = list(plan.decode.values())
        if not plan.prefill and len(groups) == 1 and tuple(r.request_id for r in groups[0]) == key:
            return []  # the decode below reads it
        events = []
        for rid, token, finite in self.runner.take_lookahead():
            req = self.requests.get(rid)
            if req is not None and req.status is Status.RUNNING:
                events += self._emit(req, token, None, None) if finite else self.fail([req], NON_FINITE)
        return events

    def _advance(self, reqs: list[Request], logits: torch.Tensor) -> list[TokenEvent]:
        sampled = self.sampler(logits, [r.params for r in reqs], [r.request_id for r in reqs],
                               [r.prompt_ids for r in reqs], [r.output_ids for r in reqs])
        events = []
        for req, tok, lp, top, ok in zip(reqs, sampled.token_ids, sampled.logprobs, sampled.top_logprobs,
                                         sampled.finite, strict=True):
            events += self._emit(req, tok, lp, top) if ok else self.fail([req], NON_FINITE)
        return events

    def _advance_greedy(self, reqs: list[Request], lookahead: bool = False) -> list[TokenEvent]:
        # a lookahead only pays if every request will still want the token after this one
        lookahead = lookahead and all(len(r.output_ids) + 2 <= r.params.max_tokens
                                      and r.num_tokens + 2 <= self.max_model_len for r in reqs)
        tokens, finite = self.runner.decode_greedy(reqs, lookahead)
        events = []
        for req, tok, ok in zip(reqs, tokens, finite, strict=True):  # a bad row fails its request only
            events += self._emit(req, tok, None, None) if ok else self.fail([req], NON_FINITE)
        return events

    def _emit(self, req: Request, token: int, logprob, top) -> list[TokenEvent]:
        req.output_ids.append(token)
        self.counters.generated_tokens += 1
        if req.first_token_s is None:
            req.first_token_s = time.monotonic()
            self.counters.ttft_s.append(req.first_token_s - req.arrival_s)
        stream = self.streams[req.request_id]
        reason, text, hit = self._finish_reason(req, token), "", False
        stop_token = reason == "stop"  # (a stop string is found below, in the text)
        if not stop_token:  # stop tokens (eos, stop_token_ids) add no text of their own
            text, hit = stream.stops.feed(stream.detok.add(token))
        if not hit and reason is not None:
            # the stream ends: text held back (a split character, a possible stop string) is released, and may
            # still complete a stop string
            tail, hit = stream.stops.feed(stream.detok.flush())
            text += tail + stream.stops.flush()
        reason = "stop" if hit else reason
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.counters.finished += 1
            self._release(req)
        event = TokenEvent(req.request_id, token, text, logprob, top, reason, req.rung, stop_token=stop_token)
        req.events.append(event)
        return [event]

    @staticmethod
    def _is_stop_token(req: Request, token: int, eos_ids: set[int]) -> bool:
        return token in req.params.stop_token_ids or (token in eos_ids and not req.params.ignore_eos)

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if self._is_stop_token(req, token, self.eos_ids):
            return "stop"
        if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ------------------------------------------------------------------------------------------ sync API
    def stream(self, req: Request) -> Iterator[TokenEvent]:
        """Drive the engine until ``req`` finishes, yielding its events as they come (those of steps run before
        this call included)."""
        if not req.finished and req.request_id not in self.requests:  # stepping would never finish it
            raise ValueError(f"request {req.request_id} is not queued in this engine")
        sent = 0
        while True:
            while sent < len(req.events):
                sent += 1
                yield req.events[sent - 1]
            if req.finished:
                return
            self.step()

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, rung: int = 0) -> str:
        req = self.add_request(prompt_ids, params, rung)
        return "".join(event.text for event in self.stream(req))
