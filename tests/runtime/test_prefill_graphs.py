"""Prefill CUDA graphs: a prompt padded to its bucket gives the unpadded prompt's last logits and K/V (the padded
forward, checked on CPU); on a GPU the replayed graph gives the eager prefill's logits, tokens and cache, a second
prompt of the bucket replays without a new capture, and Mamba models are never graphed."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import int4_ssm_decoder, tiny_hf_model, tiny_ssm_hf_model

from uniql.compressor.quantize import quantize_tables
from uniql.runtime.graphs import smallest_bucket
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, uniform_ladder
from uniql.runtime.prefill_graphs import PrefillGraphs, fill_step, padded_forward
from uniql.runtime.request import Request, SamplingParams
from uniql.runtime.runner import ModelRunner

CUDA = torch.cuda.is_available()


def _laddered():
    model = decoder_from_hf(tiny_hf_model("qwen2", heads=4, kv_heads=2, hidden=64, inter=256, seed=3))
    spec = model.spec
    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=32))
    model.ladder = uniform_ladder(model.full_sizes, steps, spec.num_layers)
    return model.eval()


def _int4_llama():
    """Three rungs, every projection and both tables INT4 (g32): what the fused CUDA path runs."""
    model = int4_ssm_decoder(tiny_hf_model("llama", vocab=256, hidden=64, inter=128, heads=4, kv_heads=2, seed=5))
    quantize_tables(model, 32)
    return model


def test_fill_step_lays_ids_padding_and_the_last_position():
    host = torch.full((9,), 7, dtype=torch.int64)
    fill_step(host, [5, 6, 4])
    assert host.tolist() == [5, 6, 4, 0, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="does not fit"):
        fill_step(host, list(range(9)))
    with pytest.raises(ValueError, match="does not fit"):
        fill_step(host, [])


@pytest.mark.parametrize(("n", "want"), [(1, 16), (16, 16), (17, 32), (512, 512), (513, None)])
def test_a_prompt_takes_the_smallest_bucket_that_holds_it(n, want):
    assert smallest_bucket((16, 32, 64, 128, 256, 512), n) == want


@pytest.mark.parametrize(("max_len", "want"), [(None, (16, 64, 256)), (64, (16, 64)), (65, (16, 64, 256)),
                                                 (10, (16,)), (4096, (16, 64, 256))])
def test_buckets_stop_at_the_first_that_holds_the_longest_prompt(max_len, want):
    from uniql.runtime.prefill_graphs import buckets_within

    assert buckets_within((256, 16, 64), max_len) == want


@pytest.mark.parametrize("rung", [0, 7])  # rung 7 keeps half the head dims
@pytest.mark.parametrize("n", [5, 16])  # padded to 16 and 32; 16 also exactly fills its bucket
def test_a_padded_prompt_gives_the_unpadded_logits_and_cache(rung, n):
    model = _laddered()
    size = 16 if n < 16 else 32
    prompt = torch.randint(1, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    with torch.inference_mode():
        eager_cache = model.new_cache(1, 40, rung)
        eager = model(torch.tensor([prompt]), cache=eager_cache, logits_to_keep=1)[0, -1]
        # the rung's staging cache: views of one full-width cache as long as the largest bucket
        staging = model.new_cache(1, 32).narrowed(model.sizes_for(rung))
        step = torch.empty(size + 1, dtype=torch.int64)
        fill_step(step, prompt)
        padded = padded_forward(model, step, staging)
        again = padded_forward(model, step, staging)  # a replay starts from position 0 again
    torch.testing.assert_close(padded[0], eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, padded)
    for layer in range(model.spec.num_layers):
        torch.testing.assert_close(staging.k[layer][:, :, :n], eager_cache.k[layer][:, :, :n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(staging.v[layer][:, :, :n], eager_cache.v[layer][:, :, :n], atol=1e-6, rtol=1e-6)


def test_a_narrowed_cache_is_views_of_the_full_one():
    model = _laddered()
    full = model.new_cache(1, 12)
    top = model.sizes_for(7)
    view = full.narrowed(top)
    assert view.sizes == top and view.length == 0 and view.nbytes() == 0 and view.serial != full.serial
    for layer, size in enumerate(top):
        assert view.k[layer].shape[-1] == size.qk < full.k[layer].shape[-1] and view.v[layer].shape[-1] == size.vo
        assert view.k[layer].data_ptr() == full.k[layer].data_ptr()  # a view: written through
    view.k[0][..., 0].fill_(3.0)
    assert torch.all(full.k[0][..., 0] == 3.0)
    with pytest.raises(ValueError, match="at most"):
        model.new_cache(1, 12, 7).narrowed(model.sizes_for(0))  # wider than the cache
    hybrid = int4_ssm_decoder(tiny_ssm_hf_model("bamba", vocab=256, seed=2))
    with pytest.raises(ValueError, match="Mamba"):
        hybrid.new_cache(1, 4).narrowed(hybrid.sizes_for(0))


def test_mamba_models_are_not_graphed():
    assert PrefillGraphs.supports(_laddered())
    hybrid = int4_ssm_decoder(tiny_ssm_hf_model("bamba", vocab=256, seed=2))
    assert not PrefillGraphs.supports(hybrid)  # the padding would reach the SSM state


def test_the_cpu_runner_prefills_eagerly():
    assert ModelRunner(_laddered()).prefill_graphs is None


def _prefill(runner: ModelRunner, prompt: list[int], rung: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    req = Request(prompt, SamplingParams(max_tokens=4), rung=rung)
    logits = runner.prefill(req).clone()
    cache = runner.caches[req.request_id]
    assert cache.length == len(prompt)
    return logits, [cache.k[0][:, :, :len(prompt)].clone(), cache.v[-1][:, :, :len(prompt)].clone()]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rung", [0, 2])
def test_graphed_prefill_equals_the_eager_one_on_gpu(rung):
    base = _int4_llama().to("cuda", torch.bfloat16)
    graphed = ModelRunner(copy.deepcopy(base), max_model_len=64, prefill_buckets=(8, 16, 32))
    eager = ModelRunner(copy.deepcopy(base), max_model_len=64, prefill_buckets=())
    assert graphed.prefill_graphs is not None and eager.prefill_graphs is None
    gen = torch.Generator().manual_seed(rung)
    for n in (11, 13, 32, 3):  # 11 captures bucket 16, 13 replays it, 32 fills its bucket, 3 pads 5 rows
        prompt = torch.randint(1, 256, (n,), generator=gen).tolist()
        (got, got_kv), (want, want_kv) = _prefill(graphed, prompt, rung), _prefill(eager, prompt, rung)
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
        assert int(got.argmax()) == int(want.argmax())
        for a, b in zip(got_kv, want_kv, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    assert sorted(graphed.prefill_graphs.graphs) == [(rung, 8), (rung, 16), (rung, 32)]
    graphed.reset_graphs()
    assert graphed.prefill_graphs.graphs == {}
    logits, _ = _prefill(graphed, prompt, rung)  # recaptured
    torch.testing.assert_close(logits, want, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_prompt_longer_than_every_bucket_runs_eagerly_on_gpu():
    runner = ModelRunner(_int4_llama().to("cuda", torch.bfloat16), max_model_len=64, prefill_buckets=(8,))
    _prefill(runner, list(range(1, 12)), 0)
    assert runner.prefill_graphs.graphs == {}


def test_capturing_at_start_up_is_a_no_op_without_graphs():
    runner = ModelRunner(_laddered())  # CPU: neither kind of graph
    runner.capture_graphs([0, 1])
    assert runner.graphs is None and runner.prefill_graphs is None


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_capturing_at_start_up_takes_every_bucket_of_the_rungs_on_gpu():
    runner = ModelRunner(_int4_llama().to("cuda", torch.bfloat16), max_model_len=64, graph_buckets=(1, 2),
                         prefill_buckets=(8, 16))
    runner.capture_graphs([0, 2])
    assert sorted(runner.prefill_graphs.graphs) == [(0, 8), (0, 16), (2, 8), (2, 16)]
    assert sorted(runner.graphs.graphs) == [(0, 1), (0, 2), (2, 1), (2, 2)]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("tokens", "want"), [(64, (16, 32, 64)), (100, (16, 32, 64)), (0, None)])
def test_the_engine_graphs_prompts_up_to_its_limit_on_gpu(tokens, want):
    from uniql.runtime.engine import Engine

    engine = Engine(_int4_llama().to("cuda", torch.bfloat16), None, max_model_len=64, prefill_graph_tokens=tokens)
    graphs = engine.runner.prefill_graphs
    assert (None if graphs is None else graphs.buckets) == want


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on CPU: the capture records the forward's call and output, a replay
    reruns it into that output (what a replay does), so the bookkeeping around the graphs runs in CI."""
    capturing: _FakeGraph | None = None

    def __init__(self):
        self.call, self.out, self.replays = None, None, 0

    def replay(self):
        self.out.copy_(_REAL_FORWARD(*self.call))
        self.replays += 1


