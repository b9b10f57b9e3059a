"""Clocks, per-stage spans, summary statistics, image agreement and GPU memory: the measuring parts of `sdrt bench`.

On a GPU every mark is a CUDA event on the current stream, read after one synchronisation at the end of a run, so
timing a stage adds no host synchronisation; on the CPU a mark is `time.perf_counter()` (the work is synchronous).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


class Clock:
    """Timeline marks: CUDA events on a GPU, perf_counter on the CPU. ``ms(a, b)`` is valid after ``sync()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class Spans:
    """Begin/end marks per stage during one run; ``calls()`` after the run: ms of each call per stage."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.open: dict[str, Any] = {}
        self.spans: list[tuple[str, Any, Any]] = []

    def begin(self, stage: str) -> None:
        self.open[stage] = self.clock.mark()

    def end(self, stage: str) -> None:
        self.spans.append((stage, self.open.pop(stage), self.clock.mark()))

    def calls(self) -> dict[str, list[float]]:
        """{stage: [ms of each call]}; the caller has synchronised the clock."""
        out: dict[str, list[float]] = defaultdict(list)
        for stage, a, b in self.spans:
            out[stage].append(self.clock.ms(a, b))
        return dict(out)


@contextlib.contextmanager
def timed_attribute(obj: Any, attr: str, spans: Spans, stage_of: Callable[..., str | None]) -> Iterator[None]:
    """Time every call of ``obj.attr`` (a bound method) as the stage ``stage_of(*args)`` names, for one run.

    The wrapper is an instance attribute, removed on exit: the class (diffusers', or sdrt's backend) is unchanged.
    """
    inner = getattr(obj, attr)

    def timed(*args, **kwargs):
        stage = stage_of(*args)
        if stage is None:
            return inner(*args, **kwargs)
        spans.begin(stage)
        out = inner(*args, **kwargs)
        spans.end(stage)
        return out

    setattr(obj, attr, timed)
    try:
        yield
    finally:
        delattr(obj, attr)


@contextlib.contextmanager
def module_hooks(modules: list[tuple[str, torch.nn.Module]], spans: Spans) -> Iterator[None]:
    """Forward pre/post hooks marking each (stage, module)'s calls as the stage, for one run (removed on exit)."""
    handles = []
    for stage, module in modules:
        handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: spans.begin(s)))
        handles.append(module.register_forward_hook(lambda m, a, o, s=stage: spans.end(s)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def stats(values: list[float]) -> dict[str, float]:
    """p50 / p90 / min / mean of a list of ms (linear interpolation between order statistics, as numpy)."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "mean": float(a.mean()),
        "n": int(a.size),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class Memory:
    """One contender's GPU memory: what it keeps resident, plus the largest transient peak of a run.

    All contenders live in one process, so torch's own peak counter also sees the others' weights; this subtracts
    what was allocated before the run and adds back the contender's own resident memory. ``device_mb`` is the drop
    in free device memory over its load and warm-up (cudaMemGetInfo), which also sees TensorRT's and ONNX Runtime's
    allocations outside torch's allocator.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.resident_mb = 0.0
        self.device_mb: float | None = None
        self.transient_mb = 0.0

    def _allocated(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 2**20

    def _free(self) -> float:
        return torch.cuda.mem_get_info(self.device)[0] / 2**20

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        torch.cuda.synchronize(self.device)
        alloc0, free0 = self._allocated(), self._free()
        yield
        torch.cuda.synchronize(self.device)
        self.resident_mb = self._allocated() - alloc0
        self.device_mb = free0 - self._free()

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        before = self._allocated()
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.transient_mb = max(self.transient_mb, peak - before)

    def peak_mb(self) -> float | None:
        return self.resident_mb + self.transient_mb if self.cuda else None
