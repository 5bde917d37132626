"""End-to-end job throughput against its bounds and the pipelines users would write.

`python scripts/bench_job.py [--pairs 2048] [--repeats 3] [--quick]`

One generated dataset (512x512 RGB crops of scikit-image's colour photographs, each saved as a PNG
reference and distorted eight ways: JPEG at four qualities kept as JPEG files, Gaussian noise, blur and
a contrast change kept as PNG files; made once into a cache folder), the same cores, one run. Rows:

- bounds: decode only (Pillow on a thread per core, both images of every pair), compute only (ssim_ray's
  metrics on pre-decoded uint8 tensors, one process per core as the job's actors run them, in the job's
  batches: the default metrics [ssim, psnr], and all three [ssim, psnr, ms_ssim]), and the combined bounds
  1 / (t_decode + t_compute) per pair, where each t is the per-pair time on all cores;
- the ssim_ray job (`run.evaluate` on a local Ray) with the default metrics and with all three: pairs/s
  over its processing time (first shard started to last committed, `throughput.pairs_per_second`) and
  over its whole wall time (planning, Ray start-up, actors, merge, shutdown); each against its own bound
  (acceptance for all three: >= 0.8);
- baselines as a competent user writes them: a plain loop (Pillow + scikit-image with Wang's
  settings), a PyTorch DataLoader with one worker per core + torchmetrics, and a Ray Data pipeline
  (read_parquet -> map_batches decode -> map_batches pytorch-msssim on an actor pool).

Contenders run in turn: each round the bounds and the job back to back, then the baselines, each group's
order rotated every round. The table shows each one's median over the rounds, the ratio of the job to it,
its CPU per pair and the cores it used (from /proc, every process it ran), the 1-minute load average while
it ran (the cores are shared with other work), and the largest |score - scikit-image| over the pairs both
computed; below it, the job against the combined bound round by round. Copy it into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

DATASET_VERSION = "v1"
SIDE = 512
# Colour photographs bundled with scikit-image (no download); smaller ones are upscaled before cropping.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
# Eight distortions per reference: half the distorted files are JPEG, half PNG.
DISTORTIONS = (("jpeg", 10), ("jpeg", 30), ("jpeg", 50), ("jpeg", 90), ("noise", 5.0), ("noise", 15.0),
               ("blur", 1.5), ("contrast", 0.7))


# ----------------------------------------------------------------------------------------- dataset


def _photo(name: str) -> np.ndarray:
    from skimage import data

    loaded = getattr(data, name)()
    return np.ascontiguousarray(loaded[0] if isinstance(loaded, tuple) else loaded)


def _crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A SIDE x SIDE crop after a random rescale (min side 1.0-1.6 x SIDE) and an optional mirror."""
    image = Image.fromarray(photo)
    scale = SIDE * rng.uniform(1.0, 1.6) / min(image.size)
    size = (max(SIDE, round(image.width * scale)), max(SIDE, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = int(rng.integers(0, size[0] - SIDE + 1)), int(rng.integers(0, size[1] - SIDE + 1))
    crop = np.asarray(image.crop((left, top, left + SIDE, top + SIDE)))
    return np.ascontiguousarray(crop[:, ::-1]) if rng.random() < 0.5 else crop


def _distorted_file(crop: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> Tuple[bytes, str]:
    buffer = io.BytesIO()
    image = Image.fromarray(crop)
    if kind == "jpeg":
        image.save(buffer, format="JPEG", quality=int(level))
        return buffer.getvalue(), "jpg"
    if kind == "noise":
        image = Image.fromarray(np.clip(np.rint(crop + rng.normal(0.0, level, crop.shape)), 0, 255).astype(np.uint8))
    elif kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(level))
    else:
        mean = crop.mean()
        image = Image.fromarray(np.clip(np.rint(mean + level * (crop - mean)), 0, 255).astype(np.uint8))
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _write_reference(folder: Path, index: int, photo_name: str, photo: np.ndarray, seed: int) -> List[dict]:
    rng = np.random.default_rng([seed, index])
    crop = _crop(photo, rng)
    reference = f"reference/{index:05d}.png"
    Image.fromarray(crop).save(folder / reference, format="PNG")
    rows = []
    for kind, level in DISTORTIONS:
        data, ext = _distorted_file(crop, kind, level, rng)
        distorted = f"distorted/{index:05d}_{kind}_{level:g}.{ext}"
        (folder / distorted).write_bytes(data)
        rows.append({"pair_id": f"{index:05d}/{kind}/{level:g}", "reference": reference, "distorted": distorted,
                     "photo": photo_name, "distortion": kind, "level": float(level)})
    return rows


def ensure_dataset(cache_dir: Path, pairs: int, *, seed: int = 6) -> Path:
    """The benchmark manifest of `pairs` pairs (a multiple of len(DISTORTIONS)), made once into `cache_dir`."""
    references = -(-pairs // len(DISTORTIONS))
    final = cache_dir / f"{DATASET_VERSION}-{references * len(DISTORTIONS)}"
    manifest = final / "manifest.parquet"
    if manifest.exists():
        return manifest
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".making-", dir=cache_dir))
    (staging / "reference").mkdir()
    (staging / "distorted").mkdir()
    photos = {name: _photo(name) for name in PHOTOS}
    jobs = [(i, PHOTOS[i % len(PHOTOS)]) for i in range(references)]
    # Pillow's encoders release the GIL: one reference (and its distortions) per thread.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        per_reference = pool.map(lambda job: _write_reference(staging, job[0], job[1], photos[job[1]], seed), jobs)
        rows = [row for rows in per_reference for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), staging / "manifest.parquet", row_group_size=4096)
    os.rename(staging, final)
    return manifest


