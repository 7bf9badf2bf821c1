"""Which deliveries run next: the most urgent first, batched by type, pipelined where the handler allows.

Deliveries wait in a local heap (RabbitMQ's priority queue orders what it has not delivered yet; the heap orders
what is prefetched). The most urgent one is taken with the other deliveries of its type already here, up to the
type's batch size, so a backlog is embedded in full batches without waiting for more to arrive.

One batch runs at a time, except for pipelined types (image.index and bucket events): up to `depth` of their
batches run side by side, so one batch's fetch and decode overlap the previous batch's forward pass and the one
before's storage writes (the handler keeps its model stage one batch at a time). A further batch starts
beside running ones only when it is full; a smaller one, and a batch of any other type, waits until the running
ones finish. So a high-priority job waits for at most the batches in hand, and nothing behind it starts first.

A suspect (a delivery that an earlier processor did not live to settle: processor/interrupted_runs.py) runs alone
and with nothing beside it, so that if it stops this processor too, nothing else is interrupted with it.

A batch whose run raises is logged and given to `crashed` (the consumer hands back the deliveries it left
unsettled); the scheduler goes on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

Item = TypeVar("Item")

# batches of a pipelined type in flight at once: one being fetched and decoded, one on the model, one being stored
PIPELINE_DEPTH = 3


@dataclass(frozen=True, slots=True)
class Lane:
    """How a job type is scheduled."""

    batch_size: int = 1
    pipelined: bool = False


class Scheduler(Generic[Item]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[None]],
        *,
        lanes: Mapping[str, Lane],
        type_of: Callable[[Item], str],
        priority_of: Callable[[Item], int],
        suspect: Callable[[Item], bool] = lambda _: False,
        depth: int = PIPELINE_DEPTH,
        crashed: Callable[[list[Item]], None] = lambda _: None,
    ) -> None:
        """`crashed`: given the batch whose run raised (the consumer hands back what it left unsettled)."""
        self._run_batch = run_batch
        self._crashed = crashed
        self._lanes = dict(lanes)
        self._type_of = type_of
        self._priority_of = priority_of
        self._suspect = suspect
        self.depth = max(1, depth)
        self._heap: list[tuple[int, int, Item]] = []
        self._sequence = itertools.count()
        self._running: dict[asyncio.Task[None], bool] = {}  # batch -> whether others may run beside it
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.Task[None] | None = None

    def prefetch_for(self, item_types: Iterable[str]) -> int:
        """Deliveries of these types worth holding: a full batch for every batch that may run, and the next one."""
        lanes = [self._lane(item_type) for item_type in item_types] or [Lane()]
        pipelined = any(lane.pipelined for lane in lanes)
        return max(lane.batch_size for lane in lanes) * ((self.depth if pipelined else 1) + 1)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self._heap and not self._running

    @property
    def is_running(self) -> bool:
        return self._loop is not None and not self._loop.done()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._schedule(), name="processor-scheduler")

    def push(self, item: Item) -> None:
        heapq.heappush(self._heap, (-self._priority_of(item), next(self._sequence), item))
        self._wakeup.set()

    async def stop(self) -> int:
        """Start nothing more, let the running batches finish; returns how many waiting items were dropped (unacked,
        the broker delivers them again)."""
        self._stopping = True
        self._wakeup.set()
        if self._loop is not None:
            await asyncio.gather(self._loop, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        dropped = len(self._heap)
        self._heap.clear()
        return dropped

    async def _schedule(self) -> None:
        while not self._stopping:
            if not self._heap or not self._may_start(self._heap[0][2]):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            alone = self._suspect(batch[0])
            task = asyncio.create_task(self._run(batch), name="processor-batch")
            self._running[task] = self._lane(self._type_of(batch[0])).pipelined and not alone

    def _lane(self, item_type: str) -> Lane:
        return self._lanes.get(item_type, Lane())

    def _may_start(self, first: Item) -> bool:
        if not self._running:
            return True
        item_type = self._type_of(first)
        lane = self._lane(item_type)
        if (
            self._suspect(first)
            or not lane.pipelined
            or len(self._running) >= self.depth
            or not all(self._running.values())
        ):
            return False
        return sum(1 for entry in self._heap if self._joins(entry[2], item_type)) >= lane.batch_size

    def _joins(self, item: Item, item_type: str) -> bool:
        """Whether `item` may go into a batch of `item_type` (a suspect never joins one)."""
        return self._type_of(item) == item_type and not self._suspect(item)

    def _take_batch(self) -> list[Item]:
        _, _, first = heapq.heappop(self._heap)
        first_type = self._type_of(first)
        limit = self._lane(first_type).batch_size
        if limit <= 1 or not self._heap or self._suspect(first):
            return [first]
        taken = [entry for entry in sorted(self._heap) if self._joins(entry[2], first_type)][: limit - 1]
        if taken:
            chosen = {id(entry[2]) for entry in taken}
            self._heap = [entry for entry in self._heap if id(entry[2]) not in chosen]
            heapq.heapify(self._heap)
        return [first, *(entry[2] for entry in taken)]

    async def _run(self, batch: list[Item]) -> None:
        try:
            await self._run_batch(batch)
        except Exception:
            log.exception("batch_crashed", size=len(batch), job_type=self._type_of(batch[0]))
            self._crashed(batch)
        finally:
            self._running.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wakeup.set()
