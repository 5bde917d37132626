"""The finite paired deltas on local disk, and their exact order statistics in bounded memory.

A comparison of 10^7 pairs must not hold 10^7 deltas in memory. `DeltaSpill` appends each batch's finite
deltas (as order-preserving uint64 keys, `order_keys`) and their group codes to two files in the
comparison's scratch folder (12 bytes per delta, on disk). `order_statistics` then finds the k-th smallest
delta of a group exactly by narrowing, for each wanted rank, a key range known to hold it: each sequential
read of the files counts the keys of every open range in at most `MAX_BINS` equal bins and keeps the bin
holding the rank, until a range is one key or holds few enough keys to be read into memory and sorted.
Memory: one chunk of the files (`CHUNK_ROWS`), the bins (`BIN_BUDGET`) and the collected keys
(`COLLECT_BUDGET`), whatever the number of deltas. Reads: usually three (12 bits of key each, then the
collection); at most seven.

`linear_percentiles` turns order statistics into numpy's `percentile(..., method="linear")`, bit for bit.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

SIGN = np.uint64(1 << 63)
CHUNK_ROWS = 1 << 20  # keys read at a time: 12 MiB with their codes
MAX_BINS = 4096  # bins per range and read: 12 bits of key
BIN_BUDGET = 1 << 21  # bins over all open ranges of one read (16 MiB of counts)
COLLECT_BUDGET = 1 << 21  # keys collected over all ranges of one read (16 MiB)
ALL = -1  # the code that stands for every group (overall)


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as the float64 values do (finite values; −0.0 is taken as 0.0).

    Example:
        >>> v = np.array([0.5, -2.0, 0.0, -0.0, 1e-300, -1e-300])
        >>> bool(np.all(np.argsort(order_keys(v), kind="stable") == np.argsort(v, kind="stable")))
        True
    """
    bits = np.ascontiguousarray(np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    return np.where(bits & SIGN, ~bits, bits | SIGN)


def key_values(keys: np.ndarray) -> np.ndarray:
    """The float64 values of order keys (`order_keys` inverted).

    Example:
        >>> key_values(order_keys(np.array([-1.5, 0.25]))).tolist()
        [-1.5, 0.25]
    """
    keys = np.asarray(keys, dtype=np.uint64)
    return np.where(keys & SIGN, keys ^ SIGN, ~keys).view(np.float64)


class DeltaSpill:
    """One metric's finite deltas and their group codes, appended to two files under `folder`.

    Example:
        >>> import tempfile
        >>> spill = DeltaSpill(tempfile.mkdtemp(), "doc")
        >>> spill.add(np.array([0.5, -0.25]), np.array([0, 1]))
        >>> [key_values(k).tolist() for k, _ in spill.chunks()], spill.size
        ([[0.5, -0.25]], 2)
        >>> spill.remove()
    """

    def __init__(self, folder: str, name: str) -> None:
        self.paths = (os.path.join(folder, f"{name}.keys"), os.path.join(folder, f"{name}.codes"))
        self._files = [open(path, "wb") for path in self.paths]
        self.size = 0

    def add(self, deltas: np.ndarray, codes: np.ndarray) -> None:
        """Append finite deltas with their group codes."""
        if deltas.size:
            order_keys(deltas).tofile(self._files[0])
            np.asarray(codes, dtype=np.int32).tofile(self._files[1])
            self.size += deltas.size

    def close(self) -> None:
        """Finish writing (reading closes first)."""
        for handle in self._files:
            handle.close()

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(keys, codes) of every delta, `rows` at a time, in the order they were added."""
        self.close()
        with open(self.paths[0], "rb") as keys_file, open(self.paths[1], "rb") as codes_file:
            while True:
                keys = np.fromfile(keys_file, dtype=np.uint64, count=rows)
                if keys.size == 0:
                    return
                yield keys, np.fromfile(codes_file, dtype=np.int32, count=keys.size)

    def remove(self) -> None:
        """Delete the files."""
        self.close()
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


class _Range:
    """An open key range [lo, hi] of one group, `below` of whose keys are smaller than lo, `count` inside."""

    def __init__(self, code: int, lo: int, hi: int, below: int, count: int) -> None:
        self.code, self.lo, self.hi, self.below, self.count = code, lo, hi, below, count
        self.width = self.bins = 0
        self.counts: np.ndarray = np.zeros(0, dtype=np.int64)
        self.collected: List[np.ndarray] = []

    @property
    def ident(self) -> Tuple[int, int, int]:
        return self.code, self.lo, self.hi

    def prepare(self, bins: int, collect: bool) -> None:
        """Before a read: collect the keys (few), or count them in `bins` equal bins."""
        if collect:
            self.width, self.bins = 0, 0
            return
        span = self.hi - self.lo + 1
        self.width = -(-span // bins)
        self.bins = -(-span // self.width)
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def take(self, keys: np.ndarray) -> None:
        inside = keys[(keys >= np.uint64(self.lo)) & (keys <= np.uint64(self.hi))]
        if not self.bins:
            self.collected.append(inside)
        elif inside.size:
            index = ((inside - np.uint64(self.lo)) // np.uint64(self.width)).astype(np.int64)
            self.counts += np.bincount(index, minlength=self.bins)

    def narrowed(self, rank: int) -> "_Range":
        """The bin holding `rank` (0-based within the group) after a counting read."""
        cumulative = np.cumsum(self.counts)
        at = int(np.searchsorted(cumulative, rank - self.below, side="right"))
        if at >= self.bins:  # a bug of this module, never of the data
            raise RuntimeError(f"rank {rank} of group {self.code} is not in its range ({int(cumulative[-1])} keys)")
        before = int(cumulative[at - 1]) if at else 0
        lo = self.lo + at * self.width
        return _Range(self.code, lo, min(self.hi, lo + self.width - 1), self.below + before, int(self.counts[at]))

    def pick(self, rank: int) -> int:
        """The key of `rank` after a collecting read."""
        keys = np.sort(np.concatenate(self.collected)) if self.collected else np.zeros(0, np.uint64)
        if keys.size != self.count:  # a bug of this module, never of the data
            raise RuntimeError(f"group {self.code}: {keys.size} keys collected in a range of {self.count}")
        return int(keys[rank - self.below])


def _read(spill: DeltaSpill, ranges: Sequence[_Range], chunk_rows: int) -> None:
    """One sequential read of the spill, feeding each range its group's keys."""
    grouped = any(r.code != ALL for r in ranges)
    for keys, codes in spill.chunks(chunk_rows):
        if grouped:
            order = np.argsort(codes, kind="stable")
            sorted_keys, sorted_codes = keys[order], codes[order]
        for item in ranges:
            if item.code == ALL:
                item.take(keys)
            else:
                start, stop = np.searchsorted(sorted_codes, [item.code, item.code + 1])
                item.take(sorted_keys[start:stop])


def order_statistics(spill: DeltaSpill, wanted: Mapping[int, Sequence[int]], sizes: Mapping[int, int], *,
                     chunk_rows: int = CHUNK_ROWS, bin_budget: int = BIN_BUDGET,
                     collect_budget: int = COLLECT_BUDGET) -> Dict[Tuple[int, int], float]:
    """The exact k-th smallest delta of each group, for the ranks wanted (see the module docstring).

    Args:
        spill: the deltas.
        wanted: group code (`ALL`: every delta) → 0-based ranks.
        sizes: group code → how many of the spill's deltas it has (`ALL`: all of them).
        chunk_rows, bin_budget, collect_budget: memory bounds (keys read at a time, bins, collected keys).

    Returns:
        (code, rank) → the delta.

    Raises:
        ValueError: a rank is outside its group.

    Example:
        >>> import tempfile
        >>> spill = DeltaSpill(tempfile.mkdtemp(), "doc")
        >>> spill.add(np.array([3.0, -1.0, 2.0, 0.5]), np.array([0, 1, 0, 1]))
        >>> order_statistics(spill, {ALL: [0, 3], 0: [0]}, {ALL: 4, 0: 2, 1: 2})
        {(-1, 0): -1.0, (-1, 3): 3.0, (0, 0): 2.0}
        >>> spill.remove()
    """
    targets: Dict[Tuple[int, int], _Range] = {}
    for code, ranks in wanted.items():
        for rank in ranks:
            if not 0 <= rank < sizes.get(code, 0):
                raise ValueError(f"rank must be in [0, {sizes.get(code, 0)}) for group {code}, got {rank}")
            targets[(code, int(rank))] = _Range(code, 0, (1 << 64) - 1, 0, sizes[code])
    found: Dict[Tuple[int, int], float] = {}
    while targets:
        for target, item in list(targets.items()):
            if item.lo == item.hi:  # one key left: every key in the range is this one
                found[target] = float(key_values(np.array([item.lo], np.uint64))[0])
                del targets[target]
        ranges = {item.ident: item for item in targets.values()}
        if not ranges:
            break
        collect_limit = max(1, collect_budget // len(ranges))
        counting = [r for r in ranges.values() if r.count > collect_limit]
        bins = int(min(MAX_BINS, max(2, bin_budget // max(1, len(counting)))))
        for item in ranges.values():
            item.prepare(bins, collect=item.count <= collect_limit)
        _read(spill, list(ranges.values()), chunk_rows)
        for target, item in list(targets.items()):
            shared = ranges[item.ident]
            if shared.bins:
                targets[target] = shared.narrowed(target[1])
            else:
                found[target] = float(key_values(np.array([shared.pick(target[1])], np.uint64))[0])
                del targets[target]
    return {key: found[key] for key in sorted(found)}


def linear_positions(size: int, percentiles: Sequence[float]) -> List[Tuple[int, int, float]]:
    """For each percentile, numpy's 'linear' method's (lower rank, upper rank, weight) over `size` values.

    Example:
        >>> linear_positions(5, [0, 50, 90, 100])
        [(0, 1, 0.0), (2, 3, 0.0), (3, 4, 0.6000000000000001), (4, 4, 0.0)]
    """
    positions = []
    for q in percentiles:
        virtual = float((size - 1) * (np.float64(q) / 100))  # numpy: q / 100, then (n − 1) · q
        if virtual >= size - 1:
            positions.append((size - 1, size - 1, 0.0))
            continue
        lower = int(np.floor(virtual))
        positions.append((lower, lower + 1, virtual - lower))
    return positions


def linear_value(low: float, high: float, weight: float) -> float:
    """numpy's interpolation between two order statistics (its `_lerp`: from the nearer end).

    Example:
        >>> linear_value(1.0, 2.0, 0.25), linear_value(1.0, 2.0, 0.75)
        (1.25, 1.75)
    """
    diff = high - low
    return high - diff * (1.0 - weight) if weight >= 0.5 else low + diff * weight