def read_rows(manifest: Path, limit: Optional[int] = None) -> List[Tuple[str, str, str]]:
    """(pair_id, reference path, distorted path) of the manifest's first `limit` rows, paths absolute."""
    table = pq.read_table(manifest, columns=["pair_id", "reference", "distorted"])
    root = manifest.parent
    rows = zip(*(table.column(name).to_pylist() for name in ("pair_id", "reference", "distorted")))
    out = [(pair_id, str(root / ref), str(root / dist)) for pair_id, ref, dist in rows]
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------------------- measuring


class TreeCpu:
    """CPU seconds (user + system) of this process and its descendants, sampled from /proc.

    Ray's workers descend from the raylet that a local `ray.init` starts, and DataLoader workers from
    this process, so the sum covers every process a contender used. A process that exits between two
    samples loses at most one interval of its time (a slight under-count). The 1-minute load average is
    sampled alongside (it counts the contender's own threads too).
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.first: Dict[Tuple[int, int], float] = {}
        self.last: Dict[Tuple[int, int], float] = {}
        self.loads: List[float] = []
        self._stop = False
        self._thread = None

    @staticmethod
    def _processes() -> Dict[int, Tuple[int, int, float]]:
        """pid -> (parent pid, start time in ticks, CPU seconds) for every readable process."""
        ticks = os.sysconf("SC_CLK_TCK")
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19).
            table[int(entry)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / ticks)
        return table

    @staticmethod
    def _descendants(table: Dict[int, Tuple[int, int, float]], root: int) -> List[int]:
        children: Dict[int, List[int]] = {}
        for pid, (ppid, _start, _cpu) in table.items():
            children.setdefault(ppid, []).append(pid)
        family, frontier = [root], [root]
        while frontier:
            for child in children.get(frontier.pop(), []):
                family.append(child)
                frontier.append(child)
        return family

    def sample(self, *, initial: bool = False) -> None:
        table = self._processes()
        for pid in self._descendants(table, os.getpid()):
            if pid in table:
                key, cpu = (pid, table[pid][1]), table[pid][2]
                self.first.setdefault(key, cpu if initial else 0.0)  # processes born later count whole
                self.last[key] = cpu
        self.loads.append(os.getloadavg()[0])

    def __enter__(self) -> "TreeCpu":
        import threading

        self.sample(initial=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            time.sleep(self.interval_s)
            self.sample()

    def __exit__(self, *exc_info) -> None:
        self._stop = True
        self._thread.join()
        self.sample()

    @property
    def seconds(self) -> float:
        return sum(self.last[key] - self.first[key] for key in self.last)

    @property
    def load(self) -> float:
        return statistics.fmean(self.loads)


@dataclass
class Outcome:
    """What a contender returns: pairs scored and, where it times itself, its own figures.

    `seconds`: the contender's own measure of its work (the job's processing time, the SSIM bound's timed
    loop); None: the wall time of the whole call. `cpu_seconds`: CPU of that timed part when known (the
    job's actors, the bound's processes); None: the whole process tree's.
    """

    pairs: int
    scores: Dict[str, float] = field(default_factory=dict)
    seconds: Optional[float] = None
    cpu_seconds: Optional[float] = None
    batch: Optional[int] = None


@dataclass
class Measurement:
    """One timed run of a contender: its own figures, and the wall time and CPU of the whole call."""

    outcome: Outcome
    wall: float
    tree_cpu: float
    load: float

    @property
    def seconds(self) -> float:
        return self.outcome.seconds or self.wall

    @property
    def rate(self) -> float:
        return self.outcome.pairs / self.seconds

    @property
    def wall_rate(self) -> float:
        return self.outcome.pairs / self.wall

    @property
    def cpu_ms_per_pair(self) -> float:
        cpu = self.outcome.cpu_seconds if self.outcome.cpu_seconds is not None else self.tree_cpu
        return 1000 * cpu / self.outcome.pairs

    @property
    def cores_used(self) -> float:
        return self.cpu_ms_per_pair * self.rate / 1000

    @property
    def wall_cpu_ms_per_pair(self) -> float:
        return 1000 * self.tree_cpu / self.outcome.pairs


def measured(run: Callable[[], Outcome]) -> Measurement:
    """Run a contender once under a TreeCpu, timing the whole call."""
    with TreeCpu() as cpu:
        start = time.perf_counter()
        outcome = run()
        wall = time.perf_counter() - start
    return Measurement(outcome, wall, cpu.seconds, cpu.load)


# ----------------------------------------------------------------------------------------- bounds


def _pillow_pixels(path: str, *, writable: bool = False) -> np.ndarray:
    """Plain Pillow decode to an (H, W, C) uint8 array: what the decode bound times.

    `writable` copies the (read-only) array, as code that hands it to torch.from_numpy must.
    """
    with Image.open(path) as image:
        image.load()
        return np.array(image) if writable else np.asarray(image)


def decode_bound(rows: Sequence[Tuple[str, str, str]], cores: int) -> Outcome:
    """Decode both images of every pair with Pillow on `cores` threads (Pillow releases the GIL)."""
    with ThreadPoolExecutor(max_workers=cores) as pool:
        for _ in pool.map(lambda row: (_pillow_pixels(row[1]), _pillow_pixels(row[2])), rows):
            pass
    return Outcome(len(rows))


DEFAULT_METRICS = ("ssim", "psnr")
ALL_METRICS = ("ssim", "psnr", "ms_ssim")


def _score_batch(x, y, metrics: Sequence[str]) -> None:
    """The metrics of one batch as an actor computes them at Wang's settings (ssim_ray.worker.ShardComputer.
    _scores): the squared errors PSNR is made of; SSIM per channel, or with MS-SSIM both from one pass over
    the first scale (`ms_ssim_terms_and_ssim`), then MS-SSIM's powers."""
    from ssim_ray.metric import ms_ssim_from_terms, ms_ssim_terms_and_ssim, mse, ssim

    if "psnr" in metrics:
        mse(x, y, per_channel=True)
    if "ms_ssim" in metrics:
        terms, _ = ms_ssim_terms_and_ssim(x, y, compile="always")
        ms_ssim_from_terms(terms, per_channel=True)
    else:
        ssim(x, y, per_channel=True, compile="always")


