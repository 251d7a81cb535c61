"""Generation slots shared between API keys (appliance.llm.slots), on trio's clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from appliance.llm.slots import FairSlots, share_per_key


def test_a_key_shares_all_but_one_slot_unless_configured() -> None:
    assert share_per_key(4, 0) == 3
    assert share_per_key(1, 0) == 1
    assert share_per_key(4, 2) == 2
    assert share_per_key(4, 9) == 4


async def test_one_key_cannot_take_every_slot_while_another_asks() -> None:
    slots = FairSlots(4, share_per_key(4, 0))
    with trio.fail_after(5):
        for _ in range(3):
            await slots.acquire("greedy")
        async with trio.open_nursery() as nursery:
            fourth = trio.Event()

            async def greedy_fourth() -> None:
                await slots.acquire("greedy")
                fourth.set()

            nursery.start_soon(greedy_fourth)
            await trio.testing.wait_all_tasks_blocked()
            assert not fourth.is_set()  # its share is used up, though a slot is free
            await slots.acquire("other")  # at once: the free slot is not the greedy key's
            assert slots.free == 0
            slots.release("greedy")
            await fourth.wait()
            assert slots.running("greedy") == 3


async def test_a_freed_slot_goes_to_the_key_running_fewest_not_the_first_in_line() -> None:
    slots = FairSlots(2, 2)
    order: list[str] = []
    with trio.fail_after(5):
        await slots.acquire("busy")
        await slots.acquire("busy")
        async with trio.open_nursery() as nursery:

            async def ask(owner: str) -> None:
                await slots.acquire(owner)
                order.append(owner)

            for owner in ("busy", "busy", "quiet"):
                nursery.start_soon(ask, owner)
                await trio.testing.wait_all_tasks_blocked()
            slots.release("busy")
            await trio.testing.wait_all_tasks_blocked()
            # "quiet" asked last but runs nothing: it goes first.
            assert order == ["quiet"]
            slots.release("busy")
            slots.release("quiet")
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["quiet", "busy", "busy"]
    assert slots.running("busy") == 2 and slots.free == 0


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    slots = FairSlots(1, 1)
    with trio.fail_after(5):
        await slots.acquire("a")
        with trio.move_on_after(0.01):
            await slots.acquire("b")
        slots.release("a")
        assert slots.free == 1
        await slots.acquire("c")
        assert slots.running("c") == 1 and slots.running("b") == 0


@pytest.mark.parametrize("parallel", [1, 3])
async def test_many_keys_never_exceed_the_slots(parallel: int) -> None:
    slots = FairSlots(parallel, share_per_key(parallel, 0))
    running = peak = 0

    async def generate(owner: str) -> None:
        nonlocal running, peak
        await slots.acquire(owner)
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.001)
        running -= 1
        slots.release(owner)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(generate, f"key-{n % 4}")
    assert peak <= parallel and slots.free == parallel
