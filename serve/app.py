"""`sdrt serve`: the HTTP API (FastAPI on uvicorn) over an engine that batches concurrent requests.

Endpoints: ``POST /v1/images``, ``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` (the web-UI request shape),
``POST /v1/images/generations`` (OpenAI's request and answer), ``GET /sdapi/v1/samplers`` and
``/sdapi/v1/embeddings`` (the directory's textual-inversion embeddings, as the web UI lists them), ``GET /healthz``
(process up), ``GET /readyz`` (warm), ``GET /metrics`` (Prometheus).

Every failure is one JSON body ``{"error": kind, "field": ..., "detail": message}`` (on the OpenAI endpoint,
OpenAI's ``{"error": {"message", "type", "param", "code"}}``): 400 names the field at fault;
503 (queue full, warming up, shutting down) carries ``Retry-After``; 504 means the deadline passed and the work
was dropped; 500 is an internal failure, after which the server goes on serving. A request's deadline is the
server's ``--timeout-s``, or less when the client asks (``X-Request-Timeout`` seconds, or ``timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params, load_options
from sdrt.serve import openai_api
from sdrt.serve.answers import b64, webui_info
from sdrt.serve.batch import Closed, Expired, QueueFull
from sdrt.serve.cli import TIMEOUT_S
from sdrt.serve.engine import EngineOptions, Generated
from sdrt.serve.inputs import ApiError, bad_request, field_of
from sdrt.serve.limits import BodyLimit, Limits, check_prompts
from sdrt.serve.metrics import Metrics
from sdrt.serve.sampler_names import WEBUI_NAMES
from sdrt.serve.v1_api import ImagesRequest
from sdrt.serve.webui_api import Img2ImgRequest, Txt2ImgRequest

log = logging.getLogger("sdrt")
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there
ENDPOINTS = (
    "/v1/images",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/v1/images/generations",
    "/sdapi/v1/samplers",
    "/sdapi/v1/embeddings",
    "/healthz",
    "/readyz",
    "/metrics",
)


class Engine(Protocol):
    """What the HTTP layer drives: `engine.LocalEngine`, or `ray_app.RayEngine` over replicas of it."""

    model: str
    max_px: int  # the engine's largest image side: what bounds the init images it is sent

    async def start(self) -> None: ...
    async def ready(self) -> bool: ...
    async def run(self, calls: list[Params], timeout_s: float) -> Generated: ...
    async def stop(self) -> None: ...


class Disconnected(Exception):
    """The client went away before its answer was ready; its work was dropped."""


def create_app(engine: Engine, metrics: Metrics, timeout_s: float = TIMEOUT_S, limits: Limits | None = None) -> FastAPI:
    """The app over ``engine``. Its lifespan warms the engine in the background (``/readyz`` says when it is done)
    and, at shutdown, after uvicorn has stopped accepting and answered the requests in flight, drains it.
    ``limits`` (default: `Limits`' defaults) bound what one request may cost (see `sdrt.serve.limits`)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.create_task(engine.start())
        warm.add_done_callback(_log_failure)
        yield
        if not warm.done():
            warm.cancel()
        await engine.stop()

    app = FastAPI(title="sdrt", lifespan=lifespan)
    app.add_middleware(BodyLimit, limits=limits, metrics=metrics)
    app.add_middleware(_Timing, metrics=metrics)  # added last: outermost, so it also times and counts the 413s

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = _field_path(first.get("loc", ()))
        if first.get("type") == "json_invalid" or not where:  # the body is not JSON (loc is a byte offset)
            where = "body"
        return _error(bad_request(where, f"{where}: {first['msg']}"), metrics, request.scope["path"])

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """No such path (404) or method (405): the same JSON body as every other failure, not FastAPI's own."""
        kind = "not_found" if err.status_code == 404 else "bad_request"
        answer = _error(ApiError(err.status_code, kind, str(err.detail)), metrics, request.scope["path"])
        answer.headers.update(err.headers or {})  # 405's Allow
        return answer

    _generation_routes(app, _Generation(engine, metrics, timeout_s, limits))
    _operation_routes(app, engine, metrics)
    return app


class _Generation:
    """One generation request from parsed body to answer: limits, calls, deadline, the wait, every failure as
    JSON."""

    def __init__(self, engine: Engine, metrics: Metrics, timeout_s: float, limits: Limits):
        self.engine, self.metrics, self.timeout_s, self.limits = engine, metrics, timeout_s, limits
        self.max_pixels = limits.max_image_pixels(engine.max_px)

    async def __call__(
        self,
        request: Request,
        body: Txt2ImgRequest | ImagesRequest,
        timeout: float | None,
        answer: Callable[[Generated], Response],
    ) -> Response:
        self.metrics.in_flight.inc()
        try:
            check_prompts(
                {"prompt": body.prompt, "negative_prompt": body.negative_prompt}, self.limits.max_prompt_chars
            )
            work = self._work(body, _timeout(request, timeout, self.timeout_s))
            gen = await _until_disconnected(request, work)
            self.metrics.images.inc(sum(len(p) for p in gen.pngs))
            return answer(gen)
        except asyncio.CancelledError:  # the server cancels a handler whose client left (Ray Serve does)
            self.metrics.errors.labels("disconnected", "").inc()
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes one JSON answer
            return _error(_as_api_error(err, body.fields), self.metrics, request.scope["path"])
        finally:
            self.metrics.in_flight.dec()

    async def _work(self, body: Txt2ImgRequest | ImagesRequest, timeout_s: float) -> Generated:
        """Decode the body's images into calls (in a thread: the event loop goes on serving), then run them. A
        client that leaves or a deadline that passes meanwhile drops the request before it reaches the engine."""
        deadline = time.monotonic() + timeout_s
        try:
            calls: list[Params] = await asyncio.to_thread(body.calls, self.max_pixels, self.engine.model)
        except asyncio.CancelledError:
            self.metrics.dropped.labels("cancelled", "preparing").inc()
            raise
        if time.monotonic() >= deadline:
            self.metrics.dropped.labels("deadline", "preparing").inc()
            raise Expired(f"no answer within {timeout_s:g} s: the deadline passed while its images were decoded")
        return await self.engine.run(calls, deadline - time.monotonic())


def _generation_routes(app: FastAPI, serve: _Generation) -> None:
    model = serve.engine.model

    @app.post("/v1/images")
    async def images(body: ImagesRequest, request: Request) -> Response:
        """JSON: ``{"images": [base64 PNG], "parameters", "timings_ms", "batch"}``; ``Accept: image/png``
        (without ``application/json``) gets the PNG itself for a one-image request."""
        raw = _wants_png(request)
        if raw and body.n != 1:
            return _error(
                ApiError(406, "bad_request", "Accept: image/png answers one image; ask n=1", "n"), serve.metrics
            )
        return await serve(request, body, body.timeout_s, lambda g: _v1_answer(g, raw))

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request) -> Response:
        return await serve(request, body, None, lambda g: _sdapi_answer(g, body, model))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request) -> Response:
        return await serve(request, body, None, lambda g: _sdapi_answer(g, body, model))

    @app.post("/v1/images/generations")
    async def generations(body: openai_api.GenerationsRequest, request: Request) -> Response:
        """OpenAI's image API (`sdrt.serve.openai_api`)."""
        return await serve(request, body, body.timeout_s, openai_api.answer)


