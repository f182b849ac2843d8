"""The model runner's batched decode: a batch of requests of different lengths at one rung gives the logits each
request gets from a full forward of its own tokens; fused q|k|v and gate|up equal the separate projections;
on a GPU, CUDA-graph replays equal the eager step, and greedy lookahead (each step queued before the host reads
the previous one) changes no token whatever happens between steps (finishes, stop tokens, cancel, joins)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import int4_ssm_decoder, tiny_hf_model, tiny_ssm_hf_model

import uniql.runtime.cache as cache_module
from uniql.compressor.quantize import quantize_tables, rtn_linear
from uniql.runtime.decoder import LINEAR_PATHS
from uniql.runtime.engine import Engine
from uniql.runtime.fusion import fuse_projections
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import Alignment, dim_steps, spec_dim_steps, uniform_ladder
from uniql.runtime.linear import FusedInt4
from uniql.runtime.request import Request, SamplingParams, Status
from uniql.runtime.runner import ModelRunner

CUDA = torch.cuda.is_available()


def _model(int4: bool, family="llama"):
    hf = tiny_hf_model(family, vocab=256, hidden=64, inter=128, heads=4, kv_heads=2, seed=5)
    model = decoder_from_hf(hf)
    spec = model.spec
    steps = dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, Alignment(group_size=32, n_align=4))
    model.ladder = uniform_ladder(model.full_sizes, steps, spec.num_layers, rates=(0.0, 0.25, 0.5))
    if int4:
        for layer in model.layers:
            for path in LINEAR_PATHS:
                layer.set_linear(path, rtn_linear(layer.get_linear(path), 32))
        quantize_tables(model, 32)
    return model.eval()


def _requests(rung: int, lengths=(3, 9, 5)) -> list[Request]:
    gen = torch.Generator().manual_seed(rung)
    return [Request(torch.randint(1, 256, (n,), generator=gen).tolist(), SamplingParams(max_tokens=4), rung=rung)
            for n in lengths]


def _full_logits(model, req: Request) -> torch.Tensor:
    ids = torch.tensor([req.prompt_ids + req.output_ids])
    with torch.inference_mode():
        return model(ids, rung=req.rung)[0, -1].float()


@pytest.mark.parametrize("interpret", ["1", "0"])  # the Triton kernel (interpreter) and the torch reference
@pytest.mark.parametrize("rung", [0, 2])
def test_batched_decode_equals_full_forward(rung, interpret, monkeypatch):
    if CUDA and interpret == "1":
        pytest.skip("with a GPU the kernels are compiled, not interpreted")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(cache_module, "TRITON_ON_CPU", interpret == "1")
    model = _model(int4=False)
    runner = ModelRunner(model)
    reqs = _requests(rung)
    for req in reqs:
        req.output_ids.append(int(runner.prefill(req).argmax()))
    for _ in range(3):  # three batched steps over caches of different lengths
        logits = runner.decode(reqs)
        for req, row in zip(reqs, logits, strict=True):
            torch.testing.assert_close(row, _full_logits(model, req), atol=2e-4, rtol=2e-4)
            req.output_ids.append(int(row.argmax()))
    assert [runner.caches[r.request_id].length for r in reqs] == [r.num_tokens - 1 for r in reqs]


def test_decode_greedy_picks_the_samplers_greedy_ids():
    """The device-side greedy picks (one small read a step) are the ids the sampler's greedy path takes from the
    same step's logits, step after step; a non-finite row is reported, not picked silently."""
    from uniql.runtime.sampler import Sampler

    model = _model(int4=True)
    fast, slow = ModelRunner(copy.deepcopy(model)), ModelRunner(copy.deepcopy(model))
    sampler = Sampler(model.spec.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert Sampler.plain_greedy(greedy) and not Sampler.plain_greedy(SamplingParams(temperature=0.0, logprobs=True))
    pairs = [_requests(1, (4, 7)), _requests(1, (4, 7))]
    for runner, reqs in zip((fast, slow), pairs, strict=True):
        for req in reqs:
            req.output_ids.append(int(runner.prefill(req).argmax()))
    for _ in range(3):
        tokens, finite = fast.decode_greedy(pairs[0])
        logits = slow.decode(pairs[1])
        want = sampler(logits, [greedy] * 2, [r.request_id for r in pairs[1]], [r.prompt_ids for r in pairs[1]],
                       [r.output_ids for r in pairs[1]]).token_ids
        assert tokens == want and finite == [True, True]
        for r0, r1, tok in zip(*pairs, tokens, strict=True):
            r0.output_ids.append(tok)
            r1.output_ids.append(tok)


def test_decode_refuses_mixed_rungs():
    runner = ModelRunner(_model(int4=False))
    reqs = _requests(0, (3,)) + _requests(1, (4,))
    for req in reqs:
        req.output_ids.append(int(runner.prefill(req).argmax()))
    with pytest.raises(ValueError, match="one rung"):
        runner.decode(reqs)


def test_fused_projections_equal_separate_and_share_storage():
    model = _model(int4=True)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * len(fused.layers)
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    assert isinstance(attn.qkv, FusedInt4) and isinstance(mlp.gate_up, FusedInt4)
    # members are views of the fused tensors: nothing stored twice
    base = attn.qkv.qweight.untyped_storage().data_ptr()
    assert all(p.qweight.untyped_storage().data_ptr() == base for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rung in range(3):
            torch.testing.assert_close(fused(ids, rung=rung), model(ids, rung=rung), atol=1e-5, rtol=1e-5)


def test_fused_projections_keep_qwen_biases():
    model = _model(int4=True, family="qwen2")
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    ids = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids, rung=1), model(ids, rung=1), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replays_equal_eager_decode_on_gpu(dtype):
    base = _model(int4=True).to("cuda", dtype)
    # prefill graphs off: a padded prefill runs other GEMM shapes (other rounding), so both caches start from the
    # same eager prefill and only the decode differs (tests/runtime/test_prefill_graphs.py covers the prefill)
    graphed = ModelRunner(copy.deepcopy(base), max_model_len=64, graph_buckets=(1, 2, 4), prefill_buckets=())
    eager = ModelRunner(copy.deepcopy(base), max_model_len=64, cuda_graphs=False)
    for rung in (0, 2):
        for size in (1, 3, 4):  # 3 pads a bucket of 4
            pairs = [(_requests(rung, (5, 11, 2, 8)[:size])), (_requests(rung, (5, 11, 2, 8)[:size]))]
            for runner, reqs in zip((graphed, eager), pairs, strict=True):
                for req in reqs:
                    req.output_ids.append(int(runner.prefill(req).argmax()))
            for _ in range(3):
                got, want = graphed.decode(pairs[0]), eager.decode(pairs[1])
                torch.testing.assert_close(got, want, atol=0, rtol=0)  # same kernels, same order
                for r0, r1, row in zip(*pairs, want, strict=True):
                    r0.output_ids.append(int(row.argmax()))
                    r1.output_ids.append(int(row.argmax()))
    assert len(graphed.graphs.graphs) == 4  # (rung, bucket) for rungs 0, 2 and buckets 1, 4


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch):
    """Graphs captured with PDL (every decode kernel waits on its predecessor; mode 1 releases the next kernel
    right after the wait, ``late`` after the GEMVs' and the attention split pass's main loop) replay the same
    logits as graphs captured without it, step after step (the cache is written too)."""
    from uniql.kernels.pdl import pdl_enabled

    base = _model(int4=True).to("cuda", torch.bfloat16)
    logits = {}
    for flag in ("0", "1", "late"):
        monkeypatch.setenv("UNIQL_PDL", flag)
        runner = ModelRunner(copy.deepcopy(base), max_model_len=64, graph_buckets=(1, 4))
        reqs = _requests(1, (5, 11, 2))
        steps = []
        for req in reqs:
            req.output_ids.append(int(runner.prefill(req).argmax()))
        for _ in range(4):
            step = runner.decode(reqs)
            steps.append(step.clone())
            for req, row in zip(reqs, step, strict=True):
                req.output_ids.append(int(row.argmax()))
        logits[flag] = torch.stack(steps)
    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("this GPU has no programmatic dependent launch (sm_90+)")
    torch.testing.assert_close(logits["1"], logits["0"], atol=0, rtol=0)
    torch.testing.assert_close(logits["late"], logits["0"], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h"])
def test_fused_mamba_in_projection_equals_separate(family):
    """z|x|B|C|dt in one five-segment launch (x|B|C a view of it) gives the separate projections' logits at
    every rung, prefill and decode paths alike; members stay views of the fused tensors."""
    model = decoder_from_hf(tiny_ssm_hf_model(family, vocab=256, seed=2))
    spec = model.spec
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(spec, Alignment(group_size=32)), spec.num_layers,
                                  rates=(0.0, 0.25, 0.5))
    for layer in model.layers:
        for path in layer.linear_paths:
            layer.set_linear(path, rtn_linear(layer.get_linear(path), 32))
    model.eval()
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    mixers = [layer.mamba for layer in fused.layers if layer.mamba is not None]
    assert mixers and all(isinstance(m.in_proj, FusedInt4) for m in mixers)
    base = mixers[0].in_proj.qweight.untyped_storage().data_ptr()
    assert mixers[0].dt_proj.qweight.untyped_storage().data_ptr() == base
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rung in range(3):
            torch.testing.assert_close(fused(ids, rung=rung), model(ids, rung=rung), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- greedy lookahead

class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def _ssm_model(family: str):
    return int4_ssm_decoder(tiny_ssm_hf_model(family, vocab=256, seed=2))


@pytest.fixture(scope="module", params=["llama", "nemotron_h"])
def gpu_model(request):
    """Attention-only and hybrid (Mamba states advance in place: a lookahead must never be dropped there)."""
    model = _model(int4=True) if request.param == "llama" else _ssm_model(request.param)
    return model.to("cuda", torch.bfloat16)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _drive(model, lookahead: bool, plan: dict) -> tuple[list, list, int]:
    """plan: {"requests": [(prompt, max_tokens, stop_ids, rung)], "cancel": (index, step) | None,
    "join": (step, prompt, max_tokens) | None}; returns output ids, finish states and lookahead reads."""
    engine = Engine(model, _Tok(), max_num_seqs=4, max_model_len=96, lookahead=lookahead)
    reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=m, stop_token_ids=s, ignore_eos=True),
                               rung=r) for p, m, s, r in plan["requests"]]
    step = 0
    while engine.scheduler.has_work:
        if plan.get("cancel") and plan["cancel"][1] == step:
            engine.cancel(reqs[plan["cancel"][0]].request_id)
        if plan.get("join") and plan["join"][0] == step:
            reqs.append(engine.add_request(plan["join"][1], SamplingParams(temperature=0, max_tokens=plan["join"][2],
                                                                           ignore_eos=True)))
        engine.step()
        step += 1
    return [r.output_ids for r in reqs], [r.status is Status.FINISHED for r in reqs], engine.runner.lookahead_reads


