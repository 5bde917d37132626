"""Real result rows for the results, stats and report tests: skimage photographs with real distortions.

Pairs are written to disk as PNG files (references) and PNG/JPEG files (distortions), so the report can
re-read and re-score them. Scores come from the reference implementation, scikit-image with Wang's
settings (gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255), so the results
tests do not depend on the project's own SSIM. A few rows are failures of the kinds sources produce.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import skimage.data
from PIL import Image, ImageEnhance, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

CROP = (96, 128)  # small crops of real photographs keep each score a few milliseconds
PHOTOS = ("camera", "astronaut", "chelsea", "coffee", "moon", "brick")


def _crop(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    h, w = image.shape[:2]
    top, left = (h - CROP[0]) // 2, (w - CROP[1]) // 2
    return np.ascontiguousarray(image[top:top + CROP[0], left:left + CROP[1]])


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _distortions(image: Image.Image, seed: int) -> Dict[str, bytes]:
    pixels = np.asarray(image, dtype=np.float64)
    noisy = np.clip(pixels + np.random.default_rng(seed).normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    return {
        "jpeg10": _jpeg(image, 10),
        "jpeg50": _jpeg(image, 50),
        "noise": _png(Image.fromarray(noisy)),
        "blur": _png(image.filter(ImageFilter.GaussianBlur(1.5))),
        "contrast": _png(ImageEnhance.Contrast(image).enhance(0.6)),
    }


def _score(reference: np.ndarray, distorted: np.ndarray) -> List[float]:
    """Per-channel SSIM with Wang's settings: the project's reference."""
    ref = reference if reference.ndim == 3 else reference[..., None]
    dist = distorted if distorted.ndim == 3 else distorted[..., None]
    return [
        float(structural_similarity(ref[..., c], dist[..., c], gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255))
        for c in range(ref.shape[-1])
    ]


def _psnr(reference: np.ndarray, distorted: np.ndarray) -> dict:
    """scikit-image's PSNR over the pair and per channel (the crops are too small for MS-SSIM's five scales)."""
    ref = reference if reference.ndim == 3 else reference[..., None]
    dist = distorted if distorted.ndim == 3 else distorted[..., None]
    return {"psnr": float(peak_signal_noise_ratio(ref, dist, data_range=255)),
            "psnr_per_channel": [float(peak_signal_noise_ratio(ref[..., c], dist[..., c], data_range=255))
                                 for c in range(ref.shape[-1])]}


def _row(pair_id: str, reference: Path, distorted: Path, distortion: str, photo: str) -> dict:
    return dict(pair_id=pair_id, reference=str(reference), distorted=str(distorted), ssim=None,
                ssim_per_channel=None, height=None, width=None, channels=None, data_range=None, bit_depth=None,
                status="ok", error=None, decoder=None, shard_id=None, distortion=distortion, photo=photo)


def photo_rows(folder: Path) -> List[dict]:
    """Write the pairs under `folder` and return one scored result row per pair (shard_id unset).

    Pass-through columns: `distortion` (jpeg10, jpeg50, noise, blur, contrast, or the failure's kind) and
    `photo`. Ends with failure rows: missing, unreadable, size_mismatch.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, name in enumerate(PHOTOS):
        pixels = _crop(name)
        reference_path = folder / f"{name}.png"
        reference_path.write_bytes(_png(Image.fromarray(pixels)))
        for kind, data in _distortions(Image.fromarray(pixels), seed=index).items():
            suffix = "jpg" if kind.startswith("jpeg") else "png"
            distorted_path = folder / f"{name}_{kind}.{suffix}"
            distorted_path.write_bytes(data)
            decoded = np.asarray(Image.open(io.BytesIO(data)))
            per_channel = _score(pixels, decoded)
            row = _row(f"{name}_{kind}", reference_path, distorted_path, kind, name)
            row.update(ssim=float(np.mean(per_channel)), ssim_per_channel=per_channel, height=CROP[0],
                       width=CROP[1], channels=len(per_channel), data_range=255.0, bit_depth=8,
                       decoder="pillow", **_psnr(pixels, decoded), ms_ssim_undefined="too_small")
            rows.append(row)
    return rows + _failure_rows(folder)


def _failure_rows(folder: Path) -> List[dict]:
    truncated = folder / "truncated.png"
    truncated.write_bytes((folder / "camera.png").read_bytes()[:100])
    small = folder / "camera_small.png"
    small.write_bytes(_png(Image.fromarray(_crop("camera")[:64, :64])))
    failures = [
        ("missing_0", folder / "camera.png", folder / "gone.png", "missing",
         f"no such file: {folder / 'gone.png'}"),
        ("unreadable_0", folder / "camera.png", truncated, "unreadable",
         f"cannot decode {truncated}: image file is truncated"),
        ("size_mismatch_0", folder / "camera.png", small, "size_mismatch",
         f"reference is 96x128, distorted {small} is 64x64"),
    ]
    rows = []
    for pair_id, reference, distorted, status, error in failures:
        row = _row(pair_id, reference, distorted, status, "camera")
        row.update(status=status, error=error)
        rows.append(row)
    return rows


def in_shards(rows: List[dict], sizes: List[int], ids: Optional[List[str]] = None) -> Dict[str, List[dict]]:
    """Split rows into consecutive shards of the given sizes, ids shard-00000, shard-00001, ... by default."""
    shards, start = {}, 0
    for index, size in enumerate(sizes):
        shard_id = ids[index] if ids else f"shard-{index:05d}"
        shards[shard_id] = [dict(row, shard_id=shard_id) for row in rows[start:start + size]]
        start += size
    if start != len(rows):
        raise ValueError(f"shard sizes must add up to {len(rows)} rows, got {start}")
    return shards


def write_manifest(rows: List[dict], path: Path) -> str:
    """A Parquet manifest of the rows' pairs (pair_id, reference, distorted and the pass-through columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("pair_id", "reference", "distorted", "distortion", "photo")
    pq.write_table(pa.table({name: [row[name] for row in rows] for name in columns}), path)
    return str(path)


def shards_of_plan(rows: List[dict], plan) -> Dict[str, List[dict]]:
    """The rows split as `plan` (sources.plan_shards of the rows' manifest) splits them, with its shard ids."""
    return in_shards(rows, [shard.num_pairs for shard in plan.shards], ids=[s.shard_id for s in plan.shards])


WORST_K = 5
HOSTILE_ERROR = "cannot decode <script>alert('x')</script> & more"


class _JobConfig:
    """The parts of an AuditJobConfig that resume.run_manifest reads: every metric computed."""

    def __init__(self, source) -> None:
        from ssim_ray.config import SSIMConfig

        self.source, self.ssim = source, SSIMConfig()

    def describe_metric(self) -> dict:
        return self.ssim.describe(metrics=("ssim", "psnr", "ms_ssim"))


def build_audit(folder: Path, *, audit) -> str:
    """An audit output of the real photo pairs, written and merged by results, grouped by distortion.

    The pairs are listed in a Parquet manifest and planned by sources.plan_shards, so the report can find
    and re-read them; the rows' scores are skimage's. One failure message holds HTML to be escaped.
    """
    from ssim_ray.config import SourceConfig, SummaryConfig
    from ssim_ray.output.commit import write_shard
    from ssim_ray.output.merge import RunInfo, merge
    from ssim_ray.output.resume import check_resume_compatible, run_manifest
    from ssim_ray.output.schema import rows_to_table
    from ssim_ray.output.table_stats import shard_stats
    from ssim_ray.sources import plan_shards

    rows = photo_rows(folder / "images")
    rows[-2]["error"] = HOSTILE_ERROR  # the unreadable row: its message must reach the page escaped
    source = SourceConfig(kind="parquet", url=write_manifest(rows, folder / "manifest.parquet"), pairs_per_shard=8)
    plan = plan_shards(source)
    out = str(folder / "out")
    manifest = run_manifest(plan=plan, cfg=_JobConfig(source))
    check_resume_compatible(out, manifest, mode="resume")
    summary_cfg = SummaryConfig(group_by="distortion", worst_k=WORST_K, examples_per_status=2)
    for shard_id, shard_rows in shards_of_plan(rows, plan).items():
        table = rows_to_table(shard_rows, ["distortion", "photo"])
        write_shard(out, shard_id, table, stats=shard_stats(table, summary_cfg))
    info = RunInfo(metric=manifest["metric"], plan_fingerprint=plan.fingerprint, total_pairs=plan.total_pairs,
                   wall_seconds=4.25, processing_seconds=2.5, pairs_computed=len(rows), shards_computed=5,
                   batch_sizes={"1x96x128 uint8": 8, "3x96x128 uint8": 4}, device="cpu", num_workers=2)
    merge(out, plan_shard_ids=[s.shard_id for s in plan.shards], run_info=info, summary_cfg=summary_cfg,
          audit_cfg=audit)
    return out
