"""The memory probe: measures a real peak, extrapolates within the budget, halves on OOM, never guesses."""

from __future__ import annotations

import pytest
import torch

from ssim_ray import batching
from ssim_ray.batching import BatchSizer, BucketKey, ProbeError, bucket_key

KEY = BucketKey(3, 512, 512, "uint8")


def _allocating_trial(bytes_per_pair: int, pairs: int):
    def work() -> None:
        block = torch.ones(bytes_per_pair * pairs // 4, dtype=torch.float32)
        block.add_(1.0)  # touch every page so it is resident
        del block

    return work


def test_cpu_probe_measures_peak_and_extrapolates_within_budget(monkeypatch):
    per_pair = 64 * 2**20
    monkeypatch.setattr(batching, "cpu_available_bytes", lambda: 8 * 2**30)
    sizer = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=10_000)
    size = sizer.probe(KEY, 4, _allocating_trial(per_pair, 4))
    record = sizer.records[KEY]
    # The profiler sees the allocation itself: the per-pair peak is what was allocated (plus a few bytes
    # of scalars), not what the resident set happened to grow by.
    assert per_pair <= record.peak_bytes_per_pair <= per_pair + 1024
    expected = (8 * 2**30 * 0.5) // record.peak_bytes_per_pair
    assert size == int(expected)
    assert 40 <= size <= 64
    assert sizer.size_for(KEY) == size


def test_probe_respects_cap_and_share(monkeypatch):
    monkeypatch.setattr(batching, "cpu_available_bytes", lambda: 8 * 2**30)
    capped = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=1.0, max_size=7)
    assert capped.probe(KEY, 2, _allocating_trial(16 * 2**20, 2)) == 7
    shared = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=10_000, share=0.25)
    alone = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=10_000, share=1.0)
    a = alone.probe(KEY, 2, _allocating_trial(64 * 2**20, 2))
    s = shared.probe(KEY, 2, _allocating_trial(64 * 2**20, 2))
    assert s < a / 2  # a quarter of the node's memory gives about a quarter of the batch


def test_probe_that_cannot_measure_fails_loudly():
    sizer = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=64)
    with pytest.raises(ProbeError, match="batch.size"):
        sizer.probe(KEY, 4, lambda: None)  # allocates nothing: a zero peak cannot be extrapolated


def test_oom_halves_and_is_remembered():
    sizer = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=64)
    assert sizer.on_oom(KEY, 64) == 32
    assert sizer.size_for(KEY) == 32
    assert sizer.on_oom(KEY, 32) == 16
    assert sizer.records[KEY].ooms == 2
    assert sizer.on_oom(KEY, 1) == 1


def test_fixed_size_bypasses_probe():
    sizer = BatchSizer(torch.device("cpu"), fixed=5, memory_fraction=0.5, max_size=64)
    assert sizer.size_for(KEY) == 5
    assert sizer.records == {}


def test_fixed_size_remembers_an_out_of_memory_back_off():
    # batch=fixed used to forget the halving and OOM again on every batch.
    sizer = BatchSizer(torch.device("cpu"), fixed=16, memory_fraction=0.5, max_size=64)
    assert sizer.on_oom(KEY, 16) == 8
    assert sizer.size_for(KEY) == 8
    assert sizer.on_oom(KEY, 8) == 4
    assert sizer.size_for(KEY) == 4 and sizer.records[KEY].ooms == 2
    assert sizer.size_for(BucketKey(1, 8, 8, "uint8")) == 16  # other buckets keep the fixed size


def test_out_of_memory_is_matched_by_type_not_message():
    assert batching.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not batching.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))


def test_bucket_key_separates_shape_and_dtype():
    a = bucket_key(torch.zeros(3, 10, 12, dtype=torch.uint8))
    assert a == BucketKey(3, 10, 12, "uint8")
    assert a != bucket_key(torch.zeros(3, 10, 12, dtype=torch.uint16))
    assert a.label() == "3x10x12:uint8"


def test_cpu_throughput_cap_bounds_the_memory_rule(monkeypatch):
    monkeypatch.setattr(batching, "cpu_available_bytes", lambda: 64 * 2**30)
    big = BucketKey(3, 1024, 1024, "uint8")
    capped = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=10_000, cap_throughput=True)
    size = capped.probe(big, 2, _allocating_trial(16 * 2**20, 2))
    # Memory alone would allow ~2,000 pairs; the measured flat part of the CPU curve ends far earlier.
    assert size == batching.CPU_BATCH_VALUES // (3 * 1024 * 1024) == 5
    assert capped.records[big].bound_by == "cpu_throughput"
    small = BucketKey(1, 64, 96, "uint8")
    assert capped.probe(small, 2, _allocating_trial(2**20, 2)) == batching.CPU_BATCH_VALUES // (64 * 96)
    assert batching.throughput_cap(torch.device("cuda"), big) is None  # GPUs: memory rule only


def test_memory_still_bounds_below_the_cap(monkeypatch):
    monkeypatch.setattr(batching, "cpu_available_bytes", lambda: 300 * 2**20)
    sizer = BatchSizer(torch.device("cpu"), fixed=None, memory_fraction=0.5, max_size=10_000, cap_throughput=True)
    assert sizer.probe(KEY, 2, _allocating_trial(64 * 2**20, 2)) == 2  # 150 MiB budget / 64 MiB per pair
    assert sizer.records[KEY].bound_by == "memory"


def test_cpu_probe_keeps_the_profilers_log_lines_out_of_the_users_terminal():
    # Every actor's stderr streams to the driver's terminal; kineto would print two lines per probe.
    import subprocess
    import sys

    script = ("import torch\nfrom ssim_ray.batching import _cpu_torch_peak_bytes\n"
              "from ssim_ray.process_setup import quiet_profiler_logs\nquiet_profiler_logs()\n"
              "print(_cpu_torch_peak_bytes(lambda: torch.ones(1 << 20).sum()))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip().splitlines()[-1]) >= 4 << 20  # the 4 MiB tensor was measured
    assert "profiler_start" not in run.stderr and "profiler_stop" not in run.stderr, run.stderr[-500:]
