"""The native API's inference routes: ``POST /encode``, ``/reconstruct``, ``/sample``, ``/loglik``.

Each endpoint is declared once, as an :class:`Endpoint`: its query parameters
(:class:`service.http.params.Param`), its handler, and its response model. :func:`routes` makes
them Starlette routes of the app's own router (which answers 405 with ``Allow``), and :mod:`service.http.openapi` documents them from the same declarations.
These are plain request-to-response routes, without FastAPI's dependency solver and response
validation: with batching on, that machinery was about half of the event loop's time per
``/encode``, and the event loop is what a batching server runs out of first. The checks run in a
fixed order: API key, model, query parameters, body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, SecretStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route, get_route_path
from starlette.types import Receive, Scope, Send

from service.http import schemas
from service.http.bodies import read_images, require_api_key
from service.http.params import SEED, Param, parse_params
from service.http.responses import FastJSONResponse
from service.model.errors import InvalidParameter, OverBudget
from service.model.likelihood import LogLikelihood
from service.model.mixture import Posterior
from service.model.preprocess import ImageInput, to_png
from service.model.runner import ModelRunner
from service.serving.jobs import Reconstruction, Samples
from service.serving.runtime import Runtime


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
    # an upper bound of the answer's size in bytes, from the model, the images and parameters
    answer_bytes: Callable[[ModelRunner, int, dict[str, Any]], int] = lambda r, n, p: 0


# Bytes per value in a JSON answer, at most: a float64 in shortest form with its comma (a
# float32 takes fewer), and a pixel of a PNG in base64 with its share of the headers.
JSON_FLOAT = 24
PNG_PIXEL = 1.4


def _pixels(runner: ModelRunner) -> int:
    c, h, w = runner.input_shape
    return c * h * w


def _encode_bytes(runner: ModelRunner, images: int, params: dict[str, Any]) -> int:
    return images * runner.mixture_order * (2 * runner.manifest.latent_dim * JSON_FLOAT + 64)


def _reconstruct_bytes(runner: ModelRunner, images: int, params: dict[str, Any]) -> int:
    per_pixel = JSON_FLOAT if params["format"] == "json" else PNG_PIXEL
    return int(images * (_pixels(runner) * per_pixel + 256))


def _sample_bytes(runner: ModelRunner, images: int, params: dict[str, Any]) -> int:
    per_draw = runner.manifest.latent_dim * JSON_FLOAT + 64
    if params["decode"]:
        per_draw += int(
            _pixels(runner) * (JSON_FLOAT if params["image_format"] == "json" else PNG_PIXEL)
        )
    return images * params["n"] * per_draw


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
        answer_bytes=_encode_bytes,
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
        answer_bytes=_reconstruct_bytes,
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
        answer_bytes=_sample_bytes,
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


class _Serve:
    """One endpoint as a plain ASGI app, the route's endpoint: it takes the request, runs the
    checks in order and answers. An error propagates to the app's exception middleware and its
    handlers (``service.http.errors``), as any route's does."""

    def __init__(
        self,
        endpoint: Endpoint,
        runtime: Runtime,
        api_key: SecretStr | None,
        max_images: int,
        max_answer_bytes: int,
    ) -> None:
        self.endpoint = endpoint
        self.runtime = runtime
        self.api_key = api_key
        self.max_images = max_images
        self.max_answer_bytes = max_answer_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        require_api_key(request, self.api_key)
        # the standard library's parse, as Starlette's QueryParams does, without building its
        # multi-dict (about 3 % of the event loop's time per /encode under load); the last of a
        # repeated name wins, as there
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        runner = self.runtime.model(query.get("model"))
        scope.setdefault("state", {})["model_name"] = (
            runner.name
        )  # the metrics' model label, a loaded name
        params = parse_params(self.endpoint.params, query)
        images = await read_images(request, self.max_images)
        estimate = self.endpoint.answer_bytes(runner, len(images), params)
        if estimate > self.max_answer_bytes:
            raise OverBudget(
                f"the answer would be about {estimate} bytes, more than the limit of "
                f"{self.max_answer_bytes}: send fewer images per request, or ask for less "
                "(a smaller n, no decoded images, or PNG instead of JSON pixels)",
                limit=self.max_answer_bytes,
            )
        call = Call(self.runtime, runner, images, params)
        response = await self.endpoint.handler(call)
        await response(scope, receive, send)


class StaticRoute(Route):
    """A route of a fixed path, matched by comparing the path instead of a regular expression
    and a copy of the path parameters (there are none): the router tries these routes first for
    every request, and under load the general match was about 2 % of the event loop's time."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or get_route_path(scope) != self.path:
            return Match.NONE, {}
        child_scope = {"endpoint": self.endpoint, "path_params": {}}
        allowed = self.methods is None or scope["method"] in self.methods
        return (Match.FULL if allowed else Match.PARTIAL), child_scope


def routes(
    runtime: Runtime, api_key: SecretStr | None, max_images: int, max_answer_bytes: int
) -> list[Route]:
    """The inference endpoints as routes of the app's router, POST only (the router answers
    another method with a 405 and ``Allow: POST``). Each route's endpoint is an ASGI app
    (:class:`_Serve`), which Starlette calls as it is, without wrapping it in a request-response
    adapter and a second exception handler of its own."""
    return [
        StaticRoute(
            e.path,
            _Serve(e, runtime, api_key, max_images, max_answer_bytes),
            methods=["POST"],
            name=e.path.strip("/"),
            include_in_schema=False,
        )
        for e in ENDPOINTS
    ]
