"""The model manifest: one schema for a model folder, written by the export, read by the service.

A model folder ``models/<name>/`` holds ``manifest.json`` beside its ONNX files. The manifest says
everything needed to load and check the model: what each file is, its tensors, its SHA-256, how an
image becomes the model's input, and how the mixture weights are formed. This module is torch-free
(numpy and pydantic only) so that the service can import it, and the training side imports it from
here: the side that reads the artifact owns its schema.

ONNX contract (what the export writes and the service runs):

- ``encoder_{m}.onnx``, m = 1..M (role ``encoder_component``, ``component = m``): input ``"x"``
  float32 ``[batch, C, H, W]``, already preprocessed (in ``input.value_range``); outputs ``"mean"``
  ``[batch, D]`` and ``"logvar"`` ``[batch, D]``, plus ``"eps_logit"`` ``[batch]`` when
  ``weights.epsilon == "amortized"``.
- ``decoder.onnx`` (role ``decoder``): input ``"z"`` float32 ``[batch, D]``, output ``"logits"``
  ``[batch, C, H, W]``, the Bernoulli logits of every pixel.
- ``encoder_fused.onnx`` (role ``fused_encoder``, optional): input ``"x"``, outputs ``"means"``
  ``[batch, M, D]``, ``"logvars"`` ``[batch, M, D]`` and ``"log_weights"`` ``[batch, M]``.
- Optionally, int8 copies of the encoder graphs (``encoder_{m}.int8.onnx``,
  ``encoder_fused.int8.onnx``; ``precision = "int8"``): the same inputs and outputs, float32, with
  the weights of every matmul quantized to int8 (onnxruntime dynamic quantization). ``quantization``
  records what they cost in accuracy against the float32 graphs. The decoder is always float32.

Mixture weights (RecMix, Kim & Pavlovic, NeurIPS 2020): ``Q_1 = q_1``,
``Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m``, so ``w_M = eps_M`` and
``w_m = eps_m * prod_{j>m} (1 - eps_j)`` with ``eps_1 = 1``; :mod:`service.model.mixture` computes
them in log space from the logits of ``eps``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILENAME = "manifest.json"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


Precision = Literal["float32", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One input or output of an ONNX graph; a ``str`` dimension is symbolic (e.g. ``"batch"``)."""

    name: str
    shape: list[int | str]
    dtype: Literal["float32"] = "float32"


class FileEntry(_Strict):
    """One file of the model folder, what it is, and its checksum."""

    path: str = Field(description="relative to the model folder")
    role: Literal["encoder_component", "decoder", "fused_encoder"]
    component: int | None = Field(default=None, description="1-based; only for encoder_component")
    precision: Precision = Field(
        default="float32", description="the weights' precision; inputs and outputs are float32"
    )
    sha256: str
    size_bytes: int = Field(gt=0)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        if not value or "\\" in value:
            raise ValueError(f"file path {value!r} must be a non-empty POSIX relative path")
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or value.startswith("~"):
            raise ValueError(f"file path {value!r} must stay inside the model folder")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 lowercase hexadecimal characters")
        return value

    @model_validator(mode="after")
    def _component_iff_encoder(self) -> FileEntry:
        if self.role == "encoder_component":
            if self.component is None or self.component < 1:
                raise ValueError(f"{self.path}: encoder_component needs component >= 1")
        elif self.component is not None:
            raise ValueError(f"{self.path}: only encoder_component files have a component number")
        return self

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class InputSpec(_Strict):
    """How an image becomes the model's input tensor (exactly as training fed it)."""

    channels: Literal[1, 3]
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)
    color: Literal["grayscale", "rgb"]
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    binarize: Literal["none", "threshold"] = "threshold"
    threshold: float = 0.5
    description: str

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.channels == 1) != (self.color == "grayscale"):
            raise ValueError("color 'grayscale' goes with 1 channel, 'rgb' with 3")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError("value_range must be (low, high) with low < high")
        return self


class WeightSpec(_Strict):
    """How the mixture weights are formed.

    ``recursive``: the RecMix recursion over ``eps_m = sigmoid(logit_m)``, either one learned
    logit per component (``epsilon="global"``, stored in ``eps_logits``, m = 1..M; ``eps_1`` is
    fixed to 1 whatever its logit) or computed per input by each component's encoder
    (``epsilon="amortized"``, the ``eps_logit`` output). ``softmax``: free weights
    ``softmax(logits)`` (the jointly trained mixture). ``single``: one component, weight 1.
    """

    form: Literal["single", "recursive", "softmax"]
    epsilon: Literal["none", "global", "amortized"] = "none"
    eps_logits: list[float] | None = None
    logits: list[float] | None = None
    description: str

    @model_validator(mode="after")
    def _consistent(self) -> WeightSpec:
        if self.form == "recursive":
            if self.epsilon == "none":
                raise ValueError("form 'recursive' needs epsilon 'global' or 'amortized'")
            if self.epsilon == "global" and self.eps_logits is None:
                raise ValueError("epsilon 'global' needs eps_logits")
            if self.epsilon == "amortized" and self.eps_logits is not None:
                raise ValueError("epsilon 'amortized' takes its logits from the encoders")
        else:
            if self.epsilon != "none":
                raise ValueError(f"form {self.form!r} takes epsilon 'none'")
            if self.eps_logits is not None:
                raise ValueError(f"form {self.form!r} takes no eps_logits")
        if (self.form == "softmax") != (self.logits is not None):
            raise ValueError("logits are given exactly when form is 'softmax'")
        for values in (self.eps_logits, self.logits):
            if values is not None and not all(np.isfinite(values)):
                raise ValueError("weight logits must be finite")
        return self


