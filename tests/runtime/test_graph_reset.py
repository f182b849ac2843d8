"""Elastic residency swaps weight tensors between two steps after ``DecodeGraphs.reset``: a greedy lookahead
queued before the swap is still read (its token is real), but its dropped graph must never be replayed again,
since it reads the replaced tensors' memory (GPU only: CUDA graphs)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_hf_model

from uniql.runtime.engine import Engine
from uniql.runtime.graphs import DecodeGraphs, Lookahead
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.request import Request, SamplingParams
from uniql.runtime.runner import ModelRunner

CUDA = torch.cuda.is_available()
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def _swap_norm_weight(engine: Engine) -> torch.Tensor:
    """What a residency pass does (``EngineBackend.change_weights``): graphs dropped, then a weight tensor replaced
    by a copy; the old memory is then free for anything (NaN here, so reading it shows)."""
    model = engine.runner.model
    engine.runner.reset_graphs()
    old = model.norm.weight
    model.norm.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
    old.data.fill_(float("nan"))
    return old  # kept alive by the caller: the allocator must not hand its memory to the new graph


def _generate(model, swap_at: int | None) -> tuple[list[int], str]:
    engine = Engine(model, _Tok(), max_num_seqs=2, max_model_len=64)
    req = engine.add_request(list(range(3, 10)), PARAMS)
    stale = None
    for step in range(100):
        if req.finished:
            break
        if step == swap_at:
            assert engine.runner.lookahead_key is not None  # a lookahead is queued across the swap
            stale = _swap_norm_weight(engine)
        engine.step()
    del stale
    return req.output_ids, req.finish_reason


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_lookahead_queued_before_a_weight_swap_is_read_but_its_graph_not_replayed():
    model = decoder_from_hf(tiny_hf_model(vocab=256, seed=5)).to("cuda", torch.bfloat16)
    want = _generate(model, None)
    got = _generate(model, 6)
    assert got == want and want[1] == "length"


class _FakeGraphs(DecodeGraphs):
    """DecodeGraphs' bookkeeping without CUDA: every "graph" picks token 7, and chain() is recorded."""

    def __init__(self):
        self.graphs, self.pending, self.chained = {}, None, []

    def bucket(self, batch):
        return 4

    def chain(self, entry):
        self.chained.append(entry)

    def fetch(self, entry, slot):
        pass

    @staticmethod
    def read(entry, slot, b):
        return [[7] * b, [1] * b]

    def reset(self):  # the real one also synchronizes the device and takes a fresh memory pool
        self.graphs.clear()


def test_the_runner_chains_a_pending_lookahead_only_while_its_graph_is_current():
    """CPU stand-in for the GPU test above: the runner's decision, with the graphs' bookkeeping faked."""
    runner = ModelRunner(decoder_from_hf(tiny_hf_model(vocab=256, seed=5)))
    reqs = [Request(list(range(3, 10)), PARAMS), Request(list(range(5, 9)), PARAMS)]
    for req in reqs:
        req.output_ids.append(int(runner.prefill(req).argmax()))
    runner.graphs = graphs = _FakeGraphs()
    key = tuple(r.request_id for r in reqs)
    entry = graphs.graphs[(0, 4)] = object()
    graphs.pending = Lookahead(key, entry, 0)
    assert runner.decode_greedy(reqs, lookahead=True) == ([7, 7], [True, True])
    assert graphs.chained == [entry]  # a current graph: the next step is queued as before
    graphs.reset()  # a residency pass between two steps
    assert runner.decode_greedy(reqs, lookahead=True) == ([7, 7], [True, True])  # the queued step is still read
    assert graphs.chained == [entry] and graphs.pending is None  # but its dropped graph is not replayed
