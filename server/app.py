"""The HTTP layer: the OpenAI API over the adaptive service (FastAPI). No torch is imported here.

The model loads in a background thread when the app starts, so the server answers at once: 503 (``/health``
and every ``/v1`` route) until the engine is ready, and again should its thread ever stop. A load that fails
(a damaged checkpoint) answers 503 with the reason, or, given ``on_load_error`` (`uniql serve`), ends the server.
``--api-key`` guards ``/v1`` (``Authorization: Bearer`` or ``x-api-key``); ``/health`` and ``/metrics`` stay public,
as in vLLM. The rung a request ran at is returned in the header ``x-uniql-prune-rate`` and in ``usage.prune_rate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from uniql.runtime.scheduler import EngineStopped, QueueFull

from . import errors, responses, schema
from .config import ServerConfig
from .errors import APIError
from .metrics import ServerMetrics
from .monitor import Monitor
from .service import AdaptiveService

log = logging.getLogger(__name__)
LOAD_THREAD = "uniql-load"  # the model loading thread (serve.py tells a stop during loading by it)
DEFAULT_MODEL_NAME = "smollm2-135m-uniql"


def served_names(cfg: ServerConfig) -> list[str]:
    if cfg.served_model_name:
        return list(cfg.served_model_name)
    return [Path(cfg.ckpt).name if cfg.ckpt else DEFAULT_MODEL_NAME]


class AppState:
    """What the routes share: config, metrics, and the service once the model has loaded."""

    def __init__(self, cfg: ServerConfig, loader: Callable[[], object], monitor_factory: Callable[[], Monitor],
                 on_load_error: Callable[[Exception], None] | None = None):
        self.cfg, self.loader, self.monitor_factory = cfg, loader, monitor_factory
        self.on_load_error = on_load_error  # None: keep answering 503 with the reason (an app run in-process)
        self.names = served_names(cfg)
        self.metrics = ServerMetrics(self.names[0])
        self.service: AdaptiveService | None = None
        self.monitor: Monitor | None = None
        self.load_error: str | None = None
        self.created = int(time.time())

    def load(self) -> None:
        backend = None
        try:
            backend = self.loader()
            self.monitor = self.monitor_factory()
            self.service = AdaptiveService(backend, self.cfg, self.metrics, self.monitor)
            self.monitor.start()
            log.info("uniql: serving %s in %s (prune rates %s)", self.names[0], backend.dtype, list(backend.rates))
        except Exception as err:  # never silently: 503 with the reason, or `uniql serve` stops (on_load_error)
            if self.on_load_error is None or not isinstance(err, ValueError | OSError):
                log.exception("loading the model failed")  # a bad input (a damaged checkpoint) is one line
            else:  # ... but a ValueError may also be a bug: its traceback stays one `--log-level debug` away
                log.debug("loading the model failed", exc_info=True)
            self.load_error = f"{type(err).__name__}: {err}"
            self.service = None
            if backend is not None:  # nothing will ever serve from it: free its engine thread and memory now
                self._shut_down(backend)
            if self.on_load_error is not None:
                self.on_load_error(err)

    @staticmethod
    def _shut_down(backend) -> None:
        try:
            backend.shutdown()
        except Exception:
            log.exception("shutting down the backend of a failed load failed")

    def ready(self) -> AdaptiveService:
        if self.service is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, None, "model_not_ready")
        if not self.service.backend.alive:  # its requests would wait forever: say so instead
            raise _engine_dead()
        return self.service

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.service is not None:
            self.service.backend.shutdown()


def create_app(cfg: ServerConfig, loader: Callable[[], object], monitor_factory: Callable[[], Monitor],
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """``on_load_error(err)``, if given, is called on the loading thread when the model fails to load."""
    state = AppState(cfg, loader, monitor_factory, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name=LOAD_THREAD, daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="UniQL", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.uniql = state
    errors.install(app, state.metrics.observe_error)
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    _routes(app, state)
    return app


def _check_key(state: AppState, request: Request) -> None:
    key = state.cfg.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given != key:
        raise APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer KEY`", None,
                       "invalid_api_key")


async def _body(request: Request) -> dict:
    try:
        return await request.json()
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the JSON parser can follow
        raise errors.bad_request("We could not parse the JSON body of your request (it must be JSON)", None,
                                 "invalid_json") from None


def _routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health")
    async def health():
        service = state.ready()
        return {"status": "ok", "model": state.names[0], **service.state()}

    # load balancers' and curl -I's probes; its own route (out of the OpenAPI schema): one route with both methods
    # gave the schema a duplicate operation id
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.exposition()
        return Response(data, media_type=content_type)

    def card(service: AdaptiveService, name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "uniql",
                "root": state.cfg.ckpt or name, "max_model_len": service.backend.max_model_len,
                "prune_rates": list(service.backend.rates)}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(state, request)
        service = state.ready()
        return {"object": "list", "data": [card(service, name) for name in state.names]}

    # the Models API's retrieve (`client.models.retrieve`); `:path` because served names may hold a slash
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _check_key(state, request)
        service = state.ready()
        schema.check_model(model_id, state.names)
        return card(service, model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _check_key(state, request)
        service = state.ready()
        req = schema.parse(schema.ChatRequest, await _body(request))
        schema.check_model(req.model, state.names)
        try:  # tokenized off the event loop: see _prompt_ids
            ids = await asyncio.to_thread(service.backend.encode_chat, schema.chat_messages(req))
        except ValueError as err:
            raise errors.bad_request(str(err), "messages") from None
        return await _generate(state, service, request, req, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        _check_key(state, request)
        service = state.ready()
        req = schema.parse(schema.CompletionRequest, await _body(request))
        schema.check_model(req.model, state.names)
        ids = await _prompt_ids(service, req.prompt)
        echo = await _echo_text(service, req.prompt, ids) if req.echo else ""
        return await _generate(state, service, request, req, ids, "text", echo)


async def _echo_text(service: AdaptiveService, prompt, ids: list[int]) -> str:
    """The prompt as ``echo`` returns it before the completion: the text sent, or token ids decoded."""
    prompt = _single_prompt(prompt)
    return prompt if isinstance(prompt, str) else await asyncio.to_thread(service.backend.decode_text, ids)


def _single_prompt(prompt):
    """A batch of one prompt (``["text"]`` or ``[[ids]]``) as that prompt; anything else as it came."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


