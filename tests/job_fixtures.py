"""A small real dataset for job tests: crops of scikit-image's photographs with real distortions, plus
bad pairs of every kind the job must type. Small images keep a few hundred pairs fast on 2 cores; the
content is real photographic structure, never noise or scaled copies.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFilter

from ssim_ray.config import AuditJobConfig, BatchConfig, OutputConfig, RuntimeConfig, SourceConfig, SSIMConfig
from ssim_ray.metric.structural import ssim

PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "moon", "page")
# A few repeated shapes, so that shape buckets hold several pairs and batches are really batched.
SHAPES = ((64, 96), (80, 80), (96, 128))
DISTORTIONS = (("jpeg", 20), ("jpeg", 50), ("jpeg", 85), ("noise", 6.0), ("noise", 18.0), ("blur", 1.2),
               ("contrast", 0.6))
BAD_STATUSES = {
    "bad/truncated": "unreadable",
    "bad/missing": "missing",
    "bad/size": "size_mismatch",
    "bad/escape": "path_escape",
    "bad/text": "unreadable",
    "bad/channels": "channel_mismatch",
}


@dataclass
class JobDataset:
    root: Path
    manifest: Path
    ok_pairs: List[str] = field(default_factory=list)
    bad_status: Dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.ok_pairs) + len(self.bad_status)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def _crop(image: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    top = int(rng.integers(0, image.shape[0] - h))
    left = int(rng.integers(0, image.shape[1] - w))
    return np.ascontiguousarray(image[top : top + h, left : left + w])


def _distort(image: np.ndarray, kind: str, level: float, rng: np.random.Generator):
    """Returns (encoded bytes, extension) of the distorted image."""
    pil = Image.fromarray(image)
    buffer = io.BytesIO()
    if kind == "jpeg":
        pil.save(buffer, format="JPEG", quality=int(level))
        return buffer.getvalue(), "jpg"
    if kind == "noise":
        noisy = image.astype(np.float64) + rng.normal(0.0, level, image.shape)
        pil = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    elif kind == "blur":
        pil = pil.filter(ImageFilter.GaussianBlur(level))
    elif kind == "contrast":
        mean = image.mean()
        pil = Image.fromarray(np.clip(np.rint(mean + level * (image - mean)), 0, 255).astype(np.uint8))
    pil.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_bad_pairs(root: Path, rows: List[dict], sample_ref: str, sample_ref_gray: str) -> None:
    (root / "bad").mkdir(exist_ok=True)
    good = (root / sample_ref).read_bytes()
    (root / "bad/truncated.png").write_bytes(good[: len(good) // 3])
    (root / "bad/text.png").write_bytes(b"this is not an image\n")
    small = np.asarray(Image.open(root / sample_ref))[:40, :40]
    (root / "bad/small_crop.png").write_bytes(_png(np.ascontiguousarray(small)))
    distorted = {
        "bad/truncated": "bad/truncated.png",
        "bad/missing": "bad/does_not_exist.png",
        "bad/size": "bad/small_crop.png",
        "bad/escape": "../outside.png",
        "bad/text": "bad/text.png",
        "bad/channels": sample_ref_gray,
    }
    for pair_id, path in distorted.items():
        rows.append({"pair_id": pair_id, "reference": sample_ref, "distorted": path, "codec": "bad"})


def make_job_dataset(root: Path, *, photos=PHOTOS, seed: int = 7, with_bad: bool = True,
                     copies_of_shapes: int = 1) -> JobDataset:
    """Write reference/ and distorted/ images and manifest.parquet under `root`.

    Each photo gives len(SHAPES) * copies_of_shapes crops, each crop len(DISTORTIONS) distorted versions.
    """
    rng = np.random.default_rng(seed)
    (root / "reference").mkdir(parents=True, exist_ok=True)
    (root / "distorted").mkdir(exist_ok=True)
    rows: List[dict] = []
    ok: List[str] = []
    gray_ref: Optional[str] = None
    color_ref: Optional[str] = None
    for name in photos:
        photo = _photo(name)
        for copy in range(copies_of_shapes):
            for shape in SHAPES:
                crop = _crop(photo, shape, rng)
                stem = f"{name}_{shape[0]}x{shape[1]}_{copy}"
                ref_path = f"reference/{stem}.png"
                (root / ref_path).write_bytes(_png(crop))
                if crop.ndim == 2 and gray_ref is None and shape == SHAPES[0]:
                    gray_ref = ref_path
                if crop.ndim == 3 and color_ref is None and shape == SHAPES[0]:
                    color_ref = ref_path
                for kind, level in DISTORTIONS:
                    data, ext = _distort(crop, kind, level, rng)
                    dist_path = f"distorted/{stem}_{kind}_{level}.{ext}"
                    (root / dist_path).write_bytes(data)
                    pair_id = f"{stem}/{kind}/{level}"
                    rows.append({"pair_id": pair_id, "reference": ref_path, "distorted": dist_path, "codec": kind})
                    ok.append(pair_id)
    bad: Dict[str, str] = {}
    if with_bad:
        _add_bad_pairs(root, rows, color_ref, gray_ref)
        bad = dict(BAD_STATUSES)
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest, row_group_size=64)
    return JobDataset(root=root, manifest=manifest, ok_pairs=ok, bad_status=bad)


def direct_score(root: Path, reference: str, distorted: str) -> float:
    """ssim_ray.ssim() on the two files decoded directly with Pillow: the value the job must reproduce."""

    def load(path: str) -> torch.Tensor:
        array = np.asarray(Image.open(root / path))
        tensor = torch.from_numpy(array.copy())
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

    return float(ssim(load(reference), load(distorted), data_range=255))


def job_config(manifest: Path, output: Path, **overrides) -> AuditJobConfig:
    """An AuditJobConfig for a Parquet manifest with 2 CPU actors and small shards."""
    source = SourceConfig(kind="parquet", url=str(manifest), pairs_per_shard=overrides.pop("pairs_per_shard", 24))
    cfg = AuditJobConfig(
        source=source,
        ssim=SSIMConfig(),
        batch=BatchConfig(size=overrides.pop("batch_size", "auto")),
        output=OutputConfig(url=str(output)),
        runtime=RuntimeConfig(num_workers=overrides.pop("num_workers", 2), progress_interval_s=1.0,
                              address=overrides.pop("address", None)),
    )
    cfg.summary.group_by = "codec"
    cfg.report.enabled = overrides.pop("report", False)
    if overrides:
        raise TypeError(f"unknown overrides {sorted(overrides)}")
    return cfg


def read_results(output: Path) -> pa.Table:
    return pq.read_table(output / "ssim.parquet")


def read_summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())
