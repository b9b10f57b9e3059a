"""`sdrt serve --ray`: the same HTTP API on Ray Serve, with engine replicas (one per GPU) autoscaled on queue depth.

Two deployments:
- `EngineReplica`: a `LocalEngine` (a Pipeline and its batcher) per replica, one GPU each; without GPUs, each
  replica is a process with ``replica_cpus`` CPUs. Serve routes every engine call to the replica with the
  shorter queue and scales between ``min_replicas`` and ``max_replicas`` on ongoing requests per replica (queued
  and running: the queue depth), aiming at two engine batches' worth each.
- `Ingress`: `sdrt.serve.app`'s FastAPI app over `RayEngine`. A call whose replica dies (killed, out of
  memory, node lost) is sent again to another replica, until its deadline: generation is a pure function of the
  request, so the retry gives the same images. Past ``retries``, the client gets a 503 with Retry-After.

``serve run`` takes the same application from a config file (see README, "Serving"): `app_builder`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel
from ray import serve
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from sdrt.runtime.model import Model
from sdrt.runtime.params import DEFAULT_BACKEND, Params, load_options
from sdrt.serve.app import create_app, limits_of, options_of
from sdrt.serve.batch import Closed, Expired, QueueFull
from sdrt.serve.cli import (
    BATCH_WINDOW_MS,
    MAX_BODY_MB,
    MAX_JSON_VALUES,
    MAX_PROMPT_CHARS,
    MAX_QUEUE,
    MIN_REPLICAS,
    REPLICA_CPUS,
    TIMEOUT_S,
    WARMUP_STEPS,
)
from sdrt.serve.engine import EngineOptions, Generated, LocalEngine
from sdrt.serve.limits import Limits
from sdrt.serve.metrics import Metrics

log = logging.getLogger("sdrt")
GRACE_S = 5.0  # past a call's deadline, how long the ingress waits for its replica's own 504 before giving up
SEEN_BATCHES = 4096  # batch ids remembered so that a batch shared by several calls is counted once
RETRIES = 3  # how many times a call whose replica died is sent again


class EngineReplica:
    """One engine per replica, loaded and warmed before Serve routes to it."""

    def __init__(self, root: str, load: dict, options: EngineOptions):
        from sdrt.runtime.pipeline import Pipeline

        pipe = Pipeline.load(root, **load)
        try:
            name = serve.get_replica_context().replica_id.unique_id
        except (RuntimeError, AttributeError):
            name = uuid.uuid4().hex[:8]
        self.engine = LocalEngine(pipe, options, Metrics(), name)
        self.engine.warm()

    async def run(self, calls: list[Params], timeout_s: float) -> Generated:
        return await self.engine.run(calls, timeout_s)

    async def ready(self) -> bool:
        return await self.engine.ready()

    def pid(self) -> int:
        return os.getpid()

    def __del__(self) -> None:  # Serve calls it once the requests in flight are answered
        self.engine.batcher.close()


class RayEngine:
    """The engine shape of `sdrt.serve.engine` (`LocalEngine`'s) over a handle to `EngineReplica`s: retries on
    another replica when one dies."""

    def __init__(self, handle: DeploymentHandle, model: str, max_px: int, metrics: Metrics, retries: int = RETRIES):
        self.handle, self.model, self.max_px, self.metrics, self.retries = handle, model, max_px, metrics, retries
        self._waiting = 0  # engine calls sent and not yet answered
        self._seen: OrderedDict[str, None] = OrderedDict()
        metrics.watch_queue(lambda: self._waiting)

    async def start(self) -> None:  # replicas warm themselves before Serve routes to them
        return None

    async def stop(self) -> None:  # Serve drains the replicas at shutdown
        return None

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.ready.remote(), 5))
        except Exception:  # noqa: BLE001 - no replica answers: not ready, whatever the reason
            return False

    async def run(self, calls: list[Params], timeout_s: float) -> Generated:
        deadline = time.monotonic() + timeout_s
        self._waiting += len(calls)
        try:
            gen = await self._call(calls, deadline)
        finally:
            self._waiting -= len(calls)
        for batch_id, requests, images in gen.batches:
            if batch_id not in self._seen:
                self._seen[batch_id] = None
                self.metrics.batch_requests.observe(requests)
                self.metrics.batch_images.observe(images)
        while len(self._seen) > SEEN_BATCHES:
            self._seen.popitem(last=False)
        return gen

    async def _call(self, calls: list[Params], deadline: float) -> Generated:
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            response = self.handle.run.remote(calls, left)
            try:
                return await asyncio.wait_for(response, left + GRACE_S)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                response.cancel()  # the replica drops the work too
                raise
            except RayTaskError as err:  # the replica raised: the engine's own error (400, 503, 504, 500)
                raise err.cause from None
            except BackPressureError:
                raise QueueFull(1) from None
            except (RayActorError, OutOfMemoryError) as err:  # the replica died with the call (killed, or by Ray's
                # memory monitor: its in-flight calls may fail as OutOfMemoryError, not ActorDiedError): retry
                if attempt == self.retries:
                    raise Closed(f"engine replicas died {attempt + 1} times under this request: {err}") from None
                self.metrics.retries.inc()
                log.warning("engine replica died under a call; retrying (%d of %d)", attempt + 1, self.retries)
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
        raise Expired("no replica answered before the deadline")


@serve.ingress()
class Ingress:
    """The HTTP API of `sdrt.serve.app`, in front of the engine replicas: the body, image and prompt limits
    are checked here, before anything is sent to a replica."""

    def __init__(
        self, engine: DeploymentHandle, model: str, max_px: int, timeout_s: float, retries: int, limits: Limits
    ):
        metrics = Metrics()
        self._http = create_app(RayEngine(engine, model, max_px, metrics, retries), metrics, timeout_s, limits)

    def __serve_build_asgi_app__(self):
        return self._http


class ServeArgs(BaseModel):
    """`app_builder`'s arguments, as ``serve run ... key=value`` or a config file's ``args`` give them."""

    dir: str
    backend: str = DEFAULT_BACKEND
    cpu_precision: str | None = None
    cpu_int8: bool = False
    refiner: str | None = None
    device: str | None = None
    cuda_graph: bool = True
    max_batch: int | None = None
    batch_window_ms: float = BATCH_WINDOW_MS
    max_queue: int = MAX_QUEUE
    timeout_s: float = TIMEOUT_S
    warmup_steps: int = WARMUP_STEPS
    min_replicas: int = MIN_REPLICAS
    max_replicas: int | None = None
    replica_cpus: float = REPLICA_CPUS
    retries: int = RETRIES
    max_body_mb: float = MAX_BODY_MB
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_json_values: int = MAX_JSON_VALUES

    @property
    def no_cuda_graph(self) -> bool:
        """As `sdrt serve`'s flag names it, so `params.load_options` reads both alike."""
        return not self.cuda_graph


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application ``serve run sdrt.serve.ray_app:app_builder dir=ENGINES`` deploys (``args`` as
    `ServeArgs`; a bad value is a validation error naming the field)."""
    args = ServeArgs.model_validate(args)
    return app_of(args, limits_of(args), args.retries)


def app_of(args, limits: Limits, retries: int = RETRIES) -> serve.Application:
    """`build_app` for `sdrt serve --ray`'s flags or `ServeArgs`, which name the same options alike."""
    return build_app(
        args.dir,
        load_options(args),
        options_of(args),
        args.timeout_s,
        args.min_replicas,
        args.max_replicas,
        args.replica_cpus,
        retries,
        limits,
    )


def build_app(
    root: str | Path,
    load: dict,
    options: EngineOptions,
    timeout_s: float = TIMEOUT_S,
    min_replicas: int = MIN_REPLICAS,
    max_replicas: int | None = None,
    replica_cpus: float = REPLICA_CPUS,
    retries: int = RETRIES,
    limits: Limits | None = None,
) -> serve.Application:
    """Ingress -> engine replicas for engine directory ``root`` (a path every Ray node can read)."""
    model = Model.read(root)  # the model's name and limits, without loading any engine
    most = model.max_images
    per_replica = min(options.max_batch or most, most)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    max_replicas = max_replicas or max(gpus, min_replicas, 1)
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"replicas: need 1 <= --min-replicas ({min_replicas}) <= --max-replicas ({max_replicas})")
    scaling = (
        {"num_replicas": min_replicas}
        if min_replicas == max_replicas
        else {
            "autoscaling_config": {
                "min_replicas": min_replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": 2 * per_replica,
            }
        }
    )
    engine = serve.deployment(EngineReplica).options(
        ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": replica_cpus},
        max_ongoing_requests=options.max_queue + per_replica,  # past it, calls wait at the ingress's router
        max_queued_requests=options.max_queue * max_replicas,  # past that, 503
        graceful_shutdown_timeout_s=timeout_s,
        **scaling,
    )
    ingress = serve.deployment(Ingress).options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    replicas = engine.bind(str(Path(root).resolve()), load, options)
    return ingress.bind(replicas, model.name, model.max_px, timeout_s, retries, limits or Limits())


def main(args) -> int:
    """`sdrt serve --ray DIR`: start (or join) a Ray cluster, deploy, and serve until SIGINT or SIGTERM; then
    Serve stops routing and each replica answers what it has in flight before it exits."""
    limits = limits_of(args)  # a bad flag fails before Ray starts
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = app_of(args, limits)
    serve.run(app, name="sdrt", route_prefix="/")
    log.info("serving %s on Ray Serve at http://%s:%d", args.dir, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
