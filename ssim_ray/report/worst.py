"""The k worst pairs of a run, shown: re-read through the sources, re-scored, and drawn with their SSIM maps.

Owns rebuilding the run's source and metric configs from `_run.json`, re-reading only the worst pairs (a
pair that cannot be read again gets a note saying why instead of images), and the pictures of a pair:
reference, distorted and SSIM-map thumbnails that line up pixel for pixel, the map's colour bar, and the
three enlarged at the map's window of lowest mean SSIM. The map itself is computed at bounded memory by
`ssim_ray.report.pair_map`; images are reduced for their thumbnails a band of rows at a time.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ssim_ray import statuses
from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.output.layout import RUN_MANIFEST
from ssim_ray.report.charts import Plot, colorbar_plot, map_colors
from ssim_ray.report.pair_map import PairMap, map_pair
from ssim_ray.sources import load_pairs, plan_shards

THUMBNAIL_SIDE = 320
ZOOM_SIDE = 192  # enlarged windows are scaled by a whole factor up to about this many pixels
BORDER_GRAY = (128, 128, 128)  # the margin of win_size // 2 that the window never sees
BOX_COLOR = (0, 230, 255)  # cyan: apart from every colour of the map's colormap
LABELS = {
    "reference": "reference",
    "distorted": "distorted",
    "map": "SSIM map (bright: structure lost)",
    "scale": "SSIM colour scale",
    "zoom_reference": "reference, lowest-SSIM window",
    "zoom_distorted": "distorted, same window",
    "zoom_map": "SSIM map, same window",
}


@dataclass
class WorstPanel:
    """One worst pair as shown: the summary's entry, the recomputed score, pictures or why there are none."""

    entry: Mapping[str, Any]
    recomputed: Optional[float] = None
    images: Optional[List[Plot]] = None
    note: Optional[str] = None


def configs_from_manifest(manifest: Mapping[str, Any]) -> Tuple[SourceConfig, SSIMConfig]:
    """Rebuild the source and metric configs a run recorded in `_run.json`, to re-read its pairs.

    Keys the schema does not know (descriptive metric entries such as `window`) are left out.

    Args:
        manifest: the parsed `_run.json`.

    Returns:
        (SourceConfig, SSIMConfig).

    Raises:
        ValueError: the manifest lacks them, or they no longer validate.

    Example:
        >>> m = {"source": {"kind": "sample"}, "metric": {"name": "wang2004", "sigma": 1.5}}
        >>> configs_from_manifest(m)[1].sigma
        1.5
    """
    source, metric = manifest.get("source"), manifest.get("metric")
    if not isinstance(source, Mapping) or not isinstance(metric, Mapping):
        raise ValueError(f"{RUN_MANIFEST} must hold 'source' and 'metric' objects, got keys {sorted(manifest)}")
    known_source = {f.name for f in fields(SourceConfig)}
    known_ssim = {f.name for f in fields(SSIMConfig)}
    try:
        return (SourceConfig(**{k: v for k, v in source.items() if k in known_source}),
                # None: a setting the metric does not use (sigma of a uniform window): the schema default.
                SSIMConfig(**{k: v for k, v in metric.items() if k in known_ssim and v is not None}))
    except TypeError as error:
        raise ValueError(f"{RUN_MANIFEST} source/metric must match the config schema, got {error}") from error


def worst_panels(worst: Sequence[Mapping[str, Any]], *, source_cfg: SourceConfig,
                 ssim_cfg: SSIMConfig) -> List[WorstPanel]:
    """Re-read the worst pairs through the sources (only those pairs are decoded) and draw their maps.

    A pair that cannot be re-read (the source changed, a file is gone) gets a note saying why instead of
    images; the note is shown in the report and printed to stderr.

    Args:
        worst: the summary's `worst` entries to show (pair_id, ssim, reference, distorted, group, shard_id).
        source_cfg: the run's source config (the shards are planned again from it).
        ssim_cfg: the run's metric config (the maps use the same settings and precision).

    Returns:
        One WorstPanel per entry, in order.

    Example:
        >>> worst_panels([], source_cfg=SourceConfig(), ssim_cfg=SSIMConfig())
        []
    """
    panels = [WorstPanel(entry) for entry in worst]
    if not panels:
        return panels
    try:
        shards = {shard.shard_id: shard for shard in plan_shards(source_cfg).shards}
    except (OSError, ValueError) as error:
        return noted(panels, f"the source could not be planned again: {error}")
    wanted: Dict[str, set] = {}
    for entry in worst:
        wanted.setdefault(entry["shard_id"], set()).add(entry["pair_id"])
    loaded = {}
    for shard_id, pair_ids in wanted.items():
        if shard_id not in shards:
            continue
        try:
            loaded.update({p.pair_id: p for p in load_pairs(shards[shard_id], source_cfg, ssim_cfg, pair_ids=pair_ids)})
        except (OSError, ValueError) as error:
            noted([p for p in panels if p.entry["shard_id"] == shard_id], f"shard could not be read: {error}")
    for panel in panels:
        if panel.note is None:
            _fill_panel(panel, loaded.get(panel.entry["pair_id"]), ssim_cfg)
    return panels


