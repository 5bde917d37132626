"""Process set-up of a computing process (an actor, or a benchmark that computes as one does): torch threads,
the allocator, the compiled kernel's GIL-free wrapper, and the process's own memory figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), or 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed.
HEAP_BLOCK_LIMIT = 1 << 30


def keep_large_blocks_in_heap() -> bool:
    """Serve large allocations from the heap and keep freed memory there (glibc only).

    By default glibc maps every block above a threshold (at most 32 MiB) freshly from the kernel and
    unmaps it on free, so each SSIM batch's float tiles (tens of MB) are page-faulted in again, page by
    page, on every call: measured 3,500 minor faults per 512x512 RGB pair, and half the batch's time at
    16 pairs or more. Raising the mmap and trim thresholds keeps those pages resident for the next batch
    (0-90 faults per pair). The cost is that the actor's resident memory stays at its peak, which the
    memory probe already budgets for.

    Returns:
        True if glibc accepted both settings; False elsewhere (another libc: nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCK_LIMIT))


def configure_cpu_compute(*, torch_threads: int) -> None:
    """Set up a process that computes SSIM on the CPU as an actor does (also used by the benchmarks).

    When ssim's CPU kernel compiles is not set here: callers pass `compile=` to ssim() (the worker decides
    per actor, benchmarks choose per row). The compiled CPU kernels (C, called through ctypes) release the
    GIL while they run, so an actor's decode threads go on while SSIM computes (with torch.compile's default
    Python binding, which held it, SSIM on the main thread and two Pillow decode threads used 1.39 cores;
    without the GIL held, 1.92: measured).

    Args:
        torch_threads: intra-op threads. One per actor: an OpenMP team of two on a core shared with
            decode threads (or other jobs) waits at every barrier for a descheduled member (measured on
            2 shared cores: 5-150 pairs/s with 2 threads against a steady 250 with 1).
    """
    torch.set_num_threads(max(1, torch_threads))
    keep_large_blocks_in_heap()


def quiet_profiler_logs() -> None:
    """Keep the PyTorch profiler's kineto library from printing two "USDT profiler_start/stop" lines per
    memory probe: every actor's stderr streams to the driver's terminal. Level 6 keeps it quiet; it is read
    when a profiler session starts, and a level set by the user wins.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def configure_actor_process(*, device: str, torch_threads: int) -> None:
    """Everything an actor's process sets once before it computes; the only place the job writes the
    environment of its own processes.

    Args:
        device: "cpu" or "cuda": the actor's device.
        torch_threads: intra-op threads (see configure_cpu_compute).
    """
    if device == "cpu":
        # Ray no longer hides GPUs from tasks that asked for none; a CPU actor must not touch one.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    quiet_profiler_logs()
    configure_cpu_compute(torch_threads=torch_threads)
