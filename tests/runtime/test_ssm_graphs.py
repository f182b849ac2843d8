"""Mamba and hybrid decode over fixed address tables (what CUDA graphs need), CPU and GPU.

CPU: several requests decoded as one batch at a rung get the logits each gets decoded alone, through the torch
references (lists of each request's states) and through the Triton kernels under the interpreter (address
tables); a decode batch rebound to other requests keeps its table buffers (a captured graph's addresses) and
reads the new requests' states (the hybrid's attention rewrites the same K/V slot twice: idempotent).
GPU (the lead's H200 run): graph replays equal eager decode step for step while requests join and leave (the
bound tables change) and batches pad a bucket."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_ssm_hf_model

import uniql.runtime.cache as cache_module
from uniql.runtime.cache import DecodeBatch
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder
from uniql.runtime.request import Request, SamplingParams
from uniql.runtime.runner import ModelRunner

CUDA = torch.cuda.is_available()


def _model(family: str):
    model = decoder_from_hf(tiny_ssm_hf_model(family, vocab=256, seed=5))
    steps = spec_dim_steps(model.spec, Alignment(group_size=32))
    model.ladder = uniform_ladder(model.full_sizes, steps, model.spec.num_layers, rates=(0.0, 0.25, 0.5))
    return model.eval()


@pytest.fixture(scope="module", params=("mamba2", "bamba"))
def small(request):
    return _model(request.param)


def _requests(rung: int, lengths, seed: int, max_tokens: int = 6) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(1, 256, (n,), generator=gen).tolist(), SamplingParams(max_tokens=max_tokens),
                    rung=rung) for n in lengths]


def _triton_on_cpu(monkeypatch, on: bool) -> None:
    if CUDA and on:
        pytest.skip("with a GPU the kernels are compiled, not interpreted")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if on else "0")
    monkeypatch.setattr(cache_module, "TRITON_ON_CPU", on)


@pytest.mark.parametrize("triton", [False, True], ids=["torch", "interpreter"])
def test_batched_decode_equals_each_request_alone(small, triton, monkeypatch):
    _triton_on_cpu(monkeypatch, triton)
    rung = 1
    together, alone = ModelRunner(small, cuda_graphs=False), ModelRunner(small, cuda_graphs=False)
    batch, singles = _requests(rung, (3, 9, 5), seed=2), _requests(rung, (3, 9, 5), seed=2)
    for a, b in zip(batch, singles, strict=True):
        first = together.prefill(a)
        alone.prefill(b)
        a.output_ids.append(int(first.argmax()))
        b.output_ids.append(a.output_ids[-1])
    for _ in range(3):
        logits = together.decode(batch)
        for req, single, row in zip(batch, singles, logits, strict=True):
            own = alone.decode([single])[0]
            torch.testing.assert_close(row, own, atol=1e-5 * own.abs().max().item(), rtol=0)
            req.output_ids.append(int(row.argmax()))
            single.output_ids.append(req.output_ids[-1])


def test_triton_step_equals_the_torch_references(small, monkeypatch):
    """The decode step over address tables (three launches a Mamba layer; interpreted) gives the logits of the
    torch references over lists of states, step after step."""
    runs = {}
    for triton in (False, True):
        _triton_on_cpu(monkeypatch, triton)
        runner = ModelRunner(small, cuda_graphs=False)
        reqs = _requests(1, (4, 7, 2), seed=8)
        steps = [torch.stack([runner.prefill(r) for r in reqs])]
        for _ in range(3):
            for req, row in zip(reqs, steps[-1], strict=True):
                req.output_ids.append(int(row.argmax()))
            steps.append(runner.decode(reqs))
        runs[triton] = steps
    for step, (got, want) in enumerate(zip(runs[True], runs[False], strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0, msg=f"step {step}")


def test_rebinding_keeps_the_tables_and_reads_the_new_requests(small, monkeypatch):
    """One DecodeBatch (as a captured graph holds it) bound to A, stepped, rebound to B: its table buffers never
    move, they point at B's states, and B's step equals a fresh batch's."""
    _triton_on_cpu(monkeypatch, True)
    runner = ModelRunner(small, cuda_graphs=False)
    first, second = _requests(0, (4, 7), seed=3), _requests(0, (6, 2), seed=4)
    for req in first + second:
        req.output_ids.append(int(runner.prefill(req).argmax()))
    mamba = small.spec.layers_with("mamba")[0]
    held = DecodeBatch(small.sizes_for(0), 2, 64, "cpu")
    buffers = (held.ssm.conv_ptrs.data_ptr(), held.ssm.ssm_ptrs.data_ptr(), held.k_ptrs.data_ptr())
    for reqs in (first, second):
        caches = [runner.caches[r.request_id] for r in reqs]
        lengths = torch.tensor([c.length + 1 for c in caches], dtype=torch.int32)
        before = [[t.clone() for t in c.conv + c.ssm if t is not None] for c in caches]
        held.bind(caches, lengths)
        assert (held.ssm.conv_ptrs.data_ptr(), held.ssm.ssm_ptrs.data_ptr(), held.k_ptrs.data_ptr()) == buffers
        conv_table, ssm_table = held.ssm_states(mamba)
        assert conv_table.tolist() == [c.conv[mamba].data_ptr() for c in caches]
        assert ssm_table.tolist() == [c.ssm[mamba].data_ptr() for c in caches]
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs])
        with torch.inference_mode():
            got = small(ids, cache=held, logits_to_keep=1)[:, -1]  # positions from the bound lengths, as the runner
        for c, saved in zip(caches, before, strict=True):  # the step moved each bound request's own states;
            states = [t for t in c.conv + c.ssm if t is not None]  # undo, then step through a fresh batch
            assert not any(torch.equal(t, old) for t, old in zip(states, saved, strict=True))
            with torch.inference_mode():  # the caches are inference tensors (made by the runner)
                for t, old in zip(states, saved, strict=True):
                    t.copy_(old)
        with torch.inference_mode():
            want = runner._decode_eager(0, [r.output_ids[-1] for r in reqs], lengths.tolist(), caches)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_runner_graphs_mamba_models_on_cuda_only(small):
    """CPU never graphs; on CUDA every model is graphed, Mamba layers included (the GPU tests below)."""
    assert ModelRunner(small).graphs is None


