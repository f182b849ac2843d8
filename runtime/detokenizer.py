"""Streaming text: incremental detokenization in valid UTF-8 pieces, stop strings, chat templates.

``IncrementalDetokenizer`` decodes a small window of recent tokens per step (the prefix/read-offset method):
the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is what the new token added. A token that
ends inside a multi-byte character decodes to U+FFFD; its text is held back until the character completes.
The window starts on the last prompt tokens, so tokenizers that render a token differently at the start of a
string (leading spaces) decode the first output token as they would in context.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
ROLES = ("system", "user", "assistant", "tool")


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True, context: int = 4):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-context:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The new text this token completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence (may contain U+FFFD if it never completed)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Cuts the stream right before the first stop string; text that may start one is held until it is clear."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self.held + delta
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text)) + 1) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids from the tokenizer's own chat template (ValueError for bad messages or no template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use the completions endpoint")
    if not messages:
        raise ValueError("messages is empty")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {msg['role']!r}")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
