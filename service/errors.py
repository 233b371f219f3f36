"""Every error the service answers with, and the one place that maps them to HTTP.

The runtime and the preprocessing raise :class:`ServiceError` subclasses and know nothing of HTTP;
:data:`HTTP_STATUS` gives each its status code, and :func:`install_handlers` turns them (and
FastAPI's own validation errors) into ``{"error": {"code": ..., "message": ...}}``. Client mistakes
get a 4xx with a message that says what to fix; anything unexpected is a 500 that names no
internals (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("recmix.service")


class ServiceError(Exception):
    """Base of every error the service reports to a client; ``code`` is stable, for machines."""

    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(ServiceError):
    """The request is malformed (bad JSON, bad base64, an empty multipart form)."""

    code = "bad_request"


class UndecodableImage(ServiceError):
    """The bytes claim a supported image format but cannot be decoded (truncated, corrupt)."""

    code = "undecodable_image"


class Unauthorized(ServiceError):
    code = "unauthorized"


class ModelNotFound(ServiceError):
    code = "model_not_found"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """Not an image in a supported format, or a request body type the endpoint does not take."""

    code = "unsupported_media_type"


class InvalidInput(ServiceError):
    """A decoded input the model cannot take: wrong shape, values out of range, wrong size."""

    code = "invalid_input"


class TooManyPixels(ServiceError):
    """An image larger than the pixel limit (a decompression-bomb guard), refused undecoded."""

    code = "too_many_pixels"


class TooManyImages(ServiceError):
    code = "too_many_images"


class InvalidParameter(ServiceError):
    """A query parameter outside the range the settings allow."""

    code = "invalid_parameter"


class NotReady(ServiceError):
    code = "not_ready"


class BatchFailed(ServiceError):
    """The batched run a request joined failed: every request of that batch gets this."""

    code = "batch_failed"


HTTP_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    UndecodableImage: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    TooManyPixels: 422,
    TooManyImages: 422,
    InvalidParameter: 422,
    NotReady: 503,
    BatchFailed: 500,
    ServiceError: 500,
}

_STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed"}


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def error_json(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    """An error answer: ``{"error": {"code", "message", "details"?}}``."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(code, message, **details), status, headers=headers)


def error_response(exc: ServiceError, path: str) -> tuple[str, JSONResponse]:
    """The error code and the answer for a :class:`ServiceError` raised on ``path``."""
    status = status_of(exc)
    # these two name no internals; any other 5xx gets a message that names none
    if status >= 500 and not isinstance(exc, NotReady | BatchFailed):
        log.error("internal error on %s: %s", path, exc.message)
        return "internal_error", error_json(status, "internal_error", "internal server error")
    return exc.code, error_json(status, exc.code, exc.message, **exc.details)


def install_handlers(app: FastAPI, on_error: Callable[[str, str], None]) -> None:
    """Answer every error FastAPI's routes raise as JSON; ``on_error(path, code)`` counts it."""

    def respond(request: Request, status: int, code: str, message: str, **details: Any):
        on_error(request.url.path, code)
        return error_json(status, code, message, **details)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        code, response = error_response(exc, request.url.path)
        on_error(request.url.path, code)
        return response

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
        return respond(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return respond(request, 500, "internal_error", "internal server error")
