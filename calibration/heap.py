"""glibc's heap: where a pass interleaves large temporaries with the buffers it keeps, hand the freed pages back.

glibc serves blocks under its mmap threshold (which rises to 32 MB after the first large free) from a heap that
only shrinks from the top. A pass that allocates tens of MB of temporaries per linear between buffers that live on
(the forward's activations, the integer codes it keeps) leaves holes that stay resident, and how many differs from run
to run (not with the hash seed; no tensor was held by a reference cycle): the same SmolLM2 quantize peaked at 1.3 GB
in one run and 2.5 GB in the next (docs/RESULTS.md, "Quantize's peak"). malloc_trim(0) returns every free page,
holes included.
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has malloc_trim), else None: another allocator decides for itself."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Give glibc's free heap pages back to the operating system (a no-op elsewhere). It costs the page faults of
    touching those pages again, so call it per linear in a pass, not per tensor."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set size (Linux); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class HeapCeiling:
    """Call once per linear in a pass: it trims glibc's heap only when the process has grown `margin` bytes since
    the last trim (or since the pass began). Trimming on every call bounds the heap too, but costs the page faults
    of touching the returned pages again (SmolLM2 calibrate: 56 s -> 87 s); a run whose heap does not fragment
    never pays it, and one that does pays a trim per `margin` of growth."""

    def __init__(self, margin: int):
        self.margin, self.trims = margin, 0
        self.floor = resident_bytes()

    def __call__(self) -> None:
        if resident_bytes() > self.floor + self.margin:
            trim_heap()
            self.trims += 1
            self.floor = resident_bytes()