class Architecture(_Strict):
    encoder_hidden: list[int]
    decoder_hidden: list[int]
    activation: str


class Evaluation(_Strict):
    """The evaluation the export recorded (test log-likelihood by importance sampling)."""

    dataset: str
    num_test_images: int
    num_samples: int
    sampling: Literal["stratified", "mixture"]
    test_log_likelihood: float
    test_elbo: float
    epochs: int
    training_time_seconds: float
    seed: int


class Quantization(_Strict):
    """How the int8 encoder graphs were made and what they cost against the float32 ones."""

    method: str = Field(description="the quantization, in words")
    num_images: int = Field(ge=1, description="test images the figures below were measured on")
    max_abs_diff: dict[str, float] = Field(
        description="largest absolute difference from the float32 graphs, per output"
    )
    mean_abs_diff: dict[str, float] = Field(description="mean absolute difference, per output")
    num_samples: int = Field(ge=1, description="importance samples per image for the figure below")
    log_likelihood_shift: float = Field(
        description="mean over the images of log p(x) with the int8 encoders minus log p(x) with "
        "the float32 ones (the same draws and decoder); negative is worse"
    )
    log_likelihood_shift_stderr: float = Field(ge=0)


class Versions(_Strict):
    torch: str
    onnx: str
    opset: int
    recmix: str


class Manifest(_Strict):
    """``manifest.json`` of one model folder."""

    schema_version: Literal[1]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str
    method: Literal["vae", "recmix", "me"]
    description: str = ""
    mixture_order: int = Field(ge=1)
    latent_dim: int = Field(ge=1)
    likelihood: Literal["bernoulli"]
    input: InputSpec
    architecture: Architecture
    weights: WeightSpec
    files: list[FileEntry]
    evaluation: Evaluation | None = None
    quantization: Quantization | None = None
    versions: Versions
    created: str = Field(description="ISO 8601 timestamp")

    @field_validator("created")
    @classmethod
    def _iso8601(cls, value: str) -> str:
        from datetime import datetime

        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"created {value!r} is not an ISO 8601 timestamp") from exc
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> Manifest:
        m_order = self.mixture_order
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        decoders = [f for f in self.files if f.role == "decoder"]
        if len(decoders) != 1:
            raise ValueError(f"exactly one decoder file is needed, got {len(decoders)}")
        if decoders[0].precision != "float32":
            raise ValueError("the decoder must be float32")
        encoders = [f for f in self.files if f.role != "decoder"]
        for precision in ("float32", "int8"):
            files = [f for f in encoders if f.precision == precision]
            components = sorted(f.component for f in files if f.role == "encoder_component")  # type: ignore[type-var]
            shipped = precision == "float32" or bool(files)
            if shipped and components != list(range(1, m_order + 1)):
                raise ValueError(
                    f"{precision} encoder_component files must be numbered exactly "
                    f"1..{m_order}, got {components}"
                )
            if sum(f.role == "fused_encoder" for f in files) > 1:
                raise ValueError(f"at most one {precision} fused_encoder file is allowed")
        if "int8" in self.precisions() and self.quantization is None:
            raise ValueError("int8 encoder files need a 'quantization' record")
        w = self.weights
        if self.method == "vae" and (m_order != 1 or w.form != "single"):
            raise ValueError("method 'vae' needs mixture_order 1 and weights form 'single'")
        if w.form == "single" and m_order != 1:
            raise ValueError("weights form 'single' needs mixture_order 1")
        if w.epsilon == "global" and len(w.eps_logits or []) != m_order:
            raise ValueError(f"eps_logits needs {m_order} values (one per component)")
        if w.form == "softmax" and len(w.logits or []) != m_order:
            raise ValueError(f"logits needs {m_order} values (one per component)")
        if w.epsilon == "amortized":
            for f in self.components() + self.components("int8"):
                if "eps_logit" not in f.output_names():
                    raise ValueError(f"{f.path}: amortized epsilon needs an 'eps_logit' output")
        return self

    def precisions(self) -> list[Precision]:
        """The precisions the encoder is shipped in: always float32, perhaps int8."""
        found = {f.precision for f in self.files if f.role == "encoder_component"}
        return [p for p in ("float32", "int8") if p in found]  # type: ignore[misc]

    def components(self, precision: Precision = "float32") -> list[FileEntry]:
        """The encoder component files of a precision, in mixture order (none if not shipped)."""
        found = [
            f for f in self.files if f.role == "encoder_component" and f.precision == precision
        ]
        return sorted(found, key=lambda f: f.component or 0)

    def decoder(self) -> FileEntry:
        return next(f for f in self.files if f.role == "decoder")

    def fused(self, precision: Precision = "float32") -> FileEntry | None:
        return next(
            (f for f in self.files if f.role == "fused_encoder" and f.precision == precision), None
        )

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest; ``path`` is the JSON file or its model folder."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def dump(self, path: str | Path) -> Path:
        """Write the manifest (sorted keys, indent 2); ``path`` is the JSON file or its folder."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path