def noted(panels: Sequence[WorstPanel], note: str) -> List[WorstPanel]:
    """Mark panels as shown without images, say why on stderr, and return them.

    Example:
        >>> noted([], "gone")
        []
    """
    for panel in panels:
        panel.note = note
        print(f"[ssim_ray report] {panel.entry['pair_id']}: {note}", file=sys.stderr)
    return list(panels)


def _fill_panel(panel: WorstPanel, pair: Any, ssim_cfg: SSIMConfig) -> None:
    if pair is None:
        noted([panel], "pair not found in its shard any more (the source changed since the run)")
        return
    if not statuses.is_ok(pair.status):
        noted([panel], f"re-reading the pair now gives status {pair.status!r}: {pair.error}")
        return
    # compile="never": a dozen pairs are scored here, and compiling the fused CPU kernel (same bits) would
    # take longer than all of them together.
    # kernel="torch": only the torch path draws maps (a run scored by Triton agrees with it to 1e-6).
    options = {**ssim_cfg.ssim_options(), "compile": "never", "kernel": "torch"}
    mapped = map_pair(pair.ref, pair.dist, data_range=pair.data_range, options=options)
    panel.recomputed = mapped.score
    panel.images = pair_images(pair.ref, pair.dist, mapped, data_range=pair.data_range)


def _display_pixels(tensor: Any, data_range: float) -> np.ndarray:
    """(C, H, W) uint8/uint16 pixels as 8-bit (H, W) or (H, W, 3) for display (scaled by the data range)."""
    pixels = tensor.detach().to("cpu").numpy().astype(np.float64)
    pixels = np.clip(np.round(pixels * (255.0 / data_range)), 0, 255).astype(np.uint8)
    return pixels[0] if pixels.shape[0] != 3 else np.transpose(pixels, (1, 2, 0))