def _ssim_bound_worker(rows, passes: int, barrier, results, metrics: Sequence[str] = DEFAULT_METRICS) -> None:
    """One core's share of the compute bound, in a process set up as a CPU actor is (ssim_ray.worker), in
    batches of the size the job's CPU rule gives (batching.throughput_cap)."""
    import torch

    from ssim_ray.batching import bucket_key, throughput_cap
    from ssim_ray.process_setup import configure_cpu_compute

    configure_cpu_compute(torch_threads=1)
    pairs = [(_pillow_pixels(ref, writable=True), _pillow_pixels(dist, writable=True)) for _pair_id, ref, dist in rows]
    x = torch.stack([torch.from_numpy(ref).permute(2, 0, 1) for ref, _ in pairs])
    y = torch.stack([torch.from_numpy(dist).permute(2, 0, 1) for _, dist in pairs])
    batch = throughput_cap(torch.device("cpu"), bucket_key(x[0]))
    # compile="always", as an actor with a long queue runs: the bound is the compiled kernel's.
    for start in range(0, len(pairs), batch):  # warm-up: compiles the kernel, touches the memory
        _score_batch(x[start : start + batch], y[start : start + batch], metrics)
    barrier.wait()
    began, cpu_began = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for start in range(0, len(pairs), batch):
            _score_batch(x[start : start + batch], y[start : start + batch], metrics)
    results.put((time.perf_counter() - began, time.process_time() - cpu_began))


