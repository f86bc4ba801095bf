"""The dispatcher's SnapshotPublisher: coalesced sends, never built while a hand-off is under way."""

import asyncio

import pytest

from comfyproxy.services import broadcast as broadcast_module
from comfyproxy.snapshots import SnapshotPublisher


class Sends:
    """Stands in for broadcast_queue_snapshot: counts sends; each waits until released."""

    def __init__(self):
        self.count = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self):
        self.count += 1
        self.started.set()
        await self.release.wait()


@pytest.fixture
def sends(monkeypatch):
    recorder = Sends()
    monkeypatch.setattr(broadcast_module, "broadcast_queue_snapshot", recorder)
    return recorder


async def test_no_snapshot_is_built_while_a_hand_off_is_under_way(sends):
    handoff_idle = asyncio.Event()  # a claim or POST /prompt is in flight
    publisher = SnapshotPublisher(handoff_idle)
    publisher.MAX_DEFER_SECONDS = 30

    publisher.request()
    # Well past the settle delay: still nothing sent.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sends.started.wait(), publisher.SETTLE_SECONDS * 5)
    assert sends.count == 0

    handoff_idle.set()
    await asyncio.wait_for(sends.started.wait(), 5)
    await publisher.aclose()
    assert sends.count == 1


async def test_a_hand_off_that_never_ends_delays_a_snapshot_only_briefly(sends):
    publisher = SnapshotPublisher(asyncio.Event())  # never idle (a ComfyUI that hangs on a POST)

    loop = asyncio.get_running_loop()
    began = loop.time()
    publisher.request()
    await asyncio.wait_for(sends.started.wait(), 5)

    assert loop.time() - began >= publisher.MAX_DEFER_SECONDS
    await publisher.aclose()


async def test_changes_during_a_send_cost_one_more_send(sends):
    idle = asyncio.Event()
    idle.set()
    publisher = SnapshotPublisher(idle)
    sends.release.clear()

    publisher.request()
    await asyncio.wait_for(sends.started.wait(), 5)
    for _ in range(50):
        publisher.request()
    sends.release.set()
    # The publisher stops by itself once nothing is pending any more.
    await asyncio.wait_for(publisher._task, 5)

    assert sends.count == 2


def test_a_few_snapshots_go_back_to_back_then_each_waits_for_its_share():
    publisher = SnapshotPublisher(min_gap_seconds=0.0, share=1 / 3, burst_seconds=0.1)
    clock, waits = 0.0, []
    for _ in range(8):  # sends of 30 ms each, the next one as soon as it is allowed
        wait = publisher._spend(clock, clock + 0.03)
        waits.append(round(wait, 6))
        clock += 0.03 + wait
    # 0.1 s of budget, 20 ms net per send (30 ms taken, 10 ms earned meanwhile): five free.
    assert waits[:5] == [0.0] * 5
    # Then a third of the time: each 30 ms send waits 60 ms, as long as the burst lasts.
    assert waits[5:] == [0.06] * 3


def test_after_a_quiet_spell_the_budget_is_full_again_but_no_fuller():
    publisher = SnapshotPublisher(min_gap_seconds=0.0, share=1 / 3, burst_seconds=0.1)
    for start in (0.0, 0.03, 0.06, 0.09, 0.12, 0.15):
        publisher._spend(start, start + 0.03)
    # An hour later: five sends free again, not 40,000.
    waits = [publisher._spend(3600 + 0.03 * n, 3600 + 0.03 * (n + 1)) for n in range(6)]
    assert [round(wait, 6) for wait in waits] == [0.0] * 5 + [0.06]


def test_in_the_dispatchers_own_process_a_snapshot_is_followed_by_twice_its_time():
    publisher = SnapshotPublisher()  # no burst: a third of the time, from the first send on
    assert round(publisher._spend(10.0, 10.03), 6) == 0.06
