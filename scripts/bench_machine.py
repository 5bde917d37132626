"""The machine line the benchmark scripts print with their tables: CPU model, cores, Python, versions."""

from __future__ import annotations

import os
import platform
import random
import resource
import sys

# glibc's malloc, told to keep freed memory for reuse: big blocks come from the heap instead of fresh mmaps
# (every page of a fresh mapping is a page fault and a zeroing), and the heap is not trimmed back.
# pytorch-msssim allocates ~0.5 GB of temporaries per 16x3x256^2 call: under glibc's defaults on the dev VM
# it paid ~122,000 page faults a call in some runs and none in others (its time 39 vs 13 ms/pair).
WARM_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
# Turn-taking has transients that belong to the switch, not to the contender: after a multi-threaded call
# OpenMP's (and OpenBLAS's) workers spin for a while, holding a core (ssim_ray right after pytorch-msssim ran
# 1.28 vs 1.00 ms/pair at two threads on the 2-core dev VM), and after an idle pause the VM's vCPUs wake slowly
# (a 0.2 s pause before each call: 1.06 vs 0.86-0.96 ms/pair at two threads). A job calls its metric back to
# back, so each turn runs its contender once untimed, then times the next call; and a fixed rotation, which
# gave every contender the same predecessor each round, is replaced by a shuffled order.


def turns(names: list, round_index: int) -> list:
    """The order of one round: `names` shuffled (seeded by the round, so reruns take the same turns)."""
    order = list(names)
    random.Random(round_index).shuffle(order)
    return order


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` shows it (read from /proc/cpuinfo), or "unknown CPU"."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (/proc/cpuinfo flags): what the C kernels are built for (-march=native)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    for isa in ("avx512f", "avx2", "avx", "sse4_2"):
                        if isa in flags:
                            return isa.upper().replace("AVX512F", "AVX-512")
    except OSError:
        pass
    return "unknown ISA"


def machine(*versions: str) -> str:
    """ "<CPU model>, <n> cores, Python <x.y.z>" followed by `versions` (e.g. "torch 2.13.0")."""
    return ", ".join([cpu_model(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}", *versions])


def memory_kib() -> dict:
    """Current and peak resident memory of this process (Linux /proc: VmRSS, VmHWM), in KiB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line.split(":")[0]] = int(line.split()[1])
    return found


def warm_malloc() -> bool:
    """Whether this process runs with WARM_MALLOC (glibc reads it once, at start-up)."""
    return all(os.environ.get(key) == value for key, value in WARM_MALLOC.items())


def rerun_with_warm_malloc() -> None:
    """Re-execute this script with WARM_MALLOC in its environment, unless it already has it."""
    if not warm_malloc():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WARM_MALLOC})


def malloc_mode() -> str:
    """What the machine line says about the allocator."""
    if warm_malloc():
        return "malloc warm (MALLOC_MMAP_THRESHOLD_=4 GiB, MALLOC_TRIM_THRESHOLD_=64 GiB)"
    return "malloc: glibc defaults (big blocks freshly mapped, page faults included)"


def minor_faults() -> int:
    """Page faults of this process so far that needed no I/O (fresh pages mapped and zeroed, among others)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