async def _prompt_ids(service: AdaptiveService, prompt) -> list[int]:
    """One prompt: a string, a list of token ids, or a batch of one of either.

    Text is tokenized (as chat messages are) in a worker thread: the tokenizer releases the GIL, and a prompt of
    megabytes takes seconds, which on the event loop stalled every stream and /health (2.7 s for 4 MB)."""
    prompt = _single_prompt(prompt)
    if isinstance(prompt, str):
        ids = await asyncio.to_thread(service.backend.encode_text, prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < service.backend.vocab_size]
        if bad:
            raise errors.bad_request(f"prompt token id {bad[0]} is outside the vocabulary", "prompt", "invalid_value")
    else:
        raise errors.bad_request("this server takes one prompt per request (send several requests, or use n)",
                                 "prompt", "unsupported_parameter")
    if not ids:
        raise errors.bad_request("the prompt is empty", "prompt", "invalid_value")
    return ids


def _max_tokens(req, prompt_len: int, max_model_len: int, default: int, kind: str) -> int:
    field = "messages" if kind == "chat" else "prompt"
    room = max_model_len - prompt_len
    asked = schema.requested_max_tokens(req)
    if room < (1 if asked is None else asked):  # asked 0 (echo alone): a prompt filling the context fits
        want = f"{prompt_len} in the {field}" + ("" if asked is None else f", {asked} in the completion")
        raise errors.bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you "
                                 f"requested {prompt_len + (asked or 0)} tokens ({want}). Please reduce the length "
                                 "of the prompt or of max_tokens.", field, "context_length_exceeded")
    return min(default, room) if asked is None else asked


def _engine_dead() -> APIError:
    return APIError(503, "the engine has stopped; restart the server", None, "engine_dead")


