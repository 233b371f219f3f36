"""The HTTP routes: decode the request, hand it to the runtime, encode the answer.

The runtime runs each request (alone, or batched with others) in a worker thread, and the
answer is built and serialized there too, off the event loop.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service import schemas
from service.errors import (
    BadRequest,
    InvalidInput,
    InvalidParameter,
    TooManyImages,
    Unauthorized,
    UnsupportedMediaType,
)
from service.metrics import CONTENT_TYPE, Metrics
from service.preprocess import ImageInput, to_png
from service.runtime import LogLikelihood, ModelRunner, Posterior, Reconstruction, Runtime, Samples
from service.settings import Settings


class FastJSONResponse(JSONResponse):
    """JSON written by orjson, numpy arrays and scalars included: the answers hold the runtime's
    float32 arrays as they are, written in float32's shortest round-trip form (a 4-component
    /encode answer in 11 us instead of 27 us through lists and pydantic's serializer, and 4.4
    instead of 7.9 KB). Not-a-number and infinities become null, as strict JSON needs."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_tolist, option=orjson.OPT_SERIALIZE_NUMPY)


def _tolist(value: Any) -> Any:
    """What orjson leaves to ``default``: a numpy array that is not C-contiguous (a view)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---------------------------------------------------------------- dependencies
# All async: FastAPI runs a plain `def` dependency in a worker thread, a hop per dependency per
# request that costs more than these functions do.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


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


@dataclass(frozen=True)
class Target:
    """What an inference request runs on: the runtime, the model asked for, the settings."""

    runtime: Runtime
    runner: ModelRunner
    settings: Settings


MODEL_DESCRIPTION = "model name (default: the server's default model)"
# ?model= as FastAPI would document a `str | None` query parameter; InferenceRoute reads it
MODEL_PARAMETER: dict[str, Any] = {
    "name": "model",
    "in": "query",
    "required": False,
    "schema": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "description": MODEL_DESCRIPTION,
        "title": "Model",
    },
    "description": MODEL_DESCRIPTION,
}


class InferenceRoute(APIRoute):
    """An inference route: checks the API key, then looks up the model asked for (``?model=``),
    before FastAPI reads the route's own parameters, so that a 401 and then a 404 come first.

    Not as FastAPI dependencies: resolving a dependency, or even one query parameter, costs
    FastAPI 10-20 us per request; without them /encode has none to resolve at all.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            state = request.app.state
            require_api_key(request, state.settings)
            runner = state.runtime.model(request.query_params.get("model"))
            request.state.model_name = runner.name  # the metrics' model label, a loaded name
            request.state.target = Target(state.runtime, runner, state.settings)
            return await handler(request)

        return handle


def target_of(request: Request) -> Target:
    """The target :class:`InferenceRoute` found for the request."""
    return request.state.target  # type: ignore[no-any-return]


Seed = Annotated[int | None, Query(ge=0, description="random seed, for reproducible draws")]


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


# ---------------------------------------------------------------- inference routes

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "malformed body or undecodable image",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body over the size limit",
        415: "not an image in a supported format, or an unsupported body type",
        422: "too many pixels or images, wrong shape, parameter out of range",
        503: "not ready",
    }.items()
}

inference = APIRouter(route_class=InferenceRoute, responses=ERROR_RESPONSES)
INFERENCE_OPENAPI = {**schemas.IMAGE_REQUEST_BODY, "parameters": [MODEL_PARAMETER]}


@inference.post("/encode", response_model=schemas.EncodeResponse, openapi_extra=INFERENCE_OPENAPI)
async def encode(request: Request) -> Response:
    """The mixture posterior of each image: every component's weight, mean and variance."""
    target = target_of(request)
    images = await read_images(request, target.settings)
    runner = target.runner

    def answer(posterior: Posterior) -> Response:  # in a worker thread, serialization included
        return FastJSONResponse(schemas.encode_answer(runner, posterior))

    return await target.runtime.encode(runner, images, answer)


