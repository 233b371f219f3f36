"""The FastAPI application: ``create_app(settings)`` builds everything; importing builds nothing.

Models load in the lifespan (checked, warmed up), and only then does ``/readyz`` answer 200. On
SIGTERM the service drains: ``/readyz`` turns 503 at once, requests are still served for
``drain_seconds`` (so that a load balancer stops sending new ones), then the server stops
accepting connections, lets in-flight requests finish, and exits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import api, inference
from service.errors import PayloadTooLarge, install_handlers
from service.inference import InferenceRouter
from service.metrics import Metrics
from service.runtime import Runtime, StartupError
from service.settings import Settings

log = logging.getLogger("recmix.service")

_ENDPOINTS = frozenset(
    {
        "/encode", "/reconstruct", "/sample", "/loglik", "/models", "/healthz", "/readyz",
        "/metrics", "/docs", "/openapi.json",
    }
)  # fmt: skip


def endpoint_label(path: str) -> str:
    """The endpoint a path belongs to, from a fixed set (never the client's raw path)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/models/"):
        return "/models/{name}"
    return "other"


class MetricsMiddleware:
    """Requests in flight and request duration by endpoint, model and status class."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope["path"])
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight = self.metrics.child(self.metrics.in_flight, endpoint)
        in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            in_flight.dec()
            model = scope.get("state", {}).get("model_name", "")
            self.metrics.child(
                self.metrics.request_duration, endpoint, model, f"{status // 100}xx"
            ).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Refuse a body over the limit: by its Content-Length, and again while it is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _content_length(scope)
        received = 0

        def too_large() -> PayloadTooLarge:
            return PayloadTooLarge(f"request body over the limit of {limit} bytes", max_bytes=limit)

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large()
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _install_drain_hook(runtime: Runtime, drain_seconds: float) -> Callable[[], None]:
    """On SIGTERM: mark the runtime draining, then after ``drain_seconds`` let the server stop.

    The server's own handler (uvicorn's, installed before the lifespan starts) is called after
    the delay; a second SIGTERM skips the wait. Signals reach only the main thread, so the hook
    is installed only there (not under an in-process test client).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    draining = False

    def stop(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal draining
        if draining or drain_seconds <= 0:
            runtime.begin_draining()
            stop(signum, frame)
            return
        draining = True
        runtime.begin_draining()
        loop.call_soon_threadsafe(loop.call_later, drain_seconds, stop, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def _freeze_startup_objects() -> None:
    """Leave what start-up built out of the garbage collector's full collections.

    The imports, the loaded models and the app are a large heap of objects that live as long as
    the process; a full collection walks all of them, 40 ms or more on a 2-core machine, and under
    load one came every second, which made the p99 latency. Frozen (``gc.freeze``), they are
    never walked again, and full collections see only what requests create. Unfrozen when the
    app stops.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service: settings (from the environment if not given), runtime, metrics, routes."""
    settings = settings or Settings()
    metrics = Metrics()
    runtime = Runtime(settings, observer=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await to_thread.run_sync(runtime.load)
        except StartupError as exc:
            log.error("%s", exc)
            raise
        for runner in runtime.models.values():
            metrics.model_info.labels(
                runner.name,
                runner.manifest.version,
                runner.provider,
                str(runner.mixture_order),
                runner.manifest.method,
                runner.precision,
                runner.encode_mode,
            ).set(1)
        restore = _install_drain_hook(runtime, settings.drain_seconds)
        _freeze_startup_objects()
        log.info("ready: serving %s", ", ".join(sorted(runtime.models)))
        try:
            yield
        finally:
            gc.unfreeze()
            restore()
            runtime.close()
            log.info("stopped")

    app = FastAPI(
        title="recmix",
        summary="Posterior inference with recursive mixtures of amortized encoders (RecMix)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics

    def count_error(path: str, code: str) -> None:
        metrics.errors.labels(endpoint_label(path), code).inc()

    install_handlers(app, count_error)
    app.include_router(api.operations)
    # the last added runs first: metrics see every request, including a refused body; the
    # inference endpoints are answered inside both, before FastAPI's routing
    app.add_middleware(InferenceRouter, runtime=runtime, settings=settings, on_error=count_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _document_inference(app)
    return app


def _document_inference(app: FastAPI) -> None:
    """``/openapi.json`` lists the inference endpoints beside FastAPI's own routes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            paths, definitions = inference.openapi_paths()
            schema["paths"] = {**paths, **schema.get("paths", {})}
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.items():
                known.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
