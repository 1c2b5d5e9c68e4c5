"""The HTTP application: probes, metrics, the OpenAI API and the admin routes.

Routes:
    GET  /health                 process up (answers while the model loads)
    GET  /live                   a timed round trip to the engine core; 503 if it hangs or died
    GET  /ready                  200 once the engine runs and the weight version is known
    GET  /metrics                Prometheus text, ``mapo_inference_*``
    GET  /v1/models              the served model and its weight version
    POST /v1/completions         OpenAI-compatible completions
    POST /v1/chat/completions    OpenAI-compatible chat completions
    POST /admin/weights/reload   {"version": N} or {} for the newest  (bearer token)
    POST /admin/pause            the rollout worker takes no new prompts (bearer token)
    POST /admin/resume           (bearer token)

The admin routes exist only when ``inference.admin_token`` is set. The ``/v1`` routes need
``Authorization: Bearer <inference.api_token>`` when that is set; the probes and ``/metrics``
never do. Before a request body is read, :class:`RequestGuard` checks the bearer token (401),
the body's size (413, ``inference.max_body_bytes``: by its Content-Length, and by counting the
bytes of a body sent without one) and the number of generation requests being served (429 with
``Retry-After``, ``inference.max_concurrent_requests``): excess requests are refused at once,
never queued.
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
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.config import RunConfig
from services.inference import openai_api
from services.inference.generation import EngineUnavailable
from services.inference.reload import ReloadRefused
from services.inference.service import InferenceService

log = logging.getLogger(__name__)

#: Probes and scrapes are not counted in ``mapo_inference_requests_total``.
UNINSTRUMENTED = ("^/metrics$", "^/health$")
#: What a 429 tells the client to wait before it tries again.
RETRY_AFTER_S = 1
#: The routes ``inference.api_token`` guards.
API_PREFIX = "/v1/"


def bearer_ok(headers: list[tuple[bytes, bytes]] | Any, expected: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` (``Bearer <token>``)."""
    given = b""
    for name, value in headers:
        if name.lower() == b"authorization":
            given = bytes(value)
            break
    return hmac.compare_digest(given, expected)


class RequestGuard:
    """ASGI middleware: the checks that run before a request body is read.

    In order: the ``/v1`` bearer token (401), the declared body size (413), the number of
    generation requests being served (429 with ``Retry-After``), then the body itself is read
    here, counting its bytes, and refused with 413 as soon as it passes the limit (a chunked
    body declares no size). The app then reads the body from this buffer. A generation request
    holds its slot from before its body is read until its response is sent, so memory held by
    request bodies stays within ``max_concurrent_requests x max_body_bytes`` on those routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_token: str,
        max_body_bytes: int,
        max_concurrent: int,
        limited_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_token}".encode() if api_token else b""
        self.max_body = max_body_bytes
        self.max_concurrent = max_concurrent
        self.limited = limited_paths
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = scope["headers"]
        guarded = self.expected and path.startswith(API_PREFIX)
        if guarded and not bearer_ok(headers, self.expected):
            await self._refuse(
                scope,
                receive,
                send,
                401,
                "a valid bearer token is needed (inference.api_token)",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body:
            await self._too_large(scope, receive, send)
            return
        limited = path in self.limited
        if limited and self.active >= self.max_concurrent:
            await self._refuse(
                scope,
                receive,
                send,
                429,
                f"{self.active} generation requests are being served, the most this replica "
                "takes at once (inference.max_concurrent_requests); retry shortly",
                "rate_limit_error",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
            return
        if limited:
            self.active += 1
        try:
            body = await self._read_body(receive) if _has_body(scope, declared) else None
            if body is False:
                await self._too_large(scope, receive, send)
                return
            if isinstance(body, bytes):
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            if limited:
                self.active -= 1

    async def _read_body(self, receive: Receive) -> bytes | bool:
        """The whole body, or False as soon as it passes the limit (the rest is left unread)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(
            scope,
            receive,
            send,
            413,
            f"the request body is larger than {self.max_body} bytes (inference.max_body_bytes)",
            "invalid_request_error",
        )

    @staticmethod
    async def _refuse(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = openai_api.error(status, message, kind, headers=headers)
        await response(scope, receive, send)


#: The names pydantic gives the members of a union in an error's location, not fields.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field(part: Any) -> bool:
    """Whether a part of a validation error's location names a field or an index (not the
    body itself, nor a member of a union such as ``constrained-str`` or ``list[str]``)."""
    if isinstance(part, int):
        return True
    text = str(part)
    return text != "body" and text not in _UNION_TAGS and text.isidentifier()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _has_body(scope: Scope, declared: int | None) -> bool:
    if declared is not None:
        return declared > 0
    # No Content-Length: a chunked body, or none at all (a GET).
    return any(n.lower() == b"transfer-encoding" for n, _ in scope["headers"])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the buffered body, then the client's later messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def probes_router(service: InferenceService) -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/live", response_model=None)
    async def live() -> JSONResponse | dict[str, str]:
        if service.engine is None and not service.startup_error and service.engine_dead_at is None:
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


def api_auth(token: str) -> Callable[..., None]:
    """The ``/v1`` routes' bearer check, as a dependency (it also declares the scheme)."""
    expected = token.encode()
    scheme = HTTPBearer(auto_error=False, description="inference.api_token")

    def authorize(
        credentials: HTTPAuthorizationCredentials | None = Depends(scheme),  # noqa: B008
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise StarletteHTTPException(
                401, "a valid bearer token is needed", headers={"WWW-Authenticate": "Bearer"}
            )

    return authorize


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
    inf = config.inference
    # The scheme is declared in the OpenAPI schema; RequestGuard checks the token before the
    # body is read, this dependency checks it again where the route runs.
    api_dependencies = [Depends(api_auth(inf.api_token))] if inf.api_token else []
    app.include_router(openai_api.build_router(svc), dependencies=api_dependencies)
    if inf.admin_token:
        app.include_router(admin_router(svc, inf.admin_token))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = () if first.get("type") == "json_invalid" else first.get("loc", ())
        where = ".".join(str(p) for p in loc if _is_field(p))
        what = str(first.get("msg", "invalid request"))
        message = f"{where}: {what}" if where else what
        response = openai_api.error(422, str(message), "invalid_request_error", where or None)
        return response

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An unknown route (404), a wrong method (405), a refused token: OpenAI's shape too.
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return openai_api.error(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    # Added before the instrumentation, so that its refusals are counted like any response.
    app.add_middleware(
        RequestGuard,
        api_token=inf.api_token,
        max_body_bytes=inf.max_body_bytes,
        max_concurrent=inf.max_concurrent_requests,
        limited_paths=openai_api.GENERATION_PATHS,
    )
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=list(UNINSTRUMENTED),
        registry=svc.metrics.registry,
    ).add(svc.metrics.count_request).instrument(app)
    return app
