"""Turns a batch of next-token logits into one token per request, honouring each request's SamplingParams.

Order of operations per row, all in float32:

1. keep the first ``vocab_size`` columns (padded LM heads have extra, meaningless ones);
2. raise ``ValueError`` naming the request if any remaining logit is NaN or +/-inf;
3. repetition penalty (HF / vLLM) over prompt + generated tokens: a seen token's positive logit is divided by it,
   a negative one multiplied;
4. presence / frequency penalties (OpenAI) over generated tokens only:
   ``logit -= presence * (count > 0) + frequency * count``;
5. greedy rows (temperature below 1e-5, 0 included, or top_k 1) take the argmax; the others go on:
   temperature -> top_k -> top_p (smallest set whose cumulative probability >= top_p, the top token always
   kept) -> min_p (drop tokens whose probability < min_p * the top probability) -> one draw.

Logprobs are taken from ``log_softmax`` of the logits after step 4, i.e. *processed by penalties only*: they are
neither the raw model distribution (vLLM's default) nor the temperature/filtered one. Penalties are part of
what the request asked the model to be, while temperature and truncation are how we pick from it, so the
reported number stays comparable across sampling settings yet explains penalised choices.

Reproducibility: each request owns a ``torch.Generator`` seeded once (from its ``seed``, or from torch's global
RNG when it has none) and each sampled row draws its own exponential noise of width ``vocab_size`` from it;
the token is ``argmax(probs / noise)`` (the exponential race, equivalent to drawing from ``probs``). A row's
draw therefore depends only on its own generator and logits, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .request import GREEDY_BELOW, SamplingParams

# Temperatures below this are treated as this: dividing logits by a denormal would overflow to inf -> NaN.
_MIN_TEMPERATURE = GREEDY_BELOW  # every row that gets here is at or above it


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    finite: list[bool]  # False: that row's logits had NaN/inf and its token means nothing (the engine fails it)


class Sampler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._generators: dict[str, torch.Generator] = {}

    # ---------------------------------------------------------------------------------------------- generators
    def generator_for(self, request_id: str, seed: int | None, device) -> torch.Generator:
        """The request's own generator, created and seeded on first use; later calls continue its stream.

        Without a seed it is seeded once from torch's global RNG, so unseeded requests still get independent
        streams (and a run is repeatable under ``torch.manual_seed``)."""
        gen = self._generators.get(request_id)
        if gen is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            gen = torch.Generator(device=torch.device(device))
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    # ---------------------------------------------------------------------------------------------- sampling
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[str],
                 prompt_ids: list[list[int]], output_ids: list[list[int]]) -> SampleOutput:
        logits_bv, finite_b = self._checked(logits, request_ids)
        logits_bv = self._penalised(logits_bv, params, prompt_ids, output_ids)
        tokens_b = logits_bv.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            rows_t = torch.tensor(rows, device=logits_bv.device)
            drawn = self._draw(logits_bv[rows_t], [params[i] for i in rows], [request_ids[i] for i in rows])
            tokens_b[rows_t] = drawn
        # one device-to-host transfer for the ids and the finiteness check (each sync costs a GPU round trip)
        host = torch.cat((tokens_b, finite_b.long())).tolist()
        tokens, finite = host[:len(params)], [bool(f) for f in host[len(params):]]
        logprobs, tops = self._logprobs(logits_bv, tokens_b, params)
        return SampleOutput(tokens, logprobs, tops, finite)

    @staticmethod
    def plain_greedy(params: SamplingParams) -> bool:
        """Argmax of the raw logits and nothing else (no penalties, no logprobs): the runner picks these ids on
        the device (``graphs.greedy_picks``), the same ids this sampler would."""
        return (params.greedy and params.repetition_penalty == 1.0 and not params.presence_penalty
                and not params.frequency_penalty and not params.logprobs)

    def _checked(self, logits: torch.Tensor, request_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A float32 copy of the first vocab_size columns and whether each row is finite (checked by the caller
        together with the sampled ids, so a step syncs with the device once)."""
        if logits.dim() != 2 or logits.shape[0] != len(request_ids):
            raise ValueError(f"logits must be [batch={len(request_ids)}, vocab], got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size={self.vocab_size}")
        logits_bv = logits[:, : self.vocab_size].to(torch.float32, copy=True)
        # NaN/inf rows must not reach top-p / the draw: sample from zeros there, the caller fails those rows
        finite_b = torch.isfinite(logits_bv).all(dim=-1)
        return torch.where(finite_b[:, None], logits_bv, 0.0), finite_b

    # ---------------------------------------------------------------------------------------------- penalties
    def _penalised(self, logits_bv: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                   output_ids: list[list[int]]) -> torch.Tensor:
        dev = logits_bv.device
        if any(p.repetition_penalty != 1.0 for p in params):
            # rows without the penalty get an empty history, so their mask stays all-false
            seen = [list(pr) + list(out) if p.repetition_penalty != 1.0 else []
                    for p, pr, out in zip(params, prompt_ids, output_ids, strict=True)]
            seen_bv = self._counts(seen, dev) > 0
            rep_b1 = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
            scaled_bv = torch.where(logits_bv > 0, logits_bv / rep_b1, logits_bv * rep_b1)
            logits_bv = torch.where(seen_bv, scaled_bv, logits_bv)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            gen = [list(out) if p.presence_penalty or p.frequency_penalty else []
                   for p, out in zip(params, output_ids, strict=True)]
            counts_bv = self._counts(gen, dev)
            pres_b1 = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
            freq_b1 = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
            logits_bv = logits_bv - pres_b1 * (counts_bv > 0) - freq_b1 * counts_bv
        return logits_bv

    def _counts(self, histories: list[list[int]], device) -> torch.Tensor:
        """[B, V] float32: how often each token id occurs in each row's history (one scatter for the batch)."""
        vocab = self.vocab_size
        width = max((len(h) for h in histories), default=0)
        counts_bv = torch.zeros(len(histories), vocab + 1, device=device)  # column `vocab` swallows padding
        if width:
            ids_bl = torch.tensor([h + [vocab] * (width - len(h)) for h in histories], device=device)
            ids_bl = ids_bl.clamp_(max=vocab)  # ids past the vocab (never sampled) land in the padding column
            counts_bv.scatter_add_(1, ids_bl, torch.ones(ids_bl.shape, device=device))
        return counts_bv[:, :vocab]

    # ---------------------------------------------------------------------------------------------- drawing
    def _draw(self, logits_rv: torch.Tensor, params: list[SamplingParams], request_ids: list[str]) -> torch.Tensor:
        """One token per (non-greedy) row: temperature, top_k/top_p/min_p truncation, then an exponential race."""
        dev = logits_rv.device
        temp_r1 = torch.tensor([max(p.temperature, _MIN_TEMPERATURE) for p in params], device=dev)[:, None]
        logits_rv = _truncated(logits_rv / temp_r1, params)
        probs_rv = logits_rv.softmax(dim=-1)
        noise_rv = torch.empty_like(probs_rv)
        for r, (p, rid) in enumerate(zip(params, request_ids, strict=True)):
            noise_rv[r].exponential_(generator=self.generator_for(rid, p.seed, dev))
        # exponential_ may return exactly 0; a 0/0 NaN would win argmax for a dropped token
        noise_rv.clamp_(min=torch.finfo(torch.float32).tiny)
        return (probs_rv / noise_rv).argmax(dim=-1)

    # ---------------------------------------------------------------------------------------------- logprobs
    @staticmethod
    def _logprobs(logits_bv: torch.Tensor, tokens_b: torch.Tensor, params: list[SamplingParams]):
        batch = len(params)
        if not any(p.logprobs for p in params):
            return [None] * batch, [None] * batch
        logp_bv = logits_bv.log_softmax(dim=-1)
        chosen = logp_bv.gather(1, tokens_b[:, None]).squeeze(1).tolist()
        k = min(max(p.top_logprobs for p in params if p.logprobs), logp_bv.shape[1])
        top_vals, top_ids = (t.tolist() for t in logp_bv.topk(k, dim=-1))  # k = 0 gives empty rows
        logprobs: list[float | None] = []
        tops: list[dict[int, float] | None] = []
        for i, p in enumerate(params):
            logprobs.append(chosen[i] if p.logprobs else None)
            n = p.top_logprobs if p.logprobs else 0
            tops.append(dict(zip(top_ids[i][:n], top_vals[i][:n], strict=True)) if n else None)
        return logprobs, tops


