"""The machine line the benchmark scripts print with their tables: CPU model, cores, Python, versions."""

from __future__ import annotations

import os
import platform


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
    """The widest x86 vector extension the CPU reports (/proc/cpuinfo flags): what inductor's C++ code targets."""
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
