"""Elastic residency through the serving engine: release and reload change no output, free the counted bytes.

The backend is the server's own (``EngineBackend``: engine thread, weight store, ``change_weights``). On CPU it
runs the dequantized copies; on CUDA the fused q|k|v / gate|up tensors inside captured decode graphs, which a
pass must drop and the next decode recapture. Greedy tokens at every resident rung must be identical to the
tokens generated before any release, and on CUDA the allocator must give back what the store says it freed.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from uniql.runtime.request import SamplingParams
from uniql.server.config import ServerConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROMPTS = ([5, 17, 99, 3, 250, 1024, 77], [400, 12, 9])
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
RUNGS = (0, 3, 5, 7)


@pytest.fixture(scope="module")
def backend(portable_tiny_ckpt):
    from uniql.server.bridge import EngineBackend

    backend = EngineBackend.load(portable_tiny_ckpt, ServerConfig(device=DEVICE, max_num_seqs=2))
    yield backend
    backend.shutdown()


def greedy(backend, rung: int) -> list[list[int]]:
    """Each prompt decoded alone through the engine thread (batch 1: the same graph bucket every time, so the
    same kernels; a batch of two would depend on when the engine thread picks the second request up)."""
    async def one(prompt):
        _, stream = backend.submit(list(prompt), GREEDY, rung)
        return [e.token_id async for e in stream if e.token_id is not None]
    return [asyncio.run(one(p)) for p in PROMPTS]


def each_layer(store, change, rung):
    return lambda: [change(layer, rung) for layer in range(store.num_layers)]


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_release_and_reload_keep_greedy_tokens_and_free_the_counted_bytes(backend):
    store, graphs = backend.weights, backend.engine.runner.graphs
    assert (graphs is not None) == CUDA  # the CUDA path runs graphs: they are what this test is about
    want = {rung: greedy(backend, rung) for rung in RUNGS}
    assert all(len(t) == GREEDY.max_tokens for tokens in want.values() for t in tokens)
    assert store.resident_bytes() == store.rung_bytes[0]
    if CUDA:
        assert (0, 1) in graphs.graphs and (7, 1) in graphs.graphs
    backend.change_weights(lambda: None)  # drops the graphs alone, so what follows measures the weights only
    if CUDA:
        assert graphs.graphs == {}
        before = allocated()

    backend.change_weights(each_layer(store, store.release_layer, 5))
    store.settle()
    freed = store.rung_bytes[0] - store.rung_bytes[5]
    assert freed > 0 and store.resident_bytes() == store.rung_bytes[5]  # the bytes counted are the bytes held
    if CUDA:
        # the allocator rounds every block up to 512 bytes: two tensors per projection, five projections a layer
        slack = 2 * 5 * store.num_layers * 512
        assert abs((before - allocated()) - freed) <= slack, (before - allocated(), freed)
    for rung in (5, 7):  # recaptured graphs over the re-laid tensors give the same tokens
        assert greedy(backend, rung) == want[rung], rung
    if CUDA:
        assert (5, 1) in graphs.graphs and (0, 1) not in graphs.graphs

    backend.change_weights(each_layer(store, store.reload_layer, 0))
    store.settle()
    assert store.resident_bytes() == store.rung_bytes[0]
    for rung in RUNGS:
        assert greedy(backend, rung) == want[rung], rung


def test_a_fused_projection_refuses_a_rung_it_does_not_hold(backend):
    store = backend.weights
    if not any(store.fused):
        pytest.skip("projections are fused on CUDA only")
    backend.change_weights(each_layer(store, store.release_layer, 6))
    try:
        model = backend.engine.runner.model
        ids = torch.tensor([list(PROMPTS[0])], device=DEVICE)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="not resident"):
            model(ids, rung=0)
    finally:
        backend.change_weights(each_layer(store, store.reload_layer, 0))
    assert store.resident_bytes() == store.rung_bytes[0]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_reset_gives_the_pool_back(backend):
    graphs = backend.engine.runner.graphs
    greedy(backend, 0)
    backend.change_weights(lambda: None)
    torch.cuda.empty_cache()
    base_alloc, base_reserved = allocated(), torch.cuda.memory_reserved()
    greedy(backend, 0)  # captures (0, 1) again into a fresh pool
    assert graphs.graphs
    backend.change_weights(lambda: None)
    torch.cuda.empty_cache()
    assert allocated() == base_alloc and torch.cuda.memory_reserved() <= base_reserved


def test_between_steps_runs_on_the_engine_thread_and_raises_there_errors_here(backend):
    import threading

    assert backend.front.between_steps(lambda engine: threading.current_thread().name) == "uniql-engine"
    with pytest.raises(ZeroDivisionError):
        backend.front.between_steps(lambda engine: 1 / 0)
    assert greedy(backend, 7)  # the engine still steps


def test_start_up_capture_takes_every_graph_before_the_first_request(portable_tiny_ckpt):
    """``--capture-graphs startup``: on CUDA every rung's decode and prefill graphs exist before any request (no
    capture in a request's latency), and they serve the same tokens; on CPU (no graphs) it loads as ever."""
    from uniql.server.bridge import EngineBackend

    backend = EngineBackend.load(portable_tiny_ckpt, ServerConfig(device=DEVICE, max_num_seqs=2,
                                                                  capture_graphs="startup"))
    try:
        runner = backend.engine.runner
        if CUDA:
            rungs = range(len(backend.rates))
            assert set(runner.graphs.graphs) == {(r, b) for r in rungs for b in runner.graphs.buckets}
            assert set(runner.prefill_graphs.graphs) == {(r, b) for r in rungs for b in runner.prefill_graphs.buckets}
        else:
            assert runner.graphs is None and runner.prefill_graphs is None
        assert all(len(t) == GREEDY.max_tokens for t in greedy(backend, 0))
    finally:
        backend.shutdown()
