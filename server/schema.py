"""OpenAI request bodies (chat and completions): parsing, validation, and conversion to SamplingParams.

Every field either works or is refused with a 400 that names it: known OpenAI fields this server does not
implement are listed in ``UNSUPPORTED`` with the reason, anything else is an unknown parameter. Extras that vLLM
accepts (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos) and UniQL's ``prune_rate`` are part of the
schema. Pure Python (pydantic and the engine's torch-free request module), as the HTTP layer must be.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uniql.runtime.request import SamplingParams

from .errors import APIError, bad_request, from_validation_error, from_value_error

UNSUPPORTED = {
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported", "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "reasoning_effort": "this model has no reasoning mode", "suffix": "suffix (insertion) is not supported",
}
# accepted without effect because their OpenAI meaning needs nothing from an inference server
NO_OPS = ("user", "metadata", "store", "service_tier")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False  # null: the default (no usage chunk)
    continuous_usage_stats: bool | None = False  # vLLM's: the usage so far in every chunk (with include_usage)
    # OpenAI's padding of chunks against size side channels; false (what this server does anyway) is fine
    include_obfuscation: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    prune_rate: float | None = Field(None, ge=0.0, lt=1.0)  # UniQL: pin this request's pruning rate
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatMessage(BaseModel):
    """One message. Besides role and content, the fields OpenAI returns on messages are accepted so clients can
    replay a conversation as they received it; they do not reach the template (a text model, no tools), and
    ``chat_messages`` refuses the ones that carry something this server cannot honour."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # only null or [] (no tool calling)
    function_call: dict[str, Any] | None = None  # only null (deprecated form of tool_calls)
    tool_call_id: str | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None  # only null (no audio)
    annotations: list[dict[str, Any]] | None = None  # citations on a returned message: nothing to do with them


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with echo: the prompt back, nothing generated (OpenAI's way to echo a prompt); refused without echo
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None


def parse(model_cls: type[BaseModel], body: Any) -> BaseModel:
    """A request body as ``model_cls``: refused fields first (clear reasons), then pydantic (400 naming the field)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    body = _without_nulls(model_cls, body)
    for name, reason in UNSUPPORTED.items():
        if body.get(name) is not None:
            raise bad_request(f"{name}: {reason} by this server", name, "unsupported_parameter")
    try:  # strict: `"max_tokens": true` or `"stream": "yes"` is a 400 as in OpenAI, never a silent 1 or true
        req = model_cls.model_validate(body, strict=True)
    except ValidationError as err:
        raise from_validation_error(err) from None
    _check_specifics(req)
    return req


def _without_nulls(model_cls: type[BaseModel], body: dict) -> dict:
    """OpenAI marks its optional fields nullable, and clients send ``"n": null`` for "the default": an explicit
    null of a field this server knows (or refuses by name) is dropped, so it takes its default. Unknown fields
    keep their null and are refused as unknown, as any other value of theirs."""
    known = model_cls.model_fields.keys() | UNSUPPORTED.keys()
    body = {k: v for k, v in body.items() if v is not None or k not in known}
    if body.get("logit_bias") == {}:  # no bias at all: what this server does anyway (OpenAI and vLLM take it)
        del body["logit_bias"]
    return body


def _check_specifics(req: BaseModel) -> None:
    if isinstance(req, ChatRequest) and req.response_format is not None and req.response_format.type != "text":
        raise bad_request(f"response_format {req.response_format.type!r} is not supported: this server has no "
                          "constrained decoding; ask for JSON in the prompt, or use response_format "
                          "{\"type\": \"text\"}", "response_format", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs asks for the prompt's logprobs, which this server does not compute "
                              "(echo alone, or logprobs alone, are supported)", "echo", "unsupported_parameter")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("invalid value for 'max_tokens': 0 generates nothing, which only makes sense with "
                              "echo (the prompt back alone)", "max_tokens", "invalid_value")
        if req.best_of not in (None, 1, req.n):
            raise bad_request("best_of other than n is not supported", "best_of", "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise bad_request("stream_options.include_obfuscation is not supported by this server (its chunks are not "
                          "padded); leave it out or set it to false", "stream_options.include_obfuscation",
                          "unsupported_parameter")
    # checked here so the 400 names the field (the engine's ValueError for it names none)
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")


def requested_max_tokens(req: BaseModel) -> int | None:
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def stops(req: BaseModel) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def sampling_params(req: BaseModel, max_tokens: int, choice: int = 0) -> SamplingParams:
    """Engine parameters for choice ``choice`` of ``n`` (with a seed, choice i gets seed + i: distinct, repeatable)."""
    if isinstance(req, ChatRequest):
        logprobs, top = req.logprobs, req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    given = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                          "frequency_penalty", "repetition_penalty") if getattr(req, k) is not None}
    if given.get("top_k") == -1:  # vLLM's spelling of "off" (clients written for vLLM send it by default)
        given["top_k"] = 0
    try:
        return SamplingParams(max_tokens=max_tokens, seed=None if req.seed is None else req.seed + choice,
                              stop=stops(req), stop_token_ids=tuple(req.stop_token_ids or ()),
                              ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top, **given)
    except ValueError as err:
        if req.seed is not None and str(err).startswith("invalid seed"):  # name the seed sent, not seed + choice
            raise bad_request(f"invalid seed: {req.seed} (choice i samples with seed + i, which must fit a signed "
                              "64-bit integer with room to spare)", "seed", "invalid_value") from None
        raise from_value_error(err) from None


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages for the chat template; content parts must be text (this is a text model)."""
    out = []
    for i, msg in enumerate(req.messages):
        _check_replayed_fields(i, msg)
        content = msg.content
        _check_content(i, msg)
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported",
                                      f"messages.{i}.content.{j}", "unsupported_parameter")
                texts.append(part["text"])
            content = "\n".join(texts)  # as vLLM: "".join glued the last word of a part to the next part's first
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content or ""})
    return out


def _check_content(i: int, msg: ChatMessage) -> None:
    """Only an assistant turn may come without content (OpenAI's replayed refusals and tool calls); any other
    message without text would reach the model as an empty turn the client never wrote."""
    if msg.role != "assistant" and (msg.content is None or msg.content == []):
        what = "is required" if msg.content is None else "must not be an empty list"
        raise bad_request(f"messages[{i}].content {what} for a {msg.role} message", f"messages.{i}.content",
                          "invalid_value")


def _check_replayed_fields(i: int, msg: ChatMessage) -> None:
    refused = {"tool_calls": (msg.tool_calls, "tool calls are"), "function_call": (msg.function_call,
               "function calls are"), "audio": (msg.audio, "audio is")}
    for name, (value, what) in refused.items():
        if value:  # null (and an empty list of tool calls) says there is nothing: fine
            raise bad_request(f"messages[{i}].{name}: {what} not supported by this server", f"messages.{i}.{name}",
                              "unsupported_parameter")


def check_model(requested: str | None, served: list[str]) -> None:
    if requested is not None and requested not in served:
        raise APIError(404, f"The model `{requested}` does not exist (this server serves {served})", "model",
                       "model_not_found")
