"""Streaming text with SmolLM2's real byte-level BPE tokenizer (the session ``tokenizer`` fixture) and a tiny
SentencePiece-style one: UTF-8-safe pieces, bounded work per token, stop strings, chat templates."""

from __future__ import annotations

import random

import pytest
from helpers import byte_fallback_tokenizer

from uniql.runtime.detokenizer import MAX_HELD_TOKENS, REPLACEMENT, IncrementalDetokenizer, StopMatcher, render_chat

TEXTS = ["The quick brown fox jumps over the lazy dog.", "  leading spaces and\nnew lines\t tabs",
         "Emoji 🦊🚀 and CJK 日本語のテキスト, accents: café naïve Ελληνικά", "12345 + 67890 = 80235",
         "👩‍👩‍👧 family, flags 🇯🇵🇫🇷, math ∀x∈ℝ", " ", "é"]
CHAR_POOL = "ab Z\n.éüß日本語中文한국어🦊🚀👍😀Ωλж"


def stream(tokenizer, prompt_ids, out_ids, skip=True, context=4):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip, context=context)
    return [detok.add(t) for t in out_ids] + [detok.flush()]


def byte_token_ids(tokenizer) -> list[int]:
    """Id of the single-byte token for each byte value (GPT-2's byte-to-printable-char alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))  # the non-printable bytes map to code points 256.. in byte order
    chars = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    return [tokenizer.convert_tokens_to_ids(c) for c in chars]


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-style tokenizer: '▁' marks spaces, byte fallback, and decode strips the first leading space."""
    return byte_fallback_tokenizer(["▁Hi", "▁Hello", "▁world", "!", "▁"])


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = stream(tokenizer, tokenizer("Say:")["input_ids"], ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT in p for p in pieces)


