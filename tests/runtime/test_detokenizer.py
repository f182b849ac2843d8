"""Streaming text with SmolLM2's real byte-level BPE tokenizer: UTF-8-safe pieces, stop strings, chat."""

from __future__ import annotations

import pytest

from uniql.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopMatcher, render_chat

TEXTS = ["The quick brown fox jumps over the lazy dog.", "  leading spaces and\nnew lines\t tabs",
         "Emoji 🦊🚀 and CJK 日本語のテキスト, accents: café naïve Ελληνικά", "12345 + 67890 = 80235"]




def stream(tokenizer, prompt: str, text: str, skip=True):
    prompt_ids = tokenizer(prompt)["input_ids"]
    out_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    pieces = [detok.add(t) for t in out_ids]
    return pieces + [detok.flush()], out_ids


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_decoded_text(tokenizer, text):
    pieces, ids = stream(tokenizer, "Say:", text)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(REPLACEMENT in p for p in pieces)


def test_split_characters_are_held_back_until_complete(tokenizer):
    pieces, ids = stream(tokenizer, "Say:", "🦊🚀日本")
    assert len(ids) > 4 and "" in pieces[:-1]  # byte-level tokens split the characters: some steps emit nothing
    assert "".join(pieces) == "🦊🚀日本"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for skip, expected in ((True, "Hi"), (False, "Hi" + eos)):
        detok = IncrementalDetokenizer(tokenizer, [1, 2], skip_special_tokens=skip)
        assert "".join(detok.add(t) for t in ids) + detok.flush() == expected


def test_work_per_token_stays_bounded(tokenizer):
    lengths = []
    real = tokenizer.decode

    class Counting:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return real(ids, **kw)

    detok = IncrementalDetokenizer(Counting(), tokenizer("x")["input_ids"])
    for t in tokenizer(" word" * 300, add_special_tokens=False)["input_ids"]:
        detok.add(t)
    assert max(lengths) <= 8


@pytest.mark.parametrize(("stops", "deltas", "emitted", "hit"), [
    (("END",), ["abc E", "N", "D more"], "abc ", True),
    (("END",), ["abc E", "NX"], "abc ENX", False),
    (("ab", "abc"), ["xa", "bc"], "x", True),
    (("stop",), ["stop here"], "", True),
    ((), ["plain ", "text"], "plain text", False),
    (("\n\n",), ["line\n", "\nnext"], "line", True),
])
def test_stop_strings_never_leak(stops, deltas, emitted, hit):
    matcher = StopMatcher(stops)
    out, stopped = "", False
    for d in deltas:
        piece, stopped = matcher.feed(d)
        out += piece
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == (emitted, hit)


def test_chat_template_matches_the_tokenizer_and_refuses_bad_messages(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ids = render_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    for bad, match in (([], "empty"), ([{"role": "user"}], "content"), ([{"role": "bot", "content": "x"}], "role")):
        with pytest.raises(ValueError, match=match):
            render_chat(tokenizer, bad)
