"""Shape buckets and the memory probe that sizes their batches.

A batch size that fits one GPU at 256² overflows it at 2048², and the best size differs from card to
card. So each actor measures, on its own device and for each shape bucket, the peak memory of a trial
batch, extrapolates to the largest batch that stays within `memory_fraction` of the free memory, caps it,
and remembers it. A CUDA out-of-memory error (caught by type) halves the size for that bucket and is
remembered too. A probe that cannot measure raises `ProbeError`: it never guesses a constant.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch


class ProbeError(RuntimeError):
    """The memory probe could not measure; set `batch.size` to a number to bypass it."""


@dataclasses.dataclass(frozen=True)
class BucketKey:
    """Pairs that can share one batch: same channels, size and dtype."""

    channels: int
    height: int
    width: int
    dtype: str

    def label(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}:{self.dtype}"


def bucket_key(image: torch.Tensor) -> BucketKey:
    """The bucket of a (C, H, W) image."""
    c, h, w = image.shape
    return BucketKey(int(c), int(h), int(w), str(image.dtype).replace("torch.", ""))


@dataclasses.dataclass
class ProbeRecord:
    """What the probe measured for one bucket, for the summary."""

    batch_size: int
    trial_pairs: int
    peak_bytes_per_pair: float
    budget_bytes: int
    ooms: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- memory measurement per device


def _cpu_torch_peak_bytes(work: Callable[[], None]) -> int:
    """Peak of the bytes PyTorch held on the CPU during `work`, from the profiler's allocation events.

    Resident-set counters cannot measure this: the allocator reuses pages already resident, so a trial
    batch often shows no growth at all. The profiler records every allocation and free with its size.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        raise ProbeError(
            "the PyTorch profiler recorded no CPU allocation during the trial batch; cannot measure its "
            "memory. Set batch.size=<int>."
        )
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def cpu_available_bytes() -> int:
    """Memory this process may still use: MemAvailable, bounded by a cgroup v2 limit if one is set."""
    available = None
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        raise ProbeError("/proc/meminfo has no MemAvailable line; cannot size CPU batches")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current") as current_file:
            current = int(current_file.read().strip())
        if limit != "max":
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller visible: MemAvailable is the bound
    return available


class _PeakMeter:
    """Measures the extra peak memory of a block of work on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        return cpu_available_bytes()

    def measure(self, work: Callable[[], None]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            work()
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - base)
        return _cpu_torch_peak_bytes(work)


# ---------------------------------------------------------------- the sizer


class BatchSizer:
    """Chooses and remembers a batch size per shape bucket.

    Args:
        device: where the batches run.
        fixed: a fixed batch size (`batch.size=<int>`), or None to probe.
        memory_fraction: share of the free memory a batch may take.
        max_size: cap on any batch size.
        share: the fraction of the device this actor owns (CPU actors on one node share its memory).

    Example:
        >>> sizer = BatchSizer(torch.device("cpu"), fixed=8, memory_fraction=0.5, max_size=64)
        >>> sizer.size_for(BucketKey(3, 64, 64, "uint8"))
        8
    """

    def __init__(
        self,
        device: torch.device,
        *,
        fixed: Optional[int],
        memory_fraction: float,
        max_size: int,
        share: float = 1.0,
    ) -> None:
        self.device = device
        self.fixed = fixed
        self.memory_fraction = memory_fraction
        self.max_size = max_size
        self.share = share
        self.records: Dict[BucketKey, ProbeRecord] = {}
        self._meter = _PeakMeter(device)

    def size_for(self, key: BucketKey) -> Optional[int]:
        """The remembered size of a bucket, or None when it still needs a probe."""
        if self.fixed is not None:
            return self.fixed
        record = self.records.get(key)
        return None if record is None else record.batch_size

    def probe(self, key: BucketKey, trial_pairs: int, run_trial: Callable[[], None]) -> int:
        """Run one trial batch of `trial_pairs` pairs, measure its peak and size the bucket from it.

        The trial batch is real work (its results are kept by the caller), so probing costs nothing
        but one small batch.

        Raises:
            ProbeError: the trial's peak could not be measured (zero or negative).
        """
        budget = int(self._meter.free_bytes() * self.memory_fraction * self.share)
        peak = self._meter.measure(run_trial)
        if peak <= 0:
            raise ProbeError(
                f"memory probe on {self.device} measured a peak of {peak} bytes for a trial batch of "
                f"{trial_pairs} pairs of {key.label()}; cannot extrapolate. Set batch.size=<int>."
            )
        per_pair = peak / trial_pairs
        size = max(1, min(self.max_size, int(budget // per_pair)))
        self.records[key] = ProbeRecord(size, trial_pairs, per_pair, budget)
        return size

    def on_oom(self, key: BucketKey, failed_size: int) -> int:
        """Halve the bucket's size after an out-of-memory error and remember it."""
        new_size = max(1, failed_size // 2)
        record = self.records.get(key)
        if record is None:
            record = ProbeRecord(new_size, failed_size, float("nan"), 0)
            self.records[key] = record
        record.batch_size = new_size
        record.ooms += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return new_size

    def summary(self) -> Dict[str, dict]:
        return {key.label(): record.as_dict() for key, record in self.records.items()}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for PyTorch's out-of-memory error, matched by type, never by message."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)

