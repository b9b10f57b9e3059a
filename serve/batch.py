"""Dynamic batching: engine requests that may share one engine batch are joined, then run by one worker thread.

Requests arrive from the event loop (`Batcher.submit`) into one bounded FIFO queue. The worker takes the oldest
request, waits until ``window_s`` after it arrived for others with the same `Request.join_key` (stopping early
once ``max_images`` are gathered), and runs them as one `Pipeline.generate_batch`. Engine batches are serialised:
there is one worker and it holds the pipeline's lock while it runs.

A request leaves the queue when its deadline passes or its caller cancels it (a client that went away); if it is
already part of the running batch, its images are dropped when the batch ends. Each request's images are exactly
what it gives alone: `generate_batch` guarantees that, and the batcher never changes a request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.serve.metrics import Metrics

log = logging.getLogger("sdrt")


class QueueFull(Exception):
    """The queue has no room for the request; ``retry_after`` (s) estimates when it will."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class Expired(Exception):
    """The request's deadline passed before its images were ready; its work was dropped."""


class Closed(Exception):
    """The server is shutting down (or not started) and takes no new requests."""


@dataclass(eq=False)
class Job:
    """One engine request in the queue, with the asyncio future its caller awaits."""

    req: Request
    key: tuple
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running -> done; or dropped (deadline, cancelled)

    @property
    def images(self) -> int:
        return self.req.batch


@dataclass(frozen=True)
class Output:
    """A request's images and how they were made: its wait, the engine stages of its batch, the batch it ran in."""

    pixels: torch.Tensor  # uint8 [n, H, W, 3]
    timings_ms: dict[str, float]
    batch_id: str
    batch_requests: int
    batch_images: int


class Batcher:
    """A bounded queue of engine requests and the worker thread that runs them in joined batches."""

    def __init__(self, pipe: Pipeline, max_images: int, window_s: float, max_queue: int, metrics: Metrics, name=""):
        self.pipe, self.max_images, self.window_s, self.max_queue = pipe, max_images, window_s, max_queue
        self.metrics, self.name = metrics, name or f"b{id(self):x}"
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._closed = False
        self._batch_s = 1.0  # moving average of an engine batch's wall time, for Retry-After
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._work, name="sdrt-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Engine requests waiting (the running batch not counted)."""
        return len(self._queue)

    def running(self) -> int:
        """Engine requests in the batch being run."""
        return len(self._running)

    def submit(self, reqs: list[Request], timeout_s: float) -> list[Job]:
        """Queue all of ``reqs`` or none: `QueueFull` when their images do not fit, `Closed` when shutting down."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            queued = sum(j.images for j in self._queue)
            if queued + sum(r.batch for r in reqs) > self.max_queue:
                raise QueueFull(self._retry_after(queued))
            jobs = [Job(r, r.join_key, deadline, loop, loop.create_future()) for r in reqs]
            self._queue.extend(jobs)
            self._cond.notify_all()
        return jobs

    def cancel(self, jobs: list[Job], reason: str) -> None:
        """Drop ``jobs``: out of the queue if still there, else their images are discarded when their batch ends."""
        with self._cond:
            for job in jobs:
                if job.state not in ("queued", "running"):
                    continue
                if job.state == "queued":
                    self._queue.remove(job)
                self.metrics.dropped.labels(reason, job.state).inc()
                job.state = "dropped"
            self._cond.notify_all()  # the oldest request may have gone: the window restarts from the next

    def close(self) -> None:
        """Take no new requests; the worker finishes those queued and running, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker ----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._running = batch
            self._run(batch)
            self._running = []

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is formed (or, once closed, the queue is empty: None)."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._expire(now)
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                batch = self._joinable(head)
                wait = head.enqueued + self.window_s - now
                if wait <= 0 or self._closed or sum(j.images for j in batch) >= self.max_images:
                    for job in batch:
                        self._queue.remove(job)
                        job.state = "running"
                    return batch
                self._cond.wait(min(wait, max(head.deadline - now, 0.0)))

    def _joinable(self, head: Job) -> list[Job]:
        """The oldest request and, in arrival order, every later one with its join key that still fits."""
        batch, images = [head], head.images
        for job in self._queue[1:]:
            if job.key == head.key and images + job.images <= self.max_images:
                batch.append(job)
                images += job.images
        return batch

    def _expire(self, now: float) -> None:
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            job.state = "dropped"
            self.metrics.dropped.labels("deadline", "queued").inc()
            _settle(job, error=Expired("the request's deadline passed while it was queued"))

    def _run(self, batch: list[Job]) -> None:
        start = time.monotonic()
        try:
            pixels, stages = self.pipe.generate_batch([j.req for j in batch])
        except Exception as err:  # one failed batch must not stop the worker: its requests get the error
            log.exception("engine batch of %d request(s) failed", len(batch))
            for job in batch:
                self._deliver(job, error=err)
            return
        batch_s = time.monotonic() - start
        self._batch_s = 0.8 * self._batch_s + 0.2 * batch_s
        images = sum(j.images for j in batch)
        self.metrics.batch_images.observe(images)
        self.metrics.batch_requests.observe(len(batch))
        batch_id = f"{self.name}-{next(self._ids)}"
        for job, px in zip(batch, pixels, strict=True):
            timings = {"queue_ms": (start - job.enqueued) * 1e3, **stages, "batch_ms": batch_s * 1e3}
            self._deliver(job, Output(px, timings, batch_id, len(batch), images))

    def _deliver(self, job: Job, output: Output | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if job.state == "dropped":  # its caller has gone or given up: nobody to give the images to
                return
            job.state = "done"
        _settle(job, output, error)

    def _retry_after(self, queued_images: int) -> int:
        batches = math.ceil(queued_images / self.max_images) + 1
        return min(max(math.ceil(batches * self._batch_s), 1), 60)


def _settle(job: Job, output: Output | None = None, error: BaseException | None = None) -> None:
    """Resolve a job's future from the worker thread, on the future's own event loop."""

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(output)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop has closed: its caller is gone
        pass
