"""One malloc arena for the whole process: the engine's step loop runs torch off the main thread.

Why. glibc gives each new thread that allocates its own malloc arena. A step loop thread that
allocates and frees tens of megabytes of activations per step gets a non-main arena, whose
heaps are trimmed back to the kernel as they empty and grown again at the next step: page
faults on every step. Measured on the 2-core machine (tiny-sd 256², `docs/benchmarks.md`, issue
21): a four-image step took 109-115 ms on the engine's loop thread against 74-78 ms with one
arena, and the step curve timed on the loop thread was 20 % above the one timed on the loading
thread at eight rows; with one arena the two agree. `MALLOC_ARENA_MAX=1` in the environment does
the same, but only for processes started with it; this applies it from inside, before the
process starts any thread, so `stepfleet worker`, `stepfleet bench` and `stepfleet up`'s
children all get it. Few threads allocate at once in a worker (the step loop, an auxiliary
thread, the HTTP loop), so one arena costs no measurable contention.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's `mallopt` parameter number for the arena limit (malloc.h: `M_ARENA_MAX`).
M_ARENA_MAX = -8


def single_malloc_arena() -> bool:
    """Limit glibc to one malloc arena (no-op off glibc, or when the environment already set a limit)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))
