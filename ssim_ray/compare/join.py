"""Pairing the rows of two runs by pair_id, streaming: one pass when they share a plan, partitions otherwise.

Both modes yield the same thing: "joined" tables whose columns are `pair_id`, `b_present`, `c_present`
and, for each side (`b_` baseline, `c_` candidate), the run's status, error, reference, distorted,
shard_id, the compared score columns and `group` (the group column as text, `table_stats.group_keys`;
null where the run lacks the column).

- **aligned** (both runs share a plan fingerprint and a row count, and both are complete): their rows are
  in the same order, so the two files are read side by side in row batches and sliced to common lengths.
  Each slice's pair_ids are checked equal; a mismatch (a hand-made file) stops with `NotAlignedError`
  and the caller starts over partitioned. Memory: two row batches, whatever the number of rows.
- **partitioned**: each run is streamed once into `n` zstd-compressed Arrow IPC files on local disk by a
  hash of pair_id (`pair_hashes`), with its row number; then partition by partition both sides are read
  and joined (Arrow's hash join, full outer) and handed on in batches sorted by (baseline row, candidate
  row). Memory: one partition of each side, their join and its sort order: about `partition_rows` rows
  per side (`partition_count`). Rows come out grouped by partition, each partition in baseline order,
  then the candidate's extra rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray.compare.runs import ROW_COLUMNS, AuditRun, CompareRefusedError
from ssim_ray.output.table_stats import group_keys

SIDES = {"baseline": "b", "candidate": "c"}
ALIGNED, PARTITIONED = "aligned", "partitioned"
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)  # FNV-1's 64-bit prime: odd, so every byte position weighs differently
_powers = np.ones(1, dtype=np.uint64)


class NotAlignedError(RuntimeError):
    """Two runs that share a plan fingerprint do not list the same pair_ids in the same order."""


@dataclass(frozen=True)
class JoinSpec:
    """What to read and how: the compared metrics, the group column, batch and partition sizes."""

    metrics: Tuple[str, ...]
    group_by: Optional[str]
    batch_rows: int
    partition_rows: int
    spill_dir: Optional[str] = None


def _position_powers(length: int) -> np.ndarray:
    global _powers
    if _powers.size < length:
        grown = np.full(max(length, 2 * _powers.size), _PRIME, dtype=np.uint64)
        grown[0] = 1
        _powers = np.cumprod(grown, dtype=np.uint64)  # wraps modulo 2**64, as intended
    return _powers


def pair_hashes(ids: Any) -> np.ndarray:
    """A 64-bit hash of each pair_id, the same in every process and run (Python's own hash is salted).

    A polynomial over the UTF-8 bytes (FNV's prime), mixed with the length, then splitmix64's finaliser.
    It decides partitions and which pairs a scatter shows, so both follow the pairs, not their order.

    Args:
        ids: a string array (chunked or not) without nulls.

    Returns:
        uint64 hashes, one per id.

    Example:
        >>> h = pair_hashes(pa.array(["a", "b", "", "a"]))
        >>> bool(h[0] == h[3]), bool(h[0] != h[1]), h.dtype.name
        (True, True, 'uint64')
    """
    array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if array.null_count:
        raise CompareRefusedError("pair_id must never be null in a results table, got null pair_ids")
    if pa.types.is_large_string(array.type):
        offsets_type = np.int64
    else:
        array, offsets_type = array.cast(pa.string()), np.int32
    _, offset_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offset_buffer, offsets_type)[array.offset:array.offset + len(array) + 1].astype(np.int64)
    local = offsets - offsets[0]
    lengths = np.diff(local).astype(np.uint64)
    sums = np.zeros(len(array), dtype=np.uint64)
    if local[-1] > 0:
        data = np.frombuffer(data_buffer, np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)
        starts = local[:-1]
        position = np.arange(local[-1]) - np.repeat(starts, np.diff(local))
        terms = data * _position_powers(int(position.max()) + 1)[position]
        filled = lengths > 0
        sums[filled] = np.add.reduceat(terms, starts[filled])
    z = sums ^ (lengths * _MIX2)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def read_columns(run: AuditRun, spec: JoinSpec) -> List[str]:
    """The columns read from `run`: the row columns, the compared metrics, the group column if it has it.

    Example:
        >>> from ssim_ray.compare.runs import AuditRun
        >>> run = AuditRun("baseline", "/a", {}, pa.schema([("codec", pa.string())]), 0, {}, None)
        >>> read_columns(run, JoinSpec(("ssim",), "codec", 10, 10))[-2:]
        ['ssim', 'codec']
    """
    extra = [spec.group_by] if spec.group_by and spec.group_by in run.schema.names else []
    return list(dict.fromkeys([*ROW_COLUMNS, *spec.metrics, *extra]))


def side_table(batch: Any, run: AuditRun, spec: JoinSpec) -> pa.Table:
    """A batch of `run`'s rows as one side of a join: columns prefixed `b_`/`c_`, plus its `group` text."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    prefix = SIDES[run.role]
    names = [*ROW_COLUMNS[1:], *spec.metrics]
    arrays = [table["pair_id"]] + [table[name].cast(pa.float64() if name in spec.metrics else pa.string())
                                   for name in names]
    has_group = spec.group_by is not None and spec.group_by in table.column_names
    arrays.append(group_keys(table, spec.group_by) if has_group else pa.nulls(table.num_rows, pa.string()))
    return pa.Table.from_arrays(arrays, names=["pair_id"] + [f"{prefix}_{n}" for n in names] + [f"{prefix}_group"])


def choose_mode(baseline: AuditRun, candidate: AuditRun, requested: str) -> Tuple[str, str]:
    """The join mode, and why: aligned only when both runs are complete and share a plan and a row count.

    Example:
        >>> from ssim_ray.compare.runs import AuditRun
        >>> a = AuditRun("baseline", "/a", {}, pa.schema([]), 5, {"plan_fingerprint": "f"}, None)
        >>> choose_mode(a, a, "auto")[0], choose_mode(a, a, "partitioned")[0]
        ('aligned', 'partitioned')
    """
    if requested == PARTITIONED:
        return PARTITIONED, "compare.join=partitioned"
    if baseline.plan_fingerprint is None or baseline.plan_fingerprint != candidate.plan_fingerprint:
        return PARTITIONED, "the runs have different plans"
    if baseline.num_rows != candidate.num_rows or not (baseline.complete and candidate.complete):
        return PARTITIONED, "the runs share a plan, but one is incomplete"
    return ALIGNED, "the runs share a plan: same pairs in the same order"


def _batches(run: AuditRun, spec: JoinSpec) -> Iterator[pa.RecordBatch]:
    results = run.open_results()
    try:
        for batch in results.iter_batches(batch_size=spec.batch_rows, columns=read_columns(run, spec)):
            if batch.num_rows:
                yield batch
    finally:
        results.close()


def aligned_tables(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec) -> Iterator[pa.Table]:
    """Joined tables of two runs whose rows are in the same order: both files read once, side by side.

    Raises:
        NotAlignedError: a slice's pair_ids differ, or one file ends first.
    """
    left_iter, right_iter = _batches(baseline, spec), _batches(candidate, spec)
    left = right = None
    while True:
        left = next(left_iter, None) if left is None or not left.num_rows else left
        right = next(right_iter, None) if right is None or not right.num_rows else right
        if left is None or right is None:
            if left is not None or right is not None:
                raise NotAlignedError("one run's ssim.parquet ends before the other's")
            return
        n = min(left.num_rows, right.num_rows)
        b, c = side_table(left.slice(0, n), baseline, spec), side_table(right.slice(0, n), candidate, spec)
        same = pc.equal(b["pair_id"], c["pair_id"])
        if not pc.all(same).as_py():
            at = pc.index(same, False).as_py()
            raise NotAlignedError(f"pair_id {b['pair_id'][at]} in the baseline faces {c['pair_id'][at]} in the "
                                  "candidate")
        present = pa.array(np.ones(n, dtype=bool))
        names = ["pair_id", "b_present", "c_present", *b.column_names[1:], *c.column_names[1:]]
        yield pa.Table.from_arrays([b["pair_id"], present, present, *b.columns[1:], *c.columns[1:]], names=names)
        left, right = left.slice(n), right.slice(n)


def partition_count(baseline: AuditRun, candidate: AuditRun, partition_rows: int) -> int:
    """Partitions so that each holds about `partition_rows` rows of the larger run.

    Example:
        >>> from ssim_ray.compare.runs import AuditRun
        >>> a = AuditRun("baseline", "/a", {}, pa.schema([]), 10_000_000, {}, None)
        >>> partition_count(a, a, 500_000)
        20
    """
    return max(1, -(-max(baseline.num_rows, candidate.num_rows) // partition_rows))


def _spill(run: AuditRun, spec: JoinSpec, folder: str, parts: int) -> List[Optional[str]]:
    """Stream `run` into `parts` IPC files by pair_id hash, each row with its row number; their paths."""
    prefix = SIDES[run.role]
    paths: List[Optional[str]] = [None] * parts
    writers: Dict[int, Any] = {}
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    row = 0
    try:
        for batch in _batches(run, spec):
            table = side_table(batch, run, spec)
            table = table.append_column(f"{prefix}_row", pa.array(np.arange(row, row + table.num_rows, dtype=np.int64)))
            row += table.num_rows
            which = (pair_hashes(table["pair_id"]) % np.uint64(parts)).astype(np.int64)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(parts + 1))
            ordered = table.take(pa.array(order))
            for part in np.flatnonzero(np.diff(bounds)):
                if part not in writers:
                    paths[part] = os.path.join(folder, f"{prefix}-{part:05d}.arrow")
                    writers[part] = pa.ipc.new_file(paths[part], ordered.schema, options=options)
                writers[part].write_table(ordered.slice(bounds[part], bounds[part + 1] - bounds[part]))
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _read_part(path: Optional[str], schema: pa.Schema) -> pa.Table:
    if path is None:
        return schema.empty_table()
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def _check_unique(table: pa.Table, run: AuditRun) -> None:
    if pc.count_distinct(table["pair_id"]).as_py() == table.num_rows:
        return
    counts = pc.value_counts(table["pair_id"])
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
    raise CompareRefusedError(f"{run.role}'s ssim.parquet must hold each pair_id once, got {repeated!r} more than "
                              "once (an audit never writes that: was the file assembled by hand?)")


def _side_schema(run: AuditRun, spec: JoinSpec) -> pa.Schema:
    return side_table(run.schema.empty_table().select(read_columns(run, spec)), run, spec).schema.append(
        pa.field(f"{SIDES[run.role]}_row", pa.int64()))


def partitioned_tables(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec,
                       info: Optional[Dict[str, Any]] = None) -> Iterator[pa.Table]:
    """Joined tables of any two runs, in bounded memory: hash partitions on disk, joined one at a time.

    `info`, if given, receives `spilled_bytes`: the partitions' size on disk (zstd-compressed).

    Raises:
        CompareRefusedError: a pair_id occurs twice in one run.
    """
    parts = partition_count(baseline, candidate, spec.partition_rows)
    folder = tempfile.mkdtemp(prefix="ssim-compare-", dir=spec.spill_dir)
    try:
        spilled = {run.role: _spill(run, spec, folder, parts) for run in (baseline, candidate)}
        if info is not None:
            info["spilled_bytes"] = sum(os.path.getsize(p) for paths in spilled.values() for p in paths if p)
        schemas = {run.role: _side_schema(run, spec) for run in (baseline, candidate)}
        for part in range(parts):
            left = _read_part(spilled["baseline"][part], schemas["baseline"])
            right = _read_part(spilled["candidate"][part], schemas["candidate"])
            _check_unique(left, baseline)
            _check_unique(right, candidate)
            yield from _joined_partition(left, right, spec)
            del left, right  # before the next partition is read
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _joined_partition(left: pa.Table, right: pa.Table, spec: JoinSpec) -> Iterator[pa.Table]:
    """One partition's joined tables, `batch_rows` at a time, in (baseline row, candidate row) order.

    Only the keys and each side's position go through Arrow's hash join (its memory grows with what it
    carries); each batch then takes its columns from the two sides by position, a null position giving the
    null row of a pair the side lacks.
    """
    positions = [pa.table({"pair_id": side["pair_id"], name: pa.array(np.arange(side.num_rows, dtype=np.int64))})
                 for side, name in ((left, "b_at"), (right, "c_at"))]
    matched = positions[0].join(positions[1], keys="pair_id", join_type="full outer", use_threads=True)
    b_at, c_at = matched["b_at"].combine_chunks(), matched["c_at"].combine_chunks()
    del matched, positions
    # Candidate-only rows (no baseline position) after the baseline's, each side in its run's row order.
    b_row = pc.fill_null(pc.take(left["b_row"], b_at), np.iinfo(np.int64).max)
    order = pc.sort_indices(pa.table({"b": b_row, "c": pc.take(right["c_row"], c_at)}),
                            sort_keys=[("b", "ascending"), ("c", "ascending")])
    b_at, c_at = pc.take(b_at, order), pc.take(c_at, order)
    del b_row, order
    names = [*ROW_COLUMNS[1:], *spec.metrics, "group"]
    for start in range(0, len(b_at), spec.batch_rows):
        b_take, c_take = b_at.slice(start, spec.batch_rows), c_at.slice(start, spec.batch_rows)
        b_side, c_side = left.take(b_take), right.take(c_take)
        pair_id = pc.coalesce(b_side["pair_id"], c_side["pair_id"])
        flags = [pc.is_valid(b_take), pc.is_valid(c_take)]
        columns = [b_side[f"b_{n}"] for n in names] + [c_side[f"c_{n}"] for n in names]
        yield pa.Table.from_arrays([pair_id, *flags, *columns], names=[
            "pair_id", "b_present", "c_present", *[f"b_{n}" for n in names], *[f"c_{n}" for n in names]])


def joined_tables(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec, mode: str,
                  info: Optional[Dict[str, Any]] = None) -> Iterator[pa.Table]:
    """The joined tables in `mode` (`ALIGNED` or `PARTITIONED`; see the module docstring); facts about the
    join (partitions' size on disk) go into `info`.

    Example:
        >>> from ssim_ray.compare.runs import AuditRun
        >>> empty = AuditRun("baseline", "/a", {}, pa.schema([]), 0, {}, None)
        >>> list(joined_tables(empty, empty, JoinSpec(("ssim",), None, 10, 10), "nonsense"))
        Traceback (most recent call last):
        ...
        ValueError: mode must be 'aligned' or 'partitioned', got 'nonsense'
    """
    if mode == ALIGNED:
        return aligned_tables(baseline, candidate, spec)
    if mode == PARTITIONED:
        return partitioned_tables(baseline, candidate, spec, info)
    raise ValueError(f"mode must be {ALIGNED!r} or {PARTITIONED!r}, got {mode!r}")

