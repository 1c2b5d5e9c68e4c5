"""The HTTP application: probes, metrics, the OpenAI API and the admin routes.

Routes:
    GET  /health                 process up (answers while the model loads)
    GET  /live                   a timed round trip to the engine core; 503 if it hangs or died
    GET  /ready                  200 once the engine runs and the weight version is known
    GET  /metrics                Prometheus text, ``mapo_inference_*``
    GET  /v1/models              the served model and its weight version
    POST /v1/completions         OpenAI-compatible completions
    POST /admin/weights/reload   {"version": N} or {} for the newest  (bearer token)
    POST /admin/pause            the rollout worker takes no new prompts (bearer token)
    POST /admin/resume           (bearer token)

The admin routes exist only when ``inference.admin_token`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import BaseModel, ConfigDict, Field

from services.core.config import RunConfig
from services.inference import openai_api
from services.inference.generation import EngineUnavailable
from services.inference.reload import ReloadRefused
from services.inference.service import InferenceService

log = logging.getLogger(__name__)

#: Probes and scrapes are not counted in ``mapo_inference_requests_total``.
UNINSTRUMENTED = ("^/metrics$", "^/health$")


def probes_router(service: InferenceService) -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/live", response_model=None)
    async def live() -> JSONResponse | dict[str, str]:
        if service.engine is None and not service.startup_error:
            return {"status": "starting"}  # alive: a slow load is not a hang
        try:
            await service.live()
        except (TimeoutError, EngineUnavailable) as exc:
            return JSONResponse({"status": "dead", "detail": str(exc) or "timeout"}, 503)
        except Exception as exc:
            return JSONResponse({"status": "dead", "detail": f"{type(exc).__name__}: {exc}"}, 503)
        return {"status": "alive"}

    @router.get("/ready", response_model=None)
    async def ready() -> JSONResponse:
        status = service.status()
        # A dead engine core is not ready either: orchestrators must stop routing to it.
        engine_ok = service.engine is not None and not service.engine.errored
        ok = service.ready and engine_ok and bool(service.weights and service.weights.healthy)
        return JSONResponse(status, 200 if ok else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return router


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="Version to load; omitted: the newest.")


def admin_router(service: InferenceService, token: str) -> APIRouter:
    expected = f"Bearer {token}".encode()

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not given:
            raise _HTTPError(401, "missing bearer token")
        if not hmac.compare_digest(given, expected):
            raise _HTTPError(403, "wrong bearer token")

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)])

    @router.post("/weights/reload", response_model=None)
    async def reload(body: ReloadRequest | None = None) -> JSONResponse:
        try:
            version = await service.reload(body.version if body else None)
        except ReloadRefused as exc:
            return JSONResponse({"error": str(exc), "reason": exc.reason, **service.status()}, 409)
        except EngineUnavailable as exc:
            return JSONResponse({"error": str(exc)}, 503)
        return JSONResponse({"weight_version": version, **service.status()})

    @router.post("/pause")
    async def pause() -> dict[str, Any]:
        if service.worker is not None:
            service.worker.pause()
        return service.status()

    @router.post("/resume")
    async def resume() -> dict[str, Any]:
        if service.worker is not None:
            service.worker.resume()
        return service.status()

    return router


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_app(
    config: RunConfig,
    *,
    service: InferenceService | None = None,
    use_bus: bool = True,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service's FastAPI app; the engine starts in the background when the app starts."""
    svc = service or InferenceService(config, use_bus=use_bus)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(svc.start(on_fatal), name="inference-start")
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await svc.stop()

    app = FastAPI(title="mapo inference", lifespan=lifespan)
    app.state.service = svc
    app.include_router(probes_router(svc))
    app.include_router(openai_api.build_router(svc))
    if config.inference.admin_token:
        app.include_router(admin_router(svc, config.inference.admin_token))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg")
        response = openai_api.error(422, str(message), "invalid_request_error", where or None)
        return response

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, exc.status, headers=headers)

    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=list(UNINSTRUMENTED),
        registry=svc.metrics.registry,
    ).add(svc.metrics.count_request).instrument(app)
    return app
