"""Prometheus metrics of one app, in its own registry (so that tests can build several apps).

The names in :data:`METRIC_NAMES` are a contract with the dashboards: rename nothing without them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 50 us to 10 s in a 1-2.5-5 series (steps of x2 and x2.5): a fast encoder call and a /loglik
# at S = 5000 both land in the middle of the range.
SECONDS_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUEST_DURATION = "recmix_request_duration_seconds"
INFERENCE_DURATION = "recmix_inference_duration_seconds"
BATCH_SIZE = "recmix_batch_size"
RUN_SIZE = "recmix_run_batch_size"
QUEUE_DURATION = "recmix_queue_duration_seconds"
REQUESTS_IN_FLIGHT = "recmix_requests_in_flight"
ERRORS = "recmix_errors_total"
DISCONNECTS = "recmix_client_disconnects_total"
MODEL_INFO = "recmix_model_info"

METRIC_NAMES = (
    REQUEST_DURATION,
    INFERENCE_DURATION,
    BATCH_SIZE,
    RUN_SIZE,
    QUEUE_DURATION,
    REQUESTS_IN_FLIGHT,
    ERRORS,
    DISCONNECTS,
    MODEL_INFO,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
M = TypeVar("M", Counter, Gauge, Histogram)


class Metrics:
    """The service's metrics; every label value comes from a fixed set, never from a client."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            REQUEST_DURATION,
            "Time from request to response, by endpoint, model and status class.",
            ("endpoint", "model", "status_class"),
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            INFERENCE_DURATION,
            "Time of one inference stage: preprocess, component_m, encode, fused_encode, decode, "
            "loglik.",
            ("model", "stage"),
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            BATCH_SIZE,
            "Images per request.",
            ("model", "endpoint"),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.run_size = Histogram(
            RUN_SIZE,
            "Images per inference run: a dynamic batch of requests, or one request when "
            "batching is off.",
            ("model", "endpoint"),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            QUEUE_DURATION,
            "Time a request waits before its inference run starts: for its batch to form and "
            "the one before it to finish, or for a worker thread when batching is off.",
            ("model", "endpoint"),
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            REQUESTS_IN_FLIGHT,
            "Requests being handled.",
            ("endpoint",),
            registry=self.registry,
        )
        self.errors = Counter(
            ERRORS.removesuffix("_total"),
            "Error responses by endpoint and error code.",
            ("endpoint", "kind"),
            registry=self.registry,
        )
        self.disconnects = Counter(
            DISCONNECTS.removesuffix("_total"),
            "Requests whose client went away before its body was read in full, by endpoint: "
            "not errors of the service, and never counted as 5xx.",
            ("endpoint",),
            registry=self.registry,
        )
        self.model_info = Gauge(
            MODEL_INFO,
            "1 for every loaded model, with its version, provider, mixture order, method, the "
            "precision of the encoder graphs it runs and how it runs the mixture.",
            (
                "model",
                "version",
                "provider",
                "mixture_order",
                "method",
                "encoder_precision",
                "encode_mode",
            ),
            registry=self.registry,
        )

        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, remembered: prometheus_client checks the labels and takes a
        lock on every call (about 1 us, several times a request); the label values come from
        fixed sets, so the few children are kept."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[no-any-return]

    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        self.child(self.inference_duration, model, stage).observe(seconds)

    def observe_batch(self, model: str, operation: str, size: int) -> None:
        # the runtime's operations are named after their endpoints
        self.child(self.batch_size, model, f"/{operation}").observe(size)

    def observe_queue(self, model: str, operation: str, seconds: float) -> None:
        self.child(self.queue_duration, model, f"/{operation}").observe(seconds)

    def observe_run(self, model: str, operation: str, rows: int) -> None:
        self.child(self.run_size, model, f"/{operation}").observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
