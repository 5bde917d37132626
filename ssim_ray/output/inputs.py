"""Inputs as part of what a committed row stands for: the versions recorded with each row, their digest in
the marker, and the check a resume makes before it reuses a shard.

Each row records what identified its two inputs when they were read (`reference_version`,
`distorted_version`: size and mtime, or size and ETag/version id, as `sources` gives them; null when
unknown). The marker records `inputs_digest` of the shard's (pair_id, versions) in shard order. On resume
an actor asks the store for the current versions (a stat or HEAD per input, no fetch, no decode) and
`check_inputs` compares their digest with the marker's; only when they differ does it read the part file's
version columns to name the pairs whose inputs changed. Such a shard is recomputed whole (the shard is the
unit of work and output); scores are deterministic, so its unchanged pairs get the same bits again.

A marker without a digest (the driver's `worker_failed` shards, whose inputs were never read) is not
checked: it serves no score.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.output.layout import output_filesystem, part_path

VERSION_COLUMNS = ("reference_version", "distorted_version")
LISTED_PAIRS = 20  # changed pair ids a message or the summary names

Versions = Tuple[str, Optional[str], Optional[str]]  # (pair_id, reference_version, distorted_version)


def inputs_digest(versions: Iterable[Versions]) -> Optional[str]:
    """The sha256 of a shard's (pair_id, reference_version, distorted_version), in shard order.

    Args:
        versions: one triple per pair of the shard, in shard order.

    Returns:
        64 hex digits, or None when no pair has a known version (nothing to check against).

    Example:
        >>> inputs_digest([("p0", None, None)]) is None
        True
        >>> inputs_digest([("p0", "12:1700000000", "9:1700000000")]) == inputs_digest([("p0", "12:1700000000", "9:1")])
        False
    """
    digest = hashlib.sha256()
    known = False
    for pair_id, reference, distorted in versions:
        known = known or reference is not None or distorted is not None
        digest.update(json.dumps([pair_id, reference, distorted]).encode("utf-8") + b"\n")
    return digest.hexdigest() if known else None


def table_versions(table: pa.Table) -> List[Versions]:
    """The (pair_id, reference_version, distorted_version) of every row of a results table, in order.

    Example:
        >>> table_versions(pa.table({"pair_id": ["a"], "reference_version": ["1:2"], "distorted_version": [None]}))
        [('a', '1:2', None)]
    """
    return list(zip(table["pair_id"].to_pylist(), *(table[name].to_pylist() for name in VERSION_COLUMNS)))


@dataclass(frozen=True)
class InputCheck:
    """One committed shard's input check, as an actor returns it (small: ids of changed pairs only).

    Attributes:
        shard_id: the shard checked.
        pairs: how many pairs' inputs were looked up.
        changed: ids of the pairs whose inputs differ from what the rows record, in shard order.
        seconds: the time the lookups and the comparison took in the actor.
        error: why the shard could not be checked (it is then recomputed); None when it was.
    """

    shard_id: str
    pairs: int
    changed: Tuple[str, ...] = ()
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def stale(self) -> bool:
        """Whether the shard must be recomputed: inputs changed, or they could not be checked."""
        return bool(self.changed) or self.error is not None


def changed_pairs(recorded: Sequence[Versions], current: Sequence[Versions]) -> Tuple[str, ...]:
    """Ids of pairs whose versions differ between the rows and now, or that are in only one of them.

    Example:
        >>> changed_pairs([("a", "1", "1"), ("b", "1", "1")], [("a", "1", "1"), ("b", "1", "2"), ("c", None, None)])
        ('b', 'c')
    """
    before: Dict[str, Versions] = {v[0]: v for v in recorded}
    now_ids = {v[0] for v in current}
    changed = [v[0] for v in current if before.get(v[0]) != v]
    changed += [pair_id for pair_id in before if pair_id not in now_ids]
    return tuple(changed)


def recorded_versions(output_url: str, shard_id: str, *, storage_options: Optional[Mapping[str, Any]] = None
                      ) -> List[Versions]:
    """The versions a committed shard's rows record, read from its part file (three columns only).

    Example:
        >>> from ssim_ray.output.commit import write_shard
        >>> from ssim_ray.output.schema import result_row, rows_to_table
        >>> row = result_row(pair_id="p0", reference="a.png", distorted="b.png", status="missing", shard_id="s0",
        ...                  passthrough={}, error="no b.png", reference_version="3:17")
        >>> _ = write_shard("memory://doc-inputs", "s0", rows_to_table([row], []))
        >>> recorded_versions("memory://doc-inputs", "s0")
        [('p0', '3:17', None)]
    """
    fs, root = output_filesystem(output_url, storage_options)
    data = fs.cat_file(part_path(root, shard_id))
    table = pq.read_table(pa.BufferReader(data), columns=["pair_id", *VERSION_COLUMNS], use_threads=False)
    return table_versions(table)


def check_inputs(output_url: str, shard_id: str, recorded_sha256: str, current: Iterable[Versions], *,
                 storage_options: Optional[Mapping[str, Any]] = None) -> InputCheck:
    """Compare a committed shard's inputs now with what its rows record.

    Args:
        output_url: the run's output folder.
        shard_id: the committed shard.
        recorded_sha256: its marker's `inputs_sha256`.
        current: (pair_id, reference_version, distorted_version) of every pair of the shard now, in shard
            order (`sources.current_versions`).
        storage_options: fsspec options for `output_url`.

    Returns:
        An InputCheck; its `changed` names the pairs whose inputs changed (read from the part file only when
        the digests differ).

    Example:
        >>> from ssim_ray.output.commit import write_shard
        >>> from ssim_ray.output.schema import result_row, rows_to_table
        >>> row = result_row(pair_id="p0", reference="a.png", distorted="b.png", status="missing", shard_id="s1",
        ...                  passthrough={}, error="no b.png", reference_version="3:17")
        >>> commit = write_shard("memory://doc-check", "s1", rows_to_table([row], []))
        >>> check_inputs("memory://doc-check", "s1", commit.inputs_sha256, [("p0", "3:17", None)]).changed
        ()
        >>> check_inputs("memory://doc-check", "s1", commit.inputs_sha256, [("p0", "4:18", None)]).changed
        ('p0',)
    """
    started = time.perf_counter()
    now = list(current)
    if inputs_digest(now) == recorded_sha256:
        return InputCheck(shard_id, len(now), (), time.perf_counter() - started)
    changed = changed_pairs(recorded_versions(output_url, shard_id, storage_options=storage_options), now)
    if not changed:  # same pairs and versions, other order: the shard no longer matches its rows
        changed = tuple(v[0] for v in now)
    return InputCheck(shard_id, len(now), changed, time.perf_counter() - started)


def summarize_checks(checks: Sequence[InputCheck], *, enabled: bool) -> Dict[str, Any]:
    """The summary's `input_check` block: what was verified, and what changed and was recomputed.

    Example:
        >>> summarize_checks([InputCheck("s0", 3, ("p1",), 0.01), InputCheck("s1", 3)], enabled=True)["pairs_changed"]
        1
    """
    stale = [c for c in checks if c.stale]
    changed = [pair_id for c in stale for pair_id in c.changed]
    return {
        "enabled": enabled,
        "shards_verified": len(checks),
        "pairs_verified": sum(c.pairs for c in checks),
        "shards_recomputed": len(stale),
        "pairs_changed": len(changed),
        "changed_pair_ids": changed[:LISTED_PAIRS],
        "unverifiable": {c.shard_id: c.error for c in stale if c.error is not None},
        "actor_seconds": round(sum(c.seconds for c in checks), 3),
    }