PLANS = {
    "one_request": {"requests": [(_prompt(1, 7), 24, [], 0)]},
    "batch_shrinks": {"requests": [(_prompt(2, 5), 5, [], 1), (_prompt(3, 11), 12, [], 1),
                                   (_prompt(4, 3), 20, [], 1)]},
    "cancel_and_join": {"requests": [(_prompt(5, 6), 16, [], 0), (_prompt(6, 9), 16, [], 0)], "cancel": (1, 6),
                        "join": (9, _prompt(7, 4), 8)},
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_lookahead_changes_no_token(gpu_model, name):
    plan = PLANS[name]
    want, done_want, reads_off = _drive(gpu_model, False, plan)
    got, done_got, reads_on = _drive(gpu_model, True, plan)
    assert got == want and done_got == done_want
    assert reads_off == 0 and reads_on > 0  # the lookahead really ran (and was read) with it on


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_stop_token_inside_a_lookahead_run_stops_there(gpu_model):
    base = {"requests": [(_prompt(8, 5), 20, [], 0), (_prompt(9, 8), 20, [], 0)]}
    outputs, _, _ = _drive(gpu_model, False, base)
    stop = outputs[0][6]  # request 0 stops on its 7th token (or earlier, if that id came before)
    plan = {"requests": [(_prompt(8, 5), 20, [stop], 0), (_prompt(9, 8), 20, [], 0)]}
    want, _, _ = _drive(gpu_model, False, plan)
    got, _, reads = _drive(gpu_model, True, plan)
    assert got == want and got[0][-1] == stop and len(got[0]) <= 7 and reads > 0


# ---------------------------------------------------------------------- RMSNorm split across two GEMVs


@pytest.mark.parametrize("family", ["llama", "nemotron_h", "mamba2", "bamba"])
@pytest.mark.parametrize("rung", [0, 2])
def test_norm_folded_into_the_gemvs_equals_the_norm_kernels(rung, family, monkeypatch):
    """A decode step whose o/down/out_proj GEMVs do the residual add and half of the next RMSNorm (the q|k|v,
    z|x|B|C|dt and gate|up GEMVs finish it) gives the logits of the same step with separate add+RMSNorm kernels, in
    bf16 (the fold serves bf16 streams only). CPU: the Triton kernels in the interpreter. Every block's output
    folds into the next block's norm, the last one's into the final norm where an INT4 head finishes it
    (UNIQL_HEAD_FOLD=1, off by default); an INT4 table's lookup begins the first norm."""
    import uniql.runtime.decoder as decoder_module
    from uniql.runtime.cache import DecodeBatch
    from uniql.runtime.decoder import DecoderLayer, ElasticDecoder, ElasticMLP
    from uniql.runtime.linear import Int4Linear

    dev = torch.device("cuda" if CUDA else "cpu")
    monkeypatch.setenv("UNIQL_HEAD_FOLD", "1")
    if not CUDA:
        monkeypatch.setattr(decoder_module, "_fused_kernels", lambda x: not torch.is_grad_enabled())
    model = (_model(int4=True) if family == "llama" else _ssm_model(family)).to(dev, torch.bfloat16)
    assert fuse_projections(model) > 0
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(dev)
    folds = []
    real = Int4Linear.forward_residual
    monkeypatch.setattr(Int4Linear, "forward_residual", lambda *a: folds.append(1) or real(*a))
    begun = []  # the INT4 table's lookup doing the first norm's half
    real_lookup = Int4Linear.lookup_prenormed
    monkeypatch.setattr(Int4Linear, "lookup_prenormed", lambda *a: begun.append(1) or real_lookup(*a))

    def step() -> torch.Tensor:
        cache = model.new_cache(1, 8, rung, torch.bfloat16)
        with torch.inference_mode():
            model(prompt, cache=cache)
            batch = DecodeBatch(model.sizes_for(rung), 1, 8, dev)
            batch.bind([cache], torch.tensor([7], dtype=torch.int32, device=dev))
            return model(torch.tensor([[5]], device=dev), positions=torch.tensor([[6]], device=dev), cache=batch,
                         logits_to_keep=1)

    folded = step()
    blocks = sum(len(layer.blocks) for layer in model.layers)
    assert len(folds) == (blocks if isinstance(model.head, Int4Linear) else blocks - 1)  # the SSM ones: dense heads
    assert family != "llama" or isinstance(model.head, Int4Linear)
    assert len(begun) == (1 if isinstance(model.embed, Int4Linear) else 0) and (family != "llama" or begun)
    monkeypatch.setattr(DecoderLayer, "takes_prenormed", property(lambda self: False))
    monkeypatch.setattr(ElasticMLP, "takes_prenormed", property(lambda self: False))
    monkeypatch.setattr(ElasticDecoder, "head_takes_prenormed", property(lambda self: False))
    plain = step()
    assert torch.isfinite(folded).all()
    torch.testing.assert_close(folded.float(), plain.float(), atol=3e-2, rtol=3e-2)
    assert not torch.equal(folded, plain)  # the folded path really ran (it rounds differently)


def test_the_head_finishes_the_final_norm_only_when_asked(monkeypatch):
    """UNIQL_HEAD_FOLD: off by default (the H100 A/B: the head's norm prologue costs more than the launch it saves),
    1 lets an INT4 head finish the final norm, and a typo is refused rather than silently ignored."""
    model = _model(int4=True)
    monkeypatch.delenv("UNIQL_HEAD_FOLD", raising=False)
    assert not model.head_takes_prenormed
    monkeypatch.setenv("UNIQL_HEAD_FOLD", "1")
    assert model.head_takes_prenormed
    monkeypatch.setenv("UNIQL_HEAD_FOLD", "on")
    with pytest.raises(ValueError, match="UNIQL_HEAD_FOLD must be 0 or 1"):
        model.head_takes_prenormed  # noqa: B018 (the property is the call under test)


def test_graph_capture_collects_garbage_first_and_pauses_the_collector():
    """A dead engine's CUDA graph freed by the cycle collector during a capture invalidates that capture (seen as a
    flaky "operation failed due to a previous error during capture"): cycles die before it, none during it."""
    import gc
    import weakref

    from uniql.runtime.graphs import collector_paused

    class Node:
        pass

    node = Node()
    node.me = node  # only the cycle collector frees this
    dead = weakref.ref(node)
    del node
    assert gc.isenabled()
    with collector_paused():
        assert dead() is None and not gc.isenabled()
    assert gc.isenabled()
