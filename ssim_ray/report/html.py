"""The HTML audit report: one self-contained report.html beside the results, plus the plots as PNG files.

Everything shown comes from summary.json (counts, statistics, histograms, worst pairs, failure examples),
so the cost of a report does not grow with the number of rows; only the k worst pairs are fetched and
decoded again, to draw their SSIM maps. Plots are drawn with Pillow (no matplotlib: one drawing path for
both the page and `plots/*.png`, and nothing more to install) and embedded as data: URIs; the page loads
nothing from anywhere (a Content-Security-Policy forbids it) and its little table-sorting script is ours.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ssim_ray import statuses
from ssim_ray.config import AuditConfig, ReportConfig, SourceConfig, SSIMConfig
from ssim_ray.output.results import RUN_MANIFEST, SUMMARY_FILE, output_filesystem, write_bytes
from ssim_ray.output.stats import HIST_BINS, HIST_RANGE
from ssim_ray.secrets import scrub

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
DISPLAY_BINS = 50
MAX_GROUP_PLOTS = 12  # groups beyond this are in the table, not plotted (the largest by ok pairs are)
THUMBNAIL_SIDE = 320
ZOOM_WINDOW = 64  # side, in SSIM-map pixels, of the region with the lowest mean SSIM shown enlarged
PALETTE = ((31, 94, 168), (214, 94, 32), (46, 139, 87), (170, 51, 119), (120, 120, 120), (204, 170, 34),
           (68, 170, 204), (136, 34, 85), (17, 119, 51), (102, 17, 0), (51, 34, 136), (153, 153, 51))
# Heatmap anchors from SSIM 1 (dark: structure kept) to SSIM <= 0 (bright: structure lost).
HEAT_ANCHORS = ((1.0, (12, 10, 48)), (0.75, (110, 30, 110)), (0.5, (205, 62, 70)), (0.25, (248, 150, 20)),
                (0.0, (252, 250, 170)))


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def png_bytes(image: Image.Image) -> bytes:
    """Encode a Pillow image as PNG bytes.

    Example:
        >>> png_bytes(Image.new("L", (2, 2)))[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A data: URI for PNG bytes, so the page embeds the image instead of loading it.

    Example:
        >>> data_uri(b"abc")
        'data:image/png;base64,YWJj'
    """
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------------------------------
# Histograms from the summary's fixed bins
# ------------------------------------------------------------------------------------------------------

def dense_histogram(sparse_counts: Sequence[Sequence[int]]) -> np.ndarray:
    """The HIST_BINS counts from the summary's sparse [bin, count] pairs.

    Example:
        >>> int(dense_histogram([[1999, 4]])[-1])
        4
    """
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    for index, count in sparse_counts:
        counts[index] = count
    return counts


def display_range(low: Optional[float], high: Optional[float]) -> Tuple[float, float]:
    """A plotting range on [-1, 1] that holds [low, high], on 0.05 steps (so fine bins align).

    Example:
        >>> display_range(0.612, 0.9991)
        (0.6, 1.0)
    """
    if low is None or high is None:
        return 0.0, 1.0
    lo = max(HIST_RANGE[0], math.floor(low * 20) / 20)
    hi = min(HIST_RANGE[1], math.ceil(high * 20) / 20)
    return (lo, hi) if hi > lo else (max(HIST_RANGE[0], hi - 0.05), hi)


def _fine_index(value: float) -> int:
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    return int(round((value - HIST_RANGE[0]) / width))


def rebin(counts: np.ndarray, *, lo: float, hi: float, bins: int = DISPLAY_BINS) -> Tuple[np.ndarray, np.ndarray]:
    """Sum the fine bins inside [lo, hi] into at most `bins` display bins of whole fine bins.

    Fine bins below `lo` are added to the first display bin and above `hi` to the last, so the display
    counts always add up to the total.

    Args:
        counts: the HIST_BINS fine counts.
        lo: left end of the display range (a fine-bin edge, e.g. from `display_range`).
        hi: right end.
        bins: at most this many display bins.

    Returns:
        (edges, counts): display bin edges (len n+1) and counts (len n).

    Example:
        >>> edges, sums = rebin(dense_histogram([[1850, 2], [1999, 1]]), lo=0.8, hi=1.0, bins=2)
        >>> sums.tolist()
        [2, 1]
    """
    first, last = _fine_index(lo), _fine_index(hi)
    step = max(1, math.ceil((last - first) / bins))
    starts = np.arange(first, last, step)
    sums = np.add.reduceat(counts[first:last], starts - first) if last > first else np.zeros(0, np.int64)
    if sums.size:
        sums[0] += counts[:first].sum()
        sums[-1] += counts[last:].sum()
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    edges = HIST_RANGE[0] + width * np.append(starts, min(last, starts[-1] + step) if starts.size else first)
    return edges, sums


def cdf_points(counts: np.ndarray, *, lo: float, hi: float) -> Tuple[np.ndarray, np.ndarray]:
    """The empirical CDF at the fine bin edges in [lo, hi]: fraction of scores below each edge.

    Example:
        >>> xs, ys = cdf_points(dense_histogram([[1990, 1], [1999, 1]]), lo=0.95, hi=1.0)
        >>> float(ys[-1]), len(xs)
        (1.0, 51)
    """
    total = counts.sum()
    cumulative = np.concatenate([[0], np.cumsum(counts)]) / (total if total else 1)
    first, last = _fine_index(lo), _fine_index(hi)
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    indices = np.arange(first, last + 1)
    return HIST_RANGE[0] + width * indices, cumulative[indices]


# ------------------------------------------------------------------------------------------------------
# Charts drawn with Pillow
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Frame:
    """A plot area inside an image: data coordinates (x0..x1, y0..y1) to pixels."""

    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float
    left: int = 70
    right: int = 18
    top: int = 34
    bottom: int = 46

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def py(self, y: float) -> float:
        return self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)


def nice_ticks(lo: float, hi: float, *, count: int = 5, integer: bool = False) -> List[float]:
    """Round tick values (1, 2 or 5 times a power of ten; whole numbers if `integer`) covering [lo, hi].

    Example:
        >>> nice_ticks(0.0, 1.0), nice_ticks(0, 2.2, integer=True)
        ([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [0, 1, 2])
    """
    if hi <= lo:
        return [lo]
    raw = max((hi - lo) / count, 1.0) if integer else (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_text(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2e}"


def _axes(draw: ImageDraw.ImageDraw, frame: _Frame, *, title: str, xlabel: str, ylabel: str,
          integer_y: bool = False) -> None:
    small, large = _font(12), _font(15)
    ink, grid = (40, 40, 40), (225, 225, 225)
    bottom, top = frame.height - frame.bottom, frame.top
    for y in nice_ticks(frame.y0, frame.y1, integer=integer_y):
        yy = frame.py(y)
        draw.line([(frame.left, yy), (frame.width - frame.right, yy)], fill=grid)
        draw.text((frame.left - 6, yy), _tick_text(y), fill=ink, font=small, anchor="rm")
    for x in nice_ticks(frame.x0, frame.x1, count=8):
        xx = frame.px(x)
        draw.line([(xx, bottom), (xx, bottom + 4)], fill=ink)
        draw.text((xx, bottom + 6), _tick_text(x), fill=ink, font=small, anchor="mt")
    draw.line([(frame.left, top), (frame.left, bottom), (frame.width - frame.right, bottom)], fill=ink)
    draw.text((frame.width / 2, 8), title, fill=ink, font=large, anchor="mt")
    draw.text(((frame.left + frame.width - frame.right) / 2, frame.height - 6), xlabel, fill=ink, font=small,
              anchor="mb")
    draw.text((6, top - 18), ylabel, fill=ink, font=small, anchor="lt")


def histogram_image(edges: np.ndarray, counts: np.ndarray, *, title: str, color=PALETTE[0],
                    size: Tuple[int, int] = (560, 300)) -> Image.Image:
    """A bar chart of display-bin counts over their SSIM edges.

    Example:
        >>> histogram_image(np.array([0.0, 0.5, 1.0]), np.array([1, 3]), title="t").size
        (560, 300)
    """
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    top = max(1, int(counts.max()) if counts.size else 1)
    frame = _Frame(size[0], size[1], float(edges[0]), float(edges[-1]), 0.0, top * 1.08)
    _axes(draw, frame, title=title, xlabel="SSIM", ylabel="pairs", integer_y=True)
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        if count:
            draw.rectangle([frame.px(lo) + 0.5, frame.py(count), frame.px(hi) - 0.5, frame.py(0)], fill=color)
    return image


def cdf_image(series: Sequence[Tuple[str, np.ndarray, np.ndarray]], *, title: str,
              size: Tuple[int, int] = (560, 300)) -> Image.Image:
    """Step-free CDF lines (fraction of pairs below x), one per (label, xs, ys) series, with a legend.

    Example:
        >>> xs = np.array([0.0, 1.0]); cdf_image([("all", xs, xs)], title="t").size
        (560, 300)
    """
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo = min(float(xs[0]) for _, xs, _ in series)
    hi = max(float(xs[-1]) for _, xs, _ in series)
    frame = _Frame(size[0], size[1], lo, hi if hi > lo else lo + 0.05, 0.0, 1.0, right=150 if len(series) > 1 else 18)
    _axes(draw, frame, title=title, xlabel="SSIM", ylabel="fraction below")
    font = _font(12)
    for index, (label, xs, ys) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        draw.line([(frame.px(x), frame.py(y)) for x, y in zip(xs, ys)], fill=color, width=2)
        if len(series) > 1:
            y = frame.top + 6 + 16 * index
            draw.line([(size[0] - 140, y), (size[0] - 120, y)], fill=color, width=3)
            draw.text((size[0] - 114, y), label[:18], fill=(40, 40, 40), font=font, anchor="lm")
    return image


def empty_image(message: str, *, size: Tuple[int, int] = (640, 120)) -> Image.Image:
    """A placeholder with a message (e.g. no ok pairs to plot).

    Example:
        >>> empty_image("nothing").size
        (640, 120)
    """
    image = Image.new("RGB", size, (248, 248, 248))
    ImageDraw.Draw(image).text((size[0] / 2, size[1] / 2), message, fill=(90, 90, 90), font=_font(14),
                               anchor="mm")
    return image


def heatmap(values: np.ndarray) -> Image.Image:
    """Color an SSIM map: dark where SSIM is 1 (structure kept), bright where it is 0 or below (lost).

    Example:
        >>> heatmap(np.array([[1.0, 0.0]])).getpixel((1, 0))
        (252, 250, 170)
    """
    positions = np.array([a[0] for a in HEAT_ANCHORS[::-1]])
    colors = np.array([a[1] for a in HEAT_ANCHORS[::-1]], dtype=np.float64)
    clipped = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(clipped, positions, colors[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def colorbar(*, size: Tuple[int, int] = (240, 40)) -> Image.Image:
    """The heatmap's legend from SSIM 0 (and below) to 1.

    Example:
        >>> colorbar().size
        (240, 40)
    """
    image = Image.new("RGB", size, "white")
    strip = heatmap(np.linspace(0.0, 1.0, size[0] - 20)[None, :].repeat(14, axis=0))
    image.paste(strip, (10, 4))
    draw = ImageDraw.Draw(image)
    font = _font(11)
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = 10 + value * (size[0] - 21)
        draw.text((x, 22), f"{value:g}", fill=(40, 40, 40), font=font, anchor="mt")
    return image


# ------------------------------------------------------------------------------------------------------
# The plots of a summary
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    """One chart: its file name under plots/, a caption, and the PNG bytes."""

    name: str
    caption: str
    png: bytes


def plotted_groups(summary: Mapping[str, Any]) -> List[str]:
    """The groups that get their own plots: the MAX_GROUP_PLOTS with most ok pairs (ties by name).

    Example:
        >>> plotted_groups({"groups": {"a": {"ssim": {"count": 1}}, "b": {"ssim": {"count": 3}}}})
        ['b', 'a']
    """
    groups = summary.get("groups") or {}
    ranked = sorted(groups, key=lambda g: (-groups[g]["ssim"]["count"], g))
    return [g for g in ranked if groups[g]["ssim"]["count"]][:MAX_GROUP_PLOTS]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40] or "_"


def summary_plots(summary: Mapping[str, Any]) -> List[Plot]:
    """Histogram and CDF of all ok pairs, and per group (CDFs overlaid, a histogram each).

    Example:
        >>> s = {"ssim": {"count": 0, "min": None, "max": None}, "histogram": {"counts": []}, "groups": {}}
        >>> [p.name for p in summary_plots(s)]
        ['ssim_histogram.png', 'ssim_cdf.png']
    """
    overall = summary["ssim"]
    if not overall["count"]:
        blank = png_bytes(empty_image("no ok pairs: nothing to plot"))
        return [Plot("ssim_histogram.png", "SSIM histogram: no ok pairs", blank),
                Plot("ssim_cdf.png", "SSIM CDF: no ok pairs", blank)]
    lo, hi = display_range(overall["min"], overall["max"])
    counts = dense_histogram(summary["histogram"]["counts"])
    edges, binned = rebin(counts, lo=lo, hi=hi)
    xs, ys = cdf_points(counts, lo=lo, hi=hi)
    plots = [
        Plot("ssim_histogram.png", f"SSIM of {overall['count']} ok pairs",
             png_bytes(histogram_image(edges, binned, title="SSIM histogram, all ok pairs"))),
        Plot("ssim_cdf.png", "Fraction of ok pairs below each SSIM (at 0.001 steps)",
             png_bytes(cdf_image([("all", xs, ys)], title="SSIM CDF, all ok pairs"))),
    ]
    return plots + _group_plots(summary, lo=lo, hi=hi)


def _group_plots(summary: Mapping[str, Any], *, lo: float, hi: float) -> List[Plot]:
    names = plotted_groups(summary)
    if not names:
        return []
    groups, by = summary["groups"], summary.get("group_by")
    series, plots = [], []
    for index, name in enumerate(names):
        counts = dense_histogram(groups[name]["histogram"]["counts"])
        xs, ys = cdf_points(counts, lo=lo, hi=hi)
        series.append((name, xs, ys))
        edges, binned = rebin(counts, lo=lo, hi=hi)
        image = histogram_image(edges, binned, title=f"{by} = {name}"[:60], color=PALETTE[index % len(PALETTE)],
                                size=(420, 240))
        plots.append(Plot(f"group_{index:02d}_{_slug(name)}.png", f"{by} = {name}", png_bytes(image)))
    cdf = cdf_image(series, title=f"SSIM CDF by {by}", size=(760, 360))
    return [Plot("groups_cdf.png", f"Fraction of ok pairs below each SSIM, by {by}", png_bytes(cdf))] + plots


# ------------------------------------------------------------------------------------------------------
# The k worst pairs, re-read and re-scored with their SSIM maps
# ------------------------------------------------------------------------------------------------------

@dataclass
class WorstPanel:
    """One worst pair as shown: the summary's entry, the recomputed score, images (PNG) or why there are none."""

    entry: Mapping[str, Any]
    recomputed: Optional[float] = None
    images: Optional[Dict[str, bytes]] = None
    note: Optional[str] = None


def configs_from_manifest(manifest: Mapping[str, Any]) -> Tuple[SourceConfig, SSIMConfig]:
    """Rebuild the source and metric configs a run recorded in `_run.json`, to re-read its pairs.

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
                SSIMConfig(**{k: v for k, v in metric.items() if k in known_ssim}))
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
    from ssim_ray.sources.planning import load_pairs, plan_shards

    panels = [WorstPanel(entry) for entry in worst]
    if not panels:
        return panels
    try:
        shards = {shard.shard_id: shard for shard in plan_shards(source_cfg).shards}
    except (OSError, ValueError) as error:
        return _noted(panels, f"the source could not be planned again: {error}")
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
            _noted([p for p in panels if p.entry["shard_id"] == shard_id], f"shard could not be read: {error}")
    for panel in panels:
        if panel.note is None:
            _fill_panel(panel, loaded.get(panel.entry["pair_id"]), ssim_cfg)
    return panels


def _noted(panels: Sequence[WorstPanel], note: str) -> List[WorstPanel]:
    for panel in panels:
        panel.note = note
        print(f"[ssim_ray report] {panel.entry['pair_id']}: {note}", file=sys.stderr)
    return list(panels)


def _fill_panel(panel: WorstPanel, pair: Any, ssim_cfg: SSIMConfig) -> None:
    if pair is None:
        _noted([panel], "pair not found in its shard any more (the source changed since the run)")
        return
    if not statuses.is_ok(pair.status):
        _noted([panel], f"re-reading the pair now gives status {pair.status!r}: {pair.error}")
        return
    from ssim_ray.metric.structural import ssim

    score, ssim_map = ssim(pair.ref, pair.dist, data_range=pair.data_range, win_size=ssim_cfg.win_size,
                           sigma=ssim_cfg.sigma, k1=ssim_cfg.k1, k2=ssim_cfg.k2, gaussian=ssim_cfg.gaussian,
                           downsample=ssim_cfg.downsample, precision=ssim_cfg.precision, return_map=True)
    values = ssim_map.detach().to("cpu").double().numpy()
    while values.ndim > 2:  # batch and channel axes: the mean over channels has the score as its mean
        values = values.mean(axis=0)
    panel.recomputed = float(score.detach().to("cpu").double().mean())
    panel.images = pair_images(_display_pixels(pair.ref, pair.data_range), _display_pixels(pair.dist, pair.data_range),
                               values, border=ssim_cfg.win_size // 2)


def _display_pixels(tensor: Any, data_range: float) -> np.ndarray:
    """(C, H, W) uint8/uint16 pixels as 8-bit (H, W) or (H, W, 3) for display (scaled by the data range)."""
    pixels = tensor.detach().to("cpu").numpy().astype(np.float64)
    pixels = np.clip(np.round(pixels * (255.0 / data_range)), 0, 255).astype(np.uint8)
    return pixels[0] if pixels.shape[0] != 3 else np.transpose(pixels, (1, 2, 0))


def lowest_window(values: np.ndarray, side: int) -> Tuple[int, int]:
    """Top-left corner of the side x side window of `values` with the lowest mean (ties: first found).

    Example:
        >>> lowest_window(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.2], [1.0, 0.1, 1.0]]), 2)
        (1, 1)
    """
    padded = np.pad(np.cumsum(np.cumsum(values, axis=0), axis=1), ((1, 0), (1, 0)))
    sums = padded[side:, side:] - padded[:-side, side:] - padded[side:, :-side] + padded[:-side, :-side]
    row, col = np.unravel_index(int(np.argmin(sums)), sums.shape)
    return int(row), int(col)


def _thumbnail(image: Image.Image, *, resample: int) -> Image.Image:
    """Down to THUMBNAIL_SIDE on the long side; small images enlarged by a whole factor (pixels stay sharp)."""
    longest = max(image.size)
    if longest <= THUMBNAIL_SIDE:
        factor = max(1, THUMBNAIL_SIDE // longest)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    scale = THUMBNAIL_SIDE / longest
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def pair_images(reference: np.ndarray, distorted: np.ndarray, values: np.ndarray, *, border: int) -> Dict[str, bytes]:
    """Thumbnails of reference, distorted and the SSIM heatmap (placed where the window saw it), and the
    three enlarged at the map's lowest-mean window.

    `values` is the valid-region map ((H - 2·border) × (W - 2·border), or the same on the downsampled grid);
    it is framed by a gray border and scaled to the image's size, so pixels line up.

    Args:
        reference: 8-bit display pixels, (H, W) or (H, W, 3).
        distorted: the same for the distorted image.
        values: the SSIM map (mean over channels).
        border: win_size // 2, the margin the window cannot see.

    Returns:
        PNG bytes by name: reference, distorted, map, zoom_reference, zoom_distorted, zoom_map.

    Example:
        >>> gray = np.zeros((32, 32), np.uint8)
        >>> sorted(pair_images(gray, gray, np.ones((22, 22)), border=5))[:2]
        ['distorted', 'map']
    """
    height, width = reference.shape[:2]
    canvas = Image.new("RGB", (values.shape[1] + 2 * border, values.shape[0] + 2 * border), (128, 128, 128))
    canvas.paste(heatmap(values), (border, border))
    scale = height / canvas.height
    side = min(ZOOM_WINDOW, *values.shape)
    row, col = lowest_window(values, side)
    box_map = (col + border, row + border, col + border + side, row + border + side)
    box_image = tuple(int(round(v * scale)) for v in box_map)
    full_map = canvas.resize((width, height), Image.NEAREST)
    zooms = {name: Image.fromarray(pixels).crop(box_image) for name, pixels in
             (("zoom_reference", reference), ("zoom_distorted", distorted))}
    zooms["zoom_map"] = full_map.crop(box_image)
    marked = full_map.copy()
    ImageDraw.Draw(marked).rectangle(box_image, outline=(0, 230, 255), width=max(2, width // 200))
    images = {
        "reference": _thumbnail(Image.fromarray(reference), resample=Image.LANCZOS),
        "distorted": _thumbnail(Image.fromarray(distorted), resample=Image.LANCZOS),
        "map": _thumbnail(marked, resample=Image.BILINEAR),
    }
    enlarge = max(1, 192 // max(1, zooms["zoom_map"].width))
    images.update({k: v.resize((v.width * enlarge, v.height * enlarge), Image.NEAREST) for k, v in zooms.items()})
    return {name: png_bytes(image) for name, image in images.items()}


# ------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;color:#222}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}table.sortable th[aria-sort=ascending]::after{content:' \\25B2'}
table.sortable th[aria-sort=descending]::after{content:' \\25BC'}
.facts,.plots{display:flex;flex-wrap:wrap;gap:16px 24px;align-items:flex-start}.plots figure{margin:0}.bad{color:#b00020;font-weight:600}.good{color:#1b7f3b;font-weight:600}
.plots img,.pair img{max-width:100%;border:1px solid #eee}.pair{border:1px solid #ddd;padding:8px;margin:12px 0}
.images{display:flex;flex-wrap:wrap;gap:8px}.images figure{margin:0}figcaption{font-size:12px;color:#555}
code{font-size:12px;word-break:break-all}.note{color:#8a5a00}
"""

