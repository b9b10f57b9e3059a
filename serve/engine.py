"""The engine behind the HTTP API: validated calls in, PNGs out. `LocalEngine` drives one Pipeline in-process.

The HTTP layer (`sdrt.serve.app`) talks to anything with this shape: ``start()`` (warm up, in the
background), ``ready()``, ``run(calls, timeout_s) -> Generated``, ``stop()`` (drain). `LocalEngine` is that over
a `Pipeline` and its `Batcher`; `sdrt.serve.ray_app` is the same over Ray Serve replicas of it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.infotext import encode_png, png_parameters
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.serve.answers import echo_v1
from sdrt.serve.batch import Batcher, Closed, Expired, Output
from sdrt.serve.cli import BATCH_WINDOW_MS, MAX_QUEUE, WARMUP_STEPS
from sdrt.serve.metrics import Metrics

log = logging.getLogger("sdrt")


@dataclass(frozen=True)
class Generated:
    """The answer to one HTTP request's calls, in call order. Plain data: it crosses process boundaries."""

    pngs: list[list[bytes]]  # per call, its images as PNG files
    infotexts: list[list[str]]  # per call, each image's `parameters` text
    parameters: list[dict]  # per call, its resolved parameters (seed drawn, defaults filled in)
    timings_ms: list[dict[str, float]]  # per call: queue wait, engine stages of its batch, PNG encoding
    batches: list[tuple[str, int, int]]  # per call: (batch id, requests joined, images) of the batch it ran in


@dataclass(frozen=True)
class EngineOptions:
    """How `sdrt serve` batches: ``max_batch`` images per engine batch (None: the engine's most), the joining
    window, the queue's bound in images, and the warm-up request's steps."""

    max_batch: int | None = None
    window_ms: float = BATCH_WINDOW_MS
    max_queue: int = MAX_QUEUE
    warmup_steps: int = WARMUP_STEPS


class LocalEngine:
    """One Pipeline behind a `Batcher`; encodes PNGs off the worker thread."""

    def __init__(self, pipe: Pipeline, options: EngineOptions, metrics: Metrics, name: str = ""):
        most = pipe.model.max_images
        if options.max_batch is not None and options.max_batch < 1:
            raise SdrtError(f"--max-batch must be >= 1, got {options.max_batch}")
        self.pipe, self.options, self.metrics = pipe, options, metrics
        self.max_px = pipe.model.max_px
        self.max_images = min(options.max_batch or most, most)  # the engine's graphs take no more
        if options.max_queue < self.max_images:
            raise SdrtError(f"--max-queue {options.max_queue} is below one batch ({self.max_images} images); raise it")
        self.model = pipe.model.name
        self.batcher = Batcher(pipe, self.max_images, options.window_ms / 1e3, options.max_queue, metrics, name)
        metrics.watch_queue(self.batcher.depth, self.batcher.running)
        self._ready = threading.Event()

    def warm(self) -> None:
        """Batches of 1 to ``max_images`` one-image requests at the engine's default size and sampler: the
        batches the queue forms from common requests, so that no client pays for loading kernels or, on a GPU,
        capturing their graphs."""
        t = time.perf_counter()
        image = mask = None
        if self.pipe.model.inpainting:  # an inpainting U-Net takes only image + mask
            size = self.pipe.default_size()[::-1]  # PIL: (width, height)
            image, mask = Image.new("RGB", size, (128, 128, 128)), Image.new("L", size, 255)
        req = self.pipe.request(Params(prompt="", steps=self.options.warmup_steps, seed=0, image=image, mask=mask))
        for k in range(1, self.max_images + 1):
            self.pipe.generate_batch([req] * k)
        log.info(
            "warm: %dx%d, %d steps, batches of 1-%d in %.1f s",
            req.width,
            req.height,
            req.steps,
            self.max_images,
            time.perf_counter() - t,
        )
        self._ready.set()

    async def start(self) -> None:
        await asyncio.to_thread(self.warm)

    async def ready(self) -> bool:
        return self._ready.is_set()

    async def stop(self) -> None:
        """Finish every queued and running request, then end the worker."""
        self.batcher.close()
        await asyncio.to_thread(self.batcher.join)

    async def run(self, calls: list[Params], timeout_s: float) -> Generated:
        """Validate ``calls`` (an `SdrtError` names the problem), queue them, wait for all, encode their PNGs.
        Past ``timeout_s``: `Expired`, with their work dropped; cancelled (the client left): dropped too."""
        if not self._ready.is_set():
            raise Closed("the engine is still warming up")
        deadline = time.monotonic() + timeout_s
        try:  # resizing init images and masks: in a thread, never on the batch worker
            reqs = await asyncio.to_thread(self._requests, calls)
        except asyncio.CancelledError:
            self.metrics.dropped.labels("cancelled", "preparing").inc()
            raise
        if time.monotonic() >= deadline:
            self.metrics.dropped.labels("deadline", "preparing").inc()
            raise Expired(f"no answer within {timeout_s:g} s: the deadline passed while the request was prepared")
        jobs = self.batcher.submit(reqs, deadline - time.monotonic())
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), deadline - time.monotonic())
        except asyncio.TimeoutError:
            self.batcher.cancel(jobs, "deadline")
            raise Expired(f"no answer within {timeout_s:g} s") from None
        except Expired:
            self.batcher.cancel(jobs, "deadline")
            raise
        except BaseException:  # cancelled (the client went away), or one of the calls failed: drop the others
            self.batcher.cancel(jobs, "cancelled")
            raise
        return await asyncio.to_thread(self._encode, reqs, outputs)

    def _requests(self, calls: list[Params]) -> list[Request]:
        reqs = [self.pipe.request(c) for c in calls]
        images = sum(r.batch for r in reqs)
        if images > self.options.max_queue:
            raise SdrtError(
                f"{images} images in one request exceed the server's queue of {self.options.max_queue}", field="n"
            )
        return reqs

    def _encode(self, reqs: list[Request], outputs: list[Output]) -> Generated:
        pngs, texts, timings = [], [], []
        for req, out in zip(reqs, outputs, strict=True):
            t = time.perf_counter()
            precision = self.pipe.backend.inference_precision
            refiner = self.pipe.refiner.model.name if self.pipe.refiner else None
            texts.append([png_parameters(req, self.model, i, precision, refiner) for i in range(req.batch)])
            pngs.append([encode_png(px.numpy(), text) for px, text in zip(out.pixels, texts[-1], strict=True)])
            timings.append({**out.timings_ms, "encode_ms": (time.perf_counter() - t) * 1e3})
        params = [echo_v1(r, self.model) for r in reqs]
        batches = [(o.batch_id, o.batch_requests, o.batch_images) for o in outputs]
        return Generated(pngs, texts, params, timings, batches)
