"""export/heap.py, read through glibc's own accounting (mallinfo2) in a fresh process: the mmap threshold is fixed
process-wide, so it is checked where no other test has set it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest

from sdrt.export.heap import trim_heap

# hblks: glibc's count of chunks served by mmap. Freeing a 16 MiB mmapped chunk raises glibc's dynamic threshold
# to 16 MiB, so a 2 MiB allocation then comes from the heap (0 new mmapped chunks), unless the threshold is fixed.
MMAPPED_AFTER_FREE = textwrap.dedent(
    """
    import ctypes, sys
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    Mallinfo2 = type("Mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "fixed":
        from sdrt.export.heap import map_large_buffers
        map_large_buffers()
    libc.free(libc.malloc(16 << 20))
    before = libc.mallinfo2().hblks
    p = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
    libc.free(p)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_map_large_buffers_keeps_mid_sized_blocks_out_of_the_heap():
    def mmapped(mode: str) -> int:
        env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}  # the sdrt this test imports
        run = subprocess.run([sys.executable, "-c", MMAPPED_AFTER_FREE, mode], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    assert mmapped("glibc default") == 0
    assert mmapped("fixed") == 1


def test_trim_heap_collects_unreachable_cycles():
    class Node:
        pass

    gc.disable()  # only trim_heap collects
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None
        trim_heap()
        assert gone() is None
    finally:
        gc.enable()