def _operation_routes(app: FastAPI, engine: Engine, metrics: Metrics) -> None:
    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": web, "aliases": [ours], "options": {}} for ours, web in WEBUI_NAMES.items()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:  # the web UI's answer; "shape": the vectors' width (all encoders')
        e = engine.pipe.embeddings
        width = sum(t.shape[1] for t in e.tables)
        loaded = {
            name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": count}
            for name, (_, count) in e.rows.items()
        }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await engine.ready()
        return JSONResponse({"ready": ready, "model": engine.model}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


async def _until_disconnected(request: Request, work: Awaitable[Generated]) -> Generated:
    """Await ``work`` while the client is there; cancel it (so its queued requests are dropped) when it leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise Disconnected("the client disconnected")
    finally:  # also when this handler itself is cancelled, as Ray Serve does when its client goes
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task


def _field_path(loc: tuple) -> str:
    """A validation error's location as the client names the field: ``("body", "init_images", 0)`` ->
    ``init_images.0``, ``("body", "controlnets", 1, "scale")`` -> ``controlnets.1.scale`` (a name after an index
    is a field of a list item); a name right after a name (a union member's type) ends it."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    path = [str(p) for p in parts[:1]]
    for before, p in zip(parts, parts[1:], strict=False):
        if not isinstance(p, int) and not isinstance(before, int):
            break
        path.append(str(p))
    return ".".join(path)


def _timeout(request: Request, asked: float | None, default: float) -> float:
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            raise bad_request("X-Request-Timeout", f"X-Request-Timeout {header!r} is not a number of seconds") from None
        if not asked > 0:
            raise bad_request("X-Request-Timeout", f"X-Request-Timeout must be > 0 seconds, got {header!r}")
    return min(asked, default) if asked is not None else default


def _wants_png(request: Request) -> bool:
    accept = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    return "image/png" in accept and "application/json" not in accept


def _as_api_error(err: Exception, fields: Callable[[], dict[str, str]]) -> ApiError:
    """Map any failure to the answer a client gets; ``fields``: the body's table of its spelling of each field."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, SdrtError):
        return bad_request(field_of(err, fields()), str(err))
    if isinstance(err, QueueFull):
        return ApiError(503, "queue_full", "the server's queue is full; retry later", retry_after=err.retry_after)
    if isinstance(err, Closed):
        return ApiError(503, "unavailable", str(err), retry_after=5)
    if isinstance(err, Expired):
        return ApiError(504, "deadline", f"deadline passed: {err}")
    if isinstance(err, Disconnected):
        return ApiError(499, "disconnected", str(err))  # nobody reads it; the status names what happened
    log.error("internal failure", exc_info=err)
    return ApiError(500, "internal", f"internal error: {type(err).__name__}: {err}")


def _error(err: ApiError, metrics: Metrics, path: str = "") -> JSONResponse:
    metrics.errors.labels(err.kind, err.reason).inc()
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    body = {"error": err.kind, "field": err.field, "detail": err.message}
    if path in openai_api.PATHS:
        body = openai_api.error_body(err)
    return JSONResponse(body, status_code=err.status, headers=headers)


def _v1_answer(gen: Generated, raw_png: bool) -> Response:
    (pngs,), (params,), (timings,), (batch,) = gen.pngs, gen.parameters, gen.timings_ms, gen.batches
    if raw_png:
        timing = ", ".join(f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in timings.items())
        headers = {"X-Seed": str(params["seed"]), "Server-Timing": timing}
        return Response(pngs[0], media_type="image/png", headers=headers)
    body = {
        "images": [b64(p) for p in pngs],
        "parameters": params,
        "timings_ms": timings,
        "batch": {"id": batch[0], "requests": batch[1], "images": batch[2]},
    }
    return JSONResponse(body)


def _sdapi_answer(gen: Generated, body: Txt2ImgRequest, model: str) -> JSONResponse:
    texts = [t for call in gen.infotexts for t in call]
    images = [b64(p) for call in gen.pngs for p in call]
    info = webui_info(gen.parameters, texts, model, body.prompt)
    return JSONResponse({"images": images, "parameters": body.echo(), "info": info})


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warm-up failed; /readyz stays 503", exc_info=task.exception())


class _Timing:
    """ASGI middleware: latency per endpoint and answers per (endpoint, status). Pure ASGI (no response
    buffering), so a waiting handler still sees its client disconnect."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, t0 = ["500"], time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.responses.labels(endpoint, status[0]).inc()


def options_of(args) -> EngineOptions:
    return EngineOptions(args.max_batch, args.batch_window_ms, args.max_queue, args.warmup_steps)


def limits_of(args) -> Limits:
    """The per-request limits the flags (or `ray_app.ServeArgs`) ask for; a bad one is an `SdrtError`."""
    limits = Limits(args.max_body_mb, args.max_prompt_chars, args.max_json_values)
    try:
        limits.check()
    except ValueError as err:
        raise SdrtError(str(err)) from None
    return limits


def main(args) -> int:
    """`sdrt serve DIR`: load (a damaged directory fails here, before the port opens), then serve until SIGINT or
    SIGTERM; at either, uvicorn stops accepting, answers the requests in flight, and the engine drains."""
    import uvicorn

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.serve.engine import LocalEngine

    if args.timeout_s <= 0:
        raise SdrtError(f"--timeout-s must be > 0, got {args.timeout_s}")
    limits = limits_of(args)
    pipe = Pipeline.load(args.dir, **load_options(args))
    metrics = Metrics()
    metrics.watch_gpu()
    engine = LocalEngine(pipe, options_of(args), metrics)
    app = create_app(engine, metrics, args.timeout_s, limits)
    log.info(
        "serving %s (%s on %s, batches of up to %d images) at http://%s:%d",
        args.dir,
        pipe.backend.name,
        pipe.device,
        engine.max_images,
        args.host,
        args.port,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=int(args.timeout_s) + 1
    )
    pipe.close()
    return 0
