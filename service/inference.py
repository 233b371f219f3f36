"""The inference endpoints (``POST /encode``, ``/reconstruct``, ``/sample``, ``/loglik``), served by
an ASGI router of their own in front of FastAPI's.

Every request of these four pays for FastAPI's request machinery (routing through the included
routers, the request/response wrappers, the dependency solver, the exception middleware) once
more than it needs: with batching on, that machinery was about half of the event loop's time
per ``/encode`` request, and the event loop is what a batching server runs out of first. So
:class:`InferenceRouter` answers these paths itself, with the same checks in the same order (API
key, then model, then query parameters, then body), the same error bodies, and the service's
metrics and body-size limit around it, and passes every other request on to FastAPI.

Each endpoint is declared once, as an :class:`Endpoint`: its query parameters (:class:`Param`,
parsed and range-checked here), its handler, and its response model; :func:`openapi_paths`
documents them from the same declarations, so ``/openapi.json`` and ``/docs`` list them as they
are served.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import schemas
from service.api import FastJSONResponse
from service.errors import (
    BadRequest,
    InvalidInput,
    InvalidParameter,
    ServiceError,
    TooManyImages,
    Unauthorized,
    UnsupportedMediaType,
    error_json,
    error_response,
)
from service.preprocess import ImageInput, to_png
from service.runtime import (
    LogLikelihood,
    ModelRunner,
    Posterior,
    Reconstruction,
    Runtime,
    Samples,
)
from service.settings import Settings

log = logging.getLogger("recmix.service")


# ---------------------------------------------------------------- query parameters

_INTEGER = re.compile(r"[+-]?\d+")
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class Param:
    """One query parameter: its type, default, bounds or choices, and description."""

    name: str
    type: Literal["integer", "boolean", "string"]
    description: str
    default: Any = None
    minimum: int | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> Any:
        """The value of ``raw``, or ValueError with what is wrong with it."""
        if self.type == "integer":
            if not _INTEGER.fullmatch(raw.strip()):
                raise ValueError("Input should be a valid integer")
            value = int(raw)
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"Input should be greater than or equal to {self.minimum}")
            return value
        if self.type == "boolean":
            word = raw.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise ValueError("Input should be a valid boolean (true or false)")
        if self.choices and raw not in self.choices:
            raise ValueError("Input should be " + " or ".join(f"'{c}'" for c in self.choices))
        return raw

    def openapi(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.default is None:
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema["default"] = self.default
        schema["title"] = self.name.replace("_", " ").title()
        schema["description"] = self.description
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": self.description,
        }


MODEL = Param("model", "string", "model name (default: the server's default model)")
SEED = Param("seed", "integer", "random seed, for reproducible draws", minimum=0)


def parse_params(params: tuple[Param, ...], query: dict[str, str]) -> dict[str, Any]:
    """The endpoint's parameters from the query (unknown names are ignored), or a 422 naming
    every one that is wrong."""
    values: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for param in params:
        raw = query.get(param.name)
        if raw is None:
            values[param.name] = param.default
            continue
        try:
            values[param.name] = param.parse(raw)
        except ValueError as exc:
            problems.append({"location": f"query.{param.name}", "message": str(exc)})
    if problems:
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        raise InvalidParameter(summary, problems=problems)
    return values


# ---------------------------------------------------------------- the request body


async def read_images(request: Request, settings: Settings) -> list[ImageInput]:
    """The images of a request body: multipart files, JSON, or one raw image."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        images = await _read_multipart(request, settings.max_images_per_request)
    elif media == "application/json" or media.endswith("+json"):
        images = _read_json(await request.body())
    elif media.startswith("image/") or media == "application/octet-stream":
        images = [await request.body()]
    else:
        raise UnsupportedMediaType(
            f"unsupported request body type {media or '(none)'!r}: send multipart/form-data "
            "files, application/json with an 'images' list, or one image/* body"
        )
    if not images:
        raise InvalidInput("the request holds no image")
    if len(images) > settings.max_images_per_request:
        raise TooManyImages(
            f"{len(images)} images in one request; the limit is {settings.max_images_per_request}"
        )
    return images


