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

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "stop" else "length" if reason == "length" else reason)


@dataclass
class ChoiceState:
    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)  # events that carry a token (for logprobs, usage)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.tokens.append(event)
        self.text.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


# ------------------------------------------------------------------------------------------- logprobs
def _entry(token_text: TokenText, token_id: int, logprob: float) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(events: list[TokenEvent], token_text: TokenText) -> dict:
    content = []
    for e in events:
        item = _entry(token_text, e.token_id, e.logprob)
        tops = sorted((e.top_logprobs or {}).items(), key=lambda kv: -kv[1])
        item["top_logprobs"] = [_entry(token_text, t, lp) for t, lp in tops]
        content.append(item)
    return {"content": content}


def completion_logprobs(events: list[TokenEvent], token_text: TokenText, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for e in events:
        offsets.append(offset)
        tokens.append(token_text(e.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{token_text(t): lp for t, lp in (e.top_logprobs or {}).items()} for e in events],
            "text_offset": offsets}


# --------------------------------------------------------------------------------------------- bodies
def usage(prompt_tokens: int, choices: list[ChoiceState], prune_rate: float) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prune_rate": prune_rate}


def chat_body(rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, prune_rate: float,
              token_text: TokenText | None) -> dict:
    out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": chat_logprobs(c.tokens, token_text) if token_text else None,
            "finish_reason": finish_reason(c.finish_reason)} for c in choices]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": out,
            "usage": usage(prompt_tokens, choices, prune_rate)}


def completion_body(rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, prune_rate: float,
                    token_text: TokenText | None) -> dict:
    out = [{"index": c.index, "text": "".join(c.text),
            "logprobs": completion_logprobs(c.tokens, token_text) if token_text else None,
            "finish_reason": finish_reason(c.finish_reason)} for c in choices]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": out,
            "usage": usage(prompt_tokens, choices, prune_rate)}


# ----------------------------------------------------------------------------------------------- SSE
def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class ChunkWriter:
    """SSE chunks of one streamed request (chat or text completion), sharing id / created / model."""

    def __init__(self, kind: str, model: str, token_text: TokenText | None):
        self.chat = kind == "chat"
        self.rid = new_id("chatcmpl" if self.chat else "cmpl")
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created, self.model, self.token_text = int(time.time()), model, token_text
        self.offsets: dict[int, int] = {}

    def _chunk(self, choices: list[dict], usage_body: dict | None = None) -> str:
        body = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage_body is not None:
            body["usage"] = usage_body
        return sse(body)

    def role(self, index: int) -> str:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def event(self, index: int, event: TokenEvent) -> str | None:
        """A chunk for one event (None when it adds nothing: no text, no logprobs, not the end)."""
        reason = finish_reason(event.finish_reason)
        logprobs = None
        if self.token_text is not None and event.token_id is not None:
            if self.chat:
                logprobs = chat_logprobs([event], self.token_text)
            else:
                logprobs = completion_logprobs([event], self.token_text, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + len(event.text)
        if not event.text and logprobs is None and reason is None:
            return None
        if self.chat:
            delta = {"content": event.text} if event.text or logprobs is not None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": reason}
        return self._chunk([choice])

    def usage(self, usage_body: dict) -> str:
        return self._chunk([], usage_body)
