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
