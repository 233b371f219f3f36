"""The one place that maps errors to HTTP: statuses, error bodies, and the app's handlers.

The model and serving layers raise :class:`service.model.errors.RecmixError` subclasses and know
nothing of HTTP; :data:`HTTP_STATUS` gives each its status code. The native API answers
``{"error": {"code", "message", "details"?}}``; the Open Inference Protocol's routes (``/v2``)
answer ``{"error": message}``, as that protocol says. Client mistakes get a 4xx with a message
that says what to fix; anything unexpected is a 500 that names no internals (the traceback goes
to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.http.v2_tensors import TensorError
from service.model.errors import (
    BatchFailed,
    InvalidInput,
    InvalidParameter,
    ModelNotFound,
    NotReady,
    OverBudget,
    RecmixError,
    TooManyImages,
    TooManyPixels,
    UndecodableImage,
    UnsupportedMediaType,
)

log = logging.getLogger("recmix.service")


class BadRequest(RecmixError):
    """The request is malformed (bad JSON, bad base64, an empty multipart form, a bad tensor)."""

    code = "bad_request"


class Unauthorized(RecmixError):
    code = "unauthorized"


class PayloadTooLarge(RecmixError):
    code = "payload_too_large"


HTTP_STATUS: dict[type[RecmixError], int] = {
    BadRequest: 400,
    UndecodableImage: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    OverBudget: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    TooManyPixels: 422,
    TooManyImages: 422,
    InvalidParameter: 422,
    NotReady: 503,
    BatchFailed: 500,
    RecmixError: 500,
}

_STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed"}


def status_of(exc: RecmixError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def is_v2(path: str) -> bool:
    """Whether a path belongs to the Open Inference Protocol's routes."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def error_json(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    path: str = "",
    **details: Any,
) -> JSONResponse:
    """An error answer in the shape of the API ``path`` belongs to."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    body = {"error": message} if is_v2(path) else error_body(code, message, **details)
    return JSONResponse(body, status, headers=headers)


def error_response(exc: RecmixError, path: str) -> tuple[str, JSONResponse]:
    """The error code and the answer for an error raised on ``path``."""
    status = status_of(exc)
    # these two name no internals; any other 5xx gets a message that names none
    if status >= 500 and not isinstance(exc, NotReady | BatchFailed):
        log.error("internal error on %s: %s", path, exc.message)
        return "internal_error", error_json(
            status, "internal_error", "internal server error", path=path
        )
    return exc.code, error_json(status, exc.code, exc.message, path=path, **exc.details)


# Not a status of HTTP's own: nginx's "client closed request", for the request log and metrics
# only, since nobody reads the answer.
CLIENT_CLOSED_REQUEST = 499


def install_handlers(
    app: FastAPI,
    on_error: Callable[[Request, str], None],
    on_disconnect: Callable[[Request], None],
) -> None:
    """Answer every error the routes raise as JSON; ``on_error(request, code)`` counts it, and
    ``on_disconnect(request)`` counts a client gone before its body was read."""

    def respond(
        request: Request,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> JSONResponse:
        on_error(request, code)
        return error_json(status, code, message, headers, request.url.path, **details)

    @app.exception_handler(RecmixError)
    async def _service_error(request: Request, exc: RecmixError) -> JSONResponse:
        code, response = error_response(exc, request.url.path)
        on_error(request, code)
        return response

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # a client's choice, not a failure of the service: one line, no traceback, no 5xx
        log.info("client disconnected before its request body was read: %s", request.url.path)
        on_disconnect(request)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(TensorError)
    async def _tensor_error(request: Request, exc: TensorError) -> JSONResponse:
        return respond(request, 400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "location": ".".join(str(p) for p in err.get("loc", ())),
                "message": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        return respond(request, 422, "invalid_parameter", summary, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STARLETTE_CODES.get(exc.status_code, "http_error")
        return respond(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return respond(request, 500, "internal_error", "internal server error")
