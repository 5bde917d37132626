"""The Ray actor: one shard in, one committed part file out, a small ShardResult back.

Inside an actor, `sources.iter_shard_pairs` fetches and decodes pairs on threads with a bounded prefetch
while this thread computes SSIM on the device, so I/O and compute overlap. Pairs are bucketed by shape;
each bucket's batch size comes from the memory probe (`batching.BatchSizer`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import defaultdict
from typing import Dict, List

import torch

from ssim_ray import statuses
from ssim_ray.batching import BatchSizer, BucketKey, bucket_key, is_out_of_memory
from ssim_ray.config import BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
from ssim_ray.metric.structural import mean_over_channels, ssim
from ssim_ray.output import results
from ssim_ray.process_setup import configure_cpu_compute, peak_rss_bytes
from ssim_ray.sources import planning as sources

# Pairs in the probe's trial batch: enough to make the per-pair peak dominate fixed costs, small enough
# to be cheap on the largest images.
PROBE_TRIAL_PAIRS = 4
# Compile ssim's CPU kernel before the first batch once an actor's work is expected to pay for it: the
# compile costs ~4-6 s of one core, the compiled kernel saves ~50 ns per pixel and channel against the
# eager one (measured at 256² and 512² RGB: 10.7 -> 2.0 and 52 -> 7 ms per pair), so it pays after about
# 1e8 pixels; twice that keeps small jobs (and tests) on ssim's own policy (compile after 3 s of eager).
COMPILE_NOW_MIN_PIXELS = 2e8
# An actor that expects this many pairs compiles while it starts, before its first shard: 1024 pairs of
# 256² RGB are the 2e8 above, and the compile is a start-up cost like torch's import, paid once per
# process (~3 s with a warm on-disk cache, most of it Python that holds the GIL, so it cannot hide behind
# the first shard's decoding: tried, no gain).
COMPILE_AT_START_MIN_PAIRS = 1024


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs, as plain picklable values (never a DictConfig)."""

    source: SourceConfig
    ssim: SSIMConfig
    batch: BatchConfig
    summary: SummaryConfig
    output_url: str
    output_storage_options: dict
    device: str  # "cpu" or "cuda"
    torch_threads: int
    decode_threads: int
    memory_share: float
    expected_pairs: int = 0  # pairs this actor is likely to score (the job's pairs / actors); 0: unknown


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What an actor hands back for a committed shard: small, no rows."""

    shard_id: str
    rows: int
    status_counts: Dict[str, int]
    started: float
    finished: float
    batch_sizes: Dict[str, dict]
    worker: str
    device: str
    peak_rss_bytes: int = 0
    # The actor process's CPU seconds (all its threads) when the shard started and finished: the driver
    # takes each actor's span, which stays right when calls overlap.
    cpu_started: float = 0.0
    cpu_finished: float = 0.0


def _result_row(pair: sources.LoadedPair, shard_id: str) -> dict:
    return {
        "pair_id": pair.pair_id,
        "reference": pair.reference,
        "distorted": pair.distorted,
        "ssim": None,
        "ssim_per_channel": None,
        "height": None,
        "width": None,
        "channels": None,
        "data_range": pair.data_range,
        "bit_depth": pair.bit_depth,
        "status": pair.status,
        "error": pair.error,
        "decoder": pair.decoder,
        "shard_id": shard_id,
        **pair.passthrough,
    }


class ShardComputer:
    """Computes the rows of one shard; separated from the actor so it can be tested without Ray."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        fixed = None if spec.batch.size == "auto" else int(spec.batch.size)
        self.sizer = BatchSizer(
            self.device,
            fixed=fixed,
            memory_fraction=spec.batch.memory_fraction,
            max_size=spec.batch.max_size,
            share=spec.memory_share,
            cap_throughput=True,
        )
        self._warmed = False

    # ------------------------------------------------------------ compute
    def _scores(self, pairs: List[sources.LoadedPair]) -> torch.Tensor:
        cfg = self.spec.ssim
        non_blocking = self.device.type == "cuda"
        x = torch.stack([p.ref for p in pairs])
        y = torch.stack([p.dist for p in pairs])
        if non_blocking:
            x, y = x.pin_memory(), y.pin_memory()
        per_channel = ssim(
            x.to(self.device, non_blocking=non_blocking),
            y.to(self.device, non_blocking=non_blocking),
            data_range=pairs[0].data_range,
            win_size=cfg.win_size,
            sigma=cfg.sigma,
            k1=cfg.k1,
            k2=cfg.k2,
            gaussian=cfg.gaussian,
            per_channel=True,
            downsample=cfg.downsample,
            precision=cfg.precision,
        )
        return per_channel.cpu()

    def _compute_batch(self, key: BucketKey, pairs: List[sources.LoadedPair], rows: Dict[int, dict]) -> None:
        try:
            per_channel = self._scores(pairs)
        except Exception as exc:  # noqa: BLE001 - every failure is typed below, none is dropped
            if is_out_of_memory(exc) and len(pairs) > 1:
                half = self.sizer.on_oom(key, len(pairs))
                for start in range(0, len(pairs), half):
                    self._compute_batch(key, pairs[start : start + half], rows)
                return
            if len(pairs) > 1:  # isolate the pair that fails; the others still get scores
                for pair in pairs:
                    self._compute_batch(key, [pair], rows)
                return
            row = rows[pairs[0].row_index]
            row["status"], row["error"] = statuses.COMPUTE_ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0]
            return
        self._fill_scores(pairs, per_channel, rows)

    @staticmethod
    def _fill_scores(pairs: List[sources.LoadedPair], per_channel: torch.Tensor, rows: Dict[int, dict]) -> None:
        # Reduce in the metric's own dtype, exactly as ssim() does, so the job's score has the same bits
        # as a direct ssim(x, y) call; widen to float64 only for storage.
        overall = mean_over_channels(per_channel).tolist()
        per_channel_values = per_channel.tolist()
        for i, pair in enumerate(pairs):
            row = rows[pair.row_index]
            row["ssim"], row["ssim_per_channel"] = overall[i], per_channel_values[i]
            row["channels"], row["height"], row["width"] = (int(s) for s in pair.ref.shape)

    def warm_up_at_start(self) -> bool:
        """Compile the CPU kernel before the first shard if this actor expects enough pairs; True if it did."""
        if self.spec.expected_pairs < COMPILE_AT_START_MIN_PAIRS:
            return False
        return self._compile_now()

    def _warm_up(self, key: BucketKey) -> None:
        """Compile the CPU kernel now, outside the probe, if this actor's expected work pays for it."""
        if self.spec.expected_pairs * key.channels * key.height * key.width >= COMPILE_NOW_MIN_PIXELS:
            self._compile_now()

    def _compile_now(self) -> bool:
        if self._warmed or self.device.type != "cpu" or os.environ.get("SSIM_RAY_COMPILE"):
            return False
        self._warmed = True
        os.environ["SSIM_RAY_COMPILE"] = "always"
        # One small pair compiles the kernel for every image size (its tiles have a fixed shape); doing it
        # here keeps the compiler's own allocations out of the memory probe's measurement.
        side = self.spec.ssim.win_size + 16
        ramp = torch.arange(side * side, dtype=torch.float64).reshape(1, 1, side, side) % 251
        cfg = self.spec.ssim
        ssim(ramp.to(torch.uint8), ramp.flip(-1).to(torch.uint8), win_size=cfg.win_size, sigma=cfg.sigma,
             gaussian=cfg.gaussian, precision=cfg.precision)
        return True

    def _flush(self, key: BucketKey, pairs: List[sources.LoadedPair], rows: Dict[int, dict]) -> None:
        self._warm_up(key)
        while pairs:
            size = self.sizer.size_for(key)
            if size is None:
                trial = pairs[:PROBE_TRIAL_PAIRS]
                self.sizer.probe(key, len(trial), lambda: self._compute_batch(key, trial, rows))
                del pairs[: len(trial)]
                continue
            batch, pairs[:] = pairs[:size], pairs[size:]
            self._compute_batch(key, batch, rows)

    # ------------------------------------------------------------ shard
    def compute_rows(self, shard: sources.Shard) -> List[dict]:
        """Every pair of the shard as one result row, in shard order."""
        spec = self.spec
        rows: Dict[int, dict] = {}
        buckets: Dict[BucketKey, List[sources.LoadedPair]] = defaultdict(list)
        pairs = sources.iter_shard_pairs(
            shard, spec.source, spec.ssim, threads=spec.decode_threads, prefetch=spec.batch.prefetch_pairs
        )
        for pair in pairs:
            rows[pair.row_index] = _result_row(pair, shard.shard_id)
            if not statuses.is_ok(pair.status):
                continue
            key = bucket_key(pair.ref)
            bucket = buckets[key]
            bucket.append(pair)
            size = self.sizer.size_for(key)
            if len(bucket) >= (PROBE_TRIAL_PAIRS if size is None else size):
                self._flush(key, bucket, rows)
        for key, bucket in buckets.items():
            self._flush(key, bucket, rows)
        return [rows[i] for i in sorted(rows)]

    def run_shard(self, shard: sources.Shard, passthrough_columns: tuple) -> ShardResult:
        started, cpu_started = time.time(), time.process_time()
        rows = self.compute_rows(shard)
        if len(rows) != shard.num_pairs:
            raise RuntimeError(
                f"shard {shard.shard_id}: expected {shard.num_pairs} pairs, the source yielded {len(rows)}"
            )
        table = results.rows_to_table(rows, passthrough_columns)
        results.write_shard(
            self.spec.output_url,
            shard.shard_id,
            table,
            storage_options=self.spec.output_storage_options,
            stats=results.shard_stats(table, self.spec.summary),
        )
        counts: Dict[str, int] = defaultdict(int)
        for row in rows:
            counts[row["status"]] += 1
        return ShardResult(
            shard_id=shard.shard_id,
            rows=len(rows),
            status_counts=dict(counts),
            started=started,
            finished=time.time(),
            batch_sizes=self.sizer.summary(),
            worker=f"{socket.gethostname()}:{os.getpid()}",
            device=str(self.device),
            peak_rss_bytes=peak_rss_bytes(),
            cpu_started=cpu_started,
            cpu_finished=time.process_time(),
        )


def configure_process(spec: WorkerSpec) -> None:
    """Per-process set-up of an actor: torch threads, allocator, kernel compilation, no GPU for CPU actors."""
    if spec.device == "cpu":
        # Ray no longer hides GPUs from tasks that asked for none; a CPU actor must not touch one.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    configure_cpu_compute(torch_threads=spec.torch_threads, compile_now=False, gil_free_kernel=spec.device == "cpu")


class ShardWorker:
    """The Ray actor class (wrapped with ray.remote by run.py, with its resources)."""

    def __init__(self, spec: WorkerSpec) -> None:
        configure_process(spec)
        self.computer = ShardComputer(spec)
        self.computer.warm_up_at_start()

    def run_shard(self, shard: sources.Shard, passthrough_columns: tuple) -> ShardResult:
        return self.computer.run_shard(shard, passthrough_columns)

    def ping(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