def ssim_bound(rows: Sequence[Tuple[str, str, str]], cores: int, *, passes: int,
               metrics: Sequence[str] = DEFAULT_METRICS) -> Outcome:
    """ssim_ray's `metrics` on pre-decoded uint8 tensors, one process per core (1 torch thread each), timed
    together.

    Each process decodes its share of `rows` untimed, warms the kernel up, waits for the others, then
    scores its share `passes` times. Seconds: the slowest process's.
    """
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(cores), context.Queue()
    shares = [rows[i::cores] for i in range(cores)]
    workers = [context.Process(target=_ssim_bound_worker, args=(share, passes, barrier, results, tuple(metrics)))
               for share in shares]
    for worker in workers:
        worker.start()
    timings = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    seconds = max(wall for wall, _cpu in timings)
    # The processes' decode and warm-up are not part of the bound: report the timed loops' CPU only.
    return Outcome(sum(len(share) for share in shares) * passes, seconds=seconds,
                   cpu_seconds=sum(cpu for _wall, cpu in timings))


# ----------------------------------------------------------------------------------------- ssim_ray job


def _override(cfg, dotted: str, value: str) -> None:
    """Set `section.key` on the job config, parsing the value as the field's current type."""
    section, key = dotted.split(".")
    target = getattr(cfg, section)
    current = getattr(target, key)
    parsed = value if isinstance(current, str) and not value.isdigit() else (
        type(current)(value) if current is not None else int(value))
    setattr(target, key, parsed)


def ssim_ray_job(manifest: Path, pairs: int, workdir: Path, *, pairs_per_shard: int, overrides=(),
                 metrics: Sequence[str] = DEFAULT_METRICS) -> Outcome:
    """`run.evaluate` on a local Ray it starts itself; seconds: its processing time (first shard to last commit)."""
    from ssim_ray.config import AuditJobConfig, OutputConfig, SourceConfig
    from ssim_ray.run import evaluate

    output = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
    cfg = AuditJobConfig(
        source=SourceConfig(kind="parquet", url=str(manifest), pairs_per_shard=pairs_per_shard),
        output=OutputConfig(url=str(output)),
        metrics=list(metrics),
    )
    cfg.report.enabled = False
    for dotted, value in overrides:
        _override(cfg, dotted, value)
    outcome = evaluate(cfg, output_url=str(output))
    throughput = outcome.summary["throughput"]
    table = pq.read_table(output / "ssim.parquet", columns=["pair_id", "ssim"])
    scores = dict(zip(table.column("pair_id").to_pylist(), table.column("ssim").to_pylist()))
    if throughput["pairs_computed"] != pairs or len(scores) != pairs:
        raise RuntimeError(f"job computed {throughput['pairs_computed']} pairs, expected {pairs}")
    sizes = outcome.summary.get("batch_sizes", {})
    return Outcome(pairs, scores, seconds=throughput["processing_seconds"],
                   cpu_seconds=sum(outcome.actor_cpu_seconds.values()),
                   batch=max((max(v["batch_sizes"]) for v in sizes.values()), default=None))


