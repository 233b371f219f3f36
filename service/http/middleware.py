"""The app's own ASGI middleware: request metrics, and the request body's size limit."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import PayloadTooLarge
from service.http.metrics import Metrics


class RouteLabels:
    """The metrics' endpoint label of a path: the path template of the app's route it belongs to
    (``/v2/models/{name}/infer``), a fixed set never holding a client's raw path; ``other``.

    Found before the request runs, so that requests in flight are counted by endpoint: static
    paths by a dict, the few routes with path parameters by their own compiled patterns.
    """

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self.static: dict[str, str] = {}
        self.patterns: list[tuple[re.Pattern[str], str]] = []
        for route in routes:
            path, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
            if not isinstance(path, str) or regex is None:
                continue
            if "{" in path:
                self.patterns.append((regex, path))
            else:
                self.static[path] = path

    def __call__(self, path: str) -> str:
        label = self.static.get(path)
        if label is not None:
            return label
        for regex, template in self.patterns:
            if regex.match(path):
                return template
        return "other"


class MetricsMiddleware:
    """Requests in flight and request duration by endpoint, model and status class."""

    def __init__(self, app: ASGIApp, metrics: Metrics, labels: RouteLabels) -> None:
        self.app = app
        self.metrics = metrics
        self.labels = labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.labels(scope["path"])
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
