"""The dispatcher's snapshot child (`comfyproxy.snapshots.SnapshotProcess`): a real child
process on this test's database and Redis, watched through a real queue WebSocket."""

import asyncio
import os

import pytest
from asgiref.sync import sync_to_async
from channels.testing.websocket import WebsocketCommunicator

from comfyproxy.services import queue
from comfyproxy.snapshots import NICENESS, SnapshotProcess
from tests.dispatcher_fixtures import test_database_url
from tests.test_consumers import connected, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}


@pytest.fixture
def snapshots(monkeypatch):
    # The child reads the database and Redis the environment names, as the dispatcher's does.
    monkeypatch.setenv("DATABASE_URL", test_database_url())
    process = SnapshotProcess()
    yield process
    asyncio.run(process.aclose())


@pytest.fixture
def student_socket(student, register_instance):
    register_instance(student, 8189)

    async def connect() -> WebsocketCommunicator:
        communicator, _state_on_connect = await connected(await sync_to_async(session_cookie)(student))
        return communicator

    return connect


def submit(student) -> str:
    return str(queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW}, port=8189).id)


async def frame_showing(communicator: WebsocketCommunicator, task_ids: set[str]) -> dict:
    """The first frame that shows exactly these tasks of the student's (others are skipped)."""
    while True:
        frame = await communicator.receive_json_from(timeout=30)
        if {task["task_id"] for task in frame["tasks"]} == task_ids:
            return frame


async def test_a_change_reaches_the_sockets_through_the_child(student, student_socket, snapshots):
    communicator = await student_socket()
    snapshots.request()  # starts the child, which sends the state as it finds it
    first = await sync_to_async(submit)(student)
    snapshots.request()
    await frame_showing(communicator, {first})

    # Once it runs, every request is a pipe write; the next change reaches the socket too.
    second = await sync_to_async(submit)(student)
    snapshots.request()
    frame = await frame_showing(communicator, {first, second})
    assert [task["position"] for task in frame["tasks"]] == [1, 2]
    # It yields the CPU to the web server and the dispatcher when they need it.
    child_priority = os.getpriority(os.PRIO_PROCESS, snapshots._process.pid)
    assert child_priority == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS
    await communicator.disconnect()


async def test_a_child_that_died_is_started_again_on_the_next_change(student, student_socket, snapshots):
    snapshots.RESTART_SECONDS = 0
    communicator = await student_socket()
    snapshots.request()
    child = snapshots._process
    child.kill()
    await asyncio.to_thread(child.wait, 10)

    task = await sync_to_async(submit)(student)
    snapshots.request()
    await frame_showing(communicator, {task})
    assert snapshots._process is not child
    await communicator.disconnect()


async def test_the_child_sends_what_it_was_asked_for_then_exits_when_the_dispatcher_closes(
    student, student_socket, snapshots
):
    communicator = await student_socket()
    snapshots.request()
    child = snapshots._process
    task = await sync_to_async(submit)(student)
    snapshots.request()
    # Closing its input is also what the dispatcher's death (kill -9 included) does.
    await snapshots.aclose()

    assert child.returncode == 0
    await frame_showing(communicator, {task})
    await communicator.disconnect()
