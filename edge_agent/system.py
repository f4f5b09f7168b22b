"""What the agent reads from, or tunes in, the operating system: allocator, temperature, platform."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(threshold_bytes: int = 64 * 1024 * 1024, arenas: int | None = None) -> bool:
    """Stop glibc from returning every freed feature buffer to the kernel.

    Each audio chunk allocates a few arrays of 0.1-2 MB. By default glibc serves those with
    mmap and unmaps them on free, so every chunk pays for fresh zeroed pages: measured here it
    doubled the front-end's cost. Keeping them in the heap (up to ``threshold_bytes``) is what
    long-running numpy services usually do. Returns False where glibc is not the allocator.

    ``arenas``: at most this many heaps. glibc gives threads heaps of their own (up to eight
    per core), each keeping its own freed memory; threads that take turns holding the GIL gain
    nothing from them, and a process whose threads hand arrays to each other (a pipe reader
    and the engine) keeps the freed buffers of both.
    """
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False  # not Linux, or musl (Alpine), which has no mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes)
    ok_arenas = arenas is None or mallopt(_M_ARENA_MAX, arenas)
    return bool(ok_mmap and ok_trim and ok_arenas)


def give_back_free_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc's ``malloc_trim``): for a process
    that let a large part of what it allocated go for good (the agent's own, which keeps the
    model without its network when engine processes run the engine), since the thresholds
    :func:`tune_allocator` sets keep freed memory for reuse. False where glibc is not the
    allocator."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    """The C library where Linux has one (glibc, or musl: callers look up what they need)."""
    if platform.system() != "Linux":
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def board_temperature() -> float | None:
    """Hottest thermal zone in degrees Celsius, where Linux exposes one (Raspberry Pi does)."""
    readings = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            readings.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(readings) if readings else None


def platform_summary() -> dict[str, str]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
