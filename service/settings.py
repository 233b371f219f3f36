"""Every setting of the service, in one commented place.

Each field is read from a ``RECMIX_<FIELD>`` environment variable (``RECMIX_MODEL_DIR``) and is a
flag of ``recmix-serve`` (``--model-dir``); a flag wins over the environment, which wins over the
default here. Settings are built by :func:`service.http.app.create_app` or the command line, never at
import time.

``encode_mode`` defaults to ``fused``: all M components in one onnxruntime call. Over HTTP, with
the int8 encoders and batching on (``python scripts/bench_load.py --concurrency 1 --server
sequential= --server fused="--encode-mode fused" --server concurrent="--encode-mode concurrent"``),
RecMix's /encode p50 at concurrency 1 was 0.74 ms fused, 0.78 ms sequential and 0.94 ms with
threads (the VAE 0.61 ms), and at 8 clients fused served 9 % more requests than sequential; at 32
they were level. Timing ``encode`` alone (``scripts/bench_encode_modes.py``) the two are level
with warm caches, and sequential is ahead with the weights evicted before every call, which is
not the state a serving process keeps them in. Threads (``concurrent``) cost more in hand-offs
than they save on two cores; they may pay off with cores to spare, or on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.model.runner import EncodeMode


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECMIX_", extra="ignore", protected_namespaces=(), validate_default=True
    )

    # models
    model_dir: Path = Field(
        default=Path("models"), description="model repository: one folder per model"
    )
    default_model: str = Field(
        default="mnist-recmix",
        description="model used when a request names none (if absent: the only model, else error)",
    )
    skip_bad_models: bool = Field(
        default=False,
        description="log and skip a model folder that fails its checks, instead of refusing "
        "to start",
    )
    # server
    host: str = Field(default="127.0.0.1", description="address to bind (0.0.0.0 in the container)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(default=1, ge=1, description="server processes, each loading every model")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="log level"
    )
    drain_seconds: float = Field(
        default=2.0,
        ge=0,
        description="on SIGTERM, keep serving this long with /readyz at 503 before closing",
    )
    graceful_timeout: float = Field(
        default=30.0,
        gt=0,
        description="after draining, how long in-flight requests may take to finish",
    )
    # inference
    provider: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="onnxruntime execution provider: auto picks CUDA when available"
    )
    encode_mode: EncodeMode = Field(
        default="fused",
        description="how the M components run: fused graph, concurrent threads or sequential "
        "(fused falls back to sequential for a model exported without a fused graph)",
    )
    encoder_precision: Literal["auto", "float32", "int8"] = Field(
        default="auto",
        description="which encoder graphs to run: int8 (a model's int8 copies, measured against "
        "float32 in its manifest), float32, or auto: int8 on CPU when the model ships them, float32 "
        "otherwise and on GPU. The decoder is always float32",
    )
    intra_op_threads: int = Field(
        default=1,
        ge=0,
        description="onnxruntime intra-op threads per CPU session (0: one per core); on GPU "
        "always 1",
    )
    max_batch_size: int = Field(
        default=64,
        ge=1,
        description="dynamic batching: most images in one batched onnxruntime run (a larger "
        "request runs alone)",
    )
    max_queue_delay_ms: float = Field(
        default=2.0,
        ge=0,
        description="dynamic batching: longest a request waits for others to join its batch, "
        "in ms (none when no other is on its way); 0 turns batching off",
    )
    decode_batch_size: int = Field(
        default=2048, ge=1, description="latent samples per decoder call in /loglik and /sample"
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's own OpenTelemetry instrumentation (traces, metrics and logs to the "
        "OpenTelemetry providers the process configures); off, it costs nothing per request. The "
        "Prometheus metrics at /metrics are always on",
    )
    # request limits
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="largest request body (bytes)"
    )
    max_pixels: int = Field(
        default=2048 * 2048,
        ge=1,
        description="largest image (width x height) decoded; larger ones are refused unread",
    )
    max_images_per_request: int = Field(default=256, ge=1, description="images in one request")
    max_request_pixels: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="decoded pixels (width x height) of all the images of one request; checked "
        "from the headers before anything is decoded",
    )
    max_loglik_work: int = Field(
        default=65536,
        ge=1,
        description="images x num_samples of one /loglik request (about 3 s on one core here "
        "for the shipped RecMix); more is refused before any work",
    )
    max_sample_draws: int = Field(
        default=65536,
        ge=1,
        description="images x n of one /sample request; more is refused before any work",
    )
    max_answer_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="largest answer, estimated before any work (decoded samples and pixels as "
        "JSON are the large ones); more is refused",
    )
    resize: Literal["allow", "refuse"] = Field(
        default="allow", description="resize images of another size to the model's, or refuse them"
    )
    default_loglik_samples: int = Field(
        default=1000, ge=1, description="importance samples S for /loglik when none is asked"
    )
    max_loglik_samples: int = Field(default=5000, ge=1, description="largest S /loglik accepts")
    max_samples_per_image: int = Field(default=1000, ge=1, description="largest n /sample accepts")
    # security
    api_key: SecretStr | None = Field(
        default=None,
        description="if set, inference endpoints need it as X-API-Key or Authorization: Bearer",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_loglik_samples > self.max_loglik_samples:
            raise ValueError("default_loglik_samples exceeds max_loglik_samples")
        if self.api_key is not None and not self.api_key.get_secret_value():
            self.api_key = None
        return self
