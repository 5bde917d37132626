"""The torch path's kernel runner: eager tile sums, or on CPU a torch.compile'd kernel, per the compile policy.

torch.compile turns the ~300 elementwise ops of a tile batch into fused, vectorised C++ loops (about 10-20x
faster than eager on CPU) but costs seconds to compile, in every process. The caller's `compile` policy says
when to pay: 'auto' compiles once the process has spent COMPILE_AFTER_S seconds in the eager kernel for that
dtype and window (short runs - tests, small jobs, workers that score a handful of pairs - never pay, and a
long run pays at most that much extra), 'always' compiles on first use, 'never' stays eager. The bits are
the same either way (`ssim_ray.metric.tiles`), so the policy is a matter of speed only. Other devices run
the eager kernel.

The compiled kernel is single-threaded (no OpenMP) and torch.get_num_threads() Python threads take chunks
of tiles from a queue: OpenMP's barriers, several per chunk, made the kernel 5x slower with two threads
than with one whenever another process held a core (measured on a shared 2-core machine), while a queue
of independent chunks only loses the share of the busy core. Several batches can share one queue
(`torch_tile_sums_of`: MS-SSIM's scales), so that no thread idles at one batch's end while another has work.

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

from ssim_ray.metric.tiles import (
    WANG,
    Chunk,
    PairTiles,
    TileVariant,
    chunk_buffer,
    eager_tile_sums,
    join_sums,
    tile_sums,
    tiles_per_call,
)

COMPILE_AFTER_S = 3.0
COMPILE_OPTIONS = {"cpp.threads": 1, "cpp_wrapper": True}
_kernels: dict = {}
_kernel_lock = threading.Lock()
_pools: dict = {}
_thread_buffers = threading.local()  # each pool thread's chunk buffers, reused call after call


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

    def __init__(self, taps: List[float], variant: TileVariant = WANG, tile: Tuple[int, int] = (0, 0)) -> None:
        self.taps = taps
        self.variant = variant
        self.per_call = tiles_per_call(*tile)
        self.eager_seconds = 0.0
        self.compiled = None
        self.ready_for_threads: set = set()
        self.failed: Optional[str] = None

    def wants_compile(self, policy: str) -> bool:
        return wants_compile(policy, self.eager_seconds, decided=self.compiled is not None or self.failed is not None)

    def compile(self) -> None:
        import torch._inductor.config  # noqa: F401 - loaded here, not at import: only compiling needs it

        taps, variant = self.taps, self.variant

        def kernel(s, d, rows, cols, consts):
            return tile_sums(s, d, rows, cols, consts, taps, variant)

        # torch.compile keeps its compiled variants on the function's code object, at most 8 of them; every
        # runner's `kernel` shares one code object, so (dtype, window, thread count) variants would add up
        # and hit that limit. A code object of its own per runner keeps them apart.
        kernel.__code__ = kernel.__code__.replace(co_name=f"ssim_tiles_{id(self):x}")
        # One static shape, `per_call` tiles of one size, for every image size and batch: compiled once.
        # (Marking the tile count dynamic instead cost 1.6x the CPU time per tile and as long to compile.)
        # Single-threaded code (the pool runs chunks side by side), wrapped in C++: inductor's default Python
        # binding holds the GIL for the whole kernel, so the pool's threads took turns instead of running
        # together (measured: 2 threads no faster than 1).
        self.compiled = torch.compile(kernel, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)

    def call(self, chunk: Chunk, consts: torch.Tensor) -> torch.Tensor:
        return self.compiled(*chunk, consts)

    def cut_and_call(self, tiles: PairTiles, rows, cols, start: int, consts: torch.Tensor) -> torch.Tensor:
        """Form tiles start .. start + per_call - 1 in this thread's buffers and run the kernel on them."""
        buffers = _thread_buffers.__dict__.setdefault("by_key", {})
        key = (self.per_call, tiles.tile_shape, tiles.dtype)
        if key not in buffers:
            buffers[key] = (chunk_buffer(tiles, self.per_call), chunk_buffer(tiles, self.per_call))
        s, d = tiles.chunk_into(*buffers[key], start, self.per_call)
        end = start + self.per_call
        return self.call((s, d, rows[start:end], cols[start:end]), consts)

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
        """A compiled call failed (e.g. no C++ compiler here): said once, then the eager kernel (same bits)."""
        with _kernel_lock:
            if self.compiled is None:
                return
            self.compiled, self.failed = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
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
    """One compiled call: `per_call` tiles of a batch from `start`, on padded extents."""

    runner: _CompiledTiles
    batch: TileBatch
    rows: torch.Tensor
    cols: torch.Tensor
    start: int

    def run(self) -> Union[torch.Tensor, BaseException]:
        try:
            return self.runner.cut_and_call(self.batch.tiles, self.rows, self.cols, self.start, self.batch.consts)
        except Exception as exc:  # torch._dynamo is imported by then (not at this module's import: ~1.4 s)
            if isinstance(exc, (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)):
                return exc
            raise


def _run_calls(calls: List[_Call]) -> List[Union[torch.Tensor, BaseException]]:
    """Every call's sums, in order: the first call of each kernel not yet run at this thread count on this
    thread, one at a time (torch.compile guards on the thread count and recompiles there), the rest from one
    queue that the pool's threads share (one kernel's calls after another's: no thread waits at a batch's
    end while there is work of the next)."""
    threads = torch.get_num_threads()
    results: dict = {}
    for index, call in enumerate(calls):
        if threads not in call.runner.ready_for_threads:
            with _kernel_lock:
                results[index] = call.run()
                call.runner.ready_for_threads.add(threads)
    rest = [index for index in range(len(calls)) if index not in results]
    if threads == 1 or len(rest) == 1:  # on this thread: a hand-over to the pool costs ~0.1 ms a call here
        results.update((index, calls[index].run()) for index in rest)
    else:
        results.update(zip(rest, _pool(threads).map(lambda index: calls[index].run(), rest)))
    return [results[index] for index in range(len(calls))]


def _runner(dtype: torch.dtype, taps: List[float], variant: TileVariant, tile: Tuple[int, int]) -> _CompiledTiles:
    with _kernel_lock:
        key = (dtype, tuple(taps), variant, tile)
        if key not in _kernels:
            _kernels[key] = _CompiledTiles(taps, variant, tile)
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
    for index, batch in enumerate(batches):
        if batch.tiles.x.device.type != "cpu":
            sums[index] = eager_tile_sums(batch.tiles, batch.rows, batch.cols, batch.consts, batch.taps, batch.variant)
            continue
        grid = batch.tiles.grid
        runner = runners[index] = _runner(batch.consts.dtype, batch.taps, batch.variant, (grid.rows, grid.cols))
        if not runner.decide(policy):
            sums[index] = runner.eager_sums(batch)
            continue
        pad = -batch.tiles.count % runner.per_call  # the last call's empty tiles: extents 0, masked out
        rows, cols = (torch.cat([t, t.new_zeros(pad)]) for t in (batch.rows, batch.cols))
        calls += [_Call(runner, batch, rows, cols, start) for start in range(0, batch.tiles.count, runner.per_call)]
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
    and a failed compile leaves the eager kernel); each tile shape has its own kernel, and a call counts as
    compiled if one of those it ran is. Before any call: 'always' will compile on first use.
    """
    with _kernel_lock:
        runners = [runner for key, runner in _kernels.items() if key[:3] == (dtype, tuple(taps), variant)]
    decided = [runner for runner in runners if runner.compiled is not None or runner.failed is not None]
    if not decided:
        return policy == "always"
    return any(runner.uses_compiled(policy) for runner in decided)