@inference.post(
    "/reconstruct",
    response_model=schemas.ReconstructResponse,
    openapi_extra=INFERENCE_OPENAPI,
    responses={200: {"content": {"image/png": {}}, "description": "PNG, or JSON on request"}},
)
async def reconstruct(
    request: Request,
    mode: Annotated[Literal["mean", "sample"], Query(description="mixture mean or a sample")] = (
        "mean"
    ),
    format: Annotated[Literal["png", "json"], Query(description="answer type")] = "png",
    seed: Seed = None,
) -> Response:
    """Decode each image's posterior mean (or a sample) to pixel probabilities."""
    target = target_of(request)
    images = await read_images(request, target.settings)
    runner = target.runner
    if format == "png" and len(images) != 1:
        raise InvalidParameter("format=png answers one image; send one, or ask format=json")

    def answer(result: Reconstruction) -> Response:
        if format == "png":
            png = to_png(result.probabilities[0])
            return Response(png, media_type="image/png", headers={"X-Recmix-Model": runner.name})
        return FastJSONResponse(schemas.reconstruct_answer(runner, result, mode))

    return await target.runtime.reconstruct(runner, images, mode, seed, answer)


@inference.post("/sample", response_model=schemas.SampleResponse, openapi_extra=INFERENCE_OPENAPI)
async def sample(
    request: Request,
    n: Annotated[int, Query(ge=1, description="samples per image")] = 1,
    decode: Annotated[bool, Query(description="also decode every sample")] = False,
    image_format: Annotated[Literal["png", "json"], Query(description="decoded image type")] = (
        "png"
    ),
    seed: Seed = None,
) -> Response:
    """Latent samples z ~ Q(z|x) per image, each with the component it came from."""
    target = target_of(request)
    images = await read_images(request, target.settings)
    runner = target.runner

    def answer(samples: Samples) -> Response:
        return FastJSONResponse(schemas.sample_answer(runner, samples, image_format))

    return await target.runtime.sample(runner, images, n, decode, seed, answer)


@inference.post("/loglik", response_model=schemas.LoglikResponse, openapi_extra=INFERENCE_OPENAPI)
async def loglik(
    request: Request,
    num_samples: Annotated[
        int | None, Query(ge=1, description="importance samples S (default: the server's)")
    ] = None,
    seed: Seed = None,
) -> Response:
    """Importance-sampled log p(x) with the mixture as proposal, and the ELBO."""
    target = target_of(request)
    images = await read_images(request, target.settings)
    runner = target.runner

    def answer(estimate: LogLikelihood) -> Response:
        return FastJSONResponse(schemas.loglik_answer(runner, estimate))

    return await target.runtime.log_likelihood(runner, images, num_samples, seed, answer)


# ---------------------------------------------------------------- models, health, metrics

operations = APIRouter()


@operations.get("/models", response_model=schemas.ModelsResponse)
def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    """Every loaded model, from its manifest, with the execution provider in use."""
    return {
        "default_model": runtime.default_model,
        "models": [
            schemas.model_summary(r, r.name == runtime.default_model)
            for r in runtime.models.values()
        ],
    }


@operations.get(
    "/models/{name}",
    response_model=schemas.ModelDetail,
    responses={404: {"model": schemas.ErrorResponse, "description": "unknown model"}},
)
def get_model_detail(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    """One model: its summary and its whole manifest."""
    runner = runtime.model(name)
    detail = schemas.model_summary(runner, runner.name == runtime.default_model)
    detail["manifest"] = runner.manifest.model_dump(mode="json")
    return detail


@operations.get("/healthz", response_model=schemas.Health)
def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@operations.get(
    "/readyz",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "starting or draining"}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready: every model loaded and warmed up, and not draining."""
    body = {"status": runtime.state, "models": sorted(runtime.models)}
    return JSONResponse(body, status_code=200 if runtime.ready else 503)


@operations.get("/metrics", response_class=Response)
def metrics(registry: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(registry.render(), media_type=CONTENT_TYPE)
