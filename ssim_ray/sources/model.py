"""The sources' data types: what a plan is made of and what a worker gets for each pair.

Small frozen dataclasses (a `Shard` travels to a Ray actor, so it stays small and picklable), the one
mutable `LoadedPair` a worker fills while loading, `ManifestError`, `DecodeError` (an image that cannot
be used) and `PairFailure` (what a pair that cannot be scored becomes). No I/O here: planning, manifest scanning and loading build and read these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ssim_ray import statuses


class ManifestError(ValueError):
    """The manifest cannot be used: a missing column, a wrong type, a duplicate id. Raised before any work."""


class PairFailure(Exception):
    """A pair that cannot be scored: its status and the one-line, redacted message for its row."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class DecodeError(Exception):
    """An image that cannot be used, with the status it gets and a one-line message naming the file.

    Attributes:
        status: one of `unreadable`, `too_large`, `unsupported`, `has_alpha`, `multi_frame`.
    """

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ManifestColumns:
    """Column names and kinds: `reference_kind`/`distorted_kind` are `path` (strings) or `bytes` (encoded)."""

    pair_id: Optional[str]
    reference: str
    distorted: str
    reference_kind: str
    distorted_kind: str
    passthrough: Tuple[str, ...]


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest, as planned from its footer."""

    url: str
    key: str
    base_url: str
    num_rows: int
    row_group_rows: Tuple[int, ...]
    footer_sha256: str


@dataclass(frozen=True)
class PrefixRows:
    """A prefix shard's pairs: (key, reference URL or None, distorted URL or None), in key order."""

    keys: Tuple[Tuple[str, Optional[str], Optional[str]], ...]


@dataclass(frozen=True)
class ParquetRows:
    """Where a Parquet shard's rows are: rows [row_start, row_start + num_pairs) of one manifest file.

    `file_url` is None for the built-in sample set, which each worker finds (or makes) in its own cache.
    """

    file_url: Optional[str]
    file_key: str
    base_url: str
    columns: ManifestColumns
    row_start: int
    row_groups: Tuple[int, ...]
    first_group_row: int
    id_suffix: str = ""


@dataclass(frozen=True)
class Shard:
    """One unit of work, retry and output. Small and picklable; `shard_id` sorts in plan order."""

    shard_id: str
    num_pairs: int
    rows: Union[ParquetRows, PrefixRows]


@dataclass(frozen=True)
class Plan:
    """A source planned into shards, with what a resumed run must agree on.

    `fingerprint` digests what defines the plan (source identity, footers or listing, pairs per shard,
    columns, the settings that decide statuses), never storage options or credentials.
    """

    shards: Tuple[Shard, ...]
    fingerprint: str
    total_pairs: int
    passthrough_columns: Tuple[str, ...]


@dataclass
class LoadedPair:
    """One pair as the worker gets it: decoded tensors when `status == statuses.OK`, else the reason in `error`.

    `ref` and `dist` are (C, H, W) uint8/uint16 tensors; `reference` and `distorted` name the two sides
    (redacted URLs, or a description of inline bytes) for rows and messages.

    `reference_version` and `distorted_version` identify the input that was read, taken before its bytes:
    `size=<bytes>;mtime_ns=<int>` for local files, `size=<bytes>;etag=<ETag>` (or the store's generation,
    hash or modification time) for object stores, None for bytes inside the manifest (the plan's fingerprint
    covers them) and for an input that could not be fetched. `sources.current_versions` gives the same
    strings without reading any image.
    """

    pair_id: str
    row_index: int
    reference: str
    distorted: str
    passthrough: Dict[str, Any] = field(default_factory=dict)
    status: str = statuses.OK
    error: Optional[str] = None
    ref: Optional[torch.Tensor] = None
    dist: Optional[torch.Tensor] = None
    bit_depth: Optional[int] = None
    data_range: Optional[float] = None
    decoder: Optional[str] = None
    reference_version: Optional[str] = None
    distorted_version: Optional[str] = None
