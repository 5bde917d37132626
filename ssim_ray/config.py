"""Typed configuration of an SSIM audit, registered with Hydra as structured-config schemas.

The dataclasses are the schema: a key that does not exist or a value of the wrong type fails when Hydra
composes the config, before any work. `OmegaConf.to_object` turns a composed config into these classes,
which runs each `__post_init__` and so validates the values that a type alone cannot (choices, ranges).
Workers receive these plain dataclasses, never a DictConfig.

They are not `frozen=True` on purpose: OmegaConf marks nodes built from frozen dataclasses read-only, and
Hydra then refuses to merge YAML or command-line overrides into them. Treat instances as immutable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ssim_ray.metric import (
    COMPILE_POLICIES,
    COVARIANCES,
    KERNELS,
    MS_SSIM_WEIGHTS,
    metric_settings,
    ms_ssim_settings,
    psnr_settings,
)
from ssim_ray.secrets import reject_credentials

SOURCE_KINDS = ("sample", "parquet", "prefix")
COLOR_POLICIES = ("rgb", "gray", "y", "y_float")
# The named conventions of conf/ssim/<name>.yaml (tests/test_presets.py keeps the two lists equal), and
# `custom` for settings that follow no published code.
PRESETS = ("wang2004", "matlab_ssim", "basicsr", "skimage_default", "custom")
ALPHA_POLICIES = ("drop", "error")
PRECISIONS = ("fp32", "fp64", "amp")
DOWNSAMPLE_MODES = (None, "wang")
OUTPUT_MODES = ("resume", "overwrite")
MULTI_FRAME_POLICIES = ("error", "first")
EXIF_ORIENTATION_POLICIES = ("error", "ignore", "apply")
# Decoded bytes a worker may hold ahead of its consumer (batch.prefetch_bytes): 512 MiB is ~5 pairs of
# 4000x4000 RGB, or every one of 64 pairs of 512x512 RGB, so the pair bound decides for ordinary images.
DEFAULT_PREFETCH_BYTES = 512 * 2**20
DEVICES = ("auto", "cpu", "cuda")
# The metrics a job can compute from the same decoded pixels (`metrics: [...]`): each is a column of
# ssim.parquet (output/schema.py) and a block of summary.json. SSIM is always computed (the worst pairs, the
# report's maps and the status rules are SSIM's); PSNR is nearly free beside it (one pass of squared errors).
METRIC_NAMES = ("ssim", "psnr", "ms_ssim")
# How summaries, messages and the report name each metric, and the unit of its values.
METRIC_LABELS = {"ssim": "SSIM", "psnr": "PSNR", "ms_ssim": "MS-SSIM"}
METRIC_UNITS = {"ssim": "", "psnr": " dB", "ms_ssim": ""}
DEFAULT_METRICS = ("ssim", "psnr")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    # NaN compares false with everything, so a plain `value < 0` test would let it through.
    if not _is_finite_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _in_range(name: str, value: Optional[float], low: float, high: float) -> None:
    if value is not None and not (_is_finite_number(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def check_metrics(metrics: Any) -> Tuple[str, ...]:
    """The job's `metrics` as a tuple in METRIC_NAMES order: known names, each once, `ssim` among them.

    Raises:
        ValueError: not a list of names, an unknown or repeated name, or `ssim` missing.

    Example:
        >>> check_metrics(["ms_ssim", "ssim"])
        ('ssim', 'ms_ssim')
    """
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
        raise ValueError(f"metrics must be a list of names from {list(METRIC_NAMES)}, got {metrics!r}")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics must name only {list(METRIC_NAMES)}, got {list(metrics)} (unknown: {unknown})")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must name each metric once, got {list(metrics)}")
    if "ssim" not in metrics:
        raise ValueError(f"metrics must include ssim (always computed: worst pairs, maps and statuses are SSIM's), "
                         f"got {list(metrics)}")
    return tuple(m for m in METRIC_NAMES if m in metrics)


@dataclass
class SourceConfig:
    """Where the (reference, distorted) pairs come from.

    kind: `sample` (built-in photographs), `parquet` (a manifest) or `prefix` (two folders/prefixes).
    url: the manifest: one Parquet file, a folder of them, or a glob, at any fsspec URL.
    reference_url, distorted_url: the two prefixes of a `prefix` source.
    base_url: what relative paths in a manifest are relative to; default: the manifest's folder.
    storage_options: passed to fsspec (endpoint, region, anon...). Never put credentials here: they come
        from the environment or fsspec's own configuration.
    passthrough_columns: manifest columns copied to the results; None: every other column.
    allowed_schemes: URL schemes an absolute path in a manifest may use.
    max_pixels: pixel cap per image (decompression bombs give status `too_large`).
    multi_frame: files with several frames or pages (APNG, multi-page TIFF, animated WebP, MPO): `error`
        (status `multi_frame`) or `first` (score frame 0, as Pillow opens it).
    exif_orientation: `error` (a pair whose two EXIF orientations differ gets `orientation_mismatch`; pairs
        that agree are compared as stored), `ignore` (stored pixels, tags disregarded) or `apply` (each
        image turned upright by its own tag).
    copies: `sample` only: how many copies of the sample set to list, for benchmarks.
    """

    kind: str = "sample"
    url: Optional[str] = None
    reference_url: Optional[str] = None
    distorted_url: Optional[str] = None
    base_url: Optional[str] = None
    pair_id_column: str = "pair_id"
    reference_column: str = "reference"
    distorted_column: str = "distorted"
    passthrough_columns: Optional[List[str]] = None
    ignore_extension: bool = False
    pairs_per_shard: int = 64
    storage_options: Dict[str, Any] = field(default_factory=dict)
    allowed_schemes: List[str] = field(default_factory=lambda: ["file", "s3", "gs", "gcs", "az", "abfs"])
    max_pixels: int = 100_000_000
    multi_frame: str = "error"
    exif_orientation: str = "error"
    fetch_retries: int = 4
    copies: int = 1
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("source.kind", self.kind, SOURCE_KINDS)
        _positive("source.pairs_per_shard", self.pairs_per_shard)
        _positive("source.max_pixels", self.max_pixels)
        _choice("source.multi_frame", self.multi_frame, MULTI_FRAME_POLICIES)
        _choice("source.exif_orientation", self.exif_orientation, EXIF_ORIENTATION_POLICIES)
        _positive("source.fetch_retries", self.fetch_retries, allow_zero=True)
        _positive("source.copies", self.copies)
        reject_credentials("source.storage_options", self.storage_options)
        if self.kind == "parquet" and not self.url:
            raise ValueError("source=parquet needs source.url (a Parquet file, folder or glob), got none")
        if self.kind == "prefix" and not (self.reference_url and self.distorted_url):
            raise ValueError(
                "source=prefix needs source.reference_url and source.distorted_url, got "
                f"reference_url={self.reference_url!r}, distorted_url={self.distorted_url!r}"
            )


@dataclass
class SSIMConfig:
    """The metrics (SSIM, PSNR, MS-SSIM), the convention they follow, and how pixels are decoded for them.

    preset: the named convention these settings come from (conf/ssim/<preset>.yaml: `wang2004`,
        `matlab_ssim`, `basicsr`, `skimage_default`), or `custom`; written into every summary.
    data_range: `auto` (from the file's bit depth: 255 for 8-bit, 65535 for 16-bit) or a number
        (e.g. 4095 for 12-bit data stored in 16-bit files).
    color: `rgb` (default), `gray` (ITU-R 601-2 luma, Pillow's `L`), `y` (BT.601 studio-swing luma
        rounded to integers as MATLAB's rgb2ycbcr) or `y_float` (the same luma unrounded in float32, as
        BasicSR's `test_y_channel` forms it).
    alpha: `drop` the alpha channel of LA/RGBA files, or treat it as an `error`.
    covariance: `population` (Wang's moments) or `sample` (times N / (N - 1): scikit-image's default).
    crop_border: pixels removed from each side of both images before every metric (BasicSR's
        `crop_border`, usually the super-resolution scale). `null` means not given: refused, so a preset
        that needs it (`basicsr`) sets it to null and the user must give the scale (`???` cannot do that
        here: merging `???` over the schema's default keeps the default).
    ms_ssim_weights: MS-SSIM's exponent per scale; their count is the number of scales.
    kernel: `auto` (the torch path, for now), `torch`, or `triton` (the fused CUDA kernel, within 1e-6 of
        the torch path; it refuses what it cannot score, e.g. CPU tensors or fp64). See `ssim()`.
    compile: when the CPU torch kernel is compiled: `auto` (after a few seconds of eager work, or before the
        first shard when an actor's queue pays for it), `always`, `never`. Speed only: the same bits.
    """

    preset: str = "wang2004"
    data_range: Any = "auto"
    color: str = "rgb"
    alpha: str = "drop"
    win_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    gaussian: bool = True
    covariance: str = "population"
    downsample: Optional[str] = None
    crop_border: Optional[int] = 0
    ms_ssim_weights: List[float] = field(default_factory=lambda: list(MS_SSIM_WEIGHTS))
    precision: str = "fp32"
    kernel: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        if self.data_range != "auto":
            if not _is_finite_number(self.data_range) or self.data_range <= 0:
                raise ValueError(f"ssim.data_range must be 'auto' or a finite number > 0, got {self.data_range!r}")
        _choice("ssim.color", self.color, COLOR_POLICIES)
        _choice("ssim.alpha", self.alpha, ALPHA_POLICIES)
        _choice("ssim.downsample", self.downsample, DOWNSAMPLE_MODES)
        _choice("ssim.precision", self.precision, PRECISIONS)
        _choice("ssim.kernel", self.kernel, KERNELS)
        _choice("ssim.compile", self.compile, COMPILE_POLICIES)
        if self.win_size < 1 or self.win_size % 2 == 0:
            raise ValueError(f"ssim.win_size must be a positive odd integer, got {self.win_size!r}")
        _positive("ssim.sigma", self.sigma)
        # k = 0 drops the constant that keeps SSIM defined on flat regions (0/0); the metric refuses it
        # per batch, so without this check every shard would fail after the run was recorded.
        _positive("ssim.k1", self.k1)
        _positive("ssim.k2", self.k2)
        _choice("ssim.preset", self.preset, PRESETS)
        _choice("ssim.covariance", self.covariance, COVARIANCES)
        if self.covariance == "sample" and self.win_size == 1:
            raise ValueError("ssim.covariance=sample needs ssim.win_size >= 3 (N / (N - 1) with N = 1), got 1")
        if self.crop_border is None:
            raise ValueError(f"ssim.crop_border is required by ssim.preset={self.preset}: give the pixels to remove "
                             "from each side, usually the super-resolution scale (e.g. ssim.crop_border=4; 0 keeps "
                             "the whole image)")
        if isinstance(self.crop_border, bool) or not isinstance(self.crop_border, int):
            raise ValueError(f"ssim.crop_border must be an integer >= 0, got {self.crop_border!r}")
        _positive("ssim.crop_border", self.crop_border, allow_zero=True)
        if not self.ms_ssim_weights:
            raise ValueError("ssim.ms_ssim_weights must hold one weight per scale, got an empty list")
        for i, weight in enumerate(self.ms_ssim_weights):
            _positive(f"ssim.ms_ssim_weights[{i}]", weight)

    def ssim_options(self) -> Dict[str, Any]:
        """The keyword arguments of `ssim()` this config sets: the one mapping from config to the metric.

        `data_range` is not among them: with `auto` it comes from each pair's files, so callers pass it per
        batch. Callers that must differ (the report maps with the torch kernel, which alone draws maps)
        override a key explicitly.

        Example:
            >>> sorted(SSIMConfig().ssim_options())[:4]
            ['compile', 'covariance', 'crop_border', 'downsample']
        """
        return {"win_size": self.win_size, "sigma": self.sigma, "k1": self.k1, "k2": self.k2,
                "gaussian": self.gaussian, "downsample": self.downsample, "precision": self.precision,
                "covariance": self.covariance, "crop_border": self.crop_border,
                "kernel": self.kernel, "compile": self.compile}

    def psnr_options(self) -> Dict[str, Any]:
        """The keyword arguments of `psnr()` (and `mse()`) this config sets; `data_range` is per batch.

        Example:
            >>> SSIMConfig(crop_border=4).psnr_options()
            {'precision': 'fp32', 'crop_border': 4}
        """
        return {"precision": self.precision, "crop_border": self.crop_border}

    def ms_ssim_options(self) -> Dict[str, Any]:
        """The keyword arguments of `ms_ssim()` this config sets; `data_range` is per batch.

        MS-SSIM is `msssim.m`'s: a Gaussian window and population moments always; `gaussian`,
        `covariance` and `downsample` are SSIM's alone, and the torch path scores it whatever `kernel` says.

        Example:
            >>> SSIMConfig().ms_ssim_options()["weights"]
            [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
        """
        return {"weights": list(self.ms_ssim_weights), "win_size": self.win_size, "sigma": self.sigma,
                "k1": self.k1, "k2": self.k2, "precision": self.precision, "crop_border": self.crop_border,
                "compile": self.compile}

    def describe(self, metrics: Sequence[str] = DEFAULT_METRICS) -> Dict[str, Any]:
        """Every setting that changes a score: the metric block of both `_run.json` and `summary.json`.

        The named convention (`preset`), SSIM's own definition (`metric_settings`: name, window, constants,
        moments, border crop, region, reduction, downsampling, precision), PSNR's and MS-SSIM's (blocks
        "psnr" and "ms_ssim"), plus what the job decides before a metric sees a pixel: the colour mode, the
        alpha policy, the data range and its rule, and the kernel (torch and Triton agree to 1e-6, not bit
        for bit). The compile policy is not here: compiled and eager kernels give the same bits, so it is
        a run fact (`summary.json` "runtime"), and a resume may change it.

        Example:
            >>> d = SSIMConfig(color="y", data_range=4095).describe()
            >>> d["preset"], d["name"], d["color"], d["data_range"], d["data_range_rule"], d["kernel"]
            ('wang2004', 'wang2004', 'y', 4095.0, 'fixed by ssim.data_range', 'auto')
        """
        options = self.ssim_options()
        kernel = options.pop("kernel")
        del options["compile"]
        settings = metric_settings(**options, data_range=self.data_range)
        ms_ssim_options = self.ms_ssim_options()
        del ms_ssim_options["compile"]
        rule = ("from each file's bit depth: 255 for 8-bit, 65535 for 16-bit" if self.data_range == "auto"
                else "fixed by ssim.data_range")
        return {"preset": self.preset, **settings, "metrics": list(check_metrics(metrics)),
                "data_range_rule": rule, "color": self.color,
                "alpha": self.alpha, "kernel": kernel, "ms_ssim_weights": list(self.ms_ssim_weights),
                "psnr": psnr_settings(**self.psnr_options(), data_range=self.data_range),
                "ms_ssim": ms_ssim_settings(**ms_ssim_options, data_range=self.data_range)}


@dataclass
class BatchConfig:
    """Batch size per shape bucket: `auto` (memory probe in each actor) or a fixed integer.

    prefetch_pairs and prefetch_bytes bound what an actor loads ahead of its computation: pairs, and the
    decoded bytes of those pairs (one pair always proceeds, even alone over the byte bound).
    """

    size: Any = "auto"
    memory_fraction: float = 0.5
    max_size: int = 512
    prefetch_pairs: int = 64
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES

    def __post_init__(self) -> None:
        if self.size != "auto" and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"batch.size must be 'auto' or a positive integer, got {self.size!r}")
        if not (_is_finite_number(self.memory_fraction) and 0 < self.memory_fraction <= 1):
            raise ValueError(f"batch.memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        _positive("batch.max_size", self.max_size)
        _positive("batch.prefetch_pairs", self.prefetch_pairs)
        _positive("batch.prefetch_bytes", self.prefetch_bytes)


@dataclass
class OutputConfig:
    """Where results go. url: any fsspec URL; mode: `resume` keeps committed shards, `overwrite` starts over.

    claim_ttl_s: the lease of the output's claim (one run at a time per output): a claim whose heartbeat is
        older than this is taken over (heartbeats come every claim_ttl_s / 4). Keep it well above the clock
        skew between the machines that may write the output.
    verify_inputs: on resume, actors look up every input of every committed shard (one stat or HEAD per
        image, no fetch, no decode) and recompute the shards whose inputs changed since they were scored;
        false reuses committed shards unchecked.
    """

    url: Optional[str] = None
    mode: str = "resume"
    merge_only: bool = False
    storage_options: Dict[str, Any] = field(default_factory=dict)
    claim_ttl_s: float = 120.0
    verify_inputs: bool = True

    def __post_init__(self) -> None:
        _choice("output.mode", self.mode, OUTPUT_MODES)
        reject_credentials("output.storage_options", self.storage_options)
        if isinstance(self.claim_ttl_s, bool) or not self.claim_ttl_s > 0 or self.claim_ttl_s == float("inf"):
            raise ValueError(f"output.claim_ttl_s must be a finite number > 0, got {self.claim_ttl_s!r}")


@dataclass
class RuntimeConfig:
    """Ray and actors.

    address: None starts a local Ray; `auto` or `host:port` joins a running cluster.
    num_workers: actors; None: one per GPU, or on CPU one per cpus_per_worker CPUs of each node (one per
        core by default), rounded up (placement.cpu_actors).
    device: `auto` (CUDA where the actor is given a GPU, else CPU), `cpu` or `cuda`.
    decode_threads: fetch-and-decode threads per actor: a positive integer, or `auto` (a GPU actor reserves
        and decodes on its node's CPUs, less one for Ray, divided among the node's GPU actors; a CPU actor
        keeps 2), see placement.actor_decode_threads.
    """

    address: Optional[str] = None
    num_workers: Optional[int] = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    device: str = "auto"
    decode_threads: Any = "auto"
    max_shard_attempts: int = 3
    progress_interval_s: float = 10.0
    stall_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.num_workers is not None:
            _positive("runtime.num_workers", self.num_workers)
        _positive("runtime.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        _positive("runtime.cpus_per_worker", self.cpus_per_worker)
        _choice("runtime.device", self.device, DEVICES)
        if self.decode_threads != "auto" and (isinstance(self.decode_threads, bool) or not isinstance(self.decode_threads, int)
                                              or self.decode_threads < 1):
            raise ValueError(f"runtime.decode_threads must be 'auto' or a positive integer, got {self.decode_threads!r}")
        _positive("runtime.max_shard_attempts", self.max_shard_attempts)
        _positive("runtime.progress_interval_s", self.progress_interval_s)
        _positive("runtime.stall_timeout_s", self.stall_timeout_s)
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError(f"runtime.device=cuda needs runtime.gpus_per_worker > 0 (Ray gives a GPU only to actors "
                             f"that ask for one), got {self.gpus_per_worker!r}")


@dataclass
class SummaryConfig:
    """group_by: a result column (e.g. a pass-through `codec`) to break statistics down by.

    worst_k: the lowest-scoring ok pairs listed in the summary. examples_per_status: example rows kept for
    each failure status. max_groups: more distinct group_by values than this is an error (a per-pair column
    was probably named by mistake; the summary and report would hold one entry per pair).
    """

    group_by: Optional[str] = None
    worst_k: int = 20
    examples_per_status: int = 5
    max_groups: int = 1000

    def __post_init__(self) -> None:
        _positive("summary.worst_k", self.worst_k, allow_zero=True)
        _positive("summary.examples_per_status", self.examples_per_status, allow_zero=True)
        _positive("summary.max_groups", self.max_groups)


@dataclass
class AuditConfig:
    """Quality gates. A violated gate still writes every output, then exits with a documented code.

    Semantics (ssim_ray/output/gates.py): the fraction of ok pairs with ssim strictly below min_ssim must not
    exceed max_fraction_below (unset: 0, i.e. no ok pair may be below); the group_ variants apply to each value
    of summary.group_by; max_failures bounds the rows whose status is not ok. An audit with no ok pair (an empty
    manifest, or every pair failed) fails with the failure gate's code unless allow_no_ok_pairs is true.

    min_psnr (dB) and min_ms_ssim follow the same rules with their own fraction and group settings
    (psnr_max_fraction_below, group_min_psnr, group_psnr_max_fraction_below; the same with ms_ssim), and
    need their metric in `metrics`. A PSNR of +inf (identical images) is above every threshold. An ok pair
    whose MS-SSIM is undefined counts below every MS-SSIM threshold when a scale's term is <= 0
    (`nonpositive_term`: no structure in common) and is left out when the image is too small for five scales
    (`too_small`: not measured).
    """

    min_ssim: Optional[float] = None
    max_fraction_below: Optional[float] = None
    group_min_ssim: Optional[float] = None
    group_max_fraction_below: Optional[float] = None
    min_psnr: Optional[float] = None
    psnr_max_fraction_below: Optional[float] = None
    group_min_psnr: Optional[float] = None
    group_psnr_max_fraction_below: Optional[float] = None
    min_ms_ssim: Optional[float] = None
    ms_ssim_max_fraction_below: Optional[float] = None
    group_min_ms_ssim: Optional[float] = None
    group_ms_ssim_max_fraction_below: Optional[float] = None
    max_failures: Optional[int] = None
    allow_no_ok_pairs: bool = False

    def __post_init__(self) -> None:
        for name in ("min_ssim", "group_min_ssim"):
            _in_range(f"audit.{name}", getattr(self, name), -1.0, 1.0)
        for name in ("min_ms_ssim", "group_min_ms_ssim"):
            _in_range(f"audit.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("min_psnr", "group_min_psnr"):
            value = getattr(self, name)
            if value is not None and not _is_finite_number(value):
                raise ValueError(f"audit.{name} must be a finite number of dB, got {value!r}")
        for gate in self.gates():
            value = getattr(self, gate.fraction)
            _in_range(f"audit.{gate.fraction}", value, 0.0, 1.0)
            if value is not None and gate.threshold_of(self) is None:
                raise ValueError(f"audit.{gate.fraction} needs audit.{gate.name}, got audit.{gate.name}=None")
        if self.max_failures is not None:
            _positive("audit.max_failures", self.max_failures, allow_zero=True)

    @staticmethod
    def gates() -> Tuple["ScoreGate", ...]:
        """Every score gate: (setting, its fraction setting, the metric, whether per group), in gate order."""
        return SCORE_GATES

    def set_gates(self) -> Tuple["ScoreGate", ...]:
        """The score gates this config sets (a threshold given).

        Example:
            >>> [g.name for g in AuditConfig(min_psnr=30.0, group_min_ssim=0.5).set_gates()]
            ['group_min_ssim', 'min_psnr']
        """
        return tuple(g for g in SCORE_GATES if g.threshold_of(self) is not None)

    def thresholds(self) -> Dict[str, List[float]]:
        """The thresholds the summary must count below, per metric (the merge writes them into `below`).

        Example:
            >>> AuditConfig(min_ssim=0.5, min_psnr=30.0).thresholds()
            {'ssim': [0.5], 'psnr': [30.0]}
        """
        found: Dict[str, List[float]] = {}
        for gate in self.set_gates():
            values = found.setdefault(gate.metric, [])
            if gate.threshold_of(self) not in values:
                values.append(float(gate.threshold_of(self)))
        return {metric: sorted(values) for metric, values in found.items()}


@dataclass(frozen=True)
class ScoreGate:
    """One score gate of AuditConfig: its threshold setting, its fraction setting, its metric, group or run."""

    name: str
    fraction: str
    metric: str
    per_group: bool

    def threshold_of(self, audit: "AuditConfig") -> Optional[float]:
        return getattr(audit, self.name)


SCORE_GATES = (
    ScoreGate("min_ssim", "max_fraction_below", "ssim", False),
    ScoreGate("group_min_ssim", "group_max_fraction_below", "ssim", True),
    ScoreGate("min_psnr", "psnr_max_fraction_below", "psnr", False),
    ScoreGate("group_min_psnr", "group_psnr_max_fraction_below", "psnr", True),
    ScoreGate("min_ms_ssim", "ms_ssim_max_fraction_below", "ms_ssim", False),
    ScoreGate("group_min_ms_ssim", "group_ms_ssim_max_fraction_below", "ms_ssim", True),
)


@dataclass
class ReportConfig:
    """report.html and plots/ beside the results. worst_k: worst pairs shown with their SSIM maps (at most
    summary.worst_k, the number the summary keeps)."""

    enabled: bool = True
    worst_k: int = 12

    def __post_init__(self) -> None:
        _positive("report.worst_k", self.worst_k, allow_zero=True)


@dataclass
class AuditJobConfig:
    """The whole audit. Each section validates its own values; `__post_init__` adds the checks that span
    sections (`validate` runs all of them again, for a config changed after it was built)."""

    source: SourceConfig = field(default_factory=SourceConfig)
    metrics: List[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    ssim: SSIMConfig = field(default_factory=SSIMConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        chosen = check_metrics(self.metrics)
        for gate in self.audit.set_gates():
            # Without a group column the group gate has nothing to test; found by the gates, it used to fail
            # the job after every shard was computed and merged.
            if gate.per_group and not self.summary.group_by:
                raise ValueError(f"audit.{gate.name} needs summary.group_by to name a column, got "
                                 f"summary.group_by={self.summary.group_by!r}")
            if gate.metric not in chosen:
                raise ValueError(f"audit.{gate.name} needs {gate.metric} among the metrics computed, got "
                                 f"metrics={list(self.metrics)} (add it: metrics=[{','.join(chosen + (gate.metric,))}])")

    def chosen_metrics(self) -> Tuple[str, ...]:
        """The metrics this job computes, in METRIC_NAMES order (`metrics`, checked).

        Example:
            >>> AuditJobConfig(metrics=["ssim", "ms_ssim"]).chosen_metrics()
            ('ssim', 'ms_ssim')
        """
        return check_metrics(self.metrics)

    def describe_metric(self) -> Dict[str, Any]:
        """The metric block of `_run.json` and `summary.json`: `SSIMConfig.describe` with this job's metrics.

        Example:
            >>> AuditJobConfig(metrics=["ssim"]).describe_metric()["metrics"]
            ['ssim']
        """
        return self.ssim.describe(metrics=self.chosen_metrics())

    def validate(self) -> None:
        """Run every section's checks and the cross-section ones again (fields may be set after building).

        Raises:
            ValueError: naming the first setting that cannot work and the value it got.

        Example:
            >>> cfg = AuditJobConfig()
            >>> cfg.ssim.k1 = float("nan")
            >>> cfg.validate()
            Traceback (most recent call last):
            ...
            ValueError: ssim.k1 must be a finite number > 0, got nan
        """
        for section in fields(self):
            check = getattr(getattr(self, section.name), "__post_init__", None)
            if check is not None:
                check()
        self.__post_init__()


SCHEMA_NAME = "ssim_audit_schema"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore, so YAML files and overrides are type-checked."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=AuditJobConfig)
