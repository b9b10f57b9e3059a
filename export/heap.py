"""The export process's memory: glibc heap tuning that keeps its peak at what is live, not at what was once
allocated (a traced U-Net freed before its fp16 conversion must not count twice)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys


def map_large_buffers() -> None:
    """Serve every allocation of 1 MiB or more from its own mmap, returned to the OS the moment it is freed.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which mid-sized weight
    tensors live on the heap and their pages stay with the process when freed; a U-Net traced, released and
    followed by its fp16 conversion would then count twice. A fixed threshold keeps the peak at what is live."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also stops its adjustment)


def trim_heap() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc keeps them otherwise, and a 3.4 GB graph's
    worth of freed float32 buffers would count against the next step's memory)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