SCRIPT = """
(function () {
  function key(cell, numeric) {
    var value = cell.getAttribute('data-sort');
    if (value === null) { value = cell.textContent; }
    if (!numeric) { return value.toLowerCase(); }
    var number = parseFloat(value);
    return isNaN(number) ? -Infinity : number;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th) {
      th.addEventListener('click', function () {
        var numeric = th.getAttribute('data-type') === 'number';
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        table.querySelectorAll('th').forEach(function (other) { other.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[th.cellIndex], numeric), y = key(b.cells[th.cellIndex], numeric);
          return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
"""


def _csp() -> str:
    """Nothing may load from anywhere; only our own style and script (by hash) and data: images run."""
    import hashlib

    digest = lambda text: base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()  # noqa: E731
    return (f"default-src 'none'; img-src data:; style-src 'sha256-{digest(STYLE)}'; "
            f"script-src 'sha256-{digest(SCRIPT)}'; base-uri 'none'; form-action 'none'")


def format_number(value: Any, *, digits: int = 4) -> str:
    """How the report prints a value: floats with `digits` decimals, ints with thousands separators,
    structures (a batch-size record, say) as JSON.

    Example:
        >>> format_number(0.123456), format_number(1234567), format_number(None), format_number({"ooms": 0})
        ('0.1235', '1,234,567', '–', '{"ooms": 0}')
    """
    if value is None:
        return "–"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, path: Sequence[Any], *, digits: int = 4) -> str:
    """A number with the summary path it comes from, so a test can check it against summary.json."""
    return (f'<span class="v" data-key="{_esc(json.dumps(list(path)))}" data-value="{_esc(json.dumps(value))}">'
            f"{_esc(format_number(value, digits=digits))}</span>")


