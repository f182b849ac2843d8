"""Errors in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Bad input is always a 400 (never FastAPI's 422, never a 500): request bodies are validated here, and FastAPI's
own validation handler is replaced so nothing slips through as a 422.
"""

from __future__ import annotations

import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return envelope(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error body; also sent as an SSE chunk when a streamed choice fails after the 200 went out."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(status, message, param, code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def queue_full(retry_after_s: float) -> APIError:
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, f"the server's request queue is full; retry in {seconds} s", None, "queue_full",
                    {"Retry-After": str(seconds)})


def engine_error(message: str | None) -> APIError:
    """A request the engine failed (non-finite logits, an exception in its step): the server's fault, not the
    client's, so a 500; the engine went on with the other requests."""
    return APIError(500, f"the engine failed this request: {message or 'unknown error'}", None, "engine_error")


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming its field (``messages.0.content``)."""
    found = [(e, _loc(e)) for e in err.errors()]
    first, loc = found[0]
    cut = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    param = ".".join(loc if cut is None else loc[:cut]) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return bad_request(f"unknown parameter: {param!r} (this server does not accept it)", param,
                           "unknown_parameter")
    if kind in ("json_invalid", "json_type"):
        return bad_request("We could not parse the JSON body of your request: it must be a JSON object", None,
                           "invalid_json")
    if cut is not None:  # a value none of a union's types took: the first member's complaint alone would mislead
        tags = dict.fromkeys(other[cut] for _, other in found if len(other) > cut and other[:cut] == loc[:cut])
        return bad_request(f"invalid type for {param!r}: expected one of {', '.join(tags)}", param, "invalid_type")
    return bad_request(f"invalid value for {param!r}: {first.get('msg', 'invalid')}", param, "invalid_value")


def _loc(error: dict) -> list[str]:
    return [str(p) for p in error.get("loc", ()) if p != "body"]


def _is_union_tag(part: str) -> bool:
    """Pydantic puts the member it tried into the location of a union's errors (``stop.list[str].0``); such a
    tag is no parameter a client sent, so the param stops before it (``stop``)."""
    return "[" in part or part in ("str", "int", "float", "bool")


_FIELD = re.compile(r"invalid (\w+)")


def from_value_error(err: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError of the engine (``SamplingParams`` names the field: ``invalid top_p: 0``) as a 400."""
    match = _FIELD.match(str(err))
    return bad_request(str(err), match.group(1) if match else default_param, "invalid_value")


def install(app: FastAPI, on_error=None) -> None:
    """Exception handlers: every error leaves in the envelope; ``on_error(status)`` counts those of /v1/ requests."""

    def send(request: Request, status: int, response: JSONResponse) -> JSONResponse:
        # API requests only: /health's 503s while the model loads (a container healthcheck polls it) and scanners'
        # 404s made the dashboard's error rate and error fraction spike at every start-up
        if on_error is not None and request.url.path.startswith("/v1/"):
            on_error(status)
        return response

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return send(request, err.status, err.response())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        api = from_validation_error(err)
        return send(request, 400, api.response())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        message = "unknown route" if err.status_code == 404 else str(err.detail)
        if err.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return send(request, err.status_code, error_response(err.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return send(request, 500, error_response(500, f"internal error: {type(err).__name__}: {err}"))
