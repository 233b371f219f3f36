"""Request and response bodies of the HTTP API, and the conversions from runtime results."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.http.errors import BadRequest
from service.model.errors import InvalidInput
from service.model.likelihood import LogLikelihood
from service.model.manifest import Evaluation, InputSpec, Manifest, Quantization
from service.model.mixture import Posterior
from service.model.preprocess import ImageInput, to_png
from service.model.runner import ModelRunner
from service.serving.jobs import Reconstruction, Samples

# ---------------------------------------------------------------- requests


class ImageItem(BaseModel):
    """One image: an encoded file in base64, or pixel intensities in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    base64: str | None = Field(None, description="a PNG, JPEG, BMP, ... file, base64-encoded")
    pixels: list[Any] | None = Field(
        None,
        description="intensities in [0, 1] as [height][width] or [height][width][channels] "
        "(1 or 3 channels)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageItem:
        if (self.base64 is None) == (self.pixels is None):
            raise ValueError("give exactly one of 'base64' and 'pixels'")
        return self

    def to_input(self) -> ImageInput:
        if self.base64 is not None:
            try:
                return base64.b64decode(self.base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequest(f"invalid base64: {exc}") from exc
        try:
            array = np.asarray(self.pixels)
        except ValueError as exc:  # ragged nesting
            raise InvalidInput(f"pixels is not a rectangular array: {exc}") from exc
        if array.dtype.kind not in "biuf":
            raise InvalidInput("pixels must be a nested array of numbers")
        return array.astype(np.float64)


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[ImageItem] = Field(description="one or more images")


IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart files (any field name), as JSON, or one raw image.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "base64": {"type": "string"},
                                    "pixels": {"type": "array", "items": {}},
                                },
                                "description": ImageItem.__doc__,
                            },
                        }
                    },
                },
                "example": {"images": [{"pixels": [[0, 1], [1, 0]]}]},
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# ---------------------------------------------------------------- responses


class Component(BaseModel):
    weight: float
    mean: list[float]
    variance: list[float]


class EncodeResult(BaseModel):
    components: list[Component] = Field(description="in mixture order")


class EncodeResponse(BaseModel):
    model: str
    version: str
    results: list[EncodeResult] = Field(description="one per image, in request order")


class PixelsResult(BaseModel):
    pixels: list[Any] = Field(
        description="Bernoulli means in [0, 1], [height][width] or [height][width][channels]"
    )


class ReconstructResponse(BaseModel):
    model: str
    version: str
    mode: Literal["mean", "sample"]
    results: list[PixelsResult]


class LatentSample(BaseModel):
    component: int = Field(description="1-based mixture component the sample was drawn from")
    z: list[float]
    image_png: str | None = Field(None, description="decoded Bernoulli means, base64 PNG")
    pixels: list[Any] | None = Field(None, description="decoded Bernoulli means, as an array")


class SampleResult(BaseModel):
    samples: list[LatentSample]


class SampleResponse(BaseModel):
    model: str
    version: str
    results: list[SampleResult]


class LoglikResult(BaseModel):
    log_likelihood: float = Field(description="importance-sampled log p(x), nats")
    elbo: float = Field(description="mixture ELBO from the same samples, nats")
    num_samples: int


class LoglikResponse(BaseModel):
    model: str
    version: str
    results: list[LoglikResult]


class ModelSummary(BaseModel):
    name: str
    version: str
    method: str
    description: str
    mixture_order: int
    latent_dim: int
    provider: str = Field(description="onnxruntime execution provider in use")
    encode_mode: str = Field(description="fused, concurrent or sequential")
    encoder_precision: str = Field(description="float32 or int8: the encoder graphs in use")
    default: bool
    input: InputSpec
    evaluation: Evaluation | None
    quantization: Quantization | None = Field(
        description="what the int8 encoder graphs cost against float32, when the model has them"
    )


class ModelsResponse(BaseModel):
    default_model: str | None
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    manifest: Manifest


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["starting", "ready", "draining", "stopped"]
    models: list[str]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------- runtime results to answers


# The answers hold numpy arrays as they are (float32 for the encoders' and decoder's outputs);
# the service's JSON response writes them (see service.http.responses.FastJSONResponse).


def _image_array(probabilities: np.ndarray) -> np.ndarray:
    """(C, H, W) to [H][W] for one channel, [H][W][C] otherwise (the input convention)."""
    if probabilities.shape[0] == 1:
        return probabilities[0]
    return np.ascontiguousarray(probabilities.transpose(1, 2, 0))


def encode_answer(runner: ModelRunner, posterior: Posterior) -> dict[str, Any]:
    weights = posterior.weights.tolist()  # float64: they sum to 1
    means = posterior.means
    variances = np.exp(posterior.logvars)
    results = [
        {
            "components": [
                {"weight": w, "mean": mu, "variance": var}
                for w, mu, var in zip(weights[b], means[b], variances[b], strict=True)
            ]
        }
        for b in range(len(weights))
    ]
    return {"model": runner.name, "version": runner.manifest.version, "results": results}


def reconstruct_answer(
    runner: ModelRunner, reconstruction: Reconstruction, mode: str
) -> dict[str, Any]:
    return {
        "model": runner.name,
        "version": runner.manifest.version,
        "mode": mode,
        "results": [{"pixels": _image_array(p)} for p in reconstruction.probabilities],
    }


def sample_answer(
    runner: ModelRunner, samples: Samples, image_format: Literal["png", "json"]
) -> dict[str, Any]:
    results = []
    for b in range(samples.z.shape[0]):
        items: list[dict[str, Any]] = []
        for s in range(samples.z.shape[1]):
            item: dict[str, Any] = {
                "component": int(samples.components[b, s]),
                "z": samples.z[b, s],
            }
            if samples.probabilities is not None:
                image = samples.probabilities[b, s]
                if image_format == "png":
                    item["image_png"] = base64.b64encode(to_png(image)).decode("ascii")
                else:
                    item["pixels"] = _image_array(image)
            items.append(item)
        results.append({"samples": items})
    return {"model": runner.name, "version": runner.manifest.version, "results": results}


def loglik_answer(runner: ModelRunner, estimate: LogLikelihood) -> dict[str, Any]:
    return {
        "model": runner.name,
        "version": runner.manifest.version,
        "results": [
            {"log_likelihood": float(ll), "elbo": float(elbo), "num_samples": estimate.num_samples}
            for ll, elbo in zip(estimate.log_likelihood, estimate.elbo, strict=True)
        ],
    }


def model_summary(runner: ModelRunner, default: bool) -> dict[str, Any]:
    manifest = runner.manifest
    return {
        "name": runner.name,
        "version": manifest.version,
        "method": manifest.method,
        "description": manifest.description,
        "mixture_order": manifest.mixture_order,
        "latent_dim": manifest.latent_dim,
        "provider": runner.provider,
        "encode_mode": runner.encode_mode,
        "encoder_precision": runner.precision,
        "default": default,
        "input": manifest.input.model_dump(mode="json"),
        "evaluation": manifest.evaluation.model_dump(mode="json") if manifest.evaluation else None,
        "quantization": (
            manifest.quantization.model_dump(mode="json") if manifest.quantization else None
        ),
    }