def _cell(value: Any, path: Sequence[Any], *, digits: int = 4) -> str:
    sort = "" if value is None else f' data-sort="{_esc(value)}"'
    return f'<td class="n"{sort}>{_num(value, path, digits=digits)}</td>'


def _rows(pairs: Sequence[Tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_esc(label)}</th><td>{content}</td></tr>" for label, content in pairs)


def _facts_section(summary: Mapping[str, Any], output_url: str) -> str:
    pairs, throughput, shards = summary["pairs"], summary.get("throughput") or {}, summary.get("shards") or {}
    complete = summary.get("complete", True)
    run = [
        ("output", f"<code>{_esc(output_url)}</code>"),
        ("complete", f'<span class="{"good" if complete else "bad"}">{"yes" if complete else "NO: shards missing"}</span>'),
        *[(f"pairs {k}", _num(pairs[k], ["pairs", k])) for k in ("planned", "merged", "ok", "failures")],
        ("pairs/s", _num(throughput.get("pairs_per_second"), ["throughput", "pairs_per_second"], digits=2)),
        ("pairs computed", _num(throughput.get("pairs_computed"), ["throughput", "pairs_computed"])),
        ("processing s", _num(throughput.get("processing_seconds"), ["throughput", "processing_seconds"], digits=2)),
        ("wall s", _num(summary.get("wall_seconds"), ["wall_seconds"], digits=2)),
        *[(f"shards {k}", _num(shards.get(k), ["shards", k])) for k in ("total", "computed", "resumed", "missing")],
        ("device", _esc((summary.get("runtime") or {}).get("device"))),
        ("workers", _num((summary.get("runtime") or {}).get("num_workers"), ["runtime", "num_workers"])),
        ("plan", f"<code>{_esc(summary.get('plan_fingerprint'))}</code>"),
    ]
    status = [(name, _num(count, ["status_counts", name])) for name, count in summary["status_counts"].items()]
    metric = [(k, f"<code>{_esc(json.dumps(v))}</code>") for k, v in (summary.get("metric") or {}).items()]
    batches = [(k, _num(v, ["batch_sizes", k])) for k, v in (summary.get("batch_sizes") or {}).items()]
    versions = [(k, _esc(v)) for k, v in (summary.get("versions") or {}).items()]
    tables = [("Run", run), ("Pairs by status", status), ("Metric", metric), ("Batch sizes", batches),
              ("Versions", versions)]
    body = "".join(f'<table class="facts-{i}"><caption>{_esc(title)}</caption>{_rows(rows)}</table>'
                   for i, (title, rows) in enumerate(tables) if rows)
    return f'<h2 id="facts">Run</h2><div class="facts">{body}</div>'


def _gates_section(summary: Mapping[str, Any]) -> str:
    from ssim_ray.output.gates import evaluate_gates, exit_code

    audit = summary.get("audit")
    if not audit or not any(v is not None for v in audit.values()):
        return '<h2 id="gates">Quality gates</h2><p>No gate configured (audit.*).</p>'
    try:
        violations = evaluate_gates(summary, AuditConfig(**audit))
    except ValueError as error:
        return f'<h2 id="gates">Quality gates</h2><p class="bad">Cannot evaluate: {_esc(error)}</p>'
    settings = ", ".join(f"audit.{k}={v}" for k, v in audit.items() if v is not None)
    if not violations:
        return f'<h2 id="gates">Quality gates</h2><p class="good">All gates pass ({_esc(settings)}).</p>'
    items = "".join(f"<li>{_esc(v.message)} (exit code {v.exit_code})</li>" for v in violations)
    return (f'<h2 id="gates">Quality gates</h2><p class="bad">Violated: exit code {exit_code(violations)} '
            f'({_esc(settings)})</p><ul class="violations">{items}</ul>')


def _distribution_section(summary: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    block = summary["ssim"]
    keys = [("count", ["ssim", "count"]), ("mean", ["ssim", "mean"]), ("std", ["ssim", "std"]),
            ("min", ["ssim", "min"])]
    keys += [(name, ["ssim", "percentiles", name]) for name in block["percentiles"]]
    keys += [("max", ["ssim", "max"])]
    head = "".join(f"<th>{_esc(label)}</th>" for label, _ in keys)
    cells = "".join(_cell(_lookup(summary, path), path) for _, path in keys)
    images = "".join(_figure(p) for p in plots if p.name in ("ssim_histogram.png", "ssim_cdf.png"))
    return (f'<h2 id="distribution">SSIM distribution (ok pairs)</h2><table class="overall"><tr>{head}</tr>'
            f'<tr>{cells}</tr></table><div class="plots">{images}</div>')


def _lookup(summary: Mapping[str, Any], path: Sequence[Any]) -> Any:
    value: Any = summary
    for key in path:
        value = value[key]
    return value


def _figure(plot: Plot) -> str:
    return (f'<figure><img src="{data_uri(plot.png)}" alt="{_esc(plot.caption)}">'
            f"<figcaption>{_esc(plot.caption)} (plots/{_esc(plot.name)})</figcaption></figure>")


def _groups_section(summary: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    groups, by = summary.get("groups") or {}, summary.get("group_by")
    if not by:
        return '<h2 id="groups">Groups</h2><p>No summary.group_by column: statistics are not broken down.</p>'
    columns = [("pairs", ["rows"]), ("ok", ["ssim", "count"]), ("mean", ["ssim", "mean"]),
               ("p5", ["ssim", "percentiles", "p5"]), ("p50", ["ssim", "percentiles", "p50"]),
               ("min", ["ssim", "min"]), ("failures", ["failures"])]
    head = f'<th data-type="text">{_esc(by)}</th>' + "".join(f'<th data-type="number">{c}</th>' for c, _ in columns)
    body = "".join(
        f'<tr><td data-sort="{_esc(name)}">{_esc(name)}</td>'
        + "".join(_cell(_lookup(group, path), ["groups", name, *path]) for _, path in columns) + "</tr>"
        for name, group in groups.items()
    )
    shown = plotted_groups(summary)
    note = (f"<p>Plots show the {len(shown)} groups with the most ok pairs of {len(groups)}.</p>"
            if len(shown) < len(groups) else "")
    images = "".join(_figure(p) for p in plots if p.name == "groups_cdf.png" or p.name.startswith("group_"))
    return (f'<h2 id="groups">By {_esc(by)}</h2><p>Click a column to sort.</p>'
            f'<table class="sortable groups"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'{note}<div class="plots">{images}</div>')


IMAGE_LABELS = (("reference", "reference"), ("distorted", "distorted"), ("map", "SSIM map (bright: structure lost)"),
                ("zoom_reference", "reference, lowest-SSIM window"), ("zoom_distorted", "distorted, same window"),
                ("zoom_map", "SSIM map, same window"))


def _panel_html(rank: int, panel: WorstPanel) -> str:
    entry = panel.entry
    facts = [
        ("pair_id", f"<code>{_esc(entry['pair_id'])}</code>"),
        ("ssim (summary)", _num(entry["ssim"], ["worst", rank, "ssim"], digits=6)),
        ("ssim (recomputed now)", _esc(format_number(panel.recomputed, digits=6))),
        ("group", _esc(entry.get("group"))),
        ("reference", f"<code>{_esc(entry.get('reference'))}</code>"),
        ("distorted", f"<code>{_esc(entry.get('distorted'))}</code>"),
        ("shard", f"<code>{_esc(entry.get('shard_id'))}</code>"),
    ]
    if panel.images:
        figures = "".join(f'<figure><img src="{data_uri(panel.images[key])}" alt="{_esc(label)}">'
                          f"<figcaption>{_esc(label)}</figcaption></figure>" for key, label in IMAGE_LABELS)
        visual = f'<div class="images">{figures}</div>'
    else:
        visual = f'<p class="note">No images: {_esc(panel.note)}</p>'
    return (f'<div class="pair" id="worst-{rank + 1}"><h3>#{rank + 1}</h3><table>{_rows(facts)}</table>'
            f"{visual}</div>")


def _worst_section(panels: Sequence[WorstPanel], *, win_size: int) -> str:
    if not panels:
        return '<h2 id="worst">Worst pairs</h2><p>No ok pairs.</p>'
    legend = f'<img src="{data_uri(png_bytes(colorbar()))}" alt="SSIM color scale">'
    return (f'<h2 id="worst">The {len(panels)} worst pairs</h2><p>Maps recomputed for these pairs only; the '
            f"map covers the region the {win_size}×{win_size} window saw (gray frame: the border it cannot see). The cyan box "
            f"marks the window of lowest mean SSIM, shown enlarged. Color scale: {legend}</p>"
            + "".join(_panel_html(rank, panel) for rank, panel in enumerate(panels)))


def _failures_section(summary: Mapping[str, Any]) -> str:
    counts = {s: n for s, n in summary["status_counts"].items() if not statuses.is_ok(s)}
    if not counts:
        return '<h2 id="failures">Failures</h2><p class="good">None: every pair was scored.</p>'
    parts = []
    for status, count in counts.items():
        examples = summary.get("failure_examples", {}).get(status, [])
        rows = "".join(
            f"<tr><td><code>{_esc(e['pair_id'])}</code></td><td><code>{_esc(e.get('reference'))}</code></td>"
            f"<td><code>{_esc(e.get('distorted'))}</code></td><td>{_esc(e.get('error'))}</td></tr>"
            for e in examples
        )
        parts.append(f'<h3>{_esc(status)}: {_num(count, ["status_counts", status])} pairs</h3>'
                     f'<table class="failures"><tr><th>pair_id</th><th>reference</th><th>distorted</th>'
                     f"<th>error</th></tr>{rows}</table>")
    return '<h2 id="failures">Failures by status</h2>' + "".join(parts)


def render_html(summary: Mapping[str, Any], *, plots: Sequence[Plot], panels: Sequence[WorstPanel],
                output_url: str) -> str:
    """The whole report page as one string (everything inline).

    Example:
        >>> s = {"ssim": {"count": 0, "mean": None, "std": None, "min": None, "max": None, "percentiles": {}},
        ...      "histogram": {"counts": []}, "groups": {}, "pairs": {"planned": 0, "merged": 0, "ok": 0,
        ...      "failures": 0}, "status_counts": {}}
        >>> render_html(s, plots=[], panels=[], output_url="out").startswith("<!DOCTYPE html>")
        True
    """
    title = f"SSIM audit: {output_url}"
    sections = [_facts_section(summary, output_url), _gates_section(summary), _distribution_section(summary, plots),
                _groups_section(summary, plots),
                _worst_section(panels, win_size=(summary.get("metric") or {}).get("win_size", 11)),
                _failures_section(summary)]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_csp())}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
        f"<p>Metric <b>{_esc((summary.get('metric') or {}).get('name'))}</b>; summary created "
        f"{_esc(summary.get('created'))}.</p>" + "".join(sections)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


# ------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportResult:
    """Where the report went, and what it took."""

    html_path: str
    plot_paths: Tuple[str, ...]
    worst_shown: int
    worst_with_images: int
    seconds: float
    worst_seconds: float  # of `seconds`: re-reading, re-scoring and drawing the worst pairs


def _read_json(fs: Any, path: str, *, what: str) -> Dict[str, Any]:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{what} must exist at {path}; run the job (or output.merge_only=true) first") from error


def make_report(
    output_url: str,
    *,
    report_cfg: ReportConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    source_cfg: Optional[SourceConfig] = None,
    ssim_cfg: Optional[SSIMConfig] = None,
) -> ReportResult:
    """Write report.html and plots/*.png under `output_url` from its summary.json.

    Cost does not grow with the number of rows: every number and plot comes from summary.json; only the
    `report_cfg.worst_k` worst pairs (at most the summary's `worst_k`) are fetched and decoded again.

    Args:
        output_url: a run's output folder holding summary.json (and _run.json).
        report_cfg: `worst_k`: how many worst pairs to show with images.
        storage_options: fsspec options for `output_url`.
        source_cfg, ssim_cfg: the run's configs, to re-read the worst pairs; None: from _run.json.

    Returns:
        A ReportResult with the paths written.

    Raises:
        FileNotFoundError: no summary.json (or no _run.json when the configs are not given).

    Example:
        >>> make_report("/data/audit", report_cfg=ReportConfig())  # doctest: +SKIP
    """
    started = time.perf_counter()
    fs, root = output_filesystem(output_url, storage_options)
    summary = _read_json(fs, f"{root}/{SUMMARY_FILE}", what="summary.json")
    plots = summary_plots(summary)
    worst = summary.get("worst", [])[: report_cfg.worst_k]
    worst_started = time.perf_counter()
    panels = _panels(fs, root, worst, source_cfg=source_cfg, ssim_cfg=ssim_cfg)
    worst_seconds = time.perf_counter() - worst_started
    page = render_html(summary, plots=plots, panels=panels, output_url=scrub(output_url))
    plot_paths = []
    if fs.exists(f"{root}/{PLOTS_DIR}"):  # plots of an earlier report (other groups) must not linger
        fs.rm(f"{root}/{PLOTS_DIR}", recursive=True)
    for plot in plots:
        path = f"{root}/{PLOTS_DIR}/{plot.name}"
        write_bytes(fs, path, plot.png)
        plot_paths.append(path)
    html_path = f"{root}/{REPORT_FILE}"
    write_bytes(fs, html_path, page.encode("utf-8"))
    return ReportResult(html_path, tuple(plot_paths), len(panels), sum(1 for p in panels if p.images),
                        time.perf_counter() - started, worst_seconds)


def _panels(fs: Any, root: str, worst: Sequence[Mapping[str, Any]], *, source_cfg: Optional[SourceConfig],
            ssim_cfg: Optional[SSIMConfig]) -> List[WorstPanel]:
    if not worst:
        return []
    if source_cfg is None or ssim_cfg is None:
        try:
            recorded = configs_from_manifest(_read_json(fs, f"{root}/{RUN_MANIFEST}", what=RUN_MANIFEST))
        except (FileNotFoundError, ValueError) as error:
            return _noted([WorstPanel(entry) for entry in worst], f"the run's configuration is unknown: {error}")
        source_cfg, ssim_cfg = source_cfg or recorded[0], ssim_cfg or recorded[1]
    return worst_panels(worst, source_cfg=source_cfg, ssim_cfg=ssim_cfg)
