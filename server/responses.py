"""OpenAI response bodies: chat and text completions, whole or as SSE chunks; logprobs in both shapes.

``ChoiceState`` accumulates one choice's events; the builders turn states into the JSON the clients expect.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from uniql.runtime.request import TokenEvent


@dataclass(frozen=True)
class TokenView:
    """How logprobs spell a token: ``text`` decoded on its own (U+FFFD where the token holds only part of a
    UTF-8 character, as in vLLM) and ``raw`` its exact bytes, which a client joins to rebuild such characters."""

    text: Callable[[int], str]
    raw: Callable[[int], bytes]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "stop" else "length" if reason == "length" else reason)


@dataclass
class ChoiceState:
    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)  # events of the tokens the text is made of (logprobs)
    offsets: list[int] = field(default_factory=list)  # per token: where its text starts in the emitted text
    # tokens generated, an ending eos / stop token included (usage.completion_tokens, as vLLM counts them)
    generated: int = 0
    finish_reason: str | None = None
    error: str | None = None  # the engine's message when finish_reason is "error"
    _length: int = field(default=0, init=False, repr=False)  # characters emitted so far

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.generated += 1
            if not event.stop_token:
                self.tokens.append(event)
                self.offsets.append(self._length)
        self.text.append(event.text)
        self._length += len(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error


# ------------------------------------------------------------------------------------------- logprobs
def _entry(tokens: TokenView, token_id: int, logprob: float) -> dict:
    return {"token": tokens.text(token_id), "logprob": logprob, "bytes": list(tokens.raw(token_id))}


def chat_logprobs(events: list[TokenEvent], tokens: TokenView) -> dict:
    content = []
    for e in events:
        item = _entry(tokens, e.token_id, e.logprob)
        tops = sorted((e.top_logprobs or {}).items(), key=lambda kv: -kv[1])
        item["top_logprobs"] = [_entry(tokens, t, lp) for t, lp in tops]
        content.append(item)
    return {"content": content}


def _top_keys(event: TokenEvent, tokens: TokenView) -> dict[str, float]:
    """Completions' top_logprobs is a dict keyed by token text, and tokens holding parts of characters all decode
    to U+FFFD: the sampled token keeps its text (it matches ``tokens[i]``), any other token whose text is taken
    at this position is keyed ``token_id:<id>`` (vLLM's spelling of a token given as its id).

    The sampled token is always in it, as the API documents ("up to logprobs+1 elements"; vLLM does the same):
    a sampled token outside the top ``logprobs`` joins them."""
    tops = dict(event.top_logprobs or {})
    if event.logprob is not None:
        tops.setdefault(event.token_id, event.logprob)
    order = sorted(tops, key=lambda t: t != event.token_id)  # the sampled token claims its text first
    keys: dict[int, str] = {}
    for t in order:
        text = tokens.text(t)
        keys[t] = text if text not in keys.values() else f"token_id:{t}"
    return {keys[t]: lp for t, lp in sorted(tops.items(), key=lambda kv: -kv[1])}


def completion_logprobs(events: list[TokenEvent], tokens: TokenView, offsets: list[int]) -> dict:
    """``offsets``: where each token's text starts in the text actually emitted (a stop string may hold text
    back), so the whole response and the streamed chunks report the same offsets."""
    return {"tokens": [tokens.text(e.token_id) for e in events], "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [_top_keys(e, tokens) for e in events], "text_offset": list(offsets)}


# --------------------------------------------------------------------------------------------- bodies
def usage(prompt_tokens: int, choices: list[ChoiceState], prune_rate: float) -> dict:
    completion = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prune_rate": prune_rate}


def chat_body(rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, prune_rate: float,
              tokens: TokenView | None) -> dict:
    out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": chat_logprobs(c.tokens, tokens) if tokens else None,
            "finish_reason": finish_reason(c.finish_reason)} for c in choices]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": out,
            "usage": usage(prompt_tokens, choices, prune_rate)}


def completion_body(rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, prune_rate: float,
                    tokens: TokenView | None) -> dict:
    out = [{"index": c.index, "text": "".join(c.text),
            "logprobs": completion_logprobs(c.tokens, tokens, c.offsets) if tokens else None,
            "finish_reason": finish_reason(c.finish_reason)} for c in choices]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": out,
            "usage": usage(prompt_tokens, choices, prune_rate)}


# ----------------------------------------------------------------------------------------------- SSE
def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class ChunkWriter:
    """SSE chunks of one streamed request (chat or text completion), sharing id / created / model."""

    def __init__(self, kind: str, model: str, tokens: TokenView | None, include_usage: bool = False):
        self.chat = kind == "chat"
        self.rid = new_id("chatcmpl" if self.chat else "cmpl")
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created, self.model, self.tokens = int(time.time()), model, tokens
        self.include_usage = include_usage
        # set for stream_options.continuous_usage_stats: the usage so far, put in every chunk
        self.usage_now: Callable[[], dict] | None = None

    def _chunk(self, choices: list[dict], usage_body: dict | None = None) -> str:
        body = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage_body is None and self.usage_now is not None:
            usage_body = self.usage_now()
        # with include_usage every chunk has the field, null until the last one, as OpenAI documents it
        if usage_body is not None or self.include_usage:
            body["usage"] = usage_body
        return sse(body)

    def role(self, index: int) -> str:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def event(self, choice: ChoiceState, event: TokenEvent) -> str | None:
        """A chunk for one event, already added to ``choice`` (None when it adds nothing: no text, no logprobs,
        not the end)."""
        index, reason = choice.index, finish_reason(event.finish_reason)
        logprobs = None
        if self.tokens is not None and event.token_id is not None and not event.stop_token:
            if self.chat:
                logprobs = chat_logprobs([event], self.tokens)
            else:
                logprobs = completion_logprobs([event], self.tokens, choice.offsets[-1:])
        if not event.text and logprobs is None and reason is None:
            return None
        if self.chat:
            delta = {"content": event.text} if event.text or logprobs is not None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": reason}
        return self._chunk([choice])

    def text(self, index: int, text: str) -> str:
        """A text-completion chunk of text that is not a generated token (the echoed prompt)."""
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def usage(self, usage_body: dict) -> str:
        return self._chunk([], usage_body)
