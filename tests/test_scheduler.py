"""The consumer's scheduler: urgency, batching, pipelining, stopping (no broker needed: items are plain tuples)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from processor.handlers.bucket_event import BatchOrder
from processor.scheduler import Lane, Scheduler


@dataclass(frozen=True)
class Item:
    kind: str
    priority: int = 0
    name: str = ""


@dataclass
class Recorder:
    """Runs each batch until released; records the order batches started and how many ran at once."""

    started: list[list[str]] = field(default_factory=list)
    running: int = 0
    most: int = 0
    gates: list[asyncio.Event] = field(default_factory=list)
    hold: bool = True

    async def __call__(self, batch: list[Item]) -> None:
        self.started.append([item.name for item in batch])
        self.running += 1
        self.most = max(self.most, self.running)
        gate = asyncio.Event()
        if not self.hold:
            gate.set()
        self.gates.append(gate)
        try:
            await gate.wait()
        finally:
            self.running -= 1

    def release_all(self) -> None:
        self.hold = False
        for gate in self.gates:
            gate.set()


def scheduler(recorder: Recorder, **lanes: Lane) -> Scheduler[Item]:
    return Scheduler(recorder, lanes=lanes, type_of=lambda item: item.kind, priority_of=lambda item: item.priority)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_most_urgent_first_and_batched_by_type():
    recorder = Recorder(hold=False)
    work = scheduler(recorder, index=Lane(batch_size=3), generate=Lane())
    for n in range(4):
        work.push(Item("index", name=f"i{n}"))
    work.push(Item("generate", priority=5, name="g0"))
    work.push(Item("generate", priority=1, name="g1"))
    work.start()
    await settle()
    await work.stop()
    assert recorder.started == [["g0"], ["g1"], ["i0", "i1", "i2"], ["i3"]]


async def test_full_batches_of_a_pipelined_type_run_side_by_side_up_to_the_depth():
    recorder = Recorder()
    work = scheduler(recorder, index=Lane(batch_size=2, pipelined=True))
    for n in range(9):
        work.push(Item("index", name=f"i{n}"))
    work.start()
    await settle()
    assert recorder.started == [["i0", "i1"], ["i2", "i3"], ["i4", "i5"]]  # depth 3; the rest waits
    assert recorder.most == 3
    recorder.gates[0].set()
    await settle()
    assert recorder.started[-1] == ["i6", "i7"]
    recorder.gates[1].set()
    await settle()
    assert len(recorder.started) == 4, "a part batch waits until nothing runs"
    recorder.release_all()
    await settle()
    assert recorder.started[-1] == ["i8"]
    await work.stop()


async def test_other_types_wait_for_the_batches_in_hand_and_block_what_is_behind_them():
    recorder = Recorder()
    work = scheduler(recorder, index=Lane(batch_size=2, pipelined=True), generate=Lane())
    for n in range(2):
        work.push(Item("index", name=f"i{n}"))
    work.start()
    await settle()
    work.push(Item("generate", priority=5, name="g"))
    for n in range(2, 6):
        work.push(Item("index", name=f"i{n}"))
    await settle()
    assert recorder.started == [["i0", "i1"]], "no index batch overtakes the waiting generate job"
    recorder.gates[0].set()
    await settle()
    assert recorder.started[-1] == ["g"]
    assert recorder.running == 1
    recorder.release_all()
    await settle()
    assert recorder.started[2:] == [["i2", "i3"], ["i4", "i5"]]
    await work.stop()


async def test_unpipelined_types_run_one_batch_at_a_time():
    recorder = Recorder()
    work = scheduler(recorder, generate=Lane())
    for n in range(3):
        work.push(Item("generate", name=f"g{n}"))
    work.start()
    await settle()
    assert recorder.started == [["g0"]]
    recorder.release_all()
    await settle()
    assert recorder.most == 1 and len(recorder.started) == 3
    await work.stop()


async def test_stop_lets_running_batches_finish_and_starts_nothing_more():
    recorder = Recorder()
    work = scheduler(recorder, index=Lane(batch_size=2, pipelined=True))
    for n in range(5):
        work.push(Item("index", name=f"i{n}"))
    work.start()
    await settle()
    stopping = asyncio.create_task(work.stop())
    await settle()
    assert not stopping.done(), "stop waits for the batches in hand"
    recorder.release_all()
    assert await stopping == 1  # the part batch left behind, for the broker to deliver again
    assert len(recorder.started) == 2
    assert work.idle


async def test_a_failing_batch_does_not_stop_the_scheduler_and_is_handed_to_crashed():
    done: list[str] = []
    crashed: list[list[str]] = []

    async def run(batch: list[Item]) -> None:
        if batch[0].name == "bad":
            raise RuntimeError("boom")
        done.append(batch[0].name)

    work: Scheduler[Item] = Scheduler(
        run,
        lanes={},
        type_of=lambda item: item.kind,
        priority_of=lambda item: item.priority,
        crashed=lambda batch: crashed.append([item.name for item in batch]),
    )
    work.push(Item("x", priority=1, name="bad"))
    work.push(Item("x", name="good"))
    work.start()
    await settle()
    await work.stop()
    assert done == ["good"]
    assert crashed == [["bad"]]


async def test_batches_that_remove_keep_their_place_among_batches_side_by_side():
    order = BatchOrder()
    events: list[str] = []
    gates = {name: asyncio.Event() for name in ("create-1", "remove-2", "create-3")}

    async def batch(name: str, removes: bool) -> None:
        async with order.turn(removes):
            events.append(f"{name} started")
            await gates[name].wait()
            events.append(f"{name} done")

    first = asyncio.create_task(batch("create-1", False))
    await settle()
    second = asyncio.create_task(batch("remove-2", True))
    third = asyncio.create_task(batch("create-3", False))
    await settle()
    assert events == ["create-1 started"], "the removal waits for the create before it; the create after waits too"
    for gate in gates.values():
        gate.set()
    await asyncio.gather(first, second, third)
    assert events == [
        "create-1 started",
        "create-1 done",
        "remove-2 started",
        "remove-2 done",
        "create-3 started",
        "create-3 done",
    ]


async def test_a_suspect_runs_alone_with_nothing_beside_it():
    """A delivery an earlier processor did not live to settle joins no batch, starts only when nothing runs, and
    nothing starts beside it, not even a pipelined batch; the others then batch as usual."""
    recorder = Recorder()
    work = Scheduler(
        recorder,
        lanes={"index": Lane(batch_size=2, pipelined=True)},
        type_of=lambda item: item.kind,
        priority_of=lambda item: item.priority,
        suspect=lambda item: item.name.startswith("s"),
    )
    for name in ("i0", "s0", "i1", "i2", "i3", "s1", "i4", "i5"):
        work.push(Item("index", name=name))
    work.start()
    await settle()
    assert recorder.started == [["i0", "i1"]]  # s0 joins no batch, and waits for the running one
    recorder.gates[0].set()
    await settle()
    assert recorder.started[1:] == [["s0"]] and recorder.running == 1  # alone, nothing beside it
    recorder.gates[1].set()
    await settle()
    assert recorder.started[2:] == [["i2", "i3"]]  # s1 waits again: it is next in line
    recorder.gates[2].set()
    await settle()
    assert recorder.started[3:] == [["s1"]] and recorder.running == 1
    recorder.gates[3].set()
    await settle()
    assert recorder.started[4:] == [["i4", "i5"]]
    recorder.release_all()
    await settle()
    await work.stop()
