"""Planning, on the driver: a source into shards with stable ids and a fingerprint, from metadata only.

A Parquet source is planned from its footers (`manifest.list_manifest`), a prefix source from a sorted
listing of its two prefixes, the sample set from its manifest listed `copies` times. So the driver's
memory grows with the number of shards, not with the number of pairs. Shard ids and the fingerprint
are made here and nowhere else: a resumed run recognises its shards by them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ssim_ray.config import SourceConfig
from ssim_ray.secrets import redact_text
from ssim_ray.sources.fetch import redacted_errors
from ssim_ray.sources.manifest import list_manifest
from ssim_ray.sources.model import ManifestColumns, ManifestError, ManifestFile, ParquetRows, Plan, PrefixRows, Shard
from ssim_ray.sources.reading import version_field
from ssim_ray.sources.storage import open_url, url_of

SHARD_ID_DIGITS = 8


def plan_shards(cfg: SourceConfig) -> Plan:
    """Plan a source into shards of at most `cfg.pairs_per_shard` pairs, from metadata or a listing.

    Args:
        cfg: the source. `parquet`: one file, a folder or a glob at any fsspec URL; `prefix`: two
            prefixes; `sample`: the built-in sample set (made on first use), listed `cfg.copies` times.

    Returns:
        The shards in order, a fingerprint of what defines the plan (source identity, the Parquet footers
        or the listing, pairs per shard, columns, the settings that decide statuses or pixels; never
        storage options or credentials), the number of pairs and the pass-through columns.

    Raises:
        ManifestError: a missing column, a column of the wrong type, a duplicate or null pair_id, no
            Parquet file at the URL, or two prefix keys that collide when extensions are ignored.
        ImportError: `sample` when scikit-image is not installed and the set is not cached yet.

    Example:
        >>> import os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> folder = tempfile.mkdtemp()
        >>> table = pa.table({"pair_id": ["a", "b", "c"], "reference": ["r/a.png"] * 3, "distorted": ["d/a.png"] * 3})
        >>> pq.write_table(table, os.path.join(folder, "pairs.parquet"))
        >>> plan = plan_shards(SourceConfig(kind="parquet", url=folder, pairs_per_shard=2))
        >>> [s.num_pairs for s in plan.shards], plan.total_pairs
        ([2, 1], 3)
    """
    with redacted_errors():
        if cfg.kind == "prefix":
            return _plan_prefix(cfg)
        if cfg.kind == "sample":
            return _plan_sample(cfg)
        return _plan_parquet(cfg, url=cfg.url, sample=False)


def _plan_sample(cfg: SourceConfig) -> Plan:
    # Imported here: the sample module is only needed for source=sample.
    from ssim_ray.sources.sample import SAMPLE_VERSION, ensure_sample_dataset

    manifest_url = ensure_sample_dataset(cache_dir=cfg.cache_dir)
    sample_cfg = dataclasses.replace(
        cfg, kind="parquet", url=manifest_url, base_url=None, pair_id_column="pair_id",
        reference_column="reference", distorted_column="distorted", passthrough_columns=None,
    )
    return _plan_parquet(sample_cfg, url=manifest_url, sample=True, identity=f"sample:{SAMPLE_VERSION}")


def _plan_parquet(cfg: SourceConfig, *, url: str, sample: bool, identity: Optional[str] = None) -> Plan:
    files, columns = list_manifest(cfg, url=url)
    suffixes = [""] + [f"#copy{k}" for k in range(1, cfg.copies)] if sample else [""]
    shards: List[Shard] = []
    for suffix in suffixes:
        for manifest_file in files:
            shards.extend(_file_shards(manifest_file, columns, cfg=cfg, sample=sample, suffix=suffix, start=len(shards)))
    identity_doc = {
        "source": identity or redact_text(url),
        "base_url": None if cfg.base_url is None else redact_text(cfg.base_url),
        "files": [[f.key, f.footer_sha256] for f in files],
        "copies": len(suffixes),
    }
    return _make_plan(shards, identity_doc, cfg=cfg, passthrough=columns.passthrough, columns=columns)


def _file_shards(
    manifest_file: ManifestFile, columns: ManifestColumns, *, cfg: SourceConfig, sample: bool, suffix: str, start: int
) -> List[Shard]:
    """Row ranges of `pairs_per_shard` rows; each records the row groups it overlaps, from the footer."""
    group_starts = np.concatenate([[0], np.cumsum(manifest_file.row_group_rows)]).astype(np.int64)
    shards = []
    for row_start in range(0, manifest_file.num_rows, cfg.pairs_per_shard):
        row_stop = min(row_start + cfg.pairs_per_shard, manifest_file.num_rows)
        first = int(np.searchsorted(group_starts, row_start, side="right") - 1)
        last = int(np.searchsorted(group_starts, row_stop, side="left") - 1)
        # The sample set's file is found again by each worker in its own cache: no URL in the shard.
        rows = ParquetRows(
            file_url=None if sample else manifest_file.url, file_key=manifest_file.key,
            base_url="" if sample else manifest_file.base_url, columns=columns, row_start=row_start,
            row_groups=tuple(range(first, last + 1)), first_group_row=int(group_starts[first]), id_suffix=suffix,
        )
        identity = f"{manifest_file.key}|{row_start}|{row_stop}|{suffix}"
        shards.append(Shard(shard_id=_shard_id(start + len(shards), identity), num_pairs=row_stop - row_start, rows=rows))
    return shards


def _plan_prefix(cfg: SourceConfig) -> Plan:
    shard_rows, listing_sha256 = _plan_prefix_rows(cfg)
    shards = []
    for index, rows in enumerate(shard_rows):
        identity = f"{rows.keys[0][0]}|{rows.keys[-1][0]}|{len(rows.keys)}"
        shards.append(Shard(shard_id=_shard_id(index, identity), num_pairs=len(rows.keys), rows=rows))
    identity_doc = {
        "source": [redact_text(cfg.reference_url), redact_text(cfg.distorted_url)],
        "ignore_extension": cfg.ignore_extension,
        "listing": listing_sha256,
    }
    return _make_plan(shards, identity_doc, cfg=cfg, passthrough=(), columns=None)


def _shard_id(index: int, identity: str) -> str:
    """`00000012-3fa9c2d1`: the plan position (so ids sort in plan order) and a digest of what it holds."""
    return f"{index:0{SHARD_ID_DIGITS}d}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _make_plan(
    shards: List[Shard], identity_doc: Dict[str, Any], *, cfg: SourceConfig, passthrough: Tuple[str, ...],
    columns: Optional[ManifestColumns],
) -> Plan:
    doc = dict(identity_doc)
    # max_pixels, allowed_schemes, multi_frame and exif_orientation decide statuses (too_large, path_escape,
    # multi_frame, orientation_mismatch) or pixels (frame 0, turned upright): a resumed run must agree on them.
    doc.update(
        kind=cfg.kind, pairs_per_shard=cfg.pairs_per_shard, passthrough=list(passthrough),
        columns=None if columns is None else dataclasses.asdict(columns), max_pixels=cfg.max_pixels,
        allowed_schemes=sorted(cfg.allowed_schemes), multi_frame=cfg.multi_frame,
        exif_orientation=cfg.exif_orientation,
    )
    fingerprint = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    total = sum(shard.num_pairs for shard in shards)
    return Plan(shards=tuple(shards), fingerprint=fingerprint, total_pairs=total, passthrough_columns=tuple(passthrough))


def _plan_prefix_rows(cfg: SourceConfig) -> Tuple[List[PrefixRows], str]:
    """Pairs of a prefix source from two sorted listings, chunked into shards; and the listing's digest.

    Keys are paths relative to each prefix (without the extension when `cfg.ignore_extension`); a key on
    one side only is kept as a pair that will get status `unpaired`.

    Raises:
        ManifestError: a prefix with no objects, or two objects whose keys collide once extensions are dropped.
    """
    reference = _list_prefix(cfg.reference_url, cfg=cfg, option="reference_url")
    distorted = _list_prefix(cfg.distorted_url, cfg=cfg, option="distorted_url")
    digest = hashlib.sha256()
    pairs = []
    for key in sorted(reference.keys() | distorted.keys()):
        ref, dist = reference.get(key), distorted.get(key)
        digest.update(json.dumps([key, ref and ref[1:], dist and dist[1:]]).encode())
        pairs.append((key, ref and ref[0], dist and dist[0]))
    step = cfg.pairs_per_shard
    return [PrefixRows(keys=tuple(pairs[i:i + step])) for i in range(0, len(pairs), step)], digest.hexdigest()


def _list_prefix(url: str, *, cfg: SourceConfig, option: str) -> Dict[str, Tuple[str, int, Any]]:
    """key -> (URL, size, version) of every object under `url`; version: the store's ETag/hash or the mtime."""
    fs, root = open_url(url, storage_options=cfg.storage_options)
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)
    if not listing:
        raise ManifestError(f"source.{option}={redact_text(url)!r}: no objects under this prefix")
    found: Dict[str, Tuple[str, int, Optional[str]]] = {}
    for path in sorted(listing):
        relative = path[len(root) + 1:]
        key = posixpath.splitext(relative)[0] if cfg.ignore_extension else relative
        if key in found:
            raise ManifestError(
                f"source.{option}: {redact_text(found[key][0])} and {redact_text(url_of(fs, path))} both have key "
                f"{key!r} with source.ignore_extension=true"
            )
        info = listing[path]
        found[key] = (url_of(fs, path), int(info.get("size") or 0), _object_version(info))
    return found


def _object_version(info: Dict[str, Any]) -> Any:
    """What tells a rewritten object from the old one (`reading.VERSION_FIELDS`): a content hash or
    generation where the store has one, else a timestamp."""
    field = version_field(info)
    if field is None:
        return None
    value = field[1]
    return value if isinstance(value, (str, int, float)) else str(value)
