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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from anyio import to_thread
from fastapi import FastAPI, Request

from service.http import native, openapi, v2
from service.http.errors import install_handlers
from service.http.metrics import Metrics
from service.http.middleware import BodyLimitMiddleware, MetricsMiddleware, RouteLabels
from service.http.operations import operations
from service.http.redirects import slash_redirects
from service.serving.runtime import Runtime, StartupError
from service.settings import Settings

log = logging.getLogger("recmix.service")


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
        # off, FastAPI skips its per-request look-up of the OpenTelemetry providers (about 5 %
        # of the event loop's time per /encode under load)
        telemetry=None
        if settings.opentelemetry
        else {"tracing": False, "metrics": False, "logs": False},
        # answered by routes of relative redirects instead (service.http.redirects)
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics

    # the inference routes first: the router tries routes in order, and these are the hot ones
    app.router.routes[:0] = native.routes(
        runtime, settings.api_key, settings.max_images_per_request, settings.max_answer_bytes
    )
    # the routers' routes themselves: an included router resolves every request through a
    # routing layer of its own, and these need none (no prefix, dependencies or tags to add)
    app.router.routes.extend(operations.routes)
    app.router.routes.extend(v2.router(runtime, settings).routes)
    app.router.routes.extend(slash_redirects(app.routes))
    labels = RouteLabels(app.routes)

    def count_error(request: Request, code: str) -> None:
        metrics.child(metrics.errors, labels(request.url.path), code).inc()

    def count_disconnect(request: Request) -> None:
        metrics.child(metrics.disconnects, labels(request.url.path)).inc()

    install_handlers(app, count_error, count_disconnect)
    # the last added runs first: metrics see every request, including a refused body
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, labels=labels)
    openapi.install(app)
    return app
