"""Progress of long build-time work: each step printed as it starts and ends, with its elapsed time and the
process's peak resident memory so far (an export of a large model is bounded by memory as much as by time)."""

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
