"""Working ahead, in order: a thread pool that runs ahead of its consumer by at most N items and B bytes.

`ordered_map(items, work, threads=, ahead=, ahead_bytes=)` yields `work(item, turn)` for each item, in item
order. At most `ahead` items are submitted and not yet consumed (the pair bound). The byte bound is kept by
reservations made before the bytes exist: `work` calls `turn.reserve(n)` before it makes the n bytes it
will hand back (decoded pixels), and waits until

- its turn has come: turns are granted in item order, so the item the consumer waits for next never waits
  behind later ones (they cannot hold bytes before it), and
- the bytes fit: reserved bytes of items not yet consumed plus n within `ahead_bytes` - or nothing is
  reserved at all, so that one item always proceeds, even alone over the bound.

`turn.settle(actual)` corrects a reservation to what was kept; the consumer's taking an item releases it.
An item that reserves nothing passes its turn when `work` returns or raises.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, Optional, Set, Tuple, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BudgetClosed(Exception):
    """The consumer went away while an item waited for its reservation."""


class _ByteBudget:
    """Bytes held ahead of the consumer; reservations granted in ticket order."""

    def __init__(self, limit: Optional[int]) -> None:
        self._limit = limit
        self._held = 0
        self._next = 0
        self._finished: Set[int] = set()
        self._closed = False
        self._changed = threading.Condition()

    def reserve(self, ticket: int, nbytes: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._closed or (self._next == ticket and self._fits(nbytes)))
            if self._closed:
                raise BudgetClosed()
            self._held += nbytes
            self._finish_turn(ticket)

    def pass_turn(self, ticket: int) -> None:
        with self._changed:
            self._finish_turn(ticket)

    def adjust(self, delta: int) -> None:
        with self._changed:
            self._held += delta
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self._limit is None or self._held == 0 or self._held + nbytes <= self._limit

    def _finish_turn(self, ticket: int) -> None:
        self._finished.add(ticket)
        while self._next in self._finished:
            self._finished.remove(self._next)
            self._next += 1
        self._changed.notify_all()


class Turn:
    """One item's place in the byte budget: `reserve` once before making bytes, `settle` to what was kept."""

    def __init__(self, budget: _ByteBudget, ticket: int) -> None:
        self._budget = budget
        self._ticket = ticket
        self._reserved = False
        self.held = 0

    def reserve(self, nbytes: int) -> None:
        """Wait for this item's turn and for `nbytes` to fit the budget, then hold them.

        Raises:
            BudgetClosed: the consumer went away meanwhile.
            RuntimeError: a second reservation for the same item.
        """
        if self._reserved:
            raise RuntimeError("an item reserves its bytes once")
        self._budget.reserve(self._ticket, nbytes)
        self._reserved, self.held = True, nbytes

    def settle(self, nbytes: int) -> None:
        """Correct the reservation to the `nbytes` this item actually keeps (0 for an item that failed)."""
        if not self._reserved:
            if nbytes:
                raise RuntimeError("settle() of bytes that were never reserved")
            return
        self._budget.adjust(nbytes - self.held)
        self.held = nbytes

    def _done(self) -> None:
        if not self._reserved:
            self._budget.pass_turn(self._ticket)


def ordered_map(
    items: Iterable[Item],
    work: Callable[[Item, Turn], Result],
    *,
    threads: int,
    ahead: int,
    ahead_bytes: Optional[int],
    name: str = "ssim-load",
) -> Iterator[Result]:
    """`work(item, turn)` for each item on a thread pool, yielded in item order, bounded in items and bytes.

    Args:
        items: the inputs, consumed lazily.
        work: called on a pool thread with an item and its `Turn`.
        threads: pool threads.
        ahead: items submitted and not yet consumed, at most.
        ahead_bytes: bytes reserved by items not yet consumed, at most (one item always proceeds); None:
            no byte bound.
        name: the threads' name prefix.

    Returns:
        An iterator of results; closing it early stops the pool (queued items are cancelled, waiting ones
        released).

    Raises:
        Exception: whatever `work` raised, when its item's turn to be yielded comes.

    Example:
        >>> def double(x, turn):
        ...     turn.reserve(10)
        ...     return 2 * x
        >>> list(ordered_map(range(5), double, threads=2, ahead=2, ahead_bytes=15))
        [0, 2, 4, 6, 8]
    """
    budget = _ByteBudget(ahead_bytes)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name) as pool:
        pending: Deque[Tuple[Future, Turn]] = deque()
        try:
            for ticket, item in enumerate(items):
                turn = Turn(budget, ticket)
                pending.append((pool.submit(_run, work, item, turn), turn))
                if len(pending) >= ahead:
                    yield _take(*pending.popleft(), budget)
            while pending:
                yield _take(*pending.popleft(), budget)
        finally:
            budget.close()
            for future, _ in pending:
                future.cancel()


def _run(work: Callable[[Item, Turn], Result], item: Item, turn: Turn) -> Result:
    try:
        return work(item, turn)
    finally:
        turn._done()


def _take(future: Future, turn: Turn, budget: _ByteBudget) -> Result:
    result = future.result()
    budget.adjust(-turn.held)
    return result