# ----------------------------------------------------------------------------------------- baselines


def plain_loop(rows: Sequence[Tuple[str, str, str]]) -> Outcome:
    """Pillow + scikit-image with Wang's settings, one pair after another (the reference scores)."""
    from skimage.metrics import structural_similarity

    scores = {}
    for pair_id, ref, dist in rows:
        scores[pair_id] = float(structural_similarity(
            _pillow_pixels(ref), _pillow_pixels(dist), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255, channel_axis=2,
        ))
    return Outcome(len(rows), scores)


class _PairDataset:
    """A map-style dataset of decoded (C, H, W) uint8 pairs, as a DataLoader user writes it."""

    def __init__(self, rows: Sequence[Tuple[str, str, str]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        import torch

        pair_id, ref, dist = self.rows[index]
        as_chw = lambda path: torch.from_numpy(_pillow_pixels(path, writable=True)).permute(2, 0, 1)  # noqa: E731
        return pair_id, as_chw(ref), as_chw(dist)


def dataloader_torchmetrics(rows: Sequence[Tuple[str, str, str]], cores: int, *, batch: int) -> Outcome:
    """A DataLoader with one decoding worker per core feeding torchmetrics' SSIM (its default settings)."""
    from torch.utils.data import DataLoader
    from torchmetrics.functional.image import structural_similarity_index_measure

    scores = {}
    loader = DataLoader(_PairDataset(rows), batch_size=batch, num_workers=cores)
    for pair_ids, x, y in loader:
        values = structural_similarity_index_measure(x.float(), y.float(), data_range=255.0, reduction="none")
        scores.update(zip(pair_ids, values.tolist()))
    return Outcome(len(rows), scores)


def _ray_data_decode(batch: Dict[str, np.ndarray], root: str) -> Dict[str, np.ndarray]:
    load = lambda paths: np.stack([_pillow_pixels(os.path.join(root, p)) for p in paths])  # noqa: E731
    return {"pair_id": batch["pair_id"], "ref": load(batch["reference"]), "dist": load(batch["distorted"])}


class _MsssimScorer:
    """The Ray Data actor: pytorch-msssim's SSIM on float tensors (uint8 input would score 1.0)."""

    def __init__(self) -> None:
        from pytorch_msssim import ssim

        self.ssim = ssim

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
        values = self.ssim(as_float(batch["ref"]), as_float(batch["dist"]), data_range=255, size_average=False)
        return {"pair_id": batch["pair_id"], "ssim": values.numpy().astype(np.float64)}


def ray_data_pipeline(manifest: Path, cores: int, workdir: Path, *, batch: int) -> Outcome:
    """read_parquet -> map_batches(decode) -> map_batches(pytorch-msssim actor pool) -> write_parquet."""
    import ray
    from ray.data import ActorPoolStrategy

    ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        started = time.perf_counter()
        output = tempfile.mkdtemp(prefix="raydata-", dir=workdir)
        ds = ray.data.read_parquet(str(manifest)).select_columns(["pair_id", "reference", "distorted"])
        ds = ds.map_batches(_ray_data_decode, batch_size=batch, fn_kwargs={"root": str(manifest.parent)})
        ds = ds.map_batches(_MsssimScorer, batch_size=batch, compute=ActorPoolStrategy(min_size=1, max_size=cores))
        ds.write_parquet(output)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    table = pq.read_table(output)
    scores = dict(zip(table.column("pair_id").to_pylist(), table.column("ssim").to_pylist()))
    return Outcome(len(scores), scores, seconds=seconds)


# ----------------------------------------------------------------------------------------- driver


class _NoopWorker:
    """An actor that commits nothing and returns at once: what is left is the driver's and Ray's cost."""

    def run_shard(self, shard, passthrough_columns):
        from ssim_ray.worker import ShardResult

        now = time.time()
        return ShardResult(shard.shard_id, shard.num_pairs, {"ok": shard.num_pairs}, now, now, {},
                           f"noop:{os.getpid()}", "none")

    def ping(self) -> str:
        return "noop"


def dispatch_rate(shards: int, actors: int) -> Tuple[float, float]:
    """Shards per second the driver's dispatcher hands out and collects with no-op actors (local Ray), and
    the driver process's CPU milliseconds per shard (what bounds it when the actors run elsewhere)."""
    import ray

    from ssim_ray.config import AuditJobConfig
    from ssim_ray.progress import Progress
    from ssim_ray.dispatch import ShardDispatcher
    from ssim_ray.sources import Plan, PrefixRows, Shard

    todo = [Shard(f"{i:08d}-noop", 64, PrefixRows(keys=())) for i in range(shards)]
    plan = Plan(shards=tuple(todo), fingerprint="noop", total_pairs=64 * shards, passthrough_columns=())
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    try:
        pool = [ray.remote(_NoopWorker).options(num_cpus=0).remote() for _ in range(actors)]
        ray.get([actor.ping.remote() for actor in pool])
        dispatcher = ShardDispatcher(pool, plan, AuditJobConfig(), "unused://")
        progress = Progress(total_pairs=plan.total_pairs, already_done=0, interval_s=3600.0, stream=io.StringIO())
        began, cpu_began = time.perf_counter(), time.process_time()
        dispatcher.run(todo, progress)
        return shards / (time.perf_counter() - began), 1e3 * (time.process_time() - cpu_began) / shards
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------- table


@dataclass
class Contender:
    name: str
    run: Callable[[], Outcome]
    results: List[Measurement] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(m, attribute) for m in self.results)


def _max_delta(scores: Dict[str, float], reference: Dict[str, float]) -> Optional[float]:
    shared = [k for k in scores if k in reference and scores[k] is not None]
    return max(abs(scores[k] - reference[k]) for k in shared) if shared else None


def machine() -> str:
    """CPU model (lscpu's model name), cores and the versions that matter here."""
    import ray
    import torch
    from bench_machine import machine as describe

    return describe(f"torch {torch.__version__}", f"ray {ray.__version__}", f"Pillow {Image.__version__}")


def _cells(*values: Tuple[Optional[float], str]) -> str:
    return " | ".join("" if v is None else format(v, spec) for v, spec in values)


def _table_rows(key: str, c: Contender, job_rate: float, reference: Dict[str, float]) -> List[str]:
    delta = _max_delta(c.results[0].outcome.scores, reference) if c.results[0].outcome.scores else None
    main = _cells((c.median("rate"), ".1f"), (job_rate / c.median("rate"), ".2f"),
                  (c.median("cpu_ms_per_pair"), ".1f"), (c.median("cores_used"), ".2f"),
                  (c.median("load"), ".1f"), (delta, ".1e"))
    rows = [f"| {c.name} | {main} |"]
    if key.startswith("job") or key == "raydata":
        wall = _cells((c.median("wall_rate"), ".1f"), (job_rate / c.median("wall_rate"), ".2f"),
                      (c.median("wall_cpu_ms_per_pair"), ".1f"), (None, ""), (None, ""), (None, ""))
        rows.append(f"| {c.name}: wall time incl. Ray start-up | {wall} |")
    return rows


BOUND_METRICS = {"ssim": "[ssim, psnr]", "ssim3": "[ssim, psnr, ms_ssim]"}


def print_table(contenders: Dict[str, Contender], pairs: int, cores: int) -> None:
    """The markdown table: medians over rounds; the ratio is the job's processing rate to each row's."""
    job = contenders["job"]
    job_rate = job.median("rate")
    plain = contenders.get("plain")
    reference = plain.results[0].outcome.scores if plain and plain.results else {}
    print(f"\n{pairs} pairs of 512x512 RGB (PNG references; JPEG and PNG distorted), {cores} cores; {machine()}; "
          f"{len(job.results)} round(s), medians")
    print("| contender | pairs/s | ssim_ray job ÷ this | CPU ms/pair | cores used | load avg | max abs Δ vs skimage |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, c in contenders.items():
        for row in _table_rows(key, c, job_rate, reference):
            print(row)
        for compute in ("ssim", "ssim3"):
            bounds = [contenders[k] for k in ("decode", compute) if k in contenders and contenders[k].results]
            if key == compute and len(bounds) == 2:
                rate = 1 / sum(1 / b.median("rate") for b in bounds)
                cpu = sum(b.median("cpu_ms_per_pair") for b in bounds)
                print(f"| combined bound 1/(t_decode + t_compute), {BOUND_METRICS[compute]} | "
                      f"{_cells((rate, '.1f'), (job_rate / rate, '.2f'), (cpu, '.1f'))} |  |  |  |")
    pairs_to_bounds = [("job", "ssim"), ("job3", "ssim3")] + [(k, "ssim3") for k in contenders if k.startswith("job3 ")]
    for job_key, compute in pairs_to_bounds:
        if all(contenders.get(k) and contenders[k].results for k in ("decode", compute, job_key)):
            # Each round ran every contender once, back to back: its own ratio compares like with like when
            # the load of the shared machine drifts between rounds.
            run, bound = contenders[job_key], contenders[compute]
            per_round = [j.rate * (1 / d.rate + 1 / s.rate)
                         for j, d, s in zip(run.results, contenders["decode"].results, bound.results)]
            cpu = contenders["decode"].median("cpu_ms_per_pair") + bound.median("cpu_ms_per_pair")
            print(f"\n{run.name} ÷ its combined bound ({BOUND_METRICS[compute]}), round by round: "
                  f"{', '.join(f'{r:.2f}' for r in per_round)} (median {statistics.median(per_round):.2f}"
                  + ("; acceptance >= 0.8" if job_key.startswith("job3") else "")
                  + f"); CPU: bound {cpu:.1f} ms/pair ÷ job {run.median('cpu_ms_per_pair'):.1f} = "
                  f"{cpu / run.median('cpu_ms_per_pair'):.2f}")
    batches = [m.outcome.batch for m in job.results if m.outcome.batch]
    print(f"\njob batch size chosen by the probe: {sorted(set(batches))}. CPU ms/pair: the job's actors over "
          "processing (wall row: every process, start-up included); the SSIM bound's timed loops; otherwise every "
          "process the contender ran. load avg: mean 1-minute load while it ran (its own threads included).")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2048, help="pairs in the dataset (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender runs once per round")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ssim_ray" / "bench_job")
    parser.add_argument("--only", nargs="*", default=None,
                        help="contenders to run: decode ssim ssim3 job job3 plain dataloader raydata (default: all; "
                             "the default job and its --job-variant runs always)")
    parser.add_argument("--pairs-per-shard", type=int, default=None,
                        help="default: what the job's parquet source uses (conf/source/parquet.yaml)")
    parser.add_argument("--job-variant", action="append", default=[],
                        help="an extra job run with config overrides, e.g. runtime.decode_threads=1,batch.size=16")
    parser.add_argument("--job3-variant", action="append", default=[],
                        help="an extra run of the all-metrics job with config overrides, e.g. runtime.cpus_per_worker=2")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 pairs, one round")
    parser.add_argument("--dispatch", type=int, default=0,
                        help="instead: time the driver dispatching this many shards to no-op actors")
    parser.add_argument("--dispatch-actors", type=int, nargs="*", default=[2, 16, 64])
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats = 64, 1
    if args.pairs_per_shard is None:
        source_defaults = Path(__file__).resolve().parent.parent / "conf" / "source" / "parquet.yaml"
        args.pairs_per_shard = int(re.search(r"^pairs_per_shard:\s*(\d+)", source_defaults.read_text(), re.M).group(1))
    return args


def _contenders(args: argparse.Namespace, manifest: Path, rows, workdir: Path) -> Dict[str, Contender]:
    cores = args.cores
    sample = rows[: min(len(rows), 128 * cores)]  # pre-decoded pairs for the SSIM bound, scored in turn
    job = lambda overrides, metrics=DEFAULT_METRICS: lambda: ssim_ray_job(  # noqa: E731
        manifest, len(rows), workdir, pairs_per_shard=args.pairs_per_shard, overrides=overrides, metrics=metrics)
    passes = max(1, len(rows) // len(sample))
    contenders = {
        "decode": Contender("decode only: Pillow, one thread per core", lambda: decode_bound(rows, cores)),
        "ssim": Contender("compute only: ssim_ray [ssim, psnr] on decoded uint8, one process per core",
                          lambda: ssim_bound(sample, cores, passes=passes)),
        "ssim3": Contender("compute only: ssim_ray [ssim, psnr, ms_ssim] on decoded uint8, one process per core",
                           lambda: ssim_bound(sample, cores, passes=passes, metrics=ALL_METRICS)),
        "job": Contender("ssim_ray job (run.evaluate, local Ray), metrics [ssim, psnr]", job(())),
        "job3": Contender("ssim_ray job, metrics [ssim, psnr, ms_ssim]", job((), ALL_METRICS)),
        "plain": Contender("plain loop: Pillow + skimage (Wang settings)", lambda: plain_loop(rows)),
        "dataloader": Contender(f"DataLoader ({cores} workers) + torchmetrics",
                                lambda: dataloader_torchmetrics(rows, cores, batch=16)),
        "raydata": Contender("Ray Data: read_parquet, decode, pytorch-msssim actor pool",
                             lambda: ray_data_pipeline(manifest, cores, workdir, batch=16)),
    }
    for variant in args.job_variant:
        overrides = tuple(item.split("=", 1) for item in variant.split(","))
        contenders[f"job {variant}"] = Contender(f"ssim_ray job, {variant}", job(overrides))
    for variant in args.job3_variant:
        overrides = tuple(item.split("=", 1) for item in variant.split(","))
        contenders[f"job3 {variant}"] = Contender(f"ssim_ray job [ssim, psnr, ms_ssim], {variant}",
                                                  job(overrides, ALL_METRICS))
    chosen = [k for k in contenders if args.only is None or k in args.only or k == "job" or k.startswith(("job ", "job3 "))]
    return {k: contenders[k] for k in chosen}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.dispatch:
        for actors in args.dispatch_actors:
            rate, cpu_ms = dispatch_rate(args.dispatch, actors)
            print(f"| {actors} | {args.dispatch} | {rate:.0f} | {cpu_ms:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)
        return
    manifest = ensure_dataset(args.cache_dir, args.pairs)
    rows = read_rows(manifest)[: args.pairs]
    if len(rows) != args.pairs:
        raise SystemExit(f"the dataset has {len(rows)} pairs, asked for {args.pairs}")
    contenders = _contenders(args, manifest, rows, Path(tempfile.mkdtemp(prefix="bench_job-")))
    # The bounds and the job run back to back (about a minute) and the slow baselines after them, each
    # group's order rotated every round: the shared machine's load drifts less within a group.
    groups = [[k for k in contenders if k in ("decode", "ssim", "ssim3") or k.startswith("job")],
              [k for k in contenders if k in ("plain", "dataloader", "raydata")]]
    for round_index in range(args.repeats):
        order = [k for g in groups for k in g[round_index % max(1, len(g)):] + g[: round_index % max(1, len(g))]]
        for key in order:
            result = measured(contenders[key].run)
            contenders[key].results.append(result)
            print(f"round {round_index + 1} {key}: {result.rate:.1f} pairs/s, {result.cpu_ms_per_pair:.1f} CPU ms/pair, "
                  f"load {result.load:.1f}", file=sys.stderr, flush=True)
    print_table(contenders, len(rows), args.cores)


if __name__ == "__main__":
    main()
