"""The torch path's kernel runner: eager tile sums, or on CPU the compiled C kernel, per the compile policy.

The C kernel (`ssim_ray.metric.native`, built from tile_kernel.c with the system's C compiler) computes the
eager kernel's operations op for op on tiles read straight from the planes, 2-3x faster per pair than the
torch.compile'd tile kernel it replaced and ~10-20x faster than eager on CPU; building it costs about a
second, once per machine (then it is cached). The caller's `compile` policy says when to pay: 'auto'
compiles once the process has spent COMPILE_AFTER_S seconds in the eager kernel for that dtype and window
(short runs - tests, small jobs, workers that score a handful of pairs - never pay, and a long run pays at
most that much extra), 'always' compiles on first use, 'never' stays eager. The bits are the same either
way (`ssim_ray.metric.tiles`), so the policy is a matter of speed only. Other devices run the eager kernel.

The compiled kernel is single-threaded and torch.get_num_threads() Python threads take chunks of tiles from
a queue (ctypes releases the GIL for each call): OpenMP's barriers, several per chunk, made a kernel 5x
slower with two threads than with one whenever another process held a core (measured on a shared 2-core
machine), while a queue of independent chunks only loses the share of the busy core. Several batches can
share one queue (`torch_tile_sums_of`: MS-SSIM's scales), so that no thread idles at one batch's end while
another has work.

State kept here is a cache, not configuration: one runner per (dtype, window, tile variant) per process,
holding its compiled kernel and its eager seconds, and one thread pool per thread count.
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ssim_ray.metric import native
from ssim_ray.metric.tiles import (
    WANG,
    PairTiles,
    TileVariant,
    eager_tile_sums,
    join_sums,
    TILES_PER_CALL,
)

COMPILE_AFTER_S = 3.0
_kernels: dict = {}
_kernel_lock = threading.Lock()
_pools: dict = {}


def wants_compile(policy: str, eager_seconds: float, *, decided: bool) -> bool:
    """The compile policy's rule, for every compiled kernel of the package: 'always' compiles on first use,
    'auto' once that kernel has spent COMPILE_AFTER_S seconds eagerly, 'never' not at all; a kernel already
    `decided` (compiled, or its compile failed) is not compiled again."""
    if decided or policy == "never":
        return False
    return policy == "always" or eager_seconds >= COMPILE_AFTER_S


def _pool(threads: int) -> ThreadPoolExecutor:
    with _kernel_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssim_ray")
        return _pools[threads]


class _CompiledTiles:
    """The compiled tile kernel for one (dtype, window, variant) on CPU, or the eager one until it pays to compile."""

    def __init__(self, taps: List[float], variant: TileVariant = WANG, dtype: torch.dtype = torch.float32) -> None:
        self.taps = taps
        self.taps_tensor = torch.tensor(taps, dtype=dtype)
        self.variant = variant
        self.variant_bits = native.variant_bits(variant.sample_covariance, variant.with_cs, variant.cs_only)
        self.per_call = TILES_PER_CALL  # the C kernel takes any tile shape and count
        self.eager_seconds = 0.0
        self.compiled = None
        self.failed: Optional[str] = None

    def wants_compile(self, policy: str) -> bool:
        return wants_compile(policy, self.eager_seconds, decided=self.compiled is not None or self.failed is not None)

    def compile(self) -> None:
        """Build (or load from this machine's cache) the C kernel for this window; a failure is said once and
        leaves the eager kernel (same bits)."""
        try:
            self.compiled = native.library(native.check_taps(self.taps))
        except native.NativeKernelError as exc:
            self._give_up(str(exc))

    def call(self, planes: native.Planes, batch: "TileBatch", start: int, count: int) -> torch.Tensor:
        """The sums of tiles start .. start + count - 1 of `batch`, by the compiled kernel."""
        end = start + count
        return native.tile_sums(self.compiled, planes, start, count, batch.rows[start:end], batch.cols[start:end],
                                batch.consts, self.taps_tensor, self.variant_bits)

    def uses_compiled(self, policy: str) -> bool:
        """Whether a call under `policy` runs the compiled kernel, as things stand."""
        return self.compiled is not None and policy != "never"

    def decide(self, policy: str) -> bool:
        """Compile if `policy` says it is time; whether this call runs compiled."""
        with _kernel_lock:
            if self.wants_compile(policy):
                self.compile()
        return self.uses_compiled(policy)

    def eager_sums(self, batch: "TileBatch") -> torch.Tensor:
        """The eager kernel's sums (same bits), its time counted towards 'auto' compiling."""
        start = time.perf_counter()
        out = eager_tile_sums(batch.tiles, batch.rows, batch.cols, batch.consts, self.taps, self.variant)
        self.eager_seconds += time.perf_counter() - start
        return out

    def fail(self, exc: BaseException) -> None:
        """A compiled call failed: said once, then the eager kernel (same bits)."""
        with _kernel_lock:
            if self.compiled is None:
                return
            self._give_up(f"{type(exc).__name__}: {exc}")

    def _give_up(self, reason: str) -> None:
        self.compiled, self.failed = None, reason.splitlines()[0]
        warnings.warn(f"ssim_ray: compiled SSIM kernel failed, using the eager one (same bits): {self.failed}")


@dataclass(eq=False)
class TileBatch:
    """One same-shape pair batch's tiles to sum by the torch path: the tiles and their extents
    (`ssim_ray.metric.tiles.pair_tiles`, `tile_extents`), C1, C2 (and N / (N - 1) for sample covariance) in
    the compute dtype, the window's taps in it (`tiles.taps_in`) and what the tiles compute besides Wang's
    SSIM (`tiles.TileVariant`)."""

    tiles: PairTiles
    rows: torch.Tensor
    cols: torch.Tensor
    consts: torch.Tensor
    taps: List[float]
    variant: TileVariant = WANG


@dataclass(eq=False)
class _Call:
    """One compiled call: `count` tiles of a batch from `start`, read from `planes` (the batch's pixels)."""

    runner: _CompiledTiles
    batch: TileBatch
    planes: native.Planes
    start: int
    count: int

    def run(self) -> Union[torch.Tensor, BaseException]:
        try:
            return self.runner.call(self.planes, self.batch, self.start, self.count)
        except native.NativeKernelError as exc:
            return exc


def _run_calls(calls: List[_Call]) -> List[Union[torch.Tensor, BaseException]]:
    """Every call's sums, in order, from one queue that the pool's threads share (one kernel's calls after
    another's: no thread waits at a batch's end while there is work of the next)."""
    threads = torch.get_num_threads()
    if threads == 1 or len(calls) <= 1:  # on this thread: a hand-over to the pool costs ~0.1 ms a call here
        return [call.run() for call in calls]
    return list(_pool(threads).map(lambda call: call.run(), calls))


def _kernel_planes(tiles: PairTiles) -> Tuple[native.Planes, Tuple[torch.Tensor, torch.Tensor]]:
    """The C kernel's view of a batch's planes, and the tensors it points into (to keep alive): the pixels
    in their own dtype, or float16 / bfloat16 converted (exactly) to the compute dtype first."""
    x, y = tiles.x, tiles.y
    if x.dtype not in native.PIXEL_CODES:
        x, y = x.to(tiles.dtype), y.to(tiles.dtype)
    grid = tiles.grid
    return native.planes_of(x, y, grid.rows, grid.cols, grid.slots, grid.across), (x, y)


def _runner(dtype: torch.dtype, taps: List[float], variant: TileVariant) -> _CompiledTiles:
    with _kernel_lock:
        key = (dtype, tuple(taps), variant)
        if key not in _kernels:
            _kernels[key] = _CompiledTiles(taps, variant, dtype)
        return _kernels[key]


def torch_tile_sums_of(batches: Sequence[TileBatch], *, policy: str) -> List[torch.Tensor]:
    """Each batch's (K,) float64 tile sums by the torch path ((K, 2) with `variant.with_cs`): on CPU the
    runner of (dtype, window, variant, tile shape) under `policy`, the compiled calls of all the batches
    sharing one queue of the pool (MS-SSIM's five scales: one batch each).

    Args:
        batches: The pair batches (`TileBatch`), any mix of shapes and variants.
        policy: 'auto', 'always' or 'never' (checked by the caller); only CPU tensors compile.

    Returns:
        Per batch, the float64 sum of each tile's valid map (maps): the same bits as that batch alone.
    """
    sums: List[Optional[torch.Tensor]] = [None] * len(batches)
    calls: List[_Call] = []
    runners: dict = {}
    kept = []  # the pixels the calls read (converted copies included), alive until they have run
    for index, batch in enumerate(batches):
        if batch.tiles.x.device.type != "cpu":
            sums[index] = eager_tile_sums(batch.tiles, batch.rows, batch.cols, batch.consts, batch.taps, batch.variant)
            continue
        runner = runners[index] = _runner(batch.consts.dtype, batch.taps, batch.variant)
        if not runner.decide(policy):
            sums[index] = runner.eager_sums(batch)
            continue
        planes, pixels = _kernel_planes(batch.tiles)
        kept.append(pixels)
        total = batch.tiles.count
        calls += [_Call(runner, batch, planes, start, min(runner.per_call, total - start))
                  for start in range(0, total, runner.per_call)]
    parts: dict = {}
    for call, result in zip(calls, _run_calls(calls)):
        parts.setdefault(id(call.batch), []).append(result)
    for index, batch in enumerate(batches):
        if sums[index] is not None:
            continue
        results = parts[id(batch)]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is None:
            sums[index] = join_sums(results, batch.tiles.count)
            continue
        runners[index].fail(failed)
        sums[index] = runners[index].eager_sums(batch)
    return sums


def compiled_in_use(dtype: torch.dtype, taps: List[float], *, policy: str, variant: TileVariant = WANG) -> bool:
    """Whether the CPU kernel of (dtype, window, variant) is the compiled one for a call under `policy`.

    After a call with the same policy: whether that call ran compiled (a compile happens as a call starts,
    and a failed compile leaves the eager kernel). Before any call: 'always' will compile on first use.
    """
    with _kernel_lock:
        runner = _kernels.get((dtype, tuple(taps), variant))
    if runner is None or (runner.compiled is None and runner.failed is None):
        return policy == "always"
    return runner.uses_compiled(policy)
