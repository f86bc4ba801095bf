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


def test_the_pause_after_a_send_leaves_sends_their_share_of_the_time():
    # In the dispatcher's own process: a third, so a 30 ms build is followed by 60 ms.
    assert round(SnapshotPublisher().pause_after(0.03), 6) == 0.06
    # The snapshot child: half.
    assert round(SnapshotPublisher(share=1 / 2).pause_after(0.03), 6) == 0.03
    # The dispatcher asking its child (a byte to a pipe): no pause.
    assert SnapshotPublisher(share=1.0).pause_after(0.03) == 0.0
