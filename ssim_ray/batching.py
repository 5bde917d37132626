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
    """What the probe measured for one bucket, for the summary; `bound_by` names the rule that set the size."""

    batch_size: int
    trial_pairs: int
    peak_bytes_per_pair: float
    budget_bytes: int
    ooms: int = 0
    bound_by: str = "memory"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- memory measurement per device


def _cpu_torch_peak_bytes(work: Callable[[], None]) -> int:
    """Peak of the bytes PyTorch held on the CPU during `work`, from the profiler's allocation events.

    Resident-set counters cannot measure this: the allocator reuses pages already resident, so a trial
    batch often shows no growth at all. The profiler records every allocation and free with its size.
    """
    from torch.profiler import ProfilerActivity, profile

    # Kineto's "USDT profiler_start/stop" lines are silenced by the actor's process set-up
    # (process_setup.quiet_profiler_logs), not here: the library writes no environment variable.
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


# ---------------------------------------------------------------- throughput cap on CPU

# On the CPU, throughput does not grow with the batch: ssim() cuts every image into fixed tiles that its
# kernel takes a few at a time, so one 256x256 RGB pair already fills it. It falls once a batch's working
# set outgrows what the allocator keeps (worker.keep_large_blocks_in_heap: 1 GiB), at about 5e7 pixel
# values: measured with scripts/bench_batch_curve.py on 2 EPYC cores, 256² RGB flat at 860-1,010 pairs/s
# from 1 to 256 pairs (5e7 values) and 409 at 512; 1024² RGB flat at 59-62 from 1 to 16 and 27-36 at 32
# and 64. A cap of 2**24 values per batch (85 pairs at 256², 21 at 512², 5 at 1024²) stays on the flat
# part with a 3x margin, is large enough to amortise a call's overhead on small images, and lets decoding
# overlap with compute inside a shard. GPUs have no such cap: their throughput grows with the batch until
# memory runs out, which is the memory rule.
CPU_BATCH_VALUES = 2**24


def throughput_cap(device: torch.device, key: BucketKey) -> Optional[int]:
    """The largest batch on the flat part of the device's measured throughput curve, or None (no cap).

    Example:
        >>> throughput_cap(torch.device("cpu"), BucketKey(3, 1024, 1024, "uint8"))
        5
    """
    if device.type != "cpu":
        return None
    return max(1, CPU_BATCH_VALUES // (key.channels * key.height * key.width))


# ---------------------------------------------------------------- the sizer


class BatchSizer:
    """Chooses and remembers a batch size per shape bucket.

    Args:
        device: where the batches run.
        fixed: a fixed batch size (`batch.size=<int>`), or None to probe.
        memory_fraction: share of the free memory a batch may take.
        max_size: cap on any batch size.
        share: the fraction of the device this actor owns (CPU actors on one node share its memory).
        cap_throughput: also cap each size at `throughput_cap` (the job does; False: memory rule only).

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
        cap_throughput: bool = False,
    ) -> None:
        self.device = device
        self.fixed = fixed
        self.memory_fraction = memory_fraction
        self.max_size = max_size
        self.share = share
        self.cap_throughput = cap_throughput
        self.records: Dict[BucketKey, ProbeRecord] = {}
        self._meter = _PeakMeter(device)

    def size_for(self, key: BucketKey) -> Optional[int]:
        """The remembered size of a bucket, or None when it still needs a probe."""
        record = self.records.get(key)
        if self.fixed is not None:
            # An out-of-memory back-off is remembered for a fixed size too: it must not OOM once per batch.
            return self.fixed if record is None else min(self.fixed, record.batch_size)
        return None if record is None else record.batch_size

    def probe(self, key: BucketKey, trial_pairs: int, run_trial: Callable[[], None]) -> int:
        """Run one trial batch of `trial_pairs` pairs, measure its peak and size the bucket from it.

        The size is the largest batch within the memory budget, capped by `max_size` and, with
        `cap_throughput`, by `throughput_cap` (on the CPU: the measured flat part of the throughput curve). The trial batch is
        real work (its results are kept by the caller), so probing costs nothing but one small batch
        (and, on the CPU, the profiler: 10-40 ms per bucket, measured at 256²-1024² RGB).

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
        limits = {"memory": int(budget // per_pair), "max_size": self.max_size}
        cap = throughput_cap(self.device, key) if self.cap_throughput else None
        if cap is not None:
            limits["cpu_throughput"] = cap
        bound_by = min(limits, key=limits.get)
        size = max(1, limits[bound_by])
        self.records[key] = ProbeRecord(size, trial_pairs, per_pair, budget, bound_by=bound_by)
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

