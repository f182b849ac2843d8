"""Streaming text: incremental detokenization in valid UTF-8 pieces, stop strings, chat templates.

``IncrementalDetokenizer`` decodes only a small window of recent tokens per step (the prefix/read-offset
method): the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is what the new tokens added, so a
step costs O(window), not O(output length). A token that ends inside a multi-byte character decodes to a
trailing U+FFFD; its text is held back until the character completes. The window starts on the last prompt
tokens, so tokenizers that render a token differently at the start of a string (SentencePiece strips the
leading space of the first piece) decode the first output token as they would in context.

Known limits, shared with vLLM's detokenizer: a tokenizer whose decode rewrites text already emitted (e.g.
``clean_up_tokenization_spaces`` turning " ." into ".") cannot retract it; a byte sequence that is genuinely
invalid UTF-8 is emitted with its U+FFFD once it can no longer be the start of a character.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
ROLES = ("system", "user", "assistant", "tool")
# A UTF-8 character has at most 4 bytes and every token adds at least one, so a character begun in a held token
# is complete (or shown to be invalid) 3 tokens later: from 4 held tokens on, the text up to a token boundary
# before the last 3 is final wherever it still prefixes the text of all of them.
MAX_HELD_TOKENS = 4
# Held that long only when every token boundary splits a character (a run of byte tokens): then emit anyway,
# so a step's decode stays O(window); the text may show U+FFFD for a character completed later.
MAX_WINDOW = 32


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals decoding all of them at once."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True, context: int = 4):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = context
        # up to MAX_HELD_TOKENS - 1 more tokens, in case the last `context` ones begin inside a character
        self.ids = [int(t) for t in prompt_ids[-(context + MAX_HELD_TOKENS - 1):]] if context > 0 else []
        self.read = len(self.ids)  # tokens before this index have had their text emitted
        # window start: the tokens before `read` give the new text its left context
        self.prefix = self._char_start(max(0, self.read - context), 0, self.read)

    def add(self, token_id: int) -> str:
        """The new text this token completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Whatever is still held back at the end (may hold U+FFFD if a character never completed)."""
        if self.read == len(self.ids):
            return ""
        return self._step(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        # hold while the text ends in a split character, or is shorter than what we already emitted
        unfinished = after.endswith(REPLACEMENT) or len(after) < len(before)
        held = len(self.ids) - self.read
        if not unfinished or final:
            return self._emit(after[len(before):], len(self.ids))
        if held < MAX_HELD_TOKENS:
            return ""
        # the trailing U+FFFD may be a character begun in one of the last 3 tokens: emit up to the latest boundary
        # before them whose text is final (still a prefix of the whole), keep the rest held
        for upto in range(len(self.ids) - (MAX_HELD_TOKENS - 1), self.read, -1):
            text = self._decode(self.ids[self.prefix:upto])
            if len(text) >= len(before) and after.startswith(text):
                return self._emit(text[len(before):], upto)
        return self._emit(after[len(before):], len(self.ids)) if held >= MAX_WINDOW else ""

    def _char_start(self, start: int, lowest: int, end: int) -> int:
        """``start``, moved left (not past ``lowest``, at most 3 tokens) while the context ``ids[start:end]`` begins
        inside a character. A window cut between the byte tokens of one character decodes to U+FFFD there, and a
        SentencePiece ``ByteFallback`` decoder turns a whole run of byte tokens into U+FFFD when any of it is
        invalid: the next character spelled in byte tokens would come out as U+FFFD too."""
        for _ in range(MAX_HELD_TOKENS - 1):
            if start <= lowest or not self._decode(self.ids[start:end]).startswith(REPLACEMENT):
                break
            start -= 1
        return start

    def _emit(self, new_text: str, upto: int) -> str:
        """Mark ``ids[:upto]`` as emitted (their text ends with ``new_text``)."""
        if new_text:
            self.prefix = self.read  # the tokens just emitted become the next step's context
        else:
            # nothing new (e.g. skipped special tokens): keep the old context, but never much more than `context`
            if upto - self.context > self.prefix:
                self.prefix = self._char_start(upto - self.context, self.prefix, upto)
        self.read = upto
        # forget tokens left of the window so memory and list copies stay O(window)
        del self.ids[:self.prefix]
        self.read -= self.prefix
        self.prefix = 0
        return new_text


class StopMatcher:
    """Cuts the stream right before the first stop string; text that may start one is held until it is clear."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit); after a hit everything is dropped."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self.held + delta
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut], True
        keep = self._partial_stop_len(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Held text at the end of the stream (it turned out not to start a stop string)."""
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids from the tokenizer's own chat template (ValueError for bad messages or no template, and for
    messages the template refuses: its ``raise_exception`` calls, e.g. "roles must alternate", are the caller's
    mistake; a template that does not even parse stays an error of the model's files)."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use the completions endpoint")
    _check_messages(messages)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except TemplateSyntaxError:
        raise
    except TemplateError as err:
        raise ValueError(f"the chat template refused the messages: {err}") from None
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):  # a tensor or array, should a tokenizer return one
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one conversation
        ids = ids[0]
    return [int(t) for t in ids]


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {msg['role']!r}")
