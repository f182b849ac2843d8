"""Request semantics users bring from OpenAI / vLLM / HF: how a stop given as one string reads, byte-fallback text
streamed after a prompt or a special token, and prompt ids the model cannot embed (CPU, tiny models)."""

from __future__ import annotations

import pytest
from helpers import byte_fallback_tokenizer, tiny_hf_model

from uniql.runtime.detokenizer import IncrementalDetokenizer
from uniql.runtime.engine import Engine
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.request import SamplingParams


@pytest.fixture(scope="module")
def byte_fallback():
    """A Llama-2 / Mistral style SentencePiece tokenizer: characters outside the vocab are spelled in byte tokens,
    and its ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any byte of it is invalid."""
    return byte_fallback_tokenizer(["▁Hi", "▁world"])


def _bytes(vocab, text: str) -> list[int]:
    return [vocab[f"<0x{b:02X}>"] for b in text.encode()]


def _stream(tok, prompt, out) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.add(t) for t in out] + [detok.flush()]


# ---------------------------------------------------------------------------------------------- byte fallback
def test_prompt_ending_in_byte_fallback_characters_keeps_the_first_output_character(byte_fallback):
    """The prompt's last 4 tokens began inside "日" (3 byte tokens): that context decoded to U+FFFD, and ByteFallback
    spread it over the output's "é" (streamed as U+FFFD though decode gives "é")."""
    tok, v = byte_fallback
    prompt = [v["<s>"], *_bytes(v, "日Ω")]
    out = [*_bytes(v, "é日"), v["▁Hi"]]
    pieces = _stream(tok, prompt, out)
    assert "".join(pieces) == "é日 Hi"
    assert tok.decode(prompt + out, skip_special_tokens=True) == "日Ωé日 Hi"


def test_skipped_special_token_between_byte_fallback_characters_loses_nothing(byte_fallback):
    """A skipped special token used to move the window start 4 tokens back, inside "🦊" (4 byte tokens): the next
    character "Ω" came out as U+FFFD."""
    tok, v = byte_fallback
    out = [*_bytes(v, "🦊"), v["</s>"], *_bytes(v, "Ω"), v["▁Hi"]]
    pieces = _stream(tok, [v["<s>"], v["▁world"]], out)
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=True) == "🦊Ω Hi"


def test_byte_fallback_streams_match_decode_around_special_tokens(byte_fallback):
    """Runs of byte-fallback characters, words and skipped special tokens in many orders, after prompts of each."""
    import random

    tok, v = byte_fallback
    rng = random.Random(0)
    words = ["▁Hi", "▁world", "</s>", "<s>"]
    for _ in range(300):
        out = [t for _ in range(rng.randrange(1, 10))
               for t in (_bytes(v, rng.choice("é日🦊Ω")) if rng.random() < 0.6 else [v[rng.choice(words)]])]
        prompt = [v["<s>"], *(t for _ in range(rng.randrange(0, 3)) for t in _bytes(v, rng.choice("é日🦊Ω")))]
        head = tok.decode(prompt, skip_special_tokens=True)
        assert "".join(_stream(tok, prompt, out)) == tok.decode(prompt + out, skip_special_tokens=True)[len(head):]


# ---------------------------------------------------------------------------------------------- stop strings
def test_stop_given_as_one_string_is_one_stop_string():
    """``stop="ld"`` (OpenAI allows a bare string) used to be iterated as the stop strings "l" and "d"."""
    assert SamplingParams(stop="ld").stop == ("ld",)
    assert SamplingParams(stop="a longer stop string").stop == ("a longer stop string",)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="")


@pytest.fixture(scope="module")
def small_model():
    return decoder_from_hf(tiny_hf_model(vocab=320, hidden=64, inter=128, heads=4, kv_heads=2, seed=3))


def test_stop_string_given_as_a_str_cuts_the_engine_text(small_model, tokenizer):
    engine = Engine(small_model, tokenizer)
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = [5, 17, 42, 99]
    full = engine.generate(ids, base)
    stop = next((full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].strip() and full[i] != full[0]),
                None)
    if stop is None:
        pytest.skip("the greedy text has no usable two-character stop string")
    cut = engine.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop))
    assert cut == full[:full.index(stop)]


# ---------------------------------------------------------------------------------------------- bad prompts
@pytest.mark.parametrize("bad", [320, 10_000, -1])
def test_prompt_ids_outside_the_vocabulary_are_refused_before_queueing(small_model, tokenizer, bad):
    """They used to be queued and fail at prefill with "IndexError: index out of range in self" (on CUDA a
    device-side assert that loses every request)."""
    engine = Engine(small_model, tokenizer)
    with pytest.raises(ValueError, match=f"prompt token id {bad} is outside the vocabulary"):
        engine.add_request([5, bad, 7], SamplingParams(max_tokens=2))
    assert engine.scheduler.num_waiting == 0 and not engine.requests
    assert engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)) is not None


def test_prompt_over_max_model_len_is_a_clear_error_and_the_engine_goes_on(small_model, tokenizer):
    engine = Engine(small_model, tokenizer, max_model_len=32)
    with pytest.raises(ValueError, match="exceeds max_model_len 32"):
        engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(5\)"):
        engine.add_request(list(range(1, 31)), SamplingParams(max_tokens=5))
    req = engine.add_request(list(range(1, 31)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert [e.finish_reason for e in engine.stream(req)][-1] == "length" and len(req.output_ids) == 2



def test_a_temperature_below_the_floor_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-5).greedy  # the floor itself samples (at 1e-5)
