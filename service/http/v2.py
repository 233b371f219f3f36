"""The Open Inference Protocol (KServe v2, as Triton and Seldon MLServer speak it), REST.

Beside the native API, on the same runtime: the same models, batching and API key. Each served
model is one v2 model with one input, ``x`` (``FP32`` intensities in [0, 1], or ``UINT8`` levels
0-255), ``[batch, C, H, W]`` at the model's size, preprocessed from there on as its manifest says
(binarization, value range). Its outputs are computed only when asked for by name:

- ``means``, ``variances`` ``[batch, M, D]`` (FP32) and ``weights`` ``[batch, M]`` (FP64): the
  mixture posterior, as ``/encode`` gives it;
- ``reconstruction`` ``[batch, C, H, W]`` (FP32): pixel probabilities decoded from the mixture
  mean, as ``/reconstruct?mode=mean``;
- ``log_likelihood`` and ``elbo`` ``[batch]`` (FP64): as ``/loglik``, with the request parameters
  ``num_samples`` and ``seed`` (the same seed gives the same answer as ``/loglik``).

A request that names no outputs gets the posterior (``means``, ``variances``, ``weights``).
Tensors travel as JSON or, with the binary tensor data extension, as raw bytes after a JSON
header (what ``tritonclient.http`` sends by default). Errors are ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from service.http.bodies import require_api_key
from service.http.errors import BadRequest
from service.http.v2_tensors import InferRequest, encode_infer_response, parse_infer_request
from service.model.errors import InvalidInput, InvalidParameter, ModelNotFound, TooManyImages
from service.model.preprocess import Prepared, preprocess_tensor
from service.model.runner import ModelRunner
from service.serving.runtime import Runtime
from service.settings import Settings

SERVER_NAME = "recmix"
EXTENSIONS = ["binary_tensor_data"]
INPUT = "x"
INPUT_DATATYPES = ("FP32", "UINT8")
POSTERIOR = ("means", "variances", "weights")
OUTPUTS = (*POSTERIOR, "reconstruction", "log_likelihood", "elbo")
HEADER_LENGTH = "inference-header-content-length"

INFER_EXAMPLE = """\
```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
x = httpclient.InferInput("x", [1, 1, 28, 28], "UINT8")
x.set_data_from_numpy(image.reshape(1, 1, 28, 28).astype(np.uint8))  # binary by default
outputs = [httpclient.InferRequestedOutput(n) for n in ("weights", "means", "log_likelihood")]
result = client.infer("mnist-recmix", [x], outputs=outputs,
                      parameters={"num_samples": 1000, "seed": 0})
result.as_numpy("weights")  # (1, M)
```"""


def output_specs(runner: ModelRunner) -> list[dict[str, Any]]:
    """Every output of a model: name, datatype and shape (-1: the batch)."""
    c, h, w = runner.input_shape
    m, d = runner.mixture_order, runner.manifest.latent_dim
    shapes = {
        "means": ("FP32", [-1, m, d]),
        "variances": ("FP32", [-1, m, d]),
        "weights": ("FP64", [-1, m]),
        "reconstruction": ("FP32", [-1, c, h, w]),
        "log_likelihood": ("FP64", [-1]),
        "elbo": ("FP64", [-1]),
    }
    return [{"name": n, "datatype": t, "shape": s} for n, (t, s) in shapes.items()]


def router(runtime: Runtime, settings: Settings) -> APIRouter:
    """The v2 routes, on ``runtime``."""
    api = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

    def model(name: str, version: str | None) -> ModelRunner:
        runner = runtime.model(name)
        if version is not None and version != runner.manifest.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; it serves version "
                f"{runner.manifest.version!r}"
            )
        return runner

    @api.get("")
    async def server_metadata() -> dict[str, Any]:
        """Server metadata: name, version and the protocol extensions it supports."""
        return {"name": SERVER_NAME, "version": "0.1.0", "extensions": EXTENSIONS}

    @api.get("/health/live")
    async def server_live() -> dict[str, bool]:
        """Live: the process answers."""
        return {"live": True}

    @api.get("/health/ready")
    async def server_ready() -> JSONResponse:
        """Ready: every model loaded and warmed up, not draining (400 otherwise, as the protocol
        says: a 4xx status means false)."""
        return JSONResponse({"ready": runtime.ready}, 200 if runtime.ready else 400)

    async def metadata(request: Request, name: str) -> dict[str, Any]:
        runner = model(name, request.path_params.get("version"))
        return {
            "name": runner.name,
            "versions": [runner.manifest.version],
            "platform": "recmix_onnxruntime",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *runner.input_shape]}],
            "outputs": output_specs(runner),
            "parameters": {
                "input_datatypes": list(INPUT_DATATYPES),
                "default_outputs": list(POSTERIOR),
                "method": runner.manifest.method,
                "mixture_order": runner.mixture_order,
            },
        }

    async def ready(request: Request, name: str) -> JSONResponse:
        runner = model(name, request.path_params.get("version"))
        return JSONResponse({"name": runner.name, "ready": runtime.ready})

    async def infer(request: Request, name: str) -> Response:
        require_api_key(request, settings.api_key)
        runner = model(name, request.path_params.get("version"))
        request.state.model_name = runner.name  # the metrics' model label, a loaded name
        header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = int(header) if header is not None else None
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, not {header!r}") from None
        per_image = int(np.prod(runner.input_shape))
        parsed = parse_infer_request(
            await request.body(),
            header_length,
            max_elements=settings.max_images_per_request * per_image,
        )
        x = _model_input(parsed, runner, settings.max_images_per_request)
        names = [o.name for o in parsed.outputs] if parsed.outputs else list(POSTERIOR)
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise BadRequest(
                f"unknown output {unknown[0]!r}; model {runner.name!r} has {', '.join(OUTPUTS)}"
            )
        binary = (
            {o.name: o.binary for o in parsed.outputs}
            if parsed.outputs
            else dict.fromkeys(names, parsed.binary_default)
        )
        values = await _compute(runtime, runner, x, set(names), parsed.parameters)
        specs = {s["name"]: s["datatype"] for s in output_specs(runner)}
        body, headers = encode_infer_response(
            runner.name,
            runner.manifest.version,
            parsed.id,
            [(n, specs[n], values[n], binary[n]) for n in names],
        )
        return Response(body, headers=headers)

    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        api.add_api_route(prefix, metadata, methods=["GET"], summary="Model metadata")
        api.add_api_route(f"{prefix}/ready", ready, methods=["GET"], summary="Model ready")
        api.add_api_route(
            f"{prefix}/infer",
            infer,
            methods=["POST"],
            summary="Infer",
            description=_INFER_DESCRIPTION,
            openapi_extra=_INFER_BODY,
        )
    return api


def _model_input(parsed: InferRequest, runner: ModelRunner, max_images: int) -> Prepared:
    if set(parsed.inputs) != {INPUT}:
        given = ", ".join(repr(n) for n in parsed.inputs) or "none"
        raise BadRequest(f"model {runner.name!r} takes one input named {INPUT!r}; given: {given}")
    datatype = parsed.input_datatypes[INPUT]
    if datatype not in INPUT_DATATYPES:
        raise BadRequest(
            f"input {INPUT!r} has datatype {datatype}; send {' or '.join(INPUT_DATATYPES)}"
        )
    x = parsed.inputs[INPUT]
    if x.ndim >= 1 and x.shape[0] > max_images:
        raise TooManyImages(f"{x.shape[0]} images in one request; the limit is {max_images}")
    try:
        return Prepared(preprocess_tensor(x, runner.manifest.input))
    except InvalidInput as exc:
        raise BadRequest(f"input {INPUT!r}: {exc.message}") from exc


def _int_parameter(parameters: dict[str, Any], name: str, minimum: int) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidParameter(f"parameter {name!r} must be an integer >= {minimum}, not {value!r}")
    return value


async def _compute(
    runtime: Runtime, runner: ModelRunner, x: Prepared, names: set[str], params: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The outputs asked for, each from the runtime operation that gives it, run together."""
    num_samples = _int_parameter(params, "num_samples", 1)
    seed = _int_parameter(params, "seed", 0)
    tasks: dict[str, Any] = {}
    if names & set(POSTERIOR):
        tasks["encode"] = runtime.encode(runner, x, _identity)
    if "reconstruction" in names:
        tasks["reconstruct"] = runtime.reconstruct(runner, x, "mean", seed, _identity)
    if names & {"log_likelihood", "elbo"}:
        tasks["loglik"] = runtime.log_likelihood(runner, x, num_samples, seed, _identity)
    results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    values: dict[str, np.ndarray] = {}
    if "encode" in results:
        posterior = results["encode"]
        values["means"] = posterior.means
        values["variances"] = np.exp(posterior.logvars)
        values["weights"] = np.ascontiguousarray(posterior.weights, dtype=np.float64)
    if "reconstruct" in results:
        values["reconstruction"] = results["reconstruct"].probabilities.astype(np.float32)
    if "loglik" in results:
        values["log_likelihood"] = results["loglik"].log_likelihood
        values["elbo"] = results["loglik"].elbo
    return values


def _identity(value: Any) -> Any:
    return value


_INFER_DESCRIPTION = (
    "Inference by the Open Inference Protocol: input `x` FP32 (intensities in [0, 1]) or UINT8 "
    "(levels 0-255), `[batch, C, H, W]` at the model's size; outputs by name: "
    f"{', '.join(f'`{n}`' for n in OUTPUTS)} (none named: the posterior). Request parameters "
    "`num_samples` and `seed` for `log_likelihood` and `elbo`. Tensors as JSON, or binary after "
    f"a JSON header of `Inference-Header-Content-Length` bytes. With tritonclient:\n\n{INFER_EXAMPLE}"
)

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": list(INPUT_DATATYPES)},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                },
                "example": {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, 1, 28, 28],
                            "datatype": "UINT8",
                            "data": [0] * 784,
                        }
                    ],
                    "outputs": [{"name": "weights"}],
                },
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