async def _generate(state: AppState, service: AdaptiveService, request: Request, req, ids: list[int], kind: str,
                    echo: str = ""):
    """``echo``: text every choice starts with (a completion's prompt, echoed)."""
    max_tokens = _max_tokens(req, len(ids), service.backend.max_model_len, state.cfg.default_max_tokens, kind)
    if req.n > service.backend.max_choices:  # a 429 would tell the client to retry what can never fit
        raise errors.bad_request(f"n={req.n} is more than this server can ever hold at once "
                                 f"({service.backend.max_choices} sequences)", "n", "invalid_value")
    # built (and so checked) even when nothing will run: a bad temperature is a 400 with max_tokens 0 too
    params = [schema.sampling_params(req, max(max_tokens, 1), i) for i in range(req.n)]
    admission = await _admit(service, ids, params, req.prune_rate, max_tokens)
    headers = {"x-uniql-prune-rate": f"{admission.prune_rate:.2f}", "x-uniql-rung": str(admission.decision.rung)}
    backend = service.backend
    tokens = responses.TokenView(backend.token_text, backend.token_bytes) if params[0].logprobs else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        writer = responses.ChunkWriter(kind, state.names[0], tokens, include_usage)
        body = _stream(admission, writer, include_usage, state.metrics.observe_error, continuous, echo)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    choices = await _collect(request, admission, echo)
    if choices is None:  # the client went away: the requests were cancelled, nobody reads this
        return Response(status_code=499)
    failed = next((c for c in choices if c.finish_reason == "error"), None)
    if failed is not None:  # the other choices finished, but a response missing one would mislead
        raise errors.engine_error(_choice_error(failed, len(choices)))
    build = responses.chat_body if kind == "chat" else responses.completion_body
    rid = responses.new_id("chatcmpl" if kind == "chat" else "cmpl")
    return JSONResponse(build(rid, state.names[0], choices, admission.prompt_tokens, admission.prune_rate,
                              tokens), headers=headers)


async def _admit(service: AdaptiveService, ids: list[int], params: list, prune_rate: float | None,
                 max_tokens: int):
    if max_tokens == 0:  # echo alone: the prompt is the whole answer, the engine has nothing to do
        return service.echo_only(len(ids), len(params), prune_rate)
    try:
        return await service.admit(ids, params, prune_rate)
    except QueueFull as err:
        raise errors.queue_full(err.retry_after_s) from None
    except EngineStopped:  # it stopped after ready() looked: the same 503, not a 500
        raise _engine_dead() from None
    except ValueError as err:
        raise errors.from_value_error(err) from None


def _choice_error(choice: responses.ChoiceState, n: int) -> str:
    return choice.error if n == 1 else f"choice {choice.index}: {choice.error}"


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from several streams as they come; leaving early cancels all of them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        finally:
            await stream.aclose()
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, event = await queue.get()
            if event is None:
                open_streams -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, admission, echo: str = "") -> list[responses.ChoiceState] | None:
    """Every choice to its end, or None (all cancelled) if the client disconnects first."""
    choices = [responses.ChoiceState(i, text=[echo] if echo else []) for i in range(len(admission.streams))]

    async def gather() -> None:
        async for index, event in _merged(admission.streams):
            choices[index].add(event)

    work, watch = asyncio.create_task(gather()), asyncio.create_task(_wait_disconnect(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    for task in (work, watch):  # no-op for the one that finished
        task.cancel()
    await asyncio.gather(work, watch, return_exceptions=True)
    if work in done:
        work.result()
        return choices
    return None


async def _stream(admission, writer: responses.ChunkWriter, include_usage: bool,
                  on_error: Callable[[int], None], continuous: bool = False, echo: str = "") -> AsyncIterator[str]:
    """SSE: a role chunk per choice (chat), a chunk per text piece, the finish, the usage chunk, ``[DONE]``.

    A choice the engine fails ends with an error chunk in the OpenAI envelope instead of its finish chunk (the
    200 has gone out; the openai client raises on it); the other choices go on and the stream ends as usual.
    It counts once as a 500 in the error metric, as the same failure unstreamed would."""
    choices = [responses.ChoiceState(i) for i in range(len(admission.streams))]
    if continuous:  # vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far
        writer.usage_now = lambda: responses.usage(admission.prompt_tokens, choices, admission.prune_rate)
    if writer.chat:
        for c in choices:
            yield writer.role(c.index)
    elif echo:  # the echoed prompt first, as its own chunk per choice (vLLM sends it with the first token's text)
        for c in choices:
            yield writer.text(c.index, echo)
    failed = False
    async for index, event in _merged(admission.streams):
        choice = choices[index]
        choice.add(event)
        if event.finish_reason == "error":
            yield responses.sse(errors.engine_error(_choice_error(choice, len(choices))).body())
            if not failed:
                on_error(500)
            failed = True
            continue
        chunk = writer.event(choice, event)
        if chunk is not None:
            yield chunk
    if include_usage:
        yield writer.usage(responses.usage(admission.prompt_tokens, choices, admission.prune_rate))
    yield responses.sse("[DONE]")