# ---------------------------------------------------------------------------------------------- GPU
SCHEDULE = [  # (requests decoding this step); letters join when first named, leave after their last step
    "abc",  # 3 rows pad a bucket of 4
    "abcd",  # d joins: the bound tables change
    "bd",  # a and c leave: bucket 2
    "bde",  # e joins: pad 4 again, other requests than the first capture's
    "e",  # bucket 1
    "ef",
]


def _run_schedule(runner: ModelRunner, rung: int, prompts: dict[str, Request], tokens: dict):
    """Decode the schedule; the next token of every request comes from ``tokens`` (the eager run's choices) so
    both runners see identical inputs. Returns the logits of every step."""
    live, out = {}, []
    for step, names in enumerate(SCHEDULE):
        for name in names:
            if name not in live:
                live[name] = copy.deepcopy(prompts[name])
                first = runner.prefill(live[name])
                tokens.setdefault((name, -1), int(first.argmax()))
                live[name].output_ids.append(tokens[(name, -1)])
        for name in [n for n in live if n not in names]:
            runner.free(live.pop(name).request_id)
        reqs = [live[n] for n in names]
        logits = runner.decode(reqs)
        out.append(logits.clone())
        for name, row in zip(names, logits, strict=True):
            tokens.setdefault((name, step), int(row.argmax()))
            live[name].output_ids.append(tokens[(name, step)])
    for req in live.values():
        runner.free(req.request_id)
    return out


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mamba2", "bamba", "nemotron_h"])
def test_graph_replays_equal_eager_decode_as_requests_join_and_leave(family, dtype):
    base = _model(family).to("cuda", dtype)
    graphed = ModelRunner(copy.deepcopy(base), max_model_len=64, graph_buckets=(1, 2, 4))
    eager = ModelRunner(copy.deepcopy(base), max_model_len=64, cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    for rung in (0, 2):
        lengths = dict(zip("abcdef", (5, 11, 2, 8, 3, 6), strict=True))
        reqs = _requests(rung, lengths.values(), seed=10 + rung, max_tokens=len(SCHEDULE) + 1)
        for name, req in zip(lengths, reqs, strict=True):
            req.request_id = f"{name}-{rung}"
        prompts = dict(zip(lengths, reqs, strict=True))
        tokens: dict = {}
        want = _run_schedule(eager, rung, prompts, tokens)
        got = _run_schedule(graphed, rung, prompts, tokens)
        for step, (g, w) in enumerate(zip(got, want, strict=True)):
            scale = w.abs().max().item()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (g - w).abs().max().item() <= tol * scale, f"{family} rung {rung} step {step}"
            if dtype == torch.float32:
                assert g.argmax(-1).tolist() == w.argmax(-1).tolist()
    assert {key[1] for key in graphed.graphs.graphs} == {1, 2, 4}  # every bucket was captured and replayed
    assert not graphed.caches and not eager.caches


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["mamba2", "nemotron_h"])
def test_ssm_kernels_in_the_pdl_chain_change_no_bit(family, monkeypatch):
    """UNIQL_PDL_SSM=1 (the state update and the group norm launched with PDL too) replays the same logits as
    without it, step after step, as requests join and leave."""
    from uniql.kernels.pdl import pdl_enabled

    base = _model(family).to("cuda", torch.bfloat16)
    lengths = dict(zip("abcdef", (5, 11, 2, 8, 3, 6), strict=True))
    prompts = dict(zip(lengths, _requests(2, lengths.values(), seed=12, max_tokens=len(SCHEDULE) + 1), strict=True))
    for name, req in prompts.items():
        req.request_id = name
    got, tokens = {}, {}  # both runs are fed the first run's tokens, as the eager / graphed test does
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIQL_PDL_SSM", flag)
        runner = ModelRunner(copy.deepcopy(base), max_model_len=64, graph_buckets=(1, 2, 4))
        got[flag] = _run_schedule(runner, 2, prompts, tokens)  # one [rows, vocab] tensor a step, rows vary
    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("this GPU has no programmatic dependent launch (sm_90+)")
    for step, (with_ssm, without) in enumerate(zip(got["1"], got["0"], strict=True)):
        torch.testing.assert_close(with_ssm, without, atol=0, rtol=0, msg=f"{family} step {step}")


