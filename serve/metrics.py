"""The server's Prometheus metrics, in a registry of their own (one per app, so several apps share a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Everything `/metrics` shows. Queue depth, the running batch and GPU memory are read when scraped, not pushed."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.latency = Histogram(
            "sdrt_request_seconds", "request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.responses = Counter(
            "sdrt_responses", "requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "sdrt_errors",
            "requests that failed, by kind (and, for a limit, reason: body, json_values, image_size, "
            "image_format, image_data, prompt_length)",
            ["kind", "reason"],
            registry=r,
        )
        self.images = Counter("sdrt_images_generated", "images delivered to clients", registry=r)
        self.batch_images = Histogram(
            "sdrt_batch_images", "images per engine batch formed", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "sdrt_batch_requests", "requests joined per engine batch formed", buckets=BATCH_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "sdrt_dropped",
            "engine requests dropped (reason: deadline, cancelled; stage: preparing, queued, running)",
            ["reason", "stage"],
            registry=r,
        )
        self.retries = Counter("sdrt_replica_retries", "calls sent again after their replica died (Ray)", registry=r)
        self.in_flight = Gauge("sdrt_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge(
            "sdrt_queue_depth", "engine requests waiting for a batch (Ray: sent to replicas, unanswered)", registry=r
        )
        self.running = Gauge("sdrt_batch_running", "engine requests in the batch being run", registry=r)
        self.gpu_memory = Gauge(
            "sdrt_gpu_memory_bytes", "torch CUDA memory (kind: allocated, reserved)", ["kind"], registry=r
        )

    def watch_queue(self, depth: Callable[[], float], running: Callable[[], float] | None = None) -> None:
        self.queue_depth.set_function(depth)
        if running is not None:
            self.running.set_function(running)

    def watch_gpu(self) -> None:
        """Report this process's CUDA memory when there is a GPU (nothing is reported without one)."""
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set_function(lambda: torch.cuda.memory_allocated())
            self.gpu_memory.labels("reserved").set_function(lambda: torch.cuda.memory_reserved())

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