def _truncated(logits_rv: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Logits with -inf where top_k, top_p or min_p drop a token (rows: temperature already applied).

    The three are all "drop" masks that never drop the top token, so applying min_p to the unfiltered row
    keeps the same set as applying it after top_k/top_p: renormalising the survivors leaves p / p_max alone."""
    rows, vocab = logits_rv.shape
    dev = logits_rv.device
    drop_rv = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)
    if any(p.top_k or p.top_p < 1.0 for p in params):
        drop_rv = _top_k_top_p_drop(logits_rv, params)
    if any(p.min_p > 0.0 for p in params):
        # prob < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf drops nothing
        log_min_p_r1 = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params],
                                    device=dev)[:, None]
        drop_rv |= logits_rv < logits_rv.max(dim=-1, keepdim=True).values + log_min_p_r1
    return logits_rv.masked_fill(drop_rv, -math.inf)


def _top_k_top_p_drop(logits_rv: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, V] bool: tokens outside each row's top_k, or outside its smallest top_p nucleus (one sort per batch)."""
    rows, vocab = logits_rv.shape
    dev = logits_rv.device
    # stable sort: tied logits keep a fixed order, so the kept set never depends on the kernel's whims
    sorted_rv, order_rv = logits_rv.sort(dim=-1, descending=True, stable=True)
    k_r1 = torch.tensor([p.top_k or vocab for p in params], device=dev)[:, None]
    drop_sorted_rv = torch.arange(vocab, device=dev)[None, :] >= k_r1
    # top_p = 1 means off: the float cumsum can reach 1.0 before the tail and would shave tiny tokens
    top_p_r1 = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params], device=dev)[:, None]
    probs_rv = sorted_rv.masked_fill(drop_sorted_rv, -math.inf).softmax(dim=-1)
    mass_before_rv = probs_rv.cumsum(dim=-1) - probs_rv  # mass of strictly higher-ranked tokens
    # rank 0 has 0 before it and always stays (top_p 0 keeps it alone rather than nothing)
    drop_sorted_rv[:, 1:] |= mass_before_rv[:, 1:] >= top_p_r1
    return torch.zeros_like(drop_sorted_rv).scatter_(1, order_rv, drop_sorted_rv)
