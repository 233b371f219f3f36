"""The operational routes of the native API: models, health, metrics.

The inference routes are in :mod:`service.http.native`, the Open Inference Protocol's in
:mod:`service.http.v2`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.http import schemas
from service.http.metrics import CONTENT_TYPE, Metrics
from service.serving.runtime import Runtime

# ---------------------------------------------------------------- dependencies
# All async: FastAPI runs a plain `def` dependency in a worker thread, a hop per dependency per
# request that costs more than these functions do.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


# ---------------------------------------------------------------- models, health, metrics

operations = APIRouter()


@operations.get("/models", response_model=schemas.ModelsResponse)
def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    """Every loaded model, from its manifest, with the execution provider in use."""
    return {
        "default_model": runtime.default_model,
        "models": [
            schemas.model_summary(r, r.name == runtime.default_model)
            for r in runtime.models.values()
        ],
    }


@operations.get(
    "/models/{name}",
    response_model=schemas.ModelDetail,
    responses={404: {"model": schemas.ErrorResponse, "description": "unknown model"}},
)
def get_model_detail(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    """One model: its summary and its whole manifest."""
    runner = runtime.model(name)
    detail = schemas.model_summary(runner, runner.name == runtime.default_model)
    detail["manifest"] = runner.manifest.model_dump(mode="json")
    return detail


@operations.get("/healthz", response_model=schemas.Health)
def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@operations.get(
    "/readyz",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "starting or draining"}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready: every model loaded and warmed up, and not draining."""
    body = {"status": runtime.state, "models": sorted(runtime.models)}
    return JSONResponse(body, status_code=200 if runtime.ready else 503)


@operations.get("/metrics", response_class=Response)
def metrics(registry: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(registry.render(), media_type=CONTENT_TYPE)