def test_decay_rates_follow_the_parameter():
    """The decode step's cached A = -exp(A_log) is recomputed when A_log is replaced or changed in place."""
    from uniql.runtime.mamba import ElasticMamba

    mixer = next(layer.mamba for layer in decoder_from_hf(tiny_ssm_hf_model("mamba2", vocab=64, seed=1)).layers)
    assert isinstance(mixer, ElasticMamba)
    torch.testing.assert_close(mixer.decay_rates(), -torch.exp(mixer.A_log.float()), atol=0, rtol=0)
    assert mixer.decay_rates() is mixer.decay_rates()  # cached
    with torch.no_grad():
        mixer.A_log.add_(0.5)
    torch.testing.assert_close(mixer.decay_rates(), -torch.exp(mixer.A_log.float()), atol=0, rtol=0)
    mixer.A_log = torch.nn.Parameter(torch.zeros_like(mixer.A_log))
    torch.testing.assert_close(mixer.decay_rates(), -torch.ones_like(mixer.A_log), atol=0, rtol=0)


def test_decay_rates_of_a_model_built_under_inference_mode():
    """Parameters made under torch.inference_mode track no version counter (reading it raised, so the decode step
    of such a model failed); loading new weights into the same storage still refreshes the cached value."""
    from uniql.runtime.mamba import ElasticMamba

    with torch.inference_mode():
        model = decoder_from_hf(tiny_ssm_hf_model("mamba2", vocab=64, seed=1))
        mixer = next(layer.mamba for layer in model.layers)
        assert isinstance(mixer, ElasticMamba) and mixer.A_log.is_inference()
        torch.testing.assert_close(mixer.decay_rates(), -torch.exp(mixer.A_log.float()), atol=0, rtol=0)
        state = {name: t.clone() for name, t in mixer.state_dict().items()}
        state["A_log"] = torch.zeros_like(state["A_log"])
        mixer.load_state_dict(state)
        torch.testing.assert_close(mixer.decay_rates(), -torch.ones_like(mixer.A_log), atol=0, rtol=0)