async def _read_multipart(request: Request, max_files: int) -> list[ImageInput]:
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except (MultiPartException, HTTPException) as exc:  # Starlette wraps the first in the second
        message = str(getattr(exc, "detail", exc))
        if "Too many files" in message:
            raise TooManyImages(f"too many files; the limit is {max_files}") from exc
        raise BadRequest(f"malformed multipart body: {message}") from exc
    try:
        return [
            await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


def _read_json(body: bytes) -> list[ImageInput]:
    try:
        payload = schemas.ImagesRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise BadRequest("the body is not valid JSON") from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(
            f"expected {{'images': [{{'base64' | 'pixels': ...}}]}}: {problems}"
        ) from exc
    return [item.to_input() for item in payload.images]


def require_api_key(request: Request, settings: Settings) -> None:
    """With an API key set, inference needs it as ``X-API-Key`` or ``Authorization: Bearer``."""
    if settings.api_key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    expected = settings.api_key.get_secret_value()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(
            "missing or wrong API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
        )


# ---------------------------------------------------------------- the endpoints


@dataclass(frozen=True)
class Call:
    """One inference request, checked: the model it runs on, its images, its parameters."""

    runtime: Runtime
    runner: ModelRunner
    images: list[ImageInput]
    params: dict[str, Any]


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    summary: str
    description: str
    handler: Handler
    response_model: type[BaseModel]
    params: tuple[Param, ...] = ()
    success_content: dict[str, Any] = field(default_factory=dict)


async def encode(call: Call) -> Response:
    runner = call.runner

    def answer(posterior: Posterior) -> Response:  # in a worker thread, serialization included
        return FastJSONResponse(schemas.encode_answer(runner, posterior))

    return await call.runtime.encode(runner, call.images, answer)


async def reconstruct(call: Call) -> Response:
    runner, mode, format = call.runner, call.params["mode"], call.params["format"]
    if format == "png" and len(call.images) != 1:
        raise InvalidParameter("format=png answers one image; send one, or ask format=json")

    def answer(result: Reconstruction) -> Response:
        if format == "png":
            png = to_png(result.probabilities[0])
            return Response(png, media_type="image/png", headers={"X-Recmix-Model": runner.name})
        return FastJSONResponse(schemas.reconstruct_answer(runner, result, mode))

    return await call.runtime.reconstruct(runner, call.images, mode, call.params["seed"], answer)


async def sample(call: Call) -> Response:
    runner, params = call.runner, call.params

    def answer(samples: Samples) -> Response:
        return FastJSONResponse(schemas.sample_answer(runner, samples, params["image_format"]))

    return await call.runtime.sample(
        runner, call.images, params["n"], params["decode"], params["seed"], answer
    )


async def loglik(call: Call) -> Response:
    runner = call.runner

    def answer(estimate: LogLikelihood) -> Response:
        return FastJSONResponse(schemas.loglik_answer(runner, estimate))

    return await call.runtime.log_likelihood(
        runner, call.images, call.params["num_samples"], call.params["seed"], answer
    )


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/encode",
        "Encode",
        "The mixture posterior of each image: every component's weight, mean and variance.",
        encode,
        schemas.EncodeResponse,
    ),
    Endpoint(
        "/reconstruct",
        "Reconstruct",
        "Decode each image's posterior mean (or a sample) to pixel probabilities.",
        reconstruct,
        schemas.ReconstructResponse,
        (
            Param("mode", "string", "mixture mean or a sample", "mean", choices=("mean", "sample")),
            Param("format", "string", "answer type", "png", choices=("png", "json")),
            SEED,
        ),
        {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    ),
    Endpoint(
        "/sample",
        "Sample",
        "Latent samples z ~ Q(z|x) per image, each with the component it came from.",
        sample,
        schemas.SampleResponse,
        (
            Param("n", "integer", "samples per image", 1, minimum=1),
            Param("decode", "boolean", "also decode every sample", False),
            Param("image_format", "string", "decoded image type", "png", choices=("png", "json")),
            SEED,
        ),
    ),
    Endpoint(
        "/loglik",
        "Loglik",
        "Importance-sampled log p(x) with the mixture as proposal, and the ELBO.",
        loglik,
        schemas.LoglikResponse,
        (
            Param(
                "num_samples",
                "integer",
                "importance samples S (default: the server's)",
                minimum=1,
            ),
            SEED,
        ),
    ),
)
INFERENCE_PATHS = frozenset(e.path for e in ENDPOINTS)


