"""Progress of long build-time work: each step printed as it starts and ends, with its elapsed time."""

from __future__ import annotations

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
        self.say(f"{what} done in {time.perf_counter() - t:.1f}s")
