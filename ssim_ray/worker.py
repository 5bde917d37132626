"""The Ray actor: one shard in, one committed part file out, a small ShardResult back.

Inside an actor, `sources.iter_shard_pairs` fetches and decodes pairs on threads with a bounded prefetch
while this thread computes the metrics on the device, so I/O and compute overlap. Pairs are bucketed by
shape; each bucket's batch size comes from the memory probe (`batching.BatchSizer`), whose trial batch
computes every chosen metric. SSIM, PSNR (from the squared errors) and MS-SSIM (from its per-scale terms)
are computed from the same pixels, moved to the device once per batch; an ok pair whose MS-SSIM is
undefined keeps its status, SSIM and PSNR and gets the reason (`ms_ssim_undefined`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from ssim_ray import sources, statuses
from ssim_ray.batching import BatchSizer, BucketKey, bucket_key, is_out_of_memory
from ssim_ray.config import DEFAULT_METRICS, BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
from ssim_ray.metric import (
    NONPOSITIVE_TERM,
    TOO_SMALL,
    kernel_in_use,
    mean_over_channels,
    ms_ssim_from_terms,
    ms_ssim_nonpositive,
    ms_ssim_terms,
    ms_ssim_terms_and_ssim,
    ms_ssim_too_small,
    mse,
    psnr_from_mse,
    ssim,
)
from ssim_ray.output.commit import write_shard_rows
from ssim_ray.output.inputs import InputCheck, check_inputs
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.output.schema import result_row
from ssim_ray.process_setup import configure_actor_process, peak_rss_bytes

# Pairs in the probe's trial batch: enough to make the per-pair peak dominate fixed costs, small enough
# to be cheap on the largest images.
PROBE_TRIAL_PAIRS = 4
# Compile ssim's CPU kernel before the first batch once an actor's work is expected to pay for it. The
# thresholds date from torch.compile, whose compile cost ~4-6 s of one core; the C kernel that replaced it
# builds in ~1 s once per machine and loads from its cache in milliseconds after that, so they are now
# conservative: small jobs (and tests) stay on ssim's own policy (compile after 3 s of eager work).
COMPILE_NOW_MIN_PIXELS = 2e8
# An actor that expects this many pairs compiles while it starts, before its first shard: 1024 pairs of
# 256² RGB are the 2e8 above, and the compile is a start-up cost like torch's import, paid once per
# process.
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
    stamp: Optional[CommitStamp] = None  # recorded in every marker: plan fingerprint, metric digest, run id
    metrics: Tuple[str, ...] = DEFAULT_METRICS  # `AuditJobConfig.chosen_metrics()`: ssim always, psnr, ms_ssim


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """What one batch's metrics computed, on the CPU, before it becomes row values (`_fill_scores`).

    ssim: (n, C) SSIM per channel. mse: (n, C) squared error per channel (PSNR's input), or None when PSNR
    is not computed. ms_ssim_terms: (n, C, scales) MS-SSIM's per-scale means, or None when MS-SSIM is not
    computed or the images are too small for it (`ms_ssim_too_small` then says so).
    """

    ssim: torch.Tensor
    mse: Optional[torch.Tensor] = None
    ms_ssim_terms: Optional[torch.Tensor] = None
    ms_ssim_too_small: bool = False


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
    # The kernel that scored the shard (`ssim_ray.metric.kernel_in_use`): 'torch-compiled', 'torch-eager'
    # or 'triton'; '' where no actor computed (a shard the driver marks failed).
    kernel: str = ""


def _result_row(pair: sources.LoadedPair, shard_id: str) -> dict:
    """The pair's row as loaded; scores and sizes are filled in once its batch is computed (`_fill_scores`)."""
    return result_row(
        pair_id=pair.pair_id, reference=pair.reference, distorted=pair.distorted, status=pair.status,
        shard_id=shard_id, passthrough=pair.passthrough, error=pair.error, data_range=pair.data_range,
        bit_depth=pair.bit_depth, decoder=pair.decoder, reference_version=pair.reference_version,
        distorted_version=pair.distorted_version,
    )


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
        # The CPU kernel's compile policy this actor passes to ssim(): the configured one, until an actor
        # left on 'auto' decides that its work pays for compiling now ('always', see _compile_now).
        self.compile_policy = spec.ssim.compile
        # A kernel this device cannot run (kernel=triton without CUDA, fp64...) fails the actor here, with
        # the metric's reason, instead of every pair of every shard.
        kernel = self._kernel_in_use()
        # MS-SSIM's first scale is SSIM's own computation when SSIM is Wang's on the torch kernel (a Gaussian
        # window, population moments, no downsampling): one pass then gives both, with ssim()'s bits.
        cfg = spec.ssim
        self.ssim_from_ms_ssim = ("ms_ssim" in spec.metrics and cfg.gaussian and cfg.covariance == "population"
                                  and cfg.downsample is None and kernel != "triton")

    # ------------------------------------------------------------ compute
    def _scores(self, pairs: List[sources.LoadedPair]) -> BatchScores:
        """Every chosen metric of one same-shape batch, from the same pixels moved to the device once."""
        cfg, metrics = self.spec.ssim, self.spec.metrics
        non_blocking = self.device.type == "cuda"
        x = torch.stack([p.ref for p in pairs])
        y = torch.stack([p.dist for p in pairs])
        if non_blocking:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)
        data_range = pairs[0].data_range
        errors = None
        if "psnr" in metrics:
            errors = mse(x, y, per_channel=True, compile=self.compile_policy, **cfg.psnr_options()).cpu()
        too_small = "ms_ssim" in metrics and self._ms_ssim_too_small(x.shape[-2], x.shape[-1])
        if "ms_ssim" in metrics and not too_small and self.ssim_from_ms_ssim:
            terms, per_channel = ms_ssim_terms_and_ssim(x, y, data_range=data_range, **self._ms_ssim_term_options())
            return BatchScores(per_channel.cpu(), errors, terms.cpu(), False)
        per_channel = ssim(x, y, data_range=data_range, per_channel=True,
                           **{**cfg.ssim_options(), "compile": self.compile_policy})
        terms = None
        if "ms_ssim" in metrics and not too_small:
            terms = ms_ssim_terms(x, y, data_range=data_range, **self._ms_ssim_term_options()).cpu()
        return BatchScores(per_channel.cpu(), errors, terms, too_small)

    def _ms_ssim_term_options(self) -> dict:
        """`ms_ssim_terms()`'s options from `SSIMConfig.ms_ssim_options()` (the weights give the scales)."""
        options = {**self.spec.ssim.ms_ssim_options(), "compile": self.compile_policy}
        options["levels"] = len(options.pop("weights"))
        return options

    def _ms_ssim_too_small(self, height: int, width: int) -> bool:
        cfg = self.spec.ssim
        return ms_ssim_too_small(height, width, levels=len(cfg.ms_ssim_weights), win_size=cfg.win_size,
                                 crop_border=cfg.crop_border) is not None

    def _kernel_in_use(self) -> str:
        """Which kernel scores on this actor's device: 'torch-compiled', 'torch-eager' or 'triton'."""
        cfg = self.spec.ssim
        return kernel_in_use(self.device, kernel=cfg.kernel, compile=self.compile_policy, precision=cfg.precision,
                             win_size=cfg.win_size, sigma=cfg.sigma, gaussian=cfg.gaussian, covariance=cfg.covariance)

    def _compute_batch(self, key: BucketKey, pairs: List[sources.LoadedPair], rows: Dict[int, dict]) -> None:
        try:
            scores = self._scores(pairs)
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
        self._fill_scores(pairs, scores, rows)

    def _fill_scores(self, pairs: List[sources.LoadedPair], scores: BatchScores, rows: Dict[int, dict]) -> None:
        # Reduce in the metric's own dtype, exactly as ssim(), psnr() and ms_ssim() do, so the job's values
        # have the same bits as direct calls; widen to float64 only for storage.
        columns = {"ssim": mean_over_channels(scores.ssim).tolist(), "ssim_per_channel": scores.ssim.tolist()}
        if scores.mse is not None:
            data_range = pairs[0].data_range
            columns["psnr"] = psnr_from_mse(mean_over_channels(scores.mse), data_range).tolist()
            columns["psnr_per_channel"] = psnr_from_mse(scores.mse, data_range).tolist()
        for i, pair in enumerate(pairs):
            row = rows[pair.row_index]
            row.update({name: values[i] for name, values in columns.items()})
            row["channels"], row["height"], row["width"] = (int(s) for s in pair.ref.shape)
        if "ms_ssim" in self.spec.metrics:
            self._fill_ms_ssim(pairs, scores, rows)

    def _fill_ms_ssim(self, pairs: List[sources.LoadedPair], scores: BatchScores, rows: Dict[int, dict]) -> None:
        """MS-SSIM per pair, or the reason it has none (`ms_ssim_undefined`); the pair stays ok either way."""
        if scores.ms_ssim_too_small:
            for pair in pairs:
                rows[pair.row_index]["ms_ssim_undefined"] = TOO_SMALL
            return
        undefined = ms_ssim_nonpositive(scores.ms_ssim_terms)
        defined = [i for i in range(len(pairs)) if i not in undefined]
        if defined:
            # Elementwise powers per pair: a subset has the same bits as the whole batch.
            per_channel = ms_ssim_from_terms(scores.ms_ssim_terms[defined], weights=self.spec.ssim.ms_ssim_weights,
                                             per_channel=True)
            overall, per_channel_values = mean_over_channels(per_channel).tolist(), per_channel.tolist()
            for j, i in enumerate(defined):
                row = rows[pairs[i].row_index]
                row["ms_ssim"], row["ms_ssim_per_channel"] = overall[j], per_channel_values[j]
        for i in undefined:
            rows[pairs[i].row_index]["ms_ssim_undefined"] = NONPOSITIVE_TERM

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
        cfg = self.spec.ssim
        # Only the CPU torch kernel compiles, and a policy set in the config (or decided already) stands.
        if self.compile_policy != "auto" or self.device.type != "cpu" or cfg.kernel == "triton":
            return False
        self.compile_policy = "always"
        # One small pair compiles the kernel for every image size (its tiles have a fixed shape); doing it
        # here keeps the compiler's own allocations out of the memory probe's measurement.
        side = cfg.win_size + 16 + 2 * cfg.crop_border  # the border is cropped before the window sees it
        ramp = torch.arange(side * side, dtype=torch.float64).reshape(1, 1, side, side) % 251
        ssim(ramp.to(torch.uint8), ramp.flip(-1).to(torch.uint8), **{**cfg.ssim_options(), "compile": self.compile_policy})
        if "ms_ssim" in self.spec.metrics:  # its tile variant (with cs) is a graph of its own
            side = cfg.win_size * 2 ** (len(cfg.ms_ssim_weights) - 1) + 2 * cfg.crop_border
            ramp = torch.arange(side * side, dtype=torch.float64).reshape(1, 1, side, side) % 251
            warm = ms_ssim_terms_and_ssim if self.ssim_from_ms_ssim else ms_ssim_terms
            warm(ramp.to(torch.uint8), ramp.flip(-1).to(torch.uint8), **self._ms_ssim_term_options())
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
            shard, spec.source, spec.ssim, threads=spec.decode_threads, prefetch=spec.batch.prefetch_pairs,
            prefetch_bytes=spec.batch.prefetch_bytes,
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
        write_shard_rows(
            self.spec.output_url, shard.shard_id, rows, passthrough_columns=passthrough_columns,
            summary_cfg=self.spec.summary, storage_options=self.spec.output_storage_options,
            stamp=self.spec.stamp,
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
            kernel=self._kernel_in_use(),
        )


def configure_process(spec: WorkerSpec) -> None:
    """Per-process set-up of an actor: torch threads, allocator, kernel compilation, no GPU for CPU actors."""
    configure_actor_process(device=spec.device, torch_threads=spec.torch_threads)


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

    def verify_inputs(self, shard: sources.Shard, recorded_sha256: str) -> InputCheck:
        """Whether a committed shard's inputs changed since it was scored: a stat or HEAD per input, no decode."""
        spec = self.computer.spec
        versions = sources.current_versions(shard, spec.source, threads=spec.decode_threads)
        return check_inputs(spec.output_url, shard.shard_id, recorded_sha256, versions,
                            storage_options=spec.output_storage_options)

