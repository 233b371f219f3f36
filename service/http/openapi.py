"""The OpenAPI schema: FastAPI's own routes, and the native inference routes from their
declarations (:data:`service.http.native.ENDPOINTS`), so ``/openapi.json`` and ``/docs`` list
every endpoint as it is served."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.http import schemas
from service.http.native import ENDPOINTS
from service.http.params import MODEL

ERROR_DESCRIPTIONS = {
    400: "malformed body or undecodable image",
    401: "missing or wrong API key",
    404: "unknown model",
    405: "not a POST",
    413: "body over the size limit",
    415: "not an image in a supported format, or an unsupported body type",
    422: "too many pixels or images, wrong shape, parameter out of range",
    503: "not ready",
}


def openapi_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference endpoints' OpenAPI path items, and the component schemas they refer to."""
    mode: JsonSchemaMode = "serialization"
    models = [(e.response_model, mode) for e in ENDPOINTS] + [(schemas.ErrorResponse, mode)]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    error_ref = refs[(schemas.ErrorResponse, mode)]
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        content = {"application/json": {"schema": refs[(endpoint.response_model, mode)]}}
        responses: dict[str, Any] = {
            "200": {
                "description": "Successful Response",
                "content": {**content, **endpoint.success_content},
            }
        }
        for status, text in ERROR_DESCRIPTIONS.items():
            responses[str(status)] = {
                "description": text,
                "content": {"application/json": {"schema": error_ref}},
            }
        name = endpoint.path.strip("/")
        paths[endpoint.path] = {
            "post": {
                "summary": endpoint.summary,
                "description": endpoint.description,
                "operationId": f"{name}_{name}_post",
                "parameters": [p.openapi() for p in (MODEL, *endpoint.params)],
                **schemas.IMAGE_REQUEST_BODY,
                "responses": responses,
            }
        }
    return paths, top.get("$defs", {})


def install(app: FastAPI) -> None:
    """``/openapi.json`` lists the native inference routes beside FastAPI's own."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            paths, definitions = openapi_paths()
            schema["paths"] = {**paths, **schema.get("paths", {})}
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.items():
                known.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
