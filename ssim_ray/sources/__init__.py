"""Pairs in: plan a dataset into shards on the driver, stream and decode one shard's pairs in a worker.

Never imports the output, the report or the job. The modules, by concern:

- `model`: the types (`Shard`, `Plan`, `LoadedPair`, the rows a shard carries, `ManifestError`);
- `planning`: `plan_shards` (Parquet footers, prefix listings, the sample set), shard ids, fingerprint;
- `manifest`: Parquet manifests: files, column and unique-id checks, `read_manifest_rows`;
- `loading`: `iter_shard_pairs`, `load_pairs`, `iter_shard_rows`, `current_versions`: pairs fetched,
  decoded, checked and typed; inputs' versions by stat alone;
- `rows`: a shard's rows as listed; `prefetch`: the ordered thread pool bounded in pairs and bytes;
- `fetch`: one side's bytes and version, every per-pair failure typed, no credential in any error;
- `decode`: encoded bytes to exact uint8/uint16 pixels (`sixteen_bit`: 16-bit files Pillow would reduce;
  `frames`: frame counts and EXIF orientation);
- `storage`: fsspec at the edge (schemes, retries, path resolution); `reading`: an object with its version;
- `sample`: the built-in sample set (needs scikit-image, imported only when the set is made).

The rest of the package imports the names below from here.
"""

from ssim_ray.sources.loading import current_versions, iter_shard_pairs, iter_shard_rows, load_pairs
from ssim_ray.sources.manifest import read_manifest_rows
from ssim_ray.sources.model import LoadedPair, ManifestError, ParquetRows, Plan, PrefixRows, Shard
from ssim_ray.sources.planning import plan_shards

__all__ = [
    "LoadedPair", "ManifestError", "ParquetRows", "Plan", "PrefixRows", "Shard",
    "current_versions", "iter_shard_pairs", "iter_shard_rows", "load_pairs", "plan_shards", "read_manifest_rows",
]