# ---------------------------------------------------------------- the router


class InferenceRouter:
    """ASGI middleware: serves the inference endpoints, passes everything else to ``app``.

    Sits inside the service's metrics and body-limit middleware (so both see these requests as
    they see any other) and outside FastAPI's routing. Errors are answered here, with the same
    bodies and error counts as FastAPI's handlers give the other routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        runtime: Runtime,
        settings: Settings,
        on_error: Callable[[str, str], None],
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = settings
        self.on_error = on_error
        self.endpoints = {e.path: e for e in ENDPOINTS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            if scope["type"] == "http" and scope["path"].rstrip("/") in self.endpoints:
                # as FastAPI's routes do: a 307 to the path without the slash, method kept
                url = Request(scope).url
                await RedirectResponse(url.replace(path=url.path.rstrip("/")))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            self.on_error(endpoint.path, "method_not_allowed")
            response: Response = error_json(
                405, "method_not_allowed", "Method Not Allowed", headers={"Allow": "POST"}
            )
        else:
            try:
                response = await self.serve(endpoint, Request(scope, receive))
            except ServiceError as exc:
                code, response = error_response(exc, endpoint.path)
                self.on_error(endpoint.path, code)
            except Exception:
                log.exception("unexpected error on %s", endpoint.path)
                self.on_error(endpoint.path, "internal_error")
                response = error_json(500, "internal_error", "internal server error")
        await response(scope, receive, send)

    async def serve(self, endpoint: Endpoint, request: Request) -> Response:
        query = dict(
            parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        )
        require_api_key(request, self.settings)
        runner = self.runtime.model(query.get("model"))
        request.state.model_name = runner.name  # the metrics' model label, a loaded name
        params = parse_params(endpoint.params, query)
        images = await read_images(request, self.settings)
        return await endpoint.handler(Call(self.runtime, runner, images, params))


# ---------------------------------------------------------------- OpenAPI

ERROR_DESCRIPTIONS = {
    400: "malformed body or undecodable image",
    401: "missing or wrong API key",
    404: "unknown model",
    405: "not a POST",
    413: "body over the size limit",
    415: "not an image in a supported format, or an unsupported body type",
    422: "too many pixels or images, wrong shape, parameter out of range",
    503: "not ready",
}


def openapi_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference endpoints' OpenAPI path items, and the component schemas they refer to."""
    mode: JsonSchemaMode = "serialization"
    models = [(e.response_model, mode) for e in ENDPOINTS] + [(schemas.ErrorResponse, mode)]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    error_ref = refs[(schemas.ErrorResponse, mode)]
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        content = {"application/json": {"schema": refs[(endpoint.response_model, mode)]}}
        responses: dict[str, Any] = {
            "200": {
                "description": "Successful Response",
                "content": {**content, **endpoint.success_content},
            }
        }
        for status, text in ERROR_DESCRIPTIONS.items():
            responses[str(status)] = {
                "description": text,
                "content": {"application/json": {"schema": error_ref}},
            }
        name = endpoint.path.strip("/")
        paths[endpoint.path] = {
            "post": {
                "summary": endpoint.summary,
                "description": endpoint.description,
                "operationId": f"{name}_{name}_post",
                "parameters": [p.openapi() for p in (MODEL, *endpoint.params)],
                **schemas.IMAGE_REQUEST_BODY,
                "responses": responses,
            }
        }
    return paths, top.get("$defs", {})
