"""Keep freed heap memory in the process, so big updates stop paying for page faults.

A 45 MB update is encoded into chunk frames of 1 MiB and decoded into fresh tensors. With
glibc's default settings each of those buffers is a fresh mmap (or heap memory trimmed back
to the OS after the previous update), so every page is faulted in and zeroed again: on this
machine that is about half of the codec's time (benchmarks/transport.py, docs/benchmarks.md).
Raising the mmap threshold and the trim threshold lets freed buffers be reused warm.

Process-wide and glibc-only: elsewhere (musl, macOS) this does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit: buffers above it stay mmaps
MAX_RETAINED = 1 << 30  # no update justifies keeping more than this freed

_lock = threading.Lock()
_retained = 0  # the trim threshold set so far, in bytes (0: glibc's defaults)


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    result: Callable[[int, int], int] = fn
    return result


def retained_bytes() -> int:
    """The most freed heap memory this process keeps per arena (0: glibc's defaults)."""
    return _retained


def retain_freed_memory(nbytes: int) -> bool:
    """Keep up to nbytes of freed memory per malloc arena instead of returning it to the OS.

    Only ever raises the amount (several peers in one process ask for their own model's
    size); capped at MAX_RETAINED. Returns whether the setting is in effect.

    Raises:
        ValueError: on a negative nbytes.
    """
    global _retained
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    want = min(int(nbytes), MAX_RETAINED)
    with _lock:
        if want <= _retained:
            return True
        fn = _mallopt()
        if fn is None:
            return False
        # A fixed mmap threshold also stops glibc from moving it back down; both calls
        # return 1 on success.
        ok = fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and fn(_M_TRIM_THRESHOLD, want) == 1
        if ok:
            _retained = want
        return ok
