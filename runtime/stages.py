"""What a batch reports while it runs on the step-by-step path: each stage's wall time; and `Batch`, what
`Pipeline.generate_batch` returns. The sampling progress line is `sdrt.runtime.progress.SamplingBar`."""

from __future__ import annotations

import contextlib
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