def test_random_texts_and_random_token_sequences(tokenizer):
    rng = random.Random(0)
    for _ in range(60):  # natural merges over a mix of 1- to 4-byte characters
        text = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randrange(1, 30)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = stream(tokenizer, tokenizer(text[::-1])["input_ids"], ids, context=rng.randrange(0, 6))
        assert "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces)
    for _ in range(150):  # whatever a model may sample, special tokens and invalid byte sequences included
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(len(tokenizer)) for _ in range(5)]
        for skip in (True, False):
            assert "".join(stream(tokenizer, prompt, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_invalid_bytes_then_split_characters_lose_nothing(tokenizer):
    """Byte tokens mixing stray (invalid) bytes with whole characters: long holds end on a final boundary, so a
    character split after invalid bytes is not replaced by U+FFFD (the pieces still join to ``decode``)."""
    rng = random.Random(1)
    byte_ids = byte_token_ids(tokenizer)
    stray = [b for b in range(0x80, 0x100) if byte_ids[b] != tokenizer.unk_token_id]  # bytes this vocab has
    for _ in range(200):
        data = b"".join(rng.choice(CHAR_POOL).encode() if rng.random() < 0.6 else bytes([rng.choice(stray)])
                        for _ in range(rng.randrange(1, 16)))
        ids = [byte_ids[b] for b in data]
        assert tokenizer.unk_token_id not in ids
        assert "".join(stream(tokenizer, tokenizer("x")["input_ids"], ids)) == tokenizer.decode(ids)
    # three stray continuation bytes, then an em dash split over two tokens: the dash used to come out as U+FFFD
    ids = [byte_ids[0xE4], *[tokenizer.convert_tokens_to_ids("\u0120\u00e2")] * 2, byte_ids[0xE2], byte_ids[0x80],
           byte_ids[0x94], byte_ids[ord("!")]]
    assert tokenizer.unk_token_id not in ids
    assert "".join(stream(tokenizer, tokenizer("Say:")["input_ids"], ids)) == tokenizer.decode(ids)


def test_split_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer("🦊🚀日本", add_special_tokens=False)["input_ids"]
    pieces = stream(tokenizer, tokenizer("Say:")["input_ids"], ids)
    assert len(ids) > 4 and "" in pieces[:-1]  # byte-level tokens split the characters: some steps emit nothing
    assert "".join(pieces) == "🦊🚀日本" and not any(REPLACEMENT in p for p in pieces)


def test_one_token_per_byte_emits_whole_characters_only(tokenizer):
    text = "héllo 🦊 日本語 naïve Ελληνικά 🚀!"
    byte_ids = byte_token_ids(tokenizer)
    ids = [byte_ids[b] for b in text.encode()]
    assert tokenizer.unk_token_id not in ids
    pieces = stream(tokenizer, tokenizer("x")["input_ids"], ids)
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == list(text)  # every non-empty piece is exactly one whole character
    assert pieces.count("") > 10


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>"), *ids]
    for skip, expected in ((True, "Hi"), (False, "<|im_start|>Hi" + tokenizer.eos_token)):
        assert "".join(stream(tokenizer, [1, 2], ids, skip)) == expected


def test_leading_space_comes_from_the_prompt_context(sentencepiece_like):
    tok, v = sentencepiece_like
    prompt = [v["<s>"], v["▁Hi"]]
    out = [v["▁Hello"], v["▁world"], v["▁"], v["<0xC3>"], v["<0xA9>"], v["!"], v["</s>"]]
    assert tok.decode([v["▁world"]]) == "world"  # alone, the space is stripped
    pieces = stream(tok, prompt, out)
    assert pieces[:6] == [" Hello", " world", " ", "", "é", "!"]  # "é" is two byte tokens: held, then whole
    full, head = tok.decode(prompt + out, skip_special_tokens=True), tok.decode(prompt, skip_special_tokens=True)
    assert "".join(pieces) == full[len(head):]
    assert "".join(stream(tok, [], out)) == tok.decode(out, skip_special_tokens=True)  # no context: as decode


@pytest.mark.parametrize("skip", [True, False])
def test_work_per_token_stays_bounded(tokenizer, skip):
    lengths = []
    real = tokenizer.decode

    class Counting:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return real(ids, **kw)

    words = tokenizer(" word 🦊 日本語" * 200, add_special_tokens=False)["input_ids"]
    specials = [tokenizer.eos_token_id] * 50  # a run of tokens that add no text when skipped
    byte_ids = byte_token_ids(tokenizer)
    garbage = [byte_ids[0xF0], byte_ids[0x9F]] * 20  # invalid UTF-8 that never completes
    ids = words + specials + words + garbage + words
    pieces = stream(Counting(), tokenizer("x")["input_ids"], ids, skip)
    assert len(lengths) <= 3 * len(ids) + 2  # two decodes a token, a third while invalid bytes are held
    assert max(lengths) <= 4 + MAX_HELD_TOKENS
    assert "".join(pieces) == real(ids, skip_special_tokens=skip)


def test_stop_string_spanning_tokens_ends_the_real_stream(tokenizer):
    text = "Answer: 42 日本語 THE END and more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok, matcher, out = IncrementalDetokenizer(tokenizer, [1]), StopMatcher(("本語 THE",)), ""
    for t in ids:
        piece, hit = matcher.feed(detok.add(t))
        out += piece
        if hit:
            break
    assert hit and out == "Answer: 42 日"


@pytest.mark.parametrize(("stop", "deltas", "emitted", "hit"), [
    (("END",), ["abc E", "N", "D more"], "abc ", True),  # spans three pieces
    (("END",), ["abc E", "NX"], "abc ENX", False),  # a false start is released
    (("END",), ["abc E", "N"], "abc EN", False),  # held at the end of the stream: flush gives it back
    (("ab", "abc"), ["xa", "bc"], "x", True),  # overlapping candidates: the earliest match wins
    (("abc", "b"), ["xab"], "xa", True),
    (("stop",), ["stop here"], "", True),  # a stop at the very start
    (("stop",), ["", "st", "op"], "", True),
    ((), ["plain ", "text"], "plain text", False),
    (("\n\n",), ["line\n", "\nnext"], "line", True),
    (("aab",), ["a", "a", "a", "b"], "a", True),  # the held "aa" slides: its first "a" is safe once "aaa" arrives
])
def test_stop_strings_never_leak(stop, deltas, emitted, hit):
    matcher = StopMatcher(stop)
    out, stopped = "", False
    for d in deltas:
        piece, stopped = matcher.feed(d)
        out += piece
        if stopped:
            break
    out += matcher.flush()
    assert (out, stopped) == (emitted, hit)


def test_stop_matcher_holds_only_what_could_start_a_stop():
    matcher = StopMatcher(("<END>",))
    assert matcher.feed("hello <E") == ("hello ", False)
    assert matcher.feed("ND") == ("", False)
    assert matcher.feed("!") == ("<END!", False)
    assert matcher.feed("<END> tail") == ("", True)
    assert matcher.feed("later") == ("", True) and matcher.flush() == ""  # nothing after a stop


def test_stop_matcher_matches_a_reference_on_random_chunks():
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 25)))
        stop = tuple({"".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(2)})
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randrange(0, len(text) + 1)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher, out, stopped = StopMatcher(stop), "", False
        for chunk in chunks:
            piece, stopped = matcher.feed(chunk)
            out += piece
        out += matcher.flush()
        first = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        assert (out, stopped) == ((text[:first], True) if first >= 0 else (text, False))


def test_chat_template_matches_the_tokenizers_own(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "日本語?"}]
    ids = render_chat(tokenizer, messages)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    without = render_chat(tokenizer, messages, add_generation_prompt=False)
    assert ids[:len(without)] == without and len(without) < len(ids)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([{"role": "user"}], "content"),
    ([{"content": "x"}], "role"),
    (["user: hi"], "role"),
    ([{"role": "user", "content": "ok"}, {"role": "bot", "content": "x"}], r"messages\[1\]\.role"),
])
def test_chat_refuses_bad_messages(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(tokenizer, messages)


def test_chat_needs_a_template(sentencepiece_like):
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(sentencepiece_like[0], [{"role": "user", "content": "hi"}])


def test_messages_the_template_refuses_are_a_value_error_for_every_caller(tokenizer, monkeypatch):
    """The server (400) and `uniql generate --chat` (exit 2, no traceback) both see a ValueError when the template
    itself refuses the messages; a template that does not parse is the model's error, not the caller's."""
    from jinja2 import TemplateSyntaxError

    monkeypatch.setattr(tokenizer, "chat_template",
                        "{% if messages | length > 1 %}{{ raise_exception('roles must alternate') }}{% endif %}"
                        "{{ messages[0]['content'] }}")
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="refused the messages: roles must alternate"):
        render_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    monkeypatch.setattr(tokenizer, "chat_template", "{% if %}")
    with pytest.raises(TemplateSyntaxError):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}])
