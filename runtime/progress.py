"""Progress of long work. `Progress`: build-time steps (export, build, quantize) printed as they start and end, with
their elapsed time and the process's peak resident memory so far (an export of a large model is bounded by memory as
much as by time). `SamplingBar`: one stderr line per request, updated per sampler step."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints each step as it starts and ends, with its elapsed time (export of a full model takes minutes)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {text}", file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str):
        self.say(f"{what} ...")
        t = time.perf_counter()
        yield
        self.say(f"{what} done in {time.perf_counter() - t:.1f}s (peak memory {peak_rss_gb():.2f} GB)")


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class SamplingBar:
    """One stderr line per request, updated per step (step-by-step path only; a graph replay has no steps)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.stream, self.t0 = total, 0, enabled, sys.stderr, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            end = "\n" if self.done == self.total else ""
            print(f"\rsampling {self.done}/{self.total} ({rate:.2f} steps/s)", end=end, file=self.stream, flush=True)
