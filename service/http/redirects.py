"""A trailing slash, redirected with a relative ``Location``.

Starlette's router redirects ``/encode/`` to an absolute URL built from the request's ``Host``
header, so a client that sends ``Host: evil.example.com`` is sent there. Instead, every route's
path with a slash added is a route of its own that answers 307 (method and body kept) to the
path without it, with the query, and no scheme or host: the client resolves it against the URL
it called. The router's own slash redirect is off.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

# whatever the method: the route it leads to answers a wrong one with its 405
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _to_path_without_slash(request: Request) -> Response:
    target = request.url.path.rstrip("/") or "/"
    query = request.url.query
    return RedirectResponse(f"{target}?{query}" if query else target, status_code=307)


def slash_redirects(routes: Iterable[BaseRoute]) -> list[Route]:
    """For each route of a path not ending in '/', that path plus '/' as a redirect to it."""
    paths = dict.fromkeys(
        path
        for route in routes
        if isinstance(path := getattr(route, "path", None), str) and not path.endswith("/")
    )
    return [
        Route(f"{path}/", _to_path_without_slash, methods=_METHODS, include_in_schema=False)
        for path in paths
    ]
