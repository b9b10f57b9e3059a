"""`sdrt serve`'s command line. Light on purpose: `sdrt --help` builds it without importing the server."""

from __future__ import annotations

import argparse

from sdrt.runtime.errors import needs_extra
from sdrt.runtime.params import BACKENDS, DEFAULT_BACKEND

# `sdrt serve`'s defaults, each written once: the flags below state them, and `EngineOptions`, `Limits`,
# `create_app` and `ray_app.ServeArgs` read them from here (this module imports nothing else of sdrt.serve, so
# that `sdrt --help` loads no server)
HOST = "127.0.0.1"
PORT = 8000
BATCH_WINDOW_MS = 20.0  # how long the oldest waiting request waits for others to join it
MAX_QUEUE = 64  # images that may wait
TIMEOUT_S = 300.0  # a request's deadline
MAX_BODY_MB = 32.0
MAX_PROMPT_CHARS = 8192
MAX_JSON_VALUES = 65536
WARMUP_STEPS = 20
MIN_REPLICAS = 1  # Ray Serve
REPLICA_CPUS = 1.0  # Ray Serve, without GPUs


def run(args: argparse.Namespace) -> int:
    """Serve with the stage the flags ask for, imported only now (FastAPI, uvicorn, Ray are slow to import)."""
    with needs_extra("sdrt serve", "serve"):
        if args.ray:
            from sdrt.serve.ray_app import main as serve_main
        else:
            from sdrt.serve.app import main as serve_main
    return serve_main(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`sdrt serve DIR [options]` on the CLI's subparsers."""
    s = sub.add_parser(
        "serve",
        help="HTTP server: /v1/images, the web-UI /sdapi/v1 API and OpenAI's /v1/images/generations, with dynamic "
        "batching",
        description="Serve an engine directory over HTTP: POST /v1/images, /sdapi/v1/txt2img and /sdapi/v1/img2img "
        "(the web UI's API), /v1/images/generations (OpenAI's image API: the openai client works with "
        "base_url=http://HOST:PORT/v1); GET /healthz, /readyz and /metrics (Prometheus). Concurrent requests of one "
        "size, step count and sampler join one engine batch; each still gets exactly the images its seed gives "
        "alone. With --ray, the same API on Ray Serve with one engine replica per GPU.",
    )
    s.add_argument("dir", metavar="DIR", help="an engine directory from `sdrt export` (and `sdrt build`)")
    _add_listening(s)
    _add_batching(s)
    _add_limits(s)
    _add_engine(s)
    _add_ray(s.add_argument_group("Ray Serve (--ray)"))
    s.set_defaults(func=run)


def _add_listening(s: argparse.ArgumentParser) -> None:
    """Where `sdrt serve` listens."""
    s.add_argument("--host", default=HOST, help=f"address to listen on (default {HOST})")
    s.add_argument("--port", type=int, default=PORT, help=f"port (default {PORT})")


def _add_batching(s: argparse.ArgumentParser) -> None:
    """How requests join engine batches, how many may wait, and for how long."""
    s.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="most images per engine batch (default and cap: the engine's max_images)",
    )
    s.add_argument(
        "--batch-window-ms",
        type=float,
        default=BATCH_WINDOW_MS,
        metavar="MS",
        help=f"how long the oldest waiting request waits for others to join it (default {BATCH_WINDOW_MS:g})",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        metavar="N",
        help=f"images that may wait; past it, 503 with Retry-After (default {MAX_QUEUE})",
    )
    s.add_argument(
        "--timeout-s",
        type=float,
        default=TIMEOUT_S,
        metavar="S",
        help="deadline of a request (clients may ask less with X-Request-Timeout); past it, 504 and its work "
        f"dropped (default {TIMEOUT_S:g})",
    )


def _add_limits(s: argparse.ArgumentParser) -> None:
    """What one request may cost (`sdrt.serve.limits`)."""
    s.add_argument(
        "--max-body-mb",
        type=float,
        default=MAX_BODY_MB,
        metavar="MB",
        help=f"largest request body; past it, 413 before the rest is read (default {MAX_BODY_MB:g})",
    )
    s.add_argument(
        "--max-prompt-chars",
        type=int,
        default=MAX_PROMPT_CHARS,
        metavar="N",
        help="longest prompt or negative prompt, in characters; past it, 400 "
        f"(default {MAX_PROMPT_CHARS}; CLIP reads only the first 75 tokens)",
    )
    s.add_argument(
        "--max-json-values",
        type=int,
        default=MAX_JSON_VALUES,
        metavar="N",
        help="most JSON values in a request body (counted as its commas and brackets, before parsing); past it, "
        f"413 (default {MAX_JSON_VALUES})",
    )


def _add_engine(s: argparse.ArgumentParser) -> None:
    """The engine served: its warm-up, and how it is loaded (as `sdrt generate`)."""
    s.add_argument(
        "--warmup-steps",
        type=int,
        default=WARMUP_STEPS,
        metavar="N",
        help="steps of the warm-up request at the default size, run before /readyz says ready "
        f"(default {WARMUP_STEPS})",
    )
    s.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="as `sdrt generate --backend`")
    s.add_argument("--cpu-precision", choices=("bf16", "f32"), help="as `sdrt generate --cpu-precision`")
    s.add_argument("--cpu-int8", action="store_true", help="as `sdrt generate --cpu-int8`")
    s.add_argument(
        "--refiner",
        metavar="DIR",
        help="an SDXL refiner's engine directory, loaded beside an SDXL base: requests with refiner_switch_at "
        "hand over to it",
    )
    s.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available")
    s.add_argument("--no-cuda-graph", action="store_true", help="run step by step instead of captured graphs")


def _add_ray(r: argparse._ArgumentGroup) -> None:
    """`sdrt serve --ray`: Ray Serve's cluster and replicas."""
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve: one engine replica per GPU, autoscaled")
    r.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: start one on this machine)")
    r.add_argument(
        "--min-replicas",
        type=int,
        default=MIN_REPLICAS,
        metavar="N",
        help=f"engine replicas kept (default {MIN_REPLICAS})",
    )
    r.add_argument(
        "--max-replicas",
        type=int,
        metavar="N",
        help="most engine replicas (default: the cluster's GPUs, or 1 without GPUs)",
    )
    r.add_argument(
        "--replica-cpus",
        type=float,
        default=REPLICA_CPUS,
        metavar="N",
        help=f"CPUs each engine replica reserves where there is no GPU (default {REPLICA_CPUS:g})",
    )
