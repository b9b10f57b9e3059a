"""What a batch reports while it runs on the step-by-step path: each stage's wall time and the sampling progress;
and `Batch`, what `Pipeline.generate_batch` returns."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """What `Pipeline.generate_batch` returns: each request's uint8 pixels [B_i, H, W, 3], and the batch's stage
    timings in ms (step by step: each stage; a graph replay: host_prepare_ms and graph_ms)."""

    pixels: list[torch.Tensor]
    timings_ms: dict[str, float]


def no_stage(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


class Stages:
    """Wall time of each stage of the step-by-step path into ``timings`` (on a GPU it synchronises at its ends)."""

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings = timings
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - t) * 1e3


class Progress:
    """One stderr line per request, updated per step (step-by-step path only; a graph replay has no steps)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.stream, self.t0 = total, 0, enabled, sys.stderr, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            end = "\n" if self.done == self.total else ""
            print(f"\rsampling {self.done}/{self.total} ({rate:.2f} steps/s)", end=end, file=self.stream, flush=True)