def _reduced_pixels(tensor: Any, data_range: float, factor: int) -> np.ndarray:
    """Display pixels averaged over factor x factor blocks (edge blocks over what they hold), computed a band
    of rows at a time so that no full-size float copy of a large image exists."""
    if factor == 1:
        return _display_pixels(tensor, data_range)
    channels, height, width = tensor.shape
    out_w = -(-width // factor)
    band = max(1, (1 << 20) // max(1, width * channels * factor)) * factor  # ~1 M values per band
    rows = []
    for top in range(0, height, band):
        pixels = tensor[:, top:top + band].detach().to("cpu").numpy().astype(np.float32)
        span = pixels.shape[1]
        padded = np.zeros((channels, -(-span // factor) * factor, out_w * factor), np.float32)
        padded[:, :span, :width] = pixels
        weight = np.zeros(padded.shape[1:], np.float32)
        weight[:span, :width] = 1.0
        rows.append(_block_sums(padded, factor) / _block_sums(weight, factor))
    pixels = np.clip(np.round(np.concatenate(rows, axis=1) * (255.0 / data_range)), 0, 255).astype(np.uint8)
    return pixels[0] if channels != 3 else np.transpose(pixels, (1, 2, 0))


def _block_sums(array: np.ndarray, factor: int) -> np.ndarray:
    """Sums over factor x factor blocks of the last two axes (both multiples of factor)."""
    *lead, height, width = array.shape
    return array.reshape(*lead, height // factor, factor, width // factor, factor).sum(axis=(-3, -1))


def lowest_window(values: np.ndarray, side: int) -> Tuple[int, int]:
    """Top-left corner of the side x side window of `values` with the lowest mean (ties: first found).

    The whole-map form; the report finds the window strip by strip (`pair_map`), and is tested against this.

    Args:
        values: an (H, W) SSIM map, H and W at least `side`.
        side: the window's side.

    Returns:
        (row, column).

    Example:
        >>> lowest_window(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.2], [1.0, 0.1, 1.0]]), 2)
        (1, 1)
    """
    padded = np.pad(np.cumsum(np.cumsum(values, axis=0), axis=1), ((1, 0), (1, 0)))
    sums = padded[side:, side:] - padded[:-side, side:] - padded[side:, :-side] + padded[:-side, :-side]
    row, col = np.unravel_index(int(np.argmin(sums)), sums.shape)
    return int(row), int(col)


def _thumbnail_size(width: int, height: int) -> Tuple[int, int]:
    """Down to THUMBNAIL_SIDE on the long side; small images enlarged by a whole factor (pixels stay sharp)."""
    longest = max(width, height)
    if longest <= THUMBNAIL_SIDE:
        factor = max(1, THUMBNAIL_SIDE // longest)
        return width * factor, height * factor
    scale = THUMBNAIL_SIDE / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized(image: Image.Image, size: Tuple[int, int], *, resample: int) -> Image.Image:
    """`image` at `size`: `resample` when it shrinks, NEAREST when it grows (enlarged pixels stay sharp)."""
    if image.size == size:
        return image
    return image.resize(size, resample if size[0] < image.width else Image.NEAREST)


def _picture(name: str, image: Image.Image) -> Plot:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Plot(name, LABELS[name], buffer.getvalue(), image.width, image.height)


def _colored(values: np.ndarray) -> Image.Image:
    """Map values coloured; NaN (cells of the frame the window never sees) in BORDER_GRAY."""
    colors = map_colors(np.nan_to_num(values, nan=1.0))
    colors[np.isnan(values)] = BORDER_GRAY
    return Image.fromarray(colors, "RGB")


def pair_images(reference: Any, distorted: Any, mapped: PairMap, *, data_range: float) -> List[Plot]:
    """Pictures of a pair in page order: reference, distorted and SSIM-map thumbnails, the map's colour
    bar, and the three enlarged at the map's lowest-mean window.

    The map is shown framed by a gray border (the margin the window never sees) and at the images' size,
    so the three thumbnails line up pixel for pixel; a cyan box on the map marks the enlarged window.
    Large images are reduced to about twice the thumbnail a band of rows at a time, then resampled.

    Args:
        reference: (C, H, W) uint8/uint16 pixels.
        distorted: the same for the distorted image.
        mapped: the pair's map (`pair_map.map_pair`).
        data_range: L, to scale 16-bit pixels for display.

    Returns:
        Plots named reference, distorted, map, scale, zoom_reference, zoom_distorted, zoom_map.

    Example:
        >>> import torch
        >>> gray = torch.zeros((1, 32, 32), dtype=torch.uint8)
        >>> mapped = map_pair(gray, gray, data_range=255.0, options={"compile": "never"})
        >>> [p.name for p in pair_images(gray, gray, mapped, data_range=255.0)][:4]
        ['reference', 'distorted', 'map', 'scale']
    """
    height, width = reference.shape[-2:]
    size = _thumbnail_size(width, height)
    factor = max(1, max(width, height) // (2 * THUMBNAIL_SIDE))
    thumbnails = {name: _resized(Image.fromarray(_reduced_pixels(pixels, data_range, factor)), size,
                                 resample=Image.LANCZOS)
                  for name, pixels in (("reference", reference), ("distorted", distorted))}
    thumbnails["map"] = _resized(_colored(mapped.display), size, resample=Image.BILINEAR)
    row, col, side = mapped.window
    box = tuple(int(round((v + mapped.border) * mapped.scale)) for v in (col, row, col + side, row + side))
    shown = [v * (size[0] / width if i % 2 == 0 else size[1] / height) for i, v in enumerate(box)]
    ImageDraw.Draw(thumbnails["map"]).rectangle(shown, outline=BOX_COLOR, width=2)
    crop = (slice(None), slice(box[1], box[3]), slice(box[0], box[2]))
    zooms = {"zoom_reference": Image.fromarray(_display_pixels(reference[crop], data_range)),
             "zoom_distorted": Image.fromarray(_display_pixels(distorted[crop], data_range))}
    zooms["zoom_map"] = _colored(mapped.zoom).resize(zooms["zoom_reference"].size, Image.NEAREST)
    enlarge = max(1, ZOOM_SIDE // max(1, zooms["zoom_map"].width))
    zooms = {k: v.resize((v.width * enlarge, v.height * enlarge), Image.NEAREST) for k, v in zooms.items()}
    scale_bar = colorbar_plot(thumbnails["map"].height)
    return ([_picture(name, image) for name, image in thumbnails.items()]
            + [Plot("scale", LABELS["scale"], scale_bar.png, scale_bar.width, scale_bar.height)]
            + [_picture(name, image) for name, image in zooms.items()])