_REAL_FORWARD = padded_forward


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    import contextlib

    import uniql.runtime.prefill_graphs as pg

    @contextlib.contextmanager
    def graph(g, pool=None):
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    def recording_forward(*args):
        out = _REAL_FORWARD(*args)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.call, _FakeGraph.capturing.out = args, out
        return out

    nothing = type("Nothing", (), {"__init__": lambda self, *a: None, "record": lambda self: None,
                                   "synchronize": lambda self: None, "wait_stream": lambda self, s: None})
    monkeypatch.setattr(pg, "padded_forward", recording_forward)
    for name, value in [("graph_pool_handle", lambda: None), ("CUDAGraph", _FakeGraph), ("graph", graph),
                        ("Stream", nothing), ("Event", nothing), ("stream", lambda s: contextlib.nullcontext()),
                        ("current_stream", lambda d=None: nothing()), ("synchronize", lambda d=None: None)]:
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    return pg


@pytest.mark.parametrize("rung", [0, 7])
def test_runs_replay_captured_graphs_and_fill_the_requests_cache(fake_cuda_graphs, rung):
    model = _laddered()
    graphs = fake_cuda_graphs.PrefillGraphs(model, torch.float32, (8, 16, 64), max_len=20)
    assert graphs.buckets == (8, 16, 64)  # 64 holds a 20-token context: kept, nothing past it
    gen = torch.Generator().manual_seed(rung)
    for n in (11, 13, 5):  # 11 captures bucket 16, 13 replays it, 5 captures bucket 8
        prompt = torch.randint(1, 320, (n,), generator=gen).tolist()
        cache, eager_cache = model.new_cache(1, 24, rung), model.new_cache(1, 24, rung)
        with torch.inference_mode():
            got = graphs.run(rung, prompt, cache).clone()
            want = model(torch.tensor([prompt]), cache=eager_cache, logits_to_keep=1)[0, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert cache.length == n
        for layer in range(model.spec.num_layers):
            torch.testing.assert_close(cache.k[layer][:, :, :n], eager_cache.k[layer][:, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[layer][:, :, :n], eager_cache.v[layer][:, :, :n], atol=1e-5, rtol=1e-5)
    assert sorted(graphs.graphs) == [(rung, 8), (rung, 16)] and graphs.graphs[(rung, 16)].graph.replays == 2
    assert graphs._full.k[0].shape[2] == 64  # one staging allocation, as long as the largest bucket
    graphs.capture_all([rung])
    assert sorted(graphs.graphs) == [(rung, 8), (rung, 16), (rung, 64)]
    graphs.reset()
    assert graphs.graphs == {} and graphs._full is None


def test_a_failed_capture_turns_the_graphs_off(fake_cuda_graphs, monkeypatch, caplog):
    model = _laddered()
    graphs = fake_cuda_graphs.PrefillGraphs(model, torch.float32, (8, 16))

    def syncs(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fake_cuda_graphs, "padded_forward", syncs)
    with caplog.at_level("WARNING"):
        assert graphs.run(0, [5, 6, 7], model.new_cache(1, 8, 0)) is None
    assert not graphs.enabled and graphs.bucket(3) is None and "prefill CUDA graphs off" in caplog.text
